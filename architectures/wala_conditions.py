"""The condition encoders WaLa's checkpoints carry (their weights are in the published Lightning files).

- Images, sketches and depth maps: DINOv2 ViT-L/14 with 4 register tokens (Oquab et al. 2023; Darcet et al. 2023),
  built the way WaLa's code builds it from torch.hub: a 37 x 37 position table (518 px) interpolated bicubically to
  the 16 x 16 patches of a 224 px input with DINOv2's scale-factor offset of 0.1 and NO antialiasing (the official
  `dinov2_vitl14_reg` uses antialiasing; WaLa passes interpolate_antialias=False). Output: the final-norm patch
  tokens (`x_norm_patchtokens`), [B, 256, 1024].
- Point clouds: PointNet_Large (per-point MLP 3 -> 64 -> 256 -> 1024 -> d with LayerNorm + SiLU, an induced-set
  attention pooling to `num_inds` learned points, then plain pre-norm transformer blocks) or PointNet_Simple.
- 16^3 voxel grids: a 3-D conv encoder with one average-pool downsampling -> 8^3 = 512 tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures import vit
from zoo.architectures.wala_uvit import GroupNorm32, SelfAttention, TanhMlp
from zoo.architectures.wala_vqvae import ResBlock, downsample

# -- DINOv2 ------------------------------------------------------------------------------------------------------


class DinoAttention(vit.Attention):
    """DINOv2's: one bias on the fused qkv."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, bias="qkv")


class DinoMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DinoBlock(nn.Module):
    """Pre-norm block with LayerScale: x + ls1 * attn(LN(x)), then x + ls2 * mlp(LN(x)); LN eps 1e-6."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DinoAttention(dim, heads)
        self.scale1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DinoMlp(dim, mlp_hidden)
        self.scale2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.scale1
        return x + self.mlp(self.norm2(x)) * self.scale2


class DinoV2(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int, mlp_hidden: int, patch: int, registers: int,
                 pos_grid: int, interpolate_offset: float, interpolate_antialias: bool):
        super().__init__()
        self.patch, self.pos_grid = patch, pos_grid
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        if registers:
            self.registers = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList(DinoBlock(dim, heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_table(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """The class position plus the patch table resized to h x w patches (DINOv2's interpolate_pos_encoding)."""
        M = self.pos_grid
        if h == M and w == M:
            return self.pos_embed
        table = self.pos_embed.float()
        grid = table[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:  # historical: a scale factor slightly above h/M, so that floor() lands on h
            size = {"scale_factor": ((h + self.interpolate_offset) / M, (w + self.interpolate_offset) / M)}
        else:
            size = {"size": (h, w)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **size)
        if grid.shape[-2:] != (h, w):
            raise ValueError(f"position table interpolated to {tuple(grid.shape[-2:])}, needed {(h, w)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([table[:, :1], grid], dim=1).to(dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (normalised) -> patch tokens after the final norm [B, H/14 * W/14, dim]."""
        B, _, H, W = images.shape
        if H % self.patch or W % self.patch:
            raise ValueError(f"image size {H}x{W} is not a multiple of the {self.patch} px patch")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_table(H // self.patch, W // self.patch, x.dtype)
        n_reg = self.registers.shape[1] if hasattr(self, "registers") else 0
        if n_reg:
            x = torch.cat([x[:, :1], self.registers.expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + n_reg:]


# -- point clouds --------------------------------------------------------------------------------------------------


class InducedAttention(nn.Module):
    """Learned inducing points attend to the per-point features (Set Transformer's MAB, q/k LayerNorm per head)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.LayerNorm(dim // heads), nn.LayerNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        B, N, C = queries.shape
        hd = C // self.heads
        q = self.q(queries).view(B, N, self.heads, hd).transpose(1, 2)
        k, v = self.kv(points).view(B, points.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class PlainBlock(nn.Module):
    """x + attn(LN(x)), x + mlp(LN(x)); LayerNorms without affine (eps 1e-6), no qkv bias, q/k LayerNorm."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.attn = SelfAttention(dim, heads, qkv_bias=False)
        self.mlp = TanhMlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(F.layer_norm(x, x.shape[-1:], eps=1e-6))
        return x + self.mlp(F.layer_norm(x, x.shape[-1:], eps=1e-6))


POINT_WIDTHS = (64, 256, 1024)  # the per-point MLP before the last (configurable) width, in all published models


class PointEncoder(nn.Module):
    """PointNet_Large ("large") or PointNet_Simple ("simple") from WaLa's points_network.py."""

    def __init__(self, kind: str, point_dims: int, out_dim: int, inducing: int, heads: int, blocks: int,
                 mlp_hidden: int):
        super().__init__()
        self.kind = kind
        widths = (3, *POINT_WIDTHS, point_dims)
        self.embed = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.embed_norms = nn.ModuleList(nn.LayerNorm(b) for b in widths[1:])
        self.inducing_points = nn.Parameter(torch.zeros(1, inducing, point_dims))
        self.pool_attn = InducedAttention(point_dims, heads, qkv_bias=kind == "large")
        if kind == "large":
            self.pool_mlp = TanhMlp(point_dims, 4 * point_dims, out_dim)
            self.blocks = nn.ModuleList(PlainBlock(out_dim, heads, mlp_hidden) for _ in range(blocks))
        else:
            self.head = nn.ModuleList([nn.Linear(point_dims, out_dim), nn.Linear(out_dim, out_dim),
                                       nn.Linear(out_dim, out_dim)])
            self.head_norms = nn.ModuleList([nn.LayerNorm(out_dim), nn.LayerNorm(out_dim)])

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points [B, N, 3] -> [B, inducing, out_dim]."""
        act = F.silu if self.kind == "large" else F.relu
        x = points
        for linear, norm in zip(self.embed, self.embed_norms):
            x = act(norm(linear(x)))
        h = self.pool_attn(self.inducing_points.expand(x.shape[0], -1, -1).to(x.dtype), x)
        if self.kind == "large":
            h = self.pool_mlp(F.layer_norm(h, h.shape[-1:], eps=1e-6))
            for block in self.blocks:
                h = block(h)
            return h
        h = F.relu(self.head_norms[0](self.head[0](h)))
        h = F.relu(self.head_norms[1](self.head[1](h)))
        return self.head[2](h)


# -- voxels --------------------------------------------------------------------------------------------------------


class VoxelEncoder(nn.Module):
    """Encoder_Down_2: conv 1 -> stem, 3 ResBlocks, avgpool, 3 ResBlocks, GN-SiLU-conv -> [B, (R/2)^3, out_dim]."""

    def __init__(self, stem: int, hidden: int, out_dim: int):
        super().__init__()
        self.conv_in = nn.Conv3d(1, stem, 3, padding=1)
        self.res1 = ResBlock(stem, hidden, skip_kernel=3)
        self.res2, self.res3 = ResBlock(hidden), ResBlock(hidden)
        self.res4, self.res5, self.res6 = ResBlock(hidden), ResBlock(hidden), ResBlock(hidden)
        self.out_norm = GroupNorm32(hidden)
        self.out_conv = nn.Conv3d(hidden, out_dim, 3, padding=1)

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        """voxels [B, 1, R, R, R] occupancy -> tokens in (x, y, z) order."""
        h = self.res3(self.res2(self.res1(self.conv_in(voxels))))
        h = self.res6(self.res5(self.res4(downsample(h))))
        h = self.out_conv(F.silu(self.out_norm(h)))
        return h.flatten(2).transpose(1, 2)
