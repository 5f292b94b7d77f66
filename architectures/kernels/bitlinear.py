"""BitLinear, the only kind of linear layer in the MatMul-free LM (Zhu et al. 2024, arXiv 2406.02528; the
BitNet b1.58 recipe of Ma et al. 2024): every projection normalises its input, rounds it to 8 bits per token,
and multiplies by a ternary weight matrix, so the "matmul" is additions and subtractions of int8 values.

    x_n  = RMSNorm_g(x)                                       own weight g, eps 1e-6, in fp32
    s_x  = 127 / max(max_k |x_n[k]|, 1e-5)                    one scale per token (row)
    x_q  = clamp(round(x_n * s_x), -128, 127)                 int8 codes, round half away from zero
    s_w  = 1 / max(mean |W|, 1e-5)                            one scale per weight tensor (absmean), in W's dtype
    t    = clamp(round(W * s_w), -1, 1)                       ternary codes {-1, 0, +1}, in W's dtype
    y    = (x_q / s_x) @ (t / s_w)^T                          both factors rounded to x's dtype, then multiplied

The arithmetic is the published code's (ridgerchu/matmulfreellm a016f72, ops/fusedbitnet.py; proven against it in
tests/test_mmfree_published.py): the fused kernel rounds with Triton's `tl.math.round` (CUDA roundf: halves away
from zero) and stores x_q / s_x in the activation dtype; `weight_quant` ternarises in the weight's own dtype
(fp16 in the published generate script) with torch.round (halves to even).

This module holds the plain PyTorch reference of the activation side and of the product, and `bitlinear_fused`:
the fused Triton kernel (bitlinear_triton.py: normalise, quantise, ternary matmul on the packed bytes, rescale, in
one launch) where the dispatch (dispatch.py) picks Triton. The weight side (ternarise, the 2-bit packing of the
codes, 4 per byte) is the "ternary" scheme's, in architectures/quant.py, which owns every packing. No triton import
here, so `import zoo` stays fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from zoo.architectures.kernels.dispatch import use_triton
from zoo.architectures.kernels.precision import widen

ACT_MIN = 1e-5  # floor of a token's absmax before 127 / absmax (an all-zero token quantises to zeros)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * (1 / sqrt(mean(x^2) + eps)) * weight, all in fp32 (the published fused kernel's order of operations)."""
    x = widen(x)
    return x * (1 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight.to(x.dtype)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, halves away from zero (CUDA roundf, Triton's tl.math.round); torch.round
    rounds halves to even. x - trunc(x) is exact in binary floating point, so the comparison with 0.5 is too."""
    t = x.trunc()
    return torch.where((x - t).abs() >= 0.5, t + x.sign(), t)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: (codes in [-128, 127] as fp32, scale [..., 1]); x ~ codes / scale."""
    x = widen(x)
    scale = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=ACT_MIN)
    return round_half_away(x * scale).clamp(-128, 127), scale


def bitlinear_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, codes: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """BitLinear from ternary codes [out, in] and their scale, step by step; output in x's dtype.

    As published: the dequantised activations x_q / s_x and the dequantised weights codes * scale are each
    rounded to x's dtype, then multiplied in x's dtype."""
    x_q, s_x = quantize_activations(rms_norm(x, norm_weight, eps))
    return F.linear((x_q / s_x).to(x.dtype), codes.to(x.dtype) * scale.to(x.dtype))


def bitlinear_fused(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, packed: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor | None:
    """BitLinear on packed ternary weights through the fused Triton kernel where the dispatch picks it (CUDA
    tensors at inference); None otherwise, and the caller (quant.Ternary) runs the reference on the unpacked
    codes."""
    if not use_triton(x, norm_weight):
        return None
    from zoo.architectures.kernels.bitlinear_triton import bitlinear_triton

    return bitlinear_triton(x, norm_weight, eps, packed, scale)
