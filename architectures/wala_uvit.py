"""WaLa's diffusion network: a latent U-ViT over the 4 x 12^3 wavelet-VQ latent (Sanghi et al., arXiv 2411.08017).

    x [B, 4, 12, 12, 12] --conv_in--> ResBlocks at 12^3 (timestep scale-shift) --patchify p^3, LN, Linear-->
    tokens (+ 3-D position embedding, + register tokens) --DiT / cross-DiT blocks (adaLN-Zero, q/k LayerNorm)-->
    LN, Linear, unpatchify --> ResBlocks with the saved skips (normalised sum or learned gate) --GN, SiLU, conv--> 4

The ResBlocks see the plain timestep embedding; the transformer blocks see it plus a pooled projection of the
condition (when the published model adds one). Cross-DiT blocks attend to the condition tokens after a small MLP,
with no pre-norm and no gate. Published defaults: GroupNorm(32) computed in fp32, LayerNorm eps 1e-6 without affine
in the blocks, tanh-GELU MLPs, time embedding [cos, sin] over 256 frequencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures import vit


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups computed in fp32 (as published), cast back to the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of t * exp(-ln(max_period) * k / (dim/2)), k < dim/2 (DiT's order: cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, hidden: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.fc1 = nn.Linear(frequencies, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(timestep_frequencies(t, self.frequencies))))


class GlobalConditionProjection(nn.Module):
    """Pooled condition -> one vector: (Linear, LN, SiLU) x 2 per token, mean over tokens, Linear-SiLU-Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.proj1, self.norm1 = nn.Linear(in_dim, hidden), nn.LayerNorm(hidden)
        self.proj2, self.norm2 = nn.Linear(hidden, hidden), nn.LayerNorm(hidden)
        self.mlp1, self.mlp2 = nn.Linear(hidden, out_dim), nn.Linear(out_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.proj1(tokens)))
        h = F.silu(self.norm2(self.proj2(h)))
        return self.mlp2(F.silu(self.mlp1(h.mean(dim=1))))


