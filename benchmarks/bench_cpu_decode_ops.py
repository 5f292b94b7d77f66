"""The small ops of one eager CPU decoding step, zoo's C++ op (csrc/decode_ops.cpp) against the PyTorch reference
it replaces, per call in microseconds (the public function each way, so the routing's Python is counted too), at
a Qwen2-0.5B layer's shapes (hidden 896, 14 query / 2 key-value heads of 64, MLP 4864), batch 1, bf16.

    python benchmarks/bench_cpu_decode_ops.py [--dtype bf16] [--cache 112] [--repeat 2000]

The two forms alternate in rounds and the best round of each is kept, so a busy machine shifts both alike.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from zoo.architectures.kernels import cpu_ext, dispatch, matvec
from zoo.architectures.kernels.rmsnorm import rms_norm
from zoo.architectures.kernels.rotary import apply_rotary_pair
from zoo.architectures.kernels.swiglu import silu_mul

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def per_call_us(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def attention(q, k, v):
    y = matvec.cpu_one_query_attention(q, k, v, None)
    return y if y is not None else F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--cache", type=int, default=112, help="cached positions the query attends to")
    parser.add_argument("--repeat", type=int, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lib = cpu_ext.library()
    if lib is None:
        raise SystemExit("zoo's CPU kernels are unavailable here")
    dt = DTYPES[args.dtype]
    x, w = torch.randn(1, 1, 896).to(dt), torch.randn(896).to(dt)
    q = torch.randn(1, 1, 14 * 64).to(dt).view(1, 1, 14, 64).transpose(1, 2)
    k = torch.randn(1, 1, 2 * 64).to(dt).view(1, 1, 2, 64).transpose(1, 2)
    cos, sin = torch.randn(1, 1, 64).to(dt), torch.randn(1, 1, 64).to(dt)
    gate, up = torch.randn(1, 1, 4864).to(dt), torch.randn(1, 1, 4864).to(dt)
    kc = torch.randn(1, 2, 4096, 64).to(dt)[:, :, : args.cache]
    vc = torch.randn(1, 2, 4096, 64).to(dt)[:, :, : args.cache]
    cases = {
        "rms_norm [1, 1, 896]": lambda: rms_norm(x, w, 1e-6),
        "rotary q [1, 14, 1, 64] + k [1, 2, 1, 64]": lambda: apply_rotary_pair(q, k, cos, sin),
        "silu_mul [1, 1, 4864]": lambda: silu_mul(gate, up),
        f"one-query attention, 14/2 heads, {args.cache} cached": lambda: attention(q[:, :, :1], kc, vc),
    }
    best: dict[tuple[str, bool], float] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for on in (True, False):
                dispatch._DECODE_LIB[:] = [lib if on else None]
                for name, fn in cases.items():
                    us = per_call_us(fn, args.repeat)
                    best[name, on] = min(best.get((name, on), us), us)
    print(f"| op ({args.dtype}) | reference us | C++ us | speed-up |\n|---|---|---|---|")
    for name in cases:
        ref, cpp = best[name, False], best[name, True]
        print(f"| {name} | {ref:.1f} | {cpp:.1f} | {ref / cpp:.1f}x |")


if __name__ == "__main__":
    main()
