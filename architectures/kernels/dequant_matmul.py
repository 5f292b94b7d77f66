"""Weight-only quantised matmul: y = x @ dequant(Q)^T (+ bias), with the weight stored as integer codes and
one scale per output row, or per group of `group_size` consecutive input columns of a row.

    int8:  codes in [-127, 127], one byte each;            scale = max|w| / 127 over the row (or group)
    int4:  codes in [-7, 7], two per byte: column 2j in the high nibble, 2j + 1 in the low nibble (the order
           GLM-130B published), each a signed 4-bit two's-complement value;  scale = max|w| / 7
    w[n, k] ~ code[n, k] * scale[n, k // group_size]       scale: [out, in / group_size] ([out, 1] per row)

Symmetric, no zero point: what the published int8/int4 checkpoints of the zoo's language models use.

`dequant_matmul_reference` is the plain definition (dequantise, then an ordinary matmul in x's dtype).
`dequant_matmul` dispatches: the Triton kernel (dequant_matmul_triton.py: the codes are unpacked and scaled
in registers, the full-precision weight never exists in memory) for CUDA tensors at inference; on CPU, for one
int8 token, the matrix-vector form below, which torch.compile turns into one fused read of the codes
(`benchmarks/bench_decode.py --kernels` measures the formulations); the reference otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from zoo.architectures.kernels.rmsnorm import use_triton

QMAX = {8: 127, 4: 7}


def quantize(w: torch.Tensor, bits: int, group_size: int | None = None,
             scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (codes, scale [out, in / group_size]); int4 codes come packed (uint8 [out, in / 2]).

    The codes are rounded against the stored (scale_dtype) scale, so dequantising reproduces what was meant."""
    if bits not in QMAX:
        raise ValueError(f"dequant_matmul supports 8 or 4 bits, not {bits}")
    out_f, in_f = w.shape
    group = group_size or in_f
    if in_f % group or (bits == 4 and group % 2):
        raise ValueError(f"cannot quantise a [{out_f}, {in_f}] weight to int{bits} in groups of {group}: the input "
                         "size must be a multiple of the group size" + (", which must be even" if bits == 4 else ""))
    g = w.float().view(out_f, in_f // group, group)
    scale = (g.abs().amax(-1) / QMAX[bits]).clamp(min=torch.finfo(torch.float16).tiny).to(scale_dtype)
    codes = (g / scale.float()[..., None]).round().clamp(-QMAX[bits], QMAX[bits]).to(torch.int8).view(out_f, in_f)
    return (pack_int4(codes) if bits == 4 else codes), scale


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] in [-8, 7] -> uint8 [out, in / 2]; column 2j -> high nibble, 2j + 1 -> low nibble."""
    c = codes.to(torch.int16) & 15
    return ((c[:, 0::2] << 4) | c[:, 1::2]).to(torch.uint8)


def nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed (high, low) nibbles of bytes stored as uint8 or int8 (the same bits), as int16.

    (v ^ 8) - 8 sign-extends a 4-bit value."""
    b = packed.to(torch.int16)
    return (((b >> 4) & 15) ^ 8) - 8, ((b & 15) ^ 8) - 8


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in / 2] bytes -> int8 codes [out, in] (pack_int4 read backwards)."""
    hi, lo = nibbles(packed)
    return torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1).to(torch.int8)


def codes_of(q: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(q) if bits == 4 else q


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (int4: packed bytes, uint8 or int8) and scale [out, groups] or [out] -> fp32 weight [out, in]."""
    codes = codes_of(q, bits)
    out_f, in_f = codes.shape
    s = scale.float().reshape(out_f, -1)
    return (codes.float().view(out_f, s.shape[1], -1) * s[..., None]).view(out_f, in_f)


def dequant_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequant(q, scale)^T + bias, the weight dequantised in fp32 and cast to x's dtype."""
    return F.linear(x, dequantize(q, scale, bits).to(x.dtype), bias)


def dequant_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product written as multiply-and-reduce over [out, groups, group] in fp32. For int8 codes
    torch.compile on CPU turns it into one vectorised pass over the codes (no dequantised weight in memory),
    about 1.4x aten's int8 kernel. int4 multiplies the high and low nibbles by the even and odd columns of x
    (the codes are never interleaved back into column order); correct, but Inductor's code for it is slow."""
    out_f = q.shape[0]
    s = scale.float().reshape(out_f, -1)
    xf = x.float()
    if bits == 8:
        xg = xf.reshape(*x.shape[:-1], 1, s.shape[1], -1)
        y = (q.float().view(out_f, s.shape[1], -1) * xg).sum(-1)
    else:
        hi, lo = nibbles(q)
        xe = xf[..., 0::2].reshape(*x.shape[:-1], 1, s.shape[1], -1)
        xo = xf[..., 1::2].reshape(*x.shape[:-1], 1, s.shape[1], -1)
        y = (hi.float().view(out_f, s.shape[1], -1) * xe + lo.float().view(out_f, s.shape[1], -1) * xo).sum(-1)
    y = (y * s).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only quantised linear: the Triton kernel for CUDA tensors at inference; on CPU, the fused
    matrix-vector form for a single int8 token, the reference (dequantise, matmul) otherwise.

    int4 single tokens take the reference on CPU too: Inductor vectorises the nibble unpacking poorly (about
    2 GB/s against 20 for int8 codes, `bench_decode.py --kernels`), so there the fast path is aten's own int4
    kernel on its own packing, which the quantised model prepares at load time."""
    if use_triton(x, scale):
        from zoo.architectures.kernels.dequant_matmul_triton import dequant_matmul_triton

        return dequant_matmul_triton(x, q, scale, bits, bias)
    if bits == 8 and x.numel() == x.shape[-1]:
        return dequant_matvec(x, q, scale, bits, bias)
    return dequant_matmul_reference(x, q, scale, bits, bias)
