"""Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864), the half-split form of the
Llama-style decoders: the first d = cos.shape[-1] dimensions of each head are rotated as pairs (j, j + d/2),

    y_j       = x_j       * cos_j       - x_{j+d/2} * sin_j
    y_{j+d/2} = x_{j+d/2} * cos_{j+d/2} + x_j       * sin_{j+d/2}          for j < d/2

and the remaining head dimensions (partial rotary, e.g. Phi-4-mini) pass through unchanged.

`apply_rotary_reference` is the plain PyTorch definition; `apply_rotary` runs what the dispatch (dispatch.py)
picks: the Triton kernel (rotary_triton.py: one read of x, one write, no rotate_half / cat temporaries) for CUDA
tensors at inference, the reference otherwise. The decoders' attention (architectures/layers.py) calls it.
"""

from __future__ import annotations

import torch
from zoo.architectures.kernels.dispatch import use_triton


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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: the fused Triton kernel for CUDA tensors at inference, else the reference."""
    if use_triton(x, cos, sin):
        from zoo.architectures.kernels.rotary_triton import apply_rotary_triton

        return apply_rotary_triton(x, cos, sin)
    return apply_rotary_reference(x, cos, sin)
