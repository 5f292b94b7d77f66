"""What one eager CPU decoding step costs outside its matrix products: a Qwen2-0.5B-shaped model (random weights)
decodes greedily through zoo's engine (zoo.generation.decode, batch 1, one token per step, eager) with every
projection and the output head replaced by a stub that returns a preallocated output, so what remains is the
per-token overhead (norms, rotary, attention, the KV cache, residual adds, Python, the decoding loop).

    python benchmarks/bench_decode_overhead.py [--dtype bf16] [--quant int8|int4] [--layers 24] [--prompt 64]
                                               [--new 64] [--stub dense|kernel] [--profile]

--quant packs every projection and the tied head as zoo.load(quantize=...) does (quant.py's PackedLinear and
PackedEmbedding), so the packed path's overhead is measured. --stub dense replaces the layers' `dense(layer, x)`
calls themselves (the overhead of the files around the projections); --stub kernel keeps `dense` and its
dispatch, stubbing only the ops torch.ops.zoo_cpu.dense_rows, quant_linear and their _many forms (whoever looks
them up, packet or .default, after the library loaded). The measurement repeats in rounds and keeps the best, as
the machine may be shared. --profile also counts the aten ops one token runs (torch.profiler), the
machine-independent measure of the same overhead.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from zoo.architectures import decoder, layers
from zoo.architectures.kernels import cpu_ext
from zoo.architectures.quant import PACKED, get_scheme, pack_linears, packable_paths
from zoo.architectures.qwen2 import PUBLISHED, Qwen2Config, build

from zoo.generation import Sampling, decode

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model(dtype: torch.dtype, n_layers: int, vocab: int, quant: str | None = None) -> torch.nn.Module:
    """Qwen2-0.5B's shapes, packed by `quant` (a scheme name) if given; the projections' weights are left unwritten
    (the stub never reads them)."""
    c = PUBLISHED["0.5b"]
    c = Qwen2Config(vocab, c.dim, n_layers, c.n_heads, c.n_kv_heads, c.intermediate_size, tie_embeddings=True)
    with torch.device("meta"):
        m = build(c).to(dtype)
        if quant:
            pack_linears(m, get_scheme(quant), packable_paths(m, quant))
    m = m.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    for name, p in m.named_parameters():
        if "proj" not in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * (0.02 if "embed" in name else 1.0))
        elif name.endswith("bias"):
            p.data.zero_()
    for sub in m.modules():  # packed tables and layers: codes and scales that give the float model's magnitudes
        if isinstance(sub, PACKED):
            for name, t in sub.named_buffers(recurse=False):
                if t.dtype.is_floating_point:
                    t.copy_(torch.full(t.shape, 0.02 / 127 if name == "weight_scale" else 0.0))
                else:
                    t.copy_(torch.randint(-100, 100, t.shape, generator=g).to(t.dtype))
    return m


class Outputs:
    """Preallocated outputs, one per (what, shape): what a stubbed product returns."""

    def __init__(self):
        self.made: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        out = self.made.get(key)
        if out is None:
            out = self.made[key] = torch.randn(shape).to(like.dtype) * 0.1
        return out


def stub_dense(outs: Outputs):
    def dense(layer, x):
        n = layer.out_features
        return outs.get((id(layer), x.shape), (*x.shape[:-1], n), x)

    def tied_head(h, embed):
        return outs.get(("head", h.shape), (*h.shape[:-1], embed.num_embeddings), h)

    return {(layers, "dense"): dense, (decoder, "dense"): dense, (decoder, "tied_head"): tied_head}


class StubOp:
    """Stands for a torch op (an OpOverloadPacket) and its .default overload: calls `fn`."""

    def __init__(self, fn):
        self.fn, self.default = fn, self

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def stub_kernel(outs: Outputs):
    lib = cpu_ext.library()
    if lib is None:
        raise SystemExit("zoo's CPU kernels are unavailable here: --stub kernel needs them")

    def dense_rows(rows, weight, bias=None):
        return outs.get((weight.data_ptr(), rows.shape), (rows.shape[0], weight.shape[0]), rows)

    def quant_linear(x, q, scale, zero, bias, bits, act_quant=False):
        return outs.get((q.data_ptr(), x.shape), (*x.shape[:-1], q.shape[0]), x)

    def dense_rows_many(rows, weights, biases):
        return [dense_rows(rows, w) for w in weights]

    def quant_linear_many(x, qs, scales, zeros, biases, bits, act_quant=False):
        return [quant_linear(x, q, None, None, None, bits) for q in qs]

    # the ops' attributes of the namespace: what a later lookup (torch.ops.zoo_cpu.X, cached or not) finds
    stubs = {"dense_rows": dense_rows, "quant_linear": quant_linear, "dense_rows_many": dense_rows_many,
             "quant_linear_many": quant_linear_many}
    return {(lib, name): StubOp(fn) for name, fn in stubs.items() if hasattr(lib, name)}


def run(m, prompt: int, new: int) -> tuple[float, float]:
    """Seconds per decoded token (the prompt's pass excluded): wall time, and the CPU time of this thread (what a
    shared machine's other work changes least: time spent descheduled is not counted)."""
    ids = [[int(t) for t in torch.randint(0, 1000, (prompt,), generator=torch.Generator().manual_seed(1))]]
    steps = decode(m, ids, new + 1, Sampling(), {m.embed.num_embeddings}, compile=False)  # (a stop never drawn)
    next(steps)  # the prefill's token
    start, cpu = time.perf_counter(), time.thread_time()
    count = sum(1 for _ in steps)
    return (time.perf_counter() - start) / count, (time.thread_time() - cpu) / count


def op_counts(m, prompt: int, new: int) -> Counter:
    """aten ops per decoded token, by name (torch.profiler over the whole decode, the prefill's ops removed)."""
    from torch.profiler import ProfilerActivity, profile

    def count(n_new):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(m, prompt, n_new)
        return Counter(e.key for e in prof.key_averages() for _ in range(e.count) if e.key.startswith(("aten::",
                                                                                                      "zoo_cpu::")))

    long, short = count(new), count(1)
    return Counter({k: (long[k] - short[k]) / (new - 1) for k in long if long[k] != short[k]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--quant", choices=("int8", "int4"), default=None)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stub", choices=("dense", "kernel"), default="dense")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    m = model(DTYPES[args.dtype], args.layers, args.vocab, args.quant)
    outs = Outputs()
    patches = (stub_dense if args.stub == "dense" else stub_kernel)(outs)
    saved = {key: getattr(*key) for key in patches}  # (the library loaded: its ops' attributes exist)
    for (mod, name), fn in patches.items():
        setattr(mod, name, fn)
    try:
        run(m, args.prompt, 4)  # warm up (the library's first load, allocations)
        times = [run(m, args.prompt, args.new) for _ in range(args.rounds)]
        wall, cpu = sorted(t[0] for t in times), sorted(t[1] for t in times)
        what = args.dtype + (f" {args.quant}" if args.quant else "")
        print(f"{args.layers} layers, {what}, stub {args.stub}: {wall[0] * 1e3:.2f} ms/token best, "
              f"{wall[len(wall) // 2] * 1e3:.2f} median of {args.rounds}; this thread's CPU time {cpu[0] * 1e3:.2f} "
              f"best, {cpu[len(cpu) // 2] * 1e3:.2f} median ({args.new} tokens after a {args.prompt}-token prompt)")
        if args.profile:
            ops = op_counts(m, args.prompt, min(args.new, 16))
            print(f"aten/zoo ops per token: {sum(ops.values()):.0f}")
            for name, n in ops.most_common(25):
                print(f"  {n:7.1f}  {name}")
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


if __name__ == "__main__":
    main()