class TimeResBlock(nn.Module):
    """GN-SiLU-conv, then GN * (1 + scale) + shift from the timestep (optionally times a condition FiLM), SiLU, conv.

    An output block also takes the matching input block's activation: normalised, then added as (h + s) / sqrt 2,
    or through a learned sigmoid gate over its channel means when the published model has one.
    """

    def __init__(self, channels: int, emb_dim: int, skip: bool = False, skip_reduction: int = 0,
                 cond_dim: int = 0):
        super().__init__()
        if skip:
            self.skip_norm = GroupNorm32(channels)
            if skip_reduction:
                self.skip_gate = nn.ModuleDict({"fc1": nn.Linear(channels, channels // skip_reduction),
                                                "fc2": nn.Linear(channels // skip_reduction, channels)})
        self.norm1 = GroupNorm32(channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.time_proj = nn.Linear(emb_dim, 2 * channels)
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, channels)
        self.norm2 = GroupNorm32(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, skip: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if skip is not None:
            s = self.skip_norm(skip)
            if hasattr(self, "skip_gate"):
                g = self.skip_gate["fc2"](F.relu(self.skip_gate["fc1"](s.mean(dim=(-3, -2, -1))))).sigmoid()
                h = h + g[..., None, None, None] * s
            else:
                h = (h + s) / math.sqrt(2)
        h = self.conv1(F.silu(h))
        scale, shift = self.time_proj(F.silu(t_emb)).to(h.dtype)[..., None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        if cond is not None:
            h = h * self.cond_proj(cond)[..., None, None, None]
        return x + self.conv2(F.silu(h))


class SelfAttention(vit.Attention):
    """timm's Attention with qkv bias and LayerNorm on each head's queries and keys."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__(dim, heads, bias="qkv" if qkv_bias else None, qk_norm=True)


class CrossAttention(nn.Module):
    """Queries from the tokens, keys/values from the condition; q/k LayerNorm per head."""

    def __init__(self, dim: int, context_dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class TanhMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero: six vectors (shift, scale, gate for attention and MLP) from SiLU + Linear of the conditioning.
    With cross attention (cross-DiT) the block adds x + cross_attn(x, context) between the two, ungated."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, context_dim: int = 0):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        if context_dim:
            self.cross_attn = CrossAttention(dim, context_dim, heads)
        self.mlp = TanhMlp(dim, mlp_hidden)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift1, scale1))
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(x, context)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift2, scale2))


class ContextMlp(nn.Module):
    """Linear - SiLU - Linear (the condition MLP in front of cross attention)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H p, W p, L p] -> [B, H W L, p p p C] (einops 'b c (h p1)(w p2)(l p3) -> b (h w l)(p1 p2 p3 c)')."""
    B, C, H, W, L = x.shape
    x = x.view(B, C, H // p, p, W // p, p, L // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, (H // p) * (W // p) * (L // p), p * p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: int) -> torch.Tensor:
    B, _, D = x.shape
    C = D // p**3
    x = x.view(B, grid, grid, grid, p, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, C, grid * p, grid * p, grid * p)


class LatentUViT(nn.Module):
    def __init__(self, latent_channels: int, latent_grid: int, patch_size: int, hidden: int, depth: int, heads: int,
                 mlp_hidden: int, unet_channels: int, res_blocks: int, context_dim: int, cross_attention: bool,
                 time_condition: bool, res_condition: int, registers: int, skip_reduction: int):
        super().__init__()
        self.patch_size, self.grid = patch_size, latent_grid // patch_size
        self.time_embed = TimestepEmbedding(hidden)
        if res_condition:
            self.res_condition = GlobalConditionProjection(context_dim, res_condition, hidden)
        if cross_attention:
            self.context_proj = ContextMlp(context_dim, hidden)
        if time_condition:
            self.time_condition = GlobalConditionProjection(context_dim, hidden, hidden)
        self.conv_in = nn.Conv3d(latent_channels, unet_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList(
            TimeResBlock(unet_channels, hidden, cond_dim=res_condition) for _ in range(res_blocks))
        token_in = patch_size**3 * unet_channels
        self.patch_norm, self.patch_proj = nn.LayerNorm(token_in), nn.Linear(token_in, hidden)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.grid**3, hidden))
        if registers:
            self.registers = nn.Parameter(torch.zeros(1, registers, hidden))
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, heads, mlp_hidden, hidden if cross_attention else 0) for _ in range(depth))
        self.unpatch_norm, self.unpatch_proj = nn.LayerNorm(hidden), nn.Linear(hidden, token_in)
        self.output_blocks = nn.ModuleList(
            TimeResBlock(unet_channels, hidden, skip=True, skip_reduction=skip_reduction, cond_dim=res_condition)
            for _ in range(res_blocks))
        self.out_norm = GroupNorm32(unet_channels)
        self.out_conv = nn.Conv3d(unet_channels, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, G, G, G], t [B] timestep indices, context [B, tokens, dim] (already mapped) -> same shape as x."""
        t_emb = self.time_embed(t)
        res_cond = self.res_condition(context) if hasattr(self, "res_condition") else None
        tokens_context = self.context_proj(context) if hasattr(self, "context_proj") else None
        block_c = t_emb + self.time_condition(context) if hasattr(self, "time_condition") else t_emb

        h = self.conv_in(x)
        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb, cond=res_cond)
            skips.append(h)
        tokens = self.patch_proj(self.patch_norm(patchify(h, self.patch_size))) + self.pos_emb
        n_reg = self.registers.shape[1] if hasattr(self, "registers") else 0
        if n_reg:
            tokens = torch.cat([tokens, self.registers.expand(tokens.shape[0], -1, -1).to(tokens.dtype)], dim=1)
        for block in self.blocks:
            tokens = block(tokens, block_c, tokens_context)
        if n_reg:
            tokens = tokens[:, :-n_reg]
        h = unpatchify(self.unpatch_proj(self.unpatch_norm(tokens)), self.patch_size, self.grid)
        for block in self.output_blocks:
            h = block(h, t_emb, skip=skips.pop(), cond=res_cond)
        return self.out_conv(F.silu(self.out_norm(h)))
