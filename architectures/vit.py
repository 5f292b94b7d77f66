"""The self-attention of a ViT block, one layer for every ViT family (VideoMAE V2, DINOv3, WaLa's DINOv2 and DiT).

    q, k, v = split(qkv(x))           one fused projection, heads of dim / heads
    q, k = norm(q), norm(k)           qk_norm: LayerNorm over each head (timm's qk_norm; WaLa's DiT)
    q, k = rope(q), rope(k)           a family's position rotation, when it passes one (DINOv3's 2-D RoPE)
    proj(softmax(q k^T / sqrt(d)) v)  scaled_dot_product_attention, no mask

The published variants differ only in their biases, held under the published names so checkpoints map onto
them unchanged: bias="qkv" one bias on `qkv` (timm, DINOv2); "qv" separate `q_bias` and `v_bias` with the key
bias fixed at zero (BEiT's layout: VideoMAE, DINOv3's masked key bias); None no bias. The projections run through
kernels.linear (oneDNN on CPU in fp32, F.linear elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels.linear import linear

BIASES = ("qkv", "qv", None)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: str | None = "qkv", proj_bias: bool = True,
                 qk_norm: bool = False):
        super().__init__()
        if bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, not {bias!r}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias == "qkv")
        self.q_bias = nn.Parameter(torch.zeros(dim)) if bias == "qv" else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if bias == "qv" else None
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.qk_norm = qk_norm
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, N, dim] -> [B, N, dim]; rope, if given, rotates the queries and keys [B, heads, N, head_dim]."""
        B, N, C = x.shape
        bias = "layer" if self.q_bias is None else torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = linear(self.qkv, x, bias=bias).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q, k, v)
        return linear(self.proj, y.transpose(1, 2).reshape(B, N, C))
