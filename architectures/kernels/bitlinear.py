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

This module holds the plain PyTorch reference of each step, the 2-bit packing of ternary codes (4 per byte),
and `bitlinear`: the fused Triton kernel (bitlinear_triton.py: normalise, quantise, ternary matmul on the packed
bytes, rescale, in one launch) where the dispatch (dispatch.py) picks Triton, the reference otherwise. No triton
import here, so `import zoo` stays fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from zoo.architectures.kernels.dispatch import use_triton
from zoo.architectures.kernels.precision import widen

ACT_MIN = 1e-5  # floor of a token's absmax before 127 / absmax (an all-zero token quantises to zeros)
WEIGHT_MIN = 1e-5  # floor of a weight tensor's mean |W|
CODES_PER_BYTE = 4  # ternary codes, 2 bits each


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


def ternarize(w: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmean ternary: (codes in {-1, 0, 1} as `dtype`, scale [1] in w's dtype); w ~ codes * scale.

    In w's own dtype, as the published weight_quant runs on the model's weights (fp16 ones give fp16 scales and
    products, so codes on a rounding boundary fall as they fall there). The scale is what the published
    u = codes / s_w gives a code of 1: 1 / s_w, rounded to w's dtype, so codes * scale is u exactly."""
    inv = 1.0 / w.abs().mean().clamp(min=WEIGHT_MIN)
    codes = (w * inv).round().clamp(-1, 1)
    return codes.to(dtype), (1.0 / inv).reshape(1)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 ternary codes [out, in] -> uint8 [out, ceil(in / 4)].

    Column k goes to byte k // 4, bits 2*(k % 4) .. 2*(k % 4) + 1, as code + 1 (0: -1, 1: 0, 2: +1);
    the padding columns of a last partial byte hold the code for 0."""
    out_f, in_f = codes.shape
    pad = -in_f % CODES_PER_BYTE
    biased = (F.pad(codes.to(torch.int16), (0, pad)) + 1).to(torch.uint8).view(out_f, -1, CODES_PER_BYTE)
    shifts = torch.arange(0, 2 * CODES_PER_BYTE, 2, dtype=torch.uint8, device=codes.device)
    return (biased << shifts).sum(-1, dtype=torch.uint8)


def unpack_ternary(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 [out, ceil(in / 4)] -> ternary codes [out, in] as `dtype` (pack_ternary read backwards).

    One table lookup per byte: byte value -> its 4 codes, so a layer unpacks in a single pass."""
    table = _UNPACK_TABLE.to(device=packed.device, dtype=dtype)
    codes = F.embedding(packed.to(torch.int32), table).reshape(packed.shape[0], -1)
    return codes if codes.shape[1] == in_features else codes[:, :in_features]


_UNPACK_TABLE = ((torch.arange(256)[:, None] >> torch.arange(0, 2 * CODES_PER_BYTE, 2)) & 3) - 1  # [256, 4]


def bitlinear_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, codes: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """BitLinear from ternary codes [out, in] and their scale, step by step; output in x's dtype.

    As published: the dequantised activations x_q / s_x and the dequantised weights codes * scale are each
    rounded to x's dtype, then multiplied in x's dtype."""
    x_q, s_x = quantize_activations(rms_norm(x, norm_weight, eps))
    return F.linear((x_q / s_x).to(x.dtype), codes.to(x.dtype) * scale.to(x.dtype))


def bitlinear_latent(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """BitLinear on the latent (trained, full-precision) weight, ternarised for this call."""
    codes, scale = ternarize(weight, weight.dtype)
    return bitlinear_reference(x, norm_weight, eps, codes, scale)


def bitlinear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, packed: torch.Tensor,
              scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """BitLinear on packed ternary weights: the fused Triton kernel where the dispatch picks it (CUDA tensors at
    inference), else the reference (which unpacks this one layer's weights for the call and drops them after)."""
    if use_triton(x, norm_weight):
        from zoo.architectures.kernels.bitlinear_triton import bitlinear_triton

        return bitlinear_triton(x, norm_weight, eps, packed, scale)
    return bitlinear_reference(x, norm_weight, eps, unpack_ternary(packed, in_features, x.dtype), scale)
