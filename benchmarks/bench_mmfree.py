"""MatMul-free LM decoding, latent and packed ternary weights, next to a Qwen2 of similar size.

    python benchmarks/bench_mmfree.py --size 370m                       # CPU: memory and decode tokens/s
    python benchmarks/bench_mmfree.py --size 370m --device cuda --kernels --write   # GPU, kernel timings too
    python benchmarks/bench_mmfree.py --size tiny --new-tokens 8        # a smoke run in seconds
    python benchmarks/bench_mmfree.py --memory                          # checkpoint sizes only, instant

Random weights in the published shapes (nothing is downloaded): MatMul-free LM 370M / 1.3B / 2.7B with its
16-bit latent weights ("latent": ternarised on every call, as the published model runs) and with the same model's
ternary codes packed 2 bits each ("packed"); and the Qwen2 of the nearest size (0.5B next to 370M, 1.5B next to
1.3B and 2.7B). For each: bytes of weights held (parameters and buffers: what the checkpoint stores), the
generation state after the run, and greedy decode tokens/s (batch 1, best of 2), plus peak CUDA memory on a GPU.
The "fp16 checkpoint" row is the published file: the latent weights at 2 bytes each.
--kernels (CUDA only) times the fused Triton BitLinear and HGRN kernels against their PyTorch references.
--write puts the tables into BENCHMARKS.md (section "mmfree").
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_ms, machine, random_model, sync, update_section  # noqa: E402
from zoo.architectures import mmfree, qwen2  # noqa: E402

SIZES = {  # ours -> (MMfree config, Qwen2 config of similar size, its name)
    "tiny": (mmfree.MMfreeConfig(4096, 256, 6), qwen2.TINY_STDLIB, "qwen2-tiny-stdlib shape"),
    "370m": (mmfree.PUBLISHED["370m"][1], qwen2.PUBLISHED["0.5b"], "Qwen2-0.5B shape"),
    "1.3b": (mmfree.PUBLISHED["1.3b"][1], qwen2.PUBLISHED["1.5b"], "Qwen2-1.5B shape"),
    "2.7b": (mmfree.PUBLISHED["2.7b"][1], qwen2.PUBLISHED["1.5b"], "Qwen2-1.5B shape"),
}


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, n_new: int) -> tuple[float, object]:
    """Greedy tokens/s through the generation protocol (new_state, prompt, one token at a time), best of 2."""
    best, state = float("inf"), None
    for _ in range(3):  # the first is a warm-up
        sync(prompt.device)
        t = time.perf_counter()
        state = model.new_state(prompt.shape[0], prompt.shape[1] + n_new)
        nxt = model(prompt, state, last_only=True)[:, -1].argmax(-1)
        for _ in range(n_new - 1):
            nxt = model(nxt[:, None], state, last_only=True)[:, -1].argmax(-1)
        sync(prompt.device)
        best = min(best, time.perf_counter() - t)
    return n_new / best, state


def kernel_rows(c: mmfree.MMfreeConfig, dtype: torch.dtype) -> list[str]:
    """Triton kernels against their references at this model's shapes (CUDA only)."""
    from zoo.architectures.kernels.bitlinear import bitlinear_reference
    from zoo.architectures.kernels.bitlinear_triton import bitlinear_triton
    from zoo.architectures.kernels.hgrn import hgrn_scan
    from zoo.architectures.kernels.hgrn_triton import hgrn_triton
    from zoo.architectures.quant import pack_ternary, ternarize, unpack_ternary

    rows = []
    dev = "cuda"
    for name, (k, n) in {"i/f/g/o_proj": (c.dim, c.dim), "gate_up_proj": (c.dim, 2 * c.intermediate_size),
                         "down_proj": (c.intermediate_size, c.dim), "lm_head": (c.dim, c.vocab_size)}.items():
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        codes, scale = ternarize(w)
        packed, g = pack_ternary(codes), torch.ones(k, device=dev, dtype=dtype)
        for m in (1, 512):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            fused = cuda_ms(partial(bitlinear_triton, x, g, 1e-6, packed, scale))
            ref = cuda_ms(lambda x=x, g=g, k=k, packed=packed, scale=scale: bitlinear_reference(
                x, g, 1e-6, unpack_ternary(packed, k, x.dtype), scale))
            dense = cuda_ms(partial(torch.nn.functional.linear, x, w))
            rows.append(f"| BitLinear {name} {m}x{k} -> {n} | {fused:.3f} | {ref:.3f} | {dense:.3f} | "
                        f"{ref / fused:.2f} |")
    for t in (1, 2048):
        i = torch.randn(1, t, c.dim, device=dev, dtype=dtype)
        f = torch.rand(1, t, c.dim, device=dev, dtype=dtype)
        h = torch.zeros(1, c.dim, device=dev)
        fused = cuda_ms(partial(hgrn_triton, i, f, h))
        ref = cuda_ms(partial(hgrn_scan, i, f, h))
        rows.append(f"| HGRN recurrence T={t}, D={c.dim} | {fused:.3f} | {ref:.3f} (scan) | - | "
                    f"{ref / fused:.2f} |")
    return rows


