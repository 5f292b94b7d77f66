"""Weight-only quantised matmul: y = x @ dequant(Q)^T (+ bias), with the weight stored as integer codes and
one scale per output row, or per group of `group_size` consecutive input columns of a row.

    int8:  codes in [-127, 127], one byte each;            scale = max|w| / 127 over the row (or group)
    int4:  codes in [-7, 7], two per byte: column 2j in the high nibble, 2j + 1 in the low nibble (the order
           GLM-130B published), each a signed 4-bit two's-complement value;  scale = max|w| / 7
    w[n, k] ~ code[n, k] * scale[n, k // group_size]       scale: [out, in / group_size] ([out, 1] per row)

    affine int4 (`quantize_affine_int4`, torchao's int4 weight-only arithmetic for its tinygemm kernels): codes
           in [-8, 7], same bytes, plus a zero point per group:  w ~ code * scale + zero,
           scale = (max - min) / 15, zero = min + 8 * scale

`dequant_matmul_reference` is the plain definition (dequantise, then an ordinary matmul in x's dtype).
`dequant_matmul` dispatches: the Triton kernel (dequant_matmul_triton.py: the codes are unpacked and scaled
in registers, the full-precision weight never exists in memory) for CUDA tensors at inference; on CPU, for one
token inside a compiled graph, the matrix-vector form below, which Inductor turns into one fused read of the
codes, eagerly aten's int8 matrix-vector kernel (bf16/fp16), and the reference otherwise
(`benchmarks/bench_decode.py --kernels` measures the formulations). For int4 on CPU the fast kernel is aten's
tinygemm one, on its own packing of the codes (`to_int4pack_cpu`), which the quantised model makes once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from zoo.architectures.kernels.matvec import computed_once
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


def quantize_affine_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int4 codes in [-8, 7] packed two per byte as int8 [out, in / 2], scale, zero
    [out, in / group_size]) by torchao's int4 weight-only arithmetic (`_choose_qparams_affine_tinygemm`,
    `_quantize_affine_tinygemm`): per group min/max, no zero kept exact, scale and zero in w's dtype and the codes
    rounded against those stored values. Computed in fp32 for fp32 weights, in w's dtype otherwise, as torchao."""
    out_f, in_f = w.shape
    if in_f % group_size or group_size % 2:
        raise ValueError(f"cannot quantise a [{out_f}, {in_f}] weight to int4 in groups of {group_size}: the input "
                         "size must be a multiple of the (even) group size")
    g = w.reshape(out_f, in_f // group_size, group_size)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-6)
    zero = low + scale * 8  # the mid-point code 8 stands at zero's place: w = (u - 8) * scale + zero
    start = zero - scale * 8
    u = torch.clamp(torch.round((g - start[..., None]) / scale[..., None]), 0, 15)
    codes = (u - 8).to(torch.int8).reshape(out_f, in_f)
    return pack_int4(codes).view(torch.int8), scale, zero


def codes_of(q: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(q) if bits == 4 else q


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, zero: torch.Tensor | None = None) -> torch.Tensor:
    """codes (int4: packed bytes, uint8 or int8), scale [out, groups] or [out] (and the zero points of affine
    int4, the same shape) -> fp32 weight [out, in]."""
    codes = codes_of(q, bits)
    out_f, in_f = codes.shape
    s = scale.float().reshape(out_f, -1)
    w = codes.float().view(out_f, s.shape[1], -1) * s[..., None]
    if zero is not None:
        w = w + zero.float().reshape(out_f, -1)[..., None]
    return w.view(out_f, in_f)


def dequant_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                             bias: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequant(q, scale, zero)^T + bias, the weight dequantised in fp32 and cast to x's dtype.

    Without a zero point, and with scales in x's 16-bit dtype, the weight is dequantised in that dtype directly:
    the same numbers (a code of at most 8 bits times a 16-bit scale is exact in fp32, so both ways round once),
    less than half the memory traffic."""
    if zero is None and x.dtype in (torch.bfloat16, torch.float16) and scale.dtype == x.dtype:
        codes = codes_of(q, bits)
        s = scale.reshape(codes.shape[0], -1)
        w = (codes.to(x.dtype).view(codes.shape[0], s.shape[1], -1) * s[..., None]).view(codes.shape)
        return F.linear(x, w, bias)
    return F.linear(x, dequantize(q, scale, bits, zero).to(x.dtype), bias)


def dequant_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                   bias: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """The same product written as multiply-and-reduce over [out, groups, group] in fp32,
    y = sum_g scale_g (sum_{k in g} code_k x_k) + zero_g (sum_{k in g} x_k). For int8 codes torch.compile on CPU
    turns it into one vectorised pass over the codes (no dequantised weight in memory), about 1.4x aten's int8
    kernel. int4 multiplies the high and low nibbles by the even and odd columns of x (the codes are never
    interleaved back into column order); correct, but Inductor's code for it is slow."""
    out_f = q.shape[0]
    s = scale.float().reshape(out_f, -1)
    xf = computed_once(x.float().contiguous())
    if bits == 8:
        xg = xf.reshape(*x.shape[:-1], 1, s.shape[1], -1)
        y = (q.float().view(out_f, s.shape[1], -1) * xg).sum(-1)
    else:
        hi, lo = nibbles(q)
        xe = xf[..., 0::2].reshape(*x.shape[:-1], 1, s.shape[1], -1)
        xo = xf[..., 1::2].reshape(*x.shape[:-1], 1, s.shape[1], -1)
        y = (hi.float().view(out_f, s.shape[1], -1) * xe + lo.float().view(out_f, s.shape[1], -1) * xo).sum(-1)
    y = y * s
    if zero is not None:
        y = y + zero.float().reshape(out_f, -1) * xf.reshape(*x.shape[:-1], 1, s.shape[1], -1).sum(-1)
    y = y.sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                   bias: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only quantised linear: the Triton kernel for CUDA tensors at inference; on CPU, for one token, the
    fused matrix-vector form inside a compiled graph (int8) or aten's int8 kernel eagerly (bf16/fp16, one scale
    per row), the reference (dequantise, matmul) otherwise.

    int4 single tokens take the reference on CPU too: Inductor vectorises the nibble unpacking poorly (about
    2 GB/s against 20 for int8 codes, `bench_decode.py --kernels`), so there the fast path is aten's own int4
    kernel on its own packing (`to_int4pack_cpu`), which the quantised model prepares once."""
    if use_triton(x, scale):
        from zoo.architectures.kernels.dequant_matmul_triton import dequant_matmul_triton

        return dequant_matmul_triton(x, q, scale, bits, bias, zero)
    one_row = x.numel() == x.shape[-1]
    if bits == 8 and one_row and zero is None and x.device.type == "cpu":
        if torch.compiler.is_compiling():
            return dequant_matvec(x, q, scale, bits, bias)
        if x.dtype in (torch.bfloat16, torch.float16) and scale.numel() == q.shape[0]:
            y = torch._weight_int8pack_mm(x.reshape(1, -1), q, scale.reshape(-1).to(x.dtype))
            return (y if bias is None else y + bias).view(*x.shape[:-1], q.shape[0])
    return dequant_matmul_reference(x, q, scale, bits, bias, zero)


# -- aten's CPU int4 kernel (tinygemm): its own packing of the codes ---------------------------------------------

INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes the kernel takes, largest first


def int4pack_group(in_features: int, group: int) -> int | None:
    """The largest group size the kernel takes that tiles a quantisation group of `group` columns (a per-row scale
    is one group of in_features), or None."""
    return next((g for g in INT4PACK_GROUPS if group % g == 0 and in_features % g == 0), None)


def to_int4pack_cpu(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Int4 codes (our packed bytes), scale and zero [out, groups] -> (aten's packed weight, its scales and zeros
    [in / g, out, 2] in `dtype`) for torch._weight_int4pack_mm_for_cpu, or None where the kernel does not apply
    (outputs not a multiple of 16, groups it cannot tile). Its packing depends on the CPU's vector width: made
    when loading, never stored. Same bytes as ours: the weight is replaced, not duplicated."""
    out_f, in_f = q.shape[0], q.shape[1] * 2
    s = scale.reshape(out_f, -1)
    group = int4pack_group(in_f, in_f // s.shape[1])
    if out_f % 16 or group is None or q.device.type != "cpu":
        return None
    repeat = in_f // s.shape[1] // group  # a wider quantisation group spans several kernel groups
    s = s.repeat_interleave(repeat, dim=1)
    z = zero.reshape(out_f, -1).repeat_interleave(repeat, dim=1) if zero is not None else torch.zeros_like(s)
    codes = unpack_int4(q).to(torch.int32) + 8  # the kernel reads unsigned codes: w = (u - 8) * scale + zero
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scales_zeros = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scales_zeros


def from_int4pack_cpu(packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int) -> torch.Tensor:
    """Our packed int4 bytes back from aten's packing (exactly: the kernel applied to the identity with unit
    scales and zero offsets returns the signed codes themselves)."""
    n_groups, out_f = scales_zeros.shape[0], scales_zeros.shape[1]
    unit = torch.zeros(n_groups, out_f, 2, dtype=torch.bfloat16)
    unit[..., 0] = 1
    eye = torch.eye(in_features, dtype=torch.bfloat16)
    codes = torch._weight_int4pack_mm_for_cpu(eye, packed, in_features // n_groups, unit)  # [in, out]
    return pack_int4(codes.t().to(torch.int8)).view(torch.int8)


def int4pack_mm_cpu(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w^T (+ bias) by aten's CPU int4 kernel from `to_int4pack_cpu`'s tensors, in x's dtype."""
    out_f = scales_zeros.shape[1]
    in_f = packed.shape[1] * 2
    x2 = x.reshape(-1, in_f)
    y = torch._weight_int4pack_mm_for_cpu(x2.to(scales_zeros.dtype), packed, in_f // scales_zeros.shape[0],
                                          scales_zeros)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], out_f)
