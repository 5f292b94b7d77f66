"""Weight-only quantised matmul: y = x @ W^T (+ bias) with W stored packed by architectures/quant.py (which owns
the formats, their quantisers and the plain reference, Scheme.reference: dequantise, then an ordinary matmul):

    int8:  codes in [-127, 127], one byte each;      w[n, k] ~ code[n, k] * scale[n, k // group]
    int4:  codes in [-8, 7], two per byte (quant.nibbles: column 2j in the high nibble, 2j + 1 in the low one,
           each a signed 4-bit value);  affine int4 adds a zero point per group:  w ~ code * scale + zero
    scale (and zero): [out, in / group] ([out] or [out, 1]: one per row)

This module only multiplies. `fast_dequant_matmul` is the fastest kernel for a call, or None where the reference is
the best there is: the Triton kernel (dequant_matmul_triton.py: the codes are unpacked and scaled in registers, the
full-precision weight never exists in memory) where the dispatch (dispatch.py) picks Triton; on CPU zoo's C++ kernel
`zoo_cpu::quant_linear` (csrc/quant_linear.cpp, built once per machine and instruction set by cpu_ext.py) on the
stored codes, eagerly and inside compiled graphs alike (an opaque op there, so a compiled step runs the same kernel
and is never slower than the eager one). By default it quantises the activations as llama.cpp's Q8_0 does, for a few
rows (decoding: matrix-vector rows) and many (prefill: an integer GEMM) alike (ZOO_QUANT_ACTIVATIONS, zoo.settings):
each row of x to int8 per block of 32 columns (int8 codes) or 64 (int4: the 32 bytes whose nibbles multiply them),
nested in the weight's scale groups, one fp32 scale per block, then exact integer dot products with the codes (AVX2
maddubs), scaled per block and per group (`act_quant_reference` is that arithmetic in PyTorch). Why: on CPUs without
VNNI widening every code to fp32 costs more instructions per byte than reading it from memory allows, integer dot
products a fraction; the price is each activation rounded to 1/254 of its block's largest (about 0.5% of an output,
the error Q8_0 accepts). With the switch off, few rows widen the codes to fp32 and multiply the exact activations
(the reference's arithmetic, summed in another order). The switch reaches the op as its act_quant argument, read
from SETTINGS at each call, so eager and compiled steps compute the same (Dynamo guards on the setting). With the
switch off (and in the scalar build), many rows dequantise blocks of rows and multiply them with at::mm
(`benchmarks/bench_cpu_quant.py` measures every path against aten's kernels and a plain read). Where the library is
off or could not be built (cpu_ext.library() is None): inside a compiled graph the matrix-vector form below (one
fused read of int8 codes), eagerly aten's int8 matrix-vector kernel (bf16/fp16), and for int4 aten's tinygemm kernel
(`int4pack_mm_cpu`) on its own packing of the codes (quant.to_int4pack_cpu), which the quantised model then makes
once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from zoo.architectures.kernels import cpu_ext
from zoo.architectures.kernels.dispatch import COMPILED, TRITON, backend
from zoo.architectures.kernels.matvec import computed_once

from zoo.settings import SETTINGS

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations zoo_cpu::quant_linear takes


@cpu_ext.fake("zoo_cpu::quant_linear")
def _quant_linear_fake(x, q, scale, zero, bias, bits, act_quant=False):
    return x.new_empty(*x.shape[:-1], q.shape[0])


@cpu_ext.fake("zoo_cpu::quant_linear_many")
def _quant_linear_many_fake(x, qs, scales, zeros, biases, bits, act_quant=False):
    return [x.new_empty(*x.shape[:-1], q.shape[0]) for q in qs]


def cpu_kernels_available() -> bool:
    """Whether zoo's C++ quantised linear runs on this machine (the library is on and built): what the int4
    schemes ask before rearranging their codes for aten's kernel, which they then do not need."""
    return cpu_ext.library() is not None