def checkpoint_bytes(c: mmfree.MMfreeConfig) -> tuple[int, int]:
    """(fp16 latent checkpoint, packed checkpoint) bytes from the shapes alone (meta build, nothing allocated):
    packed stores each BitLinear weight as uint8 [out, in / 4] plus an fp32 scale, the rest in 16 bits."""
    with torch.device("meta"):
        model = mmfree.build(c)
    latent = sum(t.numel() * 2 for t in model.state_dict().values())
    packed = latent
    for m in model.modules():
        if isinstance(m, mmfree.BitLinear):
            out_f, in_f = m.linear.weight.shape
            packed += out_f * -(-in_f // 4) + 4 - out_f * in_f * 2
    return latent, packed


def memory_table() -> list[str]:
    """Checkpoint bytes of every published size, latent vs packed, next to the Qwen2 of similar size (bf16)."""
    rows = ["| model | fp16 latent checkpoint (MiB) | packed ternary (MiB) | packed / fp16 | Qwen2 of similar size, "
            "bf16 (MiB) |", "|---|---:|---:|---:|---:|"]
    for size in ("370m", "1.3b", "2.7b"):
        c, qc, qname = SIZES[size]
        latent, packed = checkpoint_bytes(c)
        rows.append(f"| MatMul-free {size} | {latent / 2**20:,.0f} | {packed / 2**20:,.0f} | {packed / latent:.3f} | "
                    f"{qwen2.count_params(qc) * 2 / 2**20:,.0f} ({qname}) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="370m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="latent weight dtype (default: bfloat16 on CPU, float16 on GPU)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--kernels", action="store_true", help="time the Triton kernels too (CUDA only)")
    ap.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    ap.add_argument("--memory", action="store_true", help="only the checkpoint sizes of every published size "
                    "(from the shapes; instant)")
    args = ap.parse_args()
    if args.memory:
        print("\n".join(memory_table()))
        return
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "bfloat16"))
    mm_config, qwen_config, qwen_name = SIZES[args.size]
    dev = torch.device(args.device)
    prompt = torch.randint(3, 4000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(dev)

    rows, results = [], {}
    fp16_file = mmfree.count_params(mm_config) * 2
    rows.append(f"| MatMul-free {args.size}, fp16 checkpoint (published file) | {fp16_file / 2**20:,.1f} | 1.00 "
                "| - | - | - |")
    for kind in ("latent", "packed", "qwen2"):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if kind == "qwen2":
            model = random_model(qwen2.build, replace(qwen_config, max_seq_len=4096), dtype, args.device)
        else:
            model = random_model(mmfree.build, mm_config, dtype, args.device)
            if kind == "packed":
                model.pack_()
        weights = tensor_bytes(model)
        speed, state = decode(model, prompt, args.new_tokens)
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:,.1f}" if dev.type == "cuda" else "-"
        label = f"{qwen_name}, {str(dtype).removeprefix('torch.')}" if kind == "qwen2" else (
            f"MatMul-free {args.size}, {kind}" + (f" {str(dtype).removeprefix('torch.')}" if kind == "latent" else
                                                  " ternary (2 bits) + 16-bit embedding and norms"))
        rows.append(f"| {label} | {weights / 2**20:,.1f} | {weights / fp16_file:.2f} | {state.nbytes() / 2**10:,.1f} "
                    f"| {speed:.2f} | {peak} |")
        results[kind] = speed
        print(rows[-1], flush=True)
        del model, state

    lines = [
        f"## MatMul-free LM {args.size}: latent vs packed ternary weights, next to a {qwen_name}",
        "",
        f"Machine: {machine()}.  ",
        f"Random weights in the published shapes; prompt {args.prompt_tokens} tokens, greedy decode "
        f"{args.new_tokens} tokens, batch 1, best of 2.  ",
        f"Command: `python benchmarks/bench_mmfree.py --size {args.size} --device {args.device}"
        f"{' --kernels' if args.kernels else ''} --write`",
        "",
        "| model | weights held (MiB) | vs fp16 checkpoint | state after the run (KiB) | decode (tok/s) | "
        "peak CUDA (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Checkpoint sizes of the published models (from their shapes: `python benchmarks/bench_mmfree.py --memory`):",
        "",
        *memory_table(),
    ]
    if args.kernels:
        if dev.type != "cuda":
            raise SystemExit("--kernels needs --device cuda")
        lines += ["", "Kernels (median ms of 20; reference = the PyTorch path the dispatch runs off-GPU, "
                  "dense = an fp16 F.linear on the unquantised weight):", "",
                  "| kernel | Triton (ms) | reference (ms) | dense (ms) | reference / Triton |",
                  "|---|---:|---:|---:|---:|", *kernel_rows(mm_config, dtype)]
    print("\n".join(lines))
    if args.write:
        update_section("mmfree", "\n".join(lines))


if __name__ == "__main__":
    main()
