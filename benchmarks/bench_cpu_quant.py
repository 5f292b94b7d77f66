"""Int8 / int4 linear on CPU: zoo's C++ kernel (zoo_cpu::quant_linear, architectures/kernels/csrc/quant_linear.cpp)
weight-only ("zoo") and with activation-quantised integer dot products ("zoo act", what ZOO_QUANT_ACTIVATIONS=1,
the default, runs: the few-rows kernel, and for more rows the AVX2 / AVX-512 builds' integer GEMM), against aten's
int8 / int4 kernels, the scheme's reference (dequantise, then F.linear) and a plain read, on Qwen2-0.5B's shapes,
in the instruction set ATen runs at (ATEN_CPU_CAPABILITY=avx2 runs the AVX2 build on an AVX-512 machine).

    python benchmarks/bench_cpu_quant.py                      # decode (1 row): GB/s of weight bytes read
    python benchmarks/bench_cpu_quant.py --rows 64            # prefill: ms per product
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_cpu_quant.py
    python benchmarks/bench_cpu_quant.py --write              # into BENCHMARKS.md, section "cpu-quant-<ISA>"
    python benchmarks/bench_cpu_quant.py --step               # one decode step's products, as the model calls them

--step: the activation-quantised products of one decode token of Qwen2-0.5B as its int8 / int4 model calls them
(24 layers' q, k, v, o, gate, up, down in that order, each layer's own weights, so every call reads from memory,
then the int8 tied head; one bf16 row), ms per token per projection summed over the layers, best of --repeats
steps per projection and for the whole step (per-call costs included: staging and quantising x, the threads).

Each shape is held in enough copies (--mib of codes in all) that every call reads from memory, not the cache, as a
decode step does; GB/s counts the codes and scales (and zero points) a kernel reads, best of --repeats passes,
the cells of a shape timed in turn within each pass (so a busy machine slows them alike: compare within a row).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, seconds, update_section  # noqa: E402

SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)]  # q/o, k/v, gate/up, down, head


def nbytes(t: dict) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


def run(args) -> str:
    import torch
    import torch.nn.functional as F
    from zoo.architectures.kernels import cpu_ext
    from zoo.architectures.kernels.dequant_matmul import int4pack_mm_cpu
    from zoo.architectures.quant import get_scheme, to_int4pack_cpu

    torch.set_num_threads(args.threads)
    ops = cpu_ext.library()
    if ops is None:
        raise SystemExit("zoo's CPU kernels are unavailable here (no C++ compiler, or ZOO_CPU_KERNELS=0)")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    lines = [f"Machine: {machine()}; {args.rows} row(s) of {args.dtype} activations, best of {args.repeats}",
             "", "| shape | plain read (sum) | dense F.linear | int8 aten | int8 zoo | int8 zoo act | int8 reference "
             "| int4 aten | int4 zoo | int4 zoo act | int4 reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    unit = "GB/s" if args.rows <= 8 else "ms"

    def measure(n: int, k: int) -> list[float | None]:
        """One shape's cells (a function: the timed closures bind its locals)."""
        copies = max(1, args.mib * 2**20 // (n * k))
        w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
        x = torch.randn(args.rows, k, generator=gen).to(dtype)
        i8 = get_scheme("int8-row").pack(w)
        i4 = get_scheme("int4-group128").pack(w)
        i8s = [{name: v.clone() for name, v in i8.items()} for _ in range(copies)]
        i4s = [{name: v.clone() for name, v in i4.items()} for _ in range(copies)]
        dense = [w.clone() for _ in range(copies)]

        cells: list[tuple | None] = [(lambda: [d.sum() for d in dense], w.numel() * w.element_size()),
                                     (lambda: [F.linear(x, d) for d in dense], w.numel() * w.element_size())]
        if dtype != torch.float32 and args.rows <= 64:
            cells.append((lambda: [torch._weight_int8pack_mm(x, t["weight"], t["weight_scale"]) for t in i8s],
                          nbytes(i8)))
        else:
            cells.append(None)
        for on in (False, True):
            cells.append((lambda on=on: [ops.quant_linear(x, t["weight"], t["weight_scale"], None, None, 8, on)
                                         for t in i8s], nbytes(i8)))
        cells.append((lambda: [F.linear(x, get_scheme("int8-row").unpack(t, dtype)) for t in i8s], nbytes(i8)))
        packs = [to_int4pack_cpu(t["weight"], t["weight_scale"], t["weight_zero"], dtype) for t in i4s[:1]]
        if packs[0] is not None and dtype != torch.float32:
            packs += [(p.clone(), s.clone()) for p, s in packs * (copies - 1)]
            cells.append((lambda: [int4pack_mm_cpu(x, p, s) for p, s in packs], nbytes(i4)))
        else:
            cells.append(None)
        for on in (False, True):
            cells.append((lambda on=on: [ops.quant_linear(x, t["weight"], t["weight_scale"], t["weight_zero"], None,
                                                          4, on) for t in i4s], nbytes(i4)))
        cells.append((lambda: [F.linear(x, get_scheme("int4-group128").unpack(t, dtype)) for t in i4s], nbytes(i4)))
        best = [float("inf")] * len(cells)
        for cell in cells:
            if cell is not None:
                cell[0]()  # warm
        for _ in range(args.repeats):  # the cells in turn within each pass: a busy machine slows them alike
            for i, cell in enumerate(cells):
                if cell is not None:
                    best[i] = min(best[i], seconds(cell[0]) / copies)
        return [None if cell is None else cell[1] / b / 1e9 if unit == "GB/s" else b * 1e3
                for cell, b in zip(cells, best)]

    for n, k in SHAPES:
        cells = measure(n, k)
        row = f"| {n}x{k} | " + " | ".join("-" if c is None else f"{c:.1f} {unit}" if unit == "GB/s" else
                                            f"{c:.2f} ms" for c in cells) + " |"
        lines.append(row)
        print(row, flush=True)
    return "\n".join(lines)


def step(args) -> str:
    """--step: ms per decode token of each projection (summed over the layers) and of the whole step."""
    import time

    import torch
    from zoo.architectures.kernels import cpu_ext
    from zoo.architectures.quant import get_scheme

    torch.set_num_threads(args.threads)
    ops = cpu_ext.library()
    if ops is None:
        raise SystemExit("zoo's CPU kernels are unavailable here (no C++ compiler, or ZOO_CPU_KERNELS=0)")
    gen = torch.Generator().manual_seed(0)
    dim, hidden, kv, vocab = 896, 4864, 128, 151936
    proj = [("q", dim, dim), ("k", kv, dim), ("v", kv, dim), ("o", dim, dim), ("gate", hidden, dim),
            ("up", hidden, dim), ("down", dim, hidden)]
    head = get_scheme("int8-row").pack((torch.randn(vocab, dim, generator=gen) * 0.02).to(torch.bfloat16))
    xs = {k: torch.randn(args.rows, k, generator=gen).to(torch.bfloat16) for k in (dim, hidden)}
    names = [p[0] for p in proj] + ["head", "step"]
    lines = [f"Machine: {machine()}; {args.rows} row(s) of bf16, {args.layers} layers, ms per token, best of "
             f"{args.repeats} steps", "", "| weights | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    print("\n".join(lines), flush=True)
    for scheme, bits in (("int8-row", 8), ("int4-group128", 4)):
        layers = [[(nm, k, get_scheme(scheme).pack((torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)))
                   for nm, n, k in proj] for _ in range(args.layers)]
        best = dict.fromkeys(names, float("inf"))
        for _ in range(args.repeats + 1):  # the first step warms
            spent = dict.fromkeys(names, 0)
            start = time.perf_counter_ns()
            for layer in layers:
                for nm, k, t in layer:
                    t0 = time.perf_counter_ns()
                    ops.quant_linear(xs[k], t["weight"], t["weight_scale"], t.get("weight_zero"), None, bits, True)
                    spent[nm] += time.perf_counter_ns() - t0
            t0 = time.perf_counter_ns()
            ops.quant_linear(xs[dim], head["weight"], head["weight_scale"], None, None, 8, True)
            spent["head"] = time.perf_counter_ns() - t0
            spent["step"] = time.perf_counter_ns() - start
            best = {nm: min(best[nm], spent[nm] / 1e6) for nm in names}
        row = f"| {scheme} (head int8-row) | " + " | ".join(f"{best[nm]:.2f}" for nm in names) + " |"
        lines.append(row)
        print(row, flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1, help="rows of activations (1: decode; 64: a prefill)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256, help="MiB of int8 codes per shape (copies beat the cache)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--step", action="store_true", help="one decode step of Qwen2-0.5B's int8 / int4 products")
    parser.add_argument("--layers", type=int, default=24, help="--step: layers (24: Qwen2-0.5B)")
    args = parser.parse_args(argv)
    table = step(args) if args.step else run(args)
    if args.write:
        import torch

        kind = "step" if args.step else args.dtype
        update_section(f"cpu-quant-{torch.backends.cpu.get_cpu_capability()}-{kind}-{args.rows}", table)


if __name__ == "__main__":
    main()
