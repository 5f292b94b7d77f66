"""Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864), the half-split form of the
Llama-style decoders: the first d = cos.shape[-1] dimensions of each head are rotated as pairs (j, j + d/2),

    y_j       = x_j       * cos_j       - x_{j+d/2} * sin_j
    y_{j+d/2} = x_{j+d/2} * cos_{j+d/2} + x_j       * sin_{j+d/2}          for j < d/2

and the remaining head dimensions (partial rotary, e.g. Phi-4-mini) pass through unchanged.

`apply_rotary_reference` is the plain PyTorch definition; `apply_rotary` runs what the dispatch (dispatch.py)
picks: the Triton kernel (rotary_triton.py: one read of x, one write, no rotate_half / cat temporaries) for CUDA
tensors at inference, zoo's C++ op (zoo_cpu::rotary, csrc/decode_ops.cpp: one call, each product and sum rounded
to the dtype as the reference rounds them, so equal to it bit for bit) for CPU tensors at eager inference, the
reference otherwise. `apply_rotary_pair` rotates q and k in one C++ call. The decoders' attention
(architectures/layers.py) calls it.
"""

from __future__ import annotations

import torch
from zoo.architectures.kernels.dispatch import DECODE_DTYPES, cpu_decode_ops, use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos, sin: [B, T, d] with d <= head_dim, d even."""
    cos, sin = cos[:, None], sin[:, None]
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    rot = rot * cos + rotate_half(rot) * sin
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def _cpu_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the C++ op takes this call: x [B, H, T, hd], cos and sin [B, T, d] of x's dtype (no broadcasting)."""
    return (x.dim() == 4 and cos.dim() == 3 and x.dtype in DECODE_DTYPES and cos.dtype == x.dtype
            and sin.dtype == x.dtype and cos.shape == sin.shape and cos.shape[0] == x.shape[0]
            and cos.shape[1] == x.shape[2] and cos.shape[2] <= x.shape[3] and cos.shape[2] % 2 == 0)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: the fused Triton kernel for CUDA tensors at inference, zoo's C++ op on CPU at eager
    inference, else the reference."""
    lib = cpu_decode_ops(x, cos, sin)  # (None off CPU: the Triton kernel is for CUDA tensors)
    if lib is not None and _cpu_fits(x, cos, sin):
        return lib.rotary(x, cos, sin)
    if use_triton(x, cos, sin):
        from zoo.architectures.kernels.rotary_triton import apply_rotary_triton

        return apply_rotary_triton(x, cos, sin)
    return apply_rotary_reference(x, cos, sin)


def apply_rotary_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary to q and to k, in one C++ call on CPU at eager inference."""
    lib = cpu_decode_ops(q, k, cos, sin)
    if lib is not None and _cpu_fits(q, cos, sin) and _cpu_fits(k, cos, sin):
        return lib.rotary_pair(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
