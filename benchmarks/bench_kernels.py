"""Kernel speed: the ways to compute a decode step's matrix-vector products on CPU, and on a GPU each Triton
kernel against its PyTorch reference. No model, no checkpoint: the shapes of Qwen2-0.5B's blocks.

    python benchmarks/bench_kernels.py                  # CPU: GB/s of each matrix-vector formulation
    python benchmarks/bench_kernels.py --device cuda    # GPU: the Triton kernels against their references

CPU: eager and compiled F.linear, multiply-reduce forms, zoo's int8/int4 dequant_matvec, aten's int8 and int4
kernels and torchao's CPU configs, each in GB/s of the weight bytes it reads (codes and scales for the quantised
rows), best of --repeats (section "decode-kernels" of BENCHMARKS.md). GPU: microseconds per call and GB/s of
RMSNorm, rotary, silu(gate) * up and the int8/int4 matmuls (against cuBLAS bf16), decode and prefill shapes
(section "decode-kernels-gpu"). The end-to-end decoding table is benchmarks/bench_decode.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_ms, machine, seconds, update_section  # noqa: E402

GIB = 2**30

SHAPES_05B = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]


def kernels(args) -> list[tuple[str, float]]:
    """GB/s of weights read by each way to compute one token's matrix-vector products of a Qwen2-0.5B block chain
    (q, k, v, o, gate, up, down per layer; --layers layers so the weights are far larger than the cache)."""
    import torch
    import torch.nn.functional as F
    from zoo.architectures.kernels.dequant_matmul import dequant_matvec
    from zoo.architectures.quant import get_scheme

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ws = [torch.randn(n, k) * 0.02 for _ in range(args.layers) for n, k in SHAPES_05B]
    xs = {k: torch.randn(1, k) for k in (896, 4864)}
    rows = []

    def bench(name, fn, nbytes):
        fn()
        fn()
        best = min(seconds(fn) for _ in range(args.repeats))
        rows.append((name, nbytes / best / 1e9))
        print(f"{name:60s} {rows[-1][1]:6.1f} GB/s", flush=True)

    big = [torch.ones(GIB // 4)]
    bench("plain read: torch.sum over 1 GiB fp32", lambda: big[0].sum(), GIB)
    big.clear()

    def chain(body, tensors, per):
        """one compiled function over the whole chain, as a compiled decode step would be"""
        torch._dynamo.reset()  # each chain is a new function to Dynamo, not a recompilation of the last one

        def f(x896, x4864, *ts):
            return [body(x896 if ws[i // per].shape[1] == 896 else x4864, *ts[i:i + per])
                    for i in range(0, len(ts), per)]
        return torch.compile(f)

    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).removeprefix("torch.")
        wd = [w.to(dtype) for w in ws]
        xd = {k: v.to(dtype) for k, v in xs.items()}
        nb = sum(w.nbytes for w in wd)
        bench(f"{tag}: F.linear, eager", lambda wd=wd, xd=xd: [F.linear(xd[w.shape[1]], w) for w in wd], nb)
        c = chain(lambda x, w: F.linear(x, w), wd, 1)
        bench(f"{tag}: F.linear, compiled", lambda c=c, wd=wd, xd=xd: c(xd[896], xd[4864], *wd), nb)
        c = chain(lambda x, w: (w * x).float().sum(-1), wd, 1)
        bench(f"{tag}: multiply-reduce, compiled", lambda c=c, wd=wd, xd=xd: c(xd[896], xd[4864], *wd), nb)
        c = chain(lambda x, w: (w.float().view(w.shape[0], -1, 64) * x.float().view(1, -1, 64)).sum(-1).sum(-1),
                  wd, 1)
        bench(f"{tag}: multiply-reduce in 64-column groups, fp32, compiled",
              lambda c=c, wd=wd, xd=xd: c(xd[896], xd[4864], *wd), nb)
    xb = {k: v.to(torch.bfloat16) for k, v in xs.items()}
    for bits, group in ((8, None), (8, 64), (4, None), (4, 64)):
        packed = [t for w in ws for t in get_scheme(f"int{bits}-row" + (f"-g{w.shape[1] // group}" if group else ""))
                  .pack(w).values()]
        nb = sum(t.nbytes for t in packed)
        label = f"int{bits} {'per row' if group is None else f'groups of {group}'}"
        if bits == 8 and group is None:
            q8 = [(packed[i], packed[i + 1].reshape(-1).to(torch.bfloat16)) for i in range(0, len(packed), 2)]
            bench(f"{label}: torch._weight_int8pack_mm (aten), eager",
                  lambda q8=q8: [torch._weight_int8pack_mm(xb[q.shape[1]], q, s) for q, s in q8], nb)
        c = chain(lambda x, q, s, bits=bits: dequant_matvec(x, q, s, bits), packed, 2)
        bench(f"{label}: dequant_matvec, compiled", lambda c=c, packed=packed: c(xb[896], xb[4864], *packed), nb)
    for group in (32, 128):  # aten's CPU int4 layout (what torchao's int4 weight-only config calls on CPU)
        packed = []
        for w in ws:
            n, k = w.shape
            g = w.view(n, k // group, group)
            lo, hi = g.amin(-1), g.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
            zero = lo + 8 * scale
            sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            packed.append((torch._convert_weight_to_int4pack_for_cpu(q, 1), sz))
        nb = sum(p.nbytes + s.nbytes for p, s in packed)
        bench(f"int4 groups of {group}: torch._weight_int4pack_mm_for_cpu (aten), eager",
              lambda packed=packed, group=group: [torch._weight_int4pack_mm_for_cpu(xb[p.shape[1] * 2], p, group, s)
                                                  for p, s in packed], nb)
    try:
        torchao_rows(bench, xb, args.layers)
    except ImportError as e:
        print(f"torchao rows skipped: {e}")
    return rows


def torchao_rows(bench, xb, n_layers: int) -> None:
    """What torchao offers on CPU, through its own quantize_ on nn.Linear chains of the same shapes: int8
    weight-only (Int8Tensor: dequantise-then-mm, which Inductor maps to aten's int8 kernel) and the CPU int4
    layout (Int4OpaqueTensor: aten's _weight_int4pack_mm_for_cpu). Its other int4 layouts need GPU libraries."""
    import torch
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    for name, config in (("torchao Int8WeightOnlyConfig", Int8WeightOnlyConfig()),
                         ("torchao PrototypeInt4WeightOnlyConfig(group_size=128)",
                          PrototypeInt4WeightOnlyConfig(group_size=128))):
        layers = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
                                     for _ in range(n_layers) for n, k in SHAPES_05B)
        quantize_(layers, config)
        nb = sum(getattr(lin.weight, a).nbytes for lin in layers for a in lin.weight.__tensor_flatten__()[0])
        forward = lambda layers=layers: [lin(xb[lin.in_features]) for lin in layers]
        bench(f"{name}, eager", forward, nb)
        torch._dynamo.reset()
        compiled = torch.compile(forward)
        bench(f"{name}, compiled", compiled, nb)


def triton_kernels(args) -> str:
    """On a GPU: each fused Triton kernel against its plain PyTorch reference (and the int8/int4 matmuls against
    cuBLAS bf16), microseconds per call and GB/s of the bytes the call must move, decode and prefill shapes."""
    import torch
    import torch.nn.functional as F
    from zoo.architectures.kernels import rmsnorm, rotary, swiglu
    from zoo.architectures.kernels.dequant_matmul_triton import dequant_matmul_triton
    from zoo.architectures.kernels.rmsnorm_triton import rms_norm_triton
    from zoo.architectures.kernels.rotary_triton import apply_rotary_triton
    from zoo.architectures.kernels.swiglu_triton import silu_mul_triton
    from zoo.architectures.quant import get_scheme

    dev, bf = args.device, torch.bfloat16
    torch.manual_seed(0)

    def us(fn) -> float:
        return cuda_ms(fn, repeats=1, calls=50) * 1000  # the mean of 50 calls after a warm-up

    rows = []

    def pair(what, nbytes, triton_fn, reference_fn, baseline=None):
        t, r = us(triton_fn), us(reference_fn)
        b = us(baseline) if baseline else None
        rows.append((what, t, r, b, nbytes))
        print(what, f"triton {t:.1f} us, reference {r:.1f} us" + (f", bf16 cuBLAS {b:.1f} us" if b else ""), flush=True)

    for tokens in (1, 512):
        x, w = torch.randn(tokens, 896, device=dev, dtype=bf), torch.randn(896, device=dev, dtype=bf)
        pair(f"RMSNorm [{tokens}, 896]", 2 * x.nbytes + w.nbytes, lambda x=x, w=w: rms_norm_triton(x, w, 1e-6),
             lambda x=x, w=w: rmsnorm.rms_norm_reference(x, w, 1e-6))
        q = torch.randn(1, tokens, 14, 64, device=dev, dtype=bf).transpose(1, 2)
        ang = torch.randn(1, tokens, 64, device=dev)
        cos, sin = ang.cos().to(bf), ang.sin().to(bf)
        pair(f"rotary q [1, 14, {tokens}, 64]", 2 * q.nbytes + cos.nbytes + sin.nbytes,
             lambda q=q, c=cos, s=sin: apply_rotary_triton(q, c, s),
             lambda q=q, c=cos, s=sin: rotary.apply_rotary_reference(q, c, s))
        g, u = (torch.randn(tokens, 4864, device=dev, dtype=bf) for _ in range(2))
        pair(f"silu(gate) * up [{tokens}, 4864]", 3 * g.nbytes, lambda g=g, u=u: silu_mul_triton(g, u),
             lambda g=g, u=u: swiglu.silu_mul_reference(g, u))
        for bits in (8, 4):
            for out_f, in_f in ((4864, 896), (896, 4864), (151936, 896)):
                wf = torch.randn(out_f, in_f, device=dev) * 0.02
                qw, sc = get_scheme(f"int{bits}-row").pack(wf).values()
                wb = wf.to(bf)
                xx = torch.randn(tokens, in_f, device=dev, dtype=bf)
                pair(f"int{bits} matmul [{tokens}, {in_f}] x [{out_f}, {in_f}]^T", qw.nbytes + sc.nbytes,
                     lambda x=xx, q=qw, s=sc, b=bits: dequant_matmul_triton(x, q, s, b),
                     lambda x=xx, q=qw, s=sc, b=bits: get_scheme(f"int{b}-row").reference(
                         x, {"weight": q, "weight_scale": s}, None),
                     lambda x=xx, w=wb: F.linear(x, w))
    lines = [
        "## Triton kernels on the GPU (`benchmarks/bench_kernels.py --device cuda`)",
        "",
        f"Machine: {machine()}. bf16 activations, mean of 50 calls after a warm-up (CUDA events). GB/s: the bytes "
        "a call must move (inputs and output; for the matmuls the packed weight) over the Triton kernel's time.",
        "",
        "| op | Triton (us) | PyTorch reference (us) | reference / Triton | bf16 cuBLAS (us) | Triton GB/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for what, t, r, b, nbytes in rows:
        lines.append(f"| {what} | {t:.1f} | {r:.1f} | {r / t:.2f}x | {'-' if b is None else f'{b:.1f}'} | "
                     f"{nbytes / t / 1e3:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (the matrix-vector formulations) or cuda (the Triton kernels)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--layers", type=int, default=6, help="CPU: Qwen2-0.5B blocks in the chain (6: far beyond caches)")
    ap.add_argument("--repeats", type=int, default=5, help="CPU: timed runs of each formulation; the best counts")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = ap.parse_args()
    for name in ("threads", "layers", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    if args.device != "cpu":
        text = triton_kernels(args)
        if not args.no_write:
            update_section("decode-kernels-gpu", text)
        print(text)
        return
    rows = kernels(args)
    lines = ["## Matrix-vector formulations on CPU (`benchmarks/bench_kernels.py`)", "",
             f"Machine: {machine()}. Qwen2-0.5B block shapes (q, k, v, o, gate, up, down), {args.layers} "
             f"layers ({args.layers * 14.9:.0f}M weights, far beyond the caches), one token; GB/s of "
             "weight bytes (codes and scales for the quantised rows), best of several.", "",
             "| formulation | GB/s |", "|---|---:|", *[f"| {n} | {g:.1f} |" for n, g in rows]]
    if not args.no_write:
        update_section("decode-kernels", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