def cpu_quant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                     bias: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., in] @ w^T (+ bias) by zoo_cpu::quant_linear on the stored codes, in x's dtype, or None where it
    does not apply (not CPU tensors, another dtype, a gradient wanted, the library unavailable)."""
    if x.device.type != "cpu" or x.dtype not in CPU_DTYPES or scale.dtype not in CPU_DTYPES:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None  # the op has no backward
    ops = cpu_ext.library()
    if ops is None:
        return None
    # an argument read from SETTINGS at each call (inside a compiled step Dynamo guards on it: flipping it
    # recompiles rather than replaying the other arithmetic)
    return ops.quant_linear(x, q, scale, zero, bias, bits, SETTINGS.quant_activations)


def cpu_quant_linear_many(x: torch.Tensor, layers: Sequence[tuple], biases: Sequence[torch.Tensor | None]
                          ) -> list[torch.Tensor] | None:
    """[cpu_quant_linear(x, q, scale, bits, bias, zero) for (q, scale, zero, bits), bias in zip(layers, biases)] in
    one call (zoo_cpu::quant_linear_many, csrc/multi_linear.cpp: the same op for each), at CPU inference, eager or
    compiled (x is read once, one parallel region); None where one of them would not take the kernel or the layers
    differ in bits."""
    bits = layers[0][3]
    if x.device.type != "cpu" or x.dtype not in CPU_DTYPES:
        return None
    if any(layer[3] != bits or layer[1].dtype not in CPU_DTYPES for layer in layers):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(b is not None and b.requires_grad for b in biases)):
        return None  # the op has no backward
    ops = cpu_ext.library()
    if ops is None:
        return None
    q, scale, zero, _ = zip(*layers)
    return ops.quant_linear_many(x, q, scale, zero, biases, bits, SETTINGS.quant_activations)


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
    else:  # the nibbles read in place (quant.nibbles' layout): arithmetic shifts sign-extend each half
        hi, lo = q.view(torch.int8) >> 4, (q.view(torch.int8) << 4) >> 4
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


ACT_BLOCK_BYTES = 32  # code bytes per activation block: int8 32 columns, int4 64 (two nibbles a byte)


def act_quantize(x: torch.Tensor, groups: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0's activation quantisation as zoo_cpu::quant_linear does it: x [M, K] in blocks of `block` columns that
    restart at each of `groups` groups of K / groups columns (a group's last block may be shorter), per block
    d = max|x| / 127 and q = round(x * (1 / d)) (ties to even; 0 for an all-zero block), in fp32. Returns
    (q [M, groups, blocks, block] as fp32 integers, zero-padded; d [M, groups, blocks])."""
    m, k = x.shape
    gs = k // groups
    nb = -(-gs // block)
    xg = torch.nn.functional.pad(x.float().reshape(m, groups, gs), (0, nb * block - gs)).reshape(m, groups, nb, block)
    d = xg.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    return torch.round(xg * inv[..., None]), d


def act_quant_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                        bias: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """What zoo_cpu::quant_linear computes with act_quant=True (decode rows and prefill GEMM alike), in float64
    from the same integers: x quantised per block (act_quantize: 32 columns for int8, 64 for int4), each block's
    exact integer dot product with the codes times its d, summed per weight group and times the group's scale, plus
    zero[g] * sum(x over g) (exact fp32 sums) for affine int4 and the bias; in x's dtype. The kernel differs only by
    fp32 rounding."""
    n = q.shape[0]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    s = scale.double().reshape(n, -1)
    g = s.shape[1]
    if bits == 4:  # quant.nibbles' layout: column 2j in the high nibble of byte j, 2j + 1 in the low one
        q = torch.stack([q >> 4, (q << 4) >> 4], dim=-1).reshape(n, -1)
    codes = q.double()  # [N, K]
    block = ACT_BLOCK_BYTES * (2 if bits == 4 else 1)
    xq, d = act_quantize(x2, g, block)
    gs = k // g
    nb = d.shape[-1]
    cg = torch.nn.functional.pad(codes.reshape(n, g, gs), (0, nb * block - gs)).reshape(n, g, nb, block)
    isum = torch.einsum("mgbk,ngbk->mngb", xq.double(), cg)  # exact: integers below 2^53
    y = ((isum * d.double()[:, None]).sum(-1) * s).sum(-1)
    if zero is not None:
        y = y + (zero.double().reshape(n, g) * x2.float().reshape(-1, 1, g, gs).sum(-1).double()).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def fast_dequant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                        bias: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor | None:
    """Weight-only quantised linear by the fastest kernel for this call, or None where the plain reference (the
    scheme's dequantise-then-multiply) is the best there is: the Triton kernel where the dispatch picks Triton; on
    CPU zoo's C++ kernel (cpu_quant_linear) for any number of rows, eager or compiled; without it, for one token,
    the fused matrix-vector form inside a compiled graph (int8) or aten's int8 kernel eagerly (bf16/fp16, one
    scale per row).

    Without the C++ kernel int4 single tokens take the reference on CPU too: Inductor vectorises the nibble
    unpacking poorly (about 2 GB/s against 20 for int8 codes, `bench_decode.py --kernels`), so there the fast path
    is aten's own int4 kernel on its own packing (quant.to_int4pack_cpu), which the quantised model prepares once."""
    if x.device.type == "cpu":  # (first: the dispatch's Triton is for CUDA tensors; decoding asks ~170 times a token)
        y = cpu_quant_linear(x, q, scale, bits, bias, zero)
        if y is not None:
            return y
    where = backend(x, scale)
    if where == TRITON:
        from zoo.architectures.kernels.dequant_matmul_triton import dequant_matmul_triton

        return dequant_matmul_triton(x, q, scale, bits, bias, zero)
    one_row = x.numel() == x.shape[-1]
    if bits == 8 and one_row and zero is None and x.device.type == "cpu":
        if where == COMPILED:
            return dequant_matvec(x, q, scale, bits, bias)
        if x.dtype in (torch.bfloat16, torch.float16) and scale.numel() == q.shape[0]:
            y = torch._weight_int8pack_mm(x.reshape(1, -1), q, scale.reshape(-1).to(x.dtype))
            return (y if bias is None else y + bias).view(*x.shape[:-1], q.shape[0])
    return None


# -- aten's CPU int4 kernel (tinygemm), on its own packing of the codes (quant.to_int4pack_cpu) ----------------


def int4pack_mm_cpu(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w^T (+ bias) by aten's CPU int4 kernel from quant.to_int4pack_cpu's tensors, in x's dtype."""
    out_f = scales_zeros.shape[1]
    in_f = packed.shape[1] * 2
    x2 = x.reshape(-1, in_f)
    y = torch._weight_int4pack_mm_for_cpu(x2.to(scales_zeros.dtype), packed, in_f // scales_zeros.shape[0],
                                          scales_zeros)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], out_f)
