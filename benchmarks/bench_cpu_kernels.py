"""GB/s of weights read by the dense CPU kernels (architectures/kernels/cpu_ext.py, csrc/dense.cpp) against torch's
F.linear and a plain read, per Qwen2-0.5B shape, at the instruction set ATen runs at (ATEN_CPU_CAPABILITY=avx2
forces the AVX2 build on an AVX-512 machine), and prefill of 64 tokens through every layer shape.

    python -m benchmarks.bench_cpu_kernels [--threads 2] [--rows 1] [--dtype bf16] [--seconds 0.5] [--prefill]
                                           [--between-ops]

Each shape is timed over enough distinct copies of its weight to exceed the caches (a decoder's layers are
distinct weights streamed from memory), so GB/s is DRAM bandwidth, as in decoding. "plain read" is torch.sum over the
same bytes (as fp32) with the same threads, one sequential stream per thread. Every figure is the best single call
(the machine may be shared: another process only ever adds time), so compare ratios within one run.

--between-ops: microseconds per call of each projection of a layer, called back to back and with a few small aten
ops between the calls, as in a decoder (an RMSNorm's worth): a kernel slower in the model than alone shows here
(threads woken per call, caches refilled).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine

SHAPES = {  # Qwen2-0.5B: name -> (N, K)
    "q/o 896x896": (896, 896),
    "k/v 128x896": (128, 896),
    "gate/up 4864x896": (4864, 896),
    "down 896x4864": (896, 4864),
    "head 151936x896": (151936, 896),
}
LAYER = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]  # q k v o gate up down
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fns: list, seconds: float) -> list[float]:
    """Seconds per call of each function: the best of interleaved repetitions (noise from other processes on a
    shared machine only ever adds time), repeated for about `seconds` in all."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or best[0] == float("inf"):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def copies(n: int, k: int, dtype: torch.dtype, total: int = 256 << 20) -> list[torch.Tensor]:
    """Distinct weights of one shape totalling `total` bytes: more than the caches hold."""
    return [torch.randn(n, k).to(dtype) for _ in range(max(1, total // (n * k * dtype.itemsize)))]


def per_call(fns: list, copies_: int, seconds: float) -> list[float]:
    """Seconds per call of each fns[i](c) (c: which copy of the weight), the best single call over interleaved
    repetitions for about `seconds`: each call reads a weight last touched `copies_` calls ago (from memory), and
    timing calls one by one keeps a preemption by another process (the machine may be shared) to the call it hit."""
    best = [float("inf")] * len(fns)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or best[0] == float("inf"):
        for i, fn in enumerate(fns):
            for c in range(copies_):
                t0 = time.perf_counter()
                fn(c)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def decode_rows(lib, dtype: torch.dtype, rows: int, seconds: float) -> None:
    print(f"{'shape':<18} {'plain read':>10} {'F.linear':>9} {'zoo_cpu':>8}   (GB/s of weights, best call)"
          f"   zoo_cpu us/call, x plain, x F.linear")
    for name, (n, k) in SHAPES.items():
        ws = copies(n, k, dtype)
        x = torch.randn(rows, k).to(dtype)
        size = n * k * dtype.itemsize
        flats = [torch.ones(size // 4) for _ in ws]  # the same bytes as fp32, summed

        fns = [lambda c: flats[c].sum(), lambda c: F.linear(x, ws[c])]  # noqa: B023 (called within this iteration)
        if lib is not None:
            fns.append(lambda c: lib.dense_rows(x, ws[c]))  # noqa: B023
        times = per_call(fns, len(ws), seconds)
        speeds = [size / 1e9 / t for t in times] + ([] if lib is not None else [float("nan")])
        ratios = (f"   {times[2] * 1e6:8.1f} us, {times[0] / times[2]:.2f}x, {times[1] / times[2]:.2f}x"
                  if lib is not None else "")
        print(f"{name:<18} {speeds[0]:10.1f} {speeds[1]:9.1f} {speeds[2]:8.1f}{ratios}")


def prefill(lib, dtype: torch.dtype, tokens: int, seconds: float) -> None:
    """One layer's seven projections for `tokens` rows, torch's F.linear against zoo_cpu.dense_widened."""
    ws = [torch.randn(n, k).to(dtype) for n, k in LAYER]
    xs = {k: torch.randn(tokens, k).to(dtype) for _, k in LAYER}

    def run(op):
        return lambda: [op(xs[w.shape[1]], w) for w in ws]

    names = ["F.linear"] + (["zoo_cpu.dense_widened", "zoo_cpu.dense_rows"] if lib is not None else [])
    fns = [run(F.linear)] + ([run(lib.dense_widened), run(lib.dense_rows)] if lib is not None else [])
    times = timed(fns, seconds)
    print(f"prefill {tokens} tokens through one layer's projections: "
          + ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in zip(names, times)))


def between_ops(lib, dtype: torch.dtype, rows: int, seconds: float) -> None:
    """Per-call time of one layer's projections (distinct weights per layer, 24 layers: streamed from memory)
    back to back, and with an RMSNorm's worth of small aten ops before each call."""
    layers = [[torch.randn(n, k).to(dtype) for n, k in LAYER] for _ in range(24)]
    xs = {k: torch.randn(rows, k).to(dtype) for _, k in LAYER}
    gain = torch.ones(896, dtype=dtype)

    def small_ops(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * gain

    def run(with_ops: bool, spent: list[list[float]]) -> None:
        for ws in layers:
            for i, w in enumerate(ws):
                if with_ops:
                    small_ops(xs[896])
                t0 = time.perf_counter()
                lib.dense_rows(xs[w.shape[1]], w)
                spent[i].append(time.perf_counter() - t0)

    spent = {False: [[] for _ in LAYER], True: [[] for _ in LAYER]}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds * 4:
        for with_ops in (False, True):
            run(with_ops, spent[with_ops])
    names = ["q", "k", "v", "o", "gate", "up", "down"]
    for with_ops, label in ((False, "back to back"), (True, "between ops")):
        print(f"us per call, {label:<12} (best / median): "
              + ", ".join(f"{n} {min(t) * 1e6:.0f}/{statistics.median(t) * 1e6:.0f}"
                          for n, t in zip(names, spent[with_ops])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1, help="rows of x (decode: 1 per sequence)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    parser.add_argument("--prefill", type=int, default=64, help="tokens of the prefill measurement (0: skip)")
    parser.add_argument("--between-ops", action="store_true", help="per-call time with small ops between calls")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from zoo.architectures.kernels import cpu_ext

    lib = cpu_ext.library()
    features = lib.features() if lib is not None else "unavailable"
    print(machine())
    print(f"zoo_cpu build: {lib.build_isa() if lib is not None else 'none'} ({features or 'no extra features'}), "
          f"{args.dtype}, {args.rows} row(s), {args.threads} threads")
    with torch.inference_mode():
        decode_rows(lib, DTYPES[args.dtype], args.rows, args.seconds)
        if args.prefill:
            prefill(lib, DTYPES[args.dtype], args.prefill, args.seconds)
        if args.between_ops and lib is not None:
            between_ops(lib, DTYPES[args.dtype], args.rows, args.seconds)


if __name__ == "__main__":
    main()
