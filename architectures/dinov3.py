"""DINOv3 ViT: Siméoni et al., "DINOv3", arXiv 2508.10104 (facebookresearch/dinov3).

A plain pre-norm ViT with four additions, all here:
- tokens are [class, 4 registers ("storage tokens"), patches]; there is no absolute position embedding;
- 2-D RoPE on the patch tokens only: each patch centre gets coordinates normalised separately per axis to
  [-1, 1] (y first, then x); head_dim/4 periods base^(2k / (head_dim/2)) give angles 2*pi*coord/period for y and
  for x, laid out rotate-half style (the same head_dim/2 angles for the first and the second half of a head);
- LayerScale on both residual branches;
- the released query-key-value projection has a bias whose key part is masked to zero (`bias_mask` = 1, 0, 1),
  so only query and value biases exist here (and none at all in the 7B model).
The feed-forward is a GELU MLP (S, B, L) or SwiGLU (S+, H+, 7B). The class token and the patch tokens both go
through the final LayerNorm. Input sizes are free (any multiple of the patch size): the RoPE grid is computed
per input, so nothing positional is stored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from zoo.architectures import vit
from zoo.architectures.layers import GatedMLP, Mlp, rotate_half

from zoo.family import Family
from zoo.registry import Entry, Source


@dataclass
class DINOv3Config:
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn: str = "mlp"  # "mlp" (fc2(gelu(fc1 x))) or "swiglu" (down(silu(gate x) * up x))
    ffn_hidden: int = 1536  # hidden width (SwiGLU: of each of its two input projections)
    qkv_bias: bool = True  # query and value biases; the key bias is masked out in every release
    proj_bias: bool = True
    num_register_tokens: int = 4
    layerscale: bool = True
    rope_base: float = 100.0
    # The official .pth files store the RoPE periods rounded to bfloat16 (they were trained with a bf16 RoPE
    # buffer) and the official model computes with those; timm and transformers regenerate them in float32.
    # Both are derived, not stored: "bfloat16" reproduces the official numbers, "float32" timm/transformers'.
    rope_periods: str = "float32"
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.rope_periods not in ("float32", "bfloat16"):
            raise ValueError(f"rope_periods must be 'float32' or 'bfloat16', got {self.rope_periods!r}")
        if self.embed_dim % (4 * self.num_heads):
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of 4 x num_heads ({self.num_heads}): "
                             "2-D RoPE splits each head into y and x halves of cos/sin pairs")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens


# -- 2-D rotary position embedding ---------------------------------------------------------------------------------


def rope_periods(head_dim: int, base: float, dtype: str = "float32", device=None) -> torch.Tensor:
    """[head_dim/4] periods base^(2k / (head_dim/2)), optionally rounded to bfloat16 as the official files are."""
    k = torch.arange(head_dim // 4, dtype=torch.float32, device=device)
    periods = base ** (2 * k / (head_dim // 2))
    return periods.bfloat16().float() if dtype == "bfloat16" else periods


def rope_cos_sin(h: int, w: int, periods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [h*w, head_dim] (float32) for a grid of h x w patches, row-major."""
    dd = dict(dtype=torch.float32, device=periods.device)
    ys = torch.arange(0.5, h, **dd) / h  # patch centres, each axis normalised by its own length
    xs = torch.arange(0.5, w, **dd) / w
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0  # [hw, 2] in [-1, 1]
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # [hw, 2, head_dim/4]
    angles = angles.flatten(1).tile(2)  # [hw, head_dim]: (y angles, x angles) for each half of the head
    return angles.cos(), angles.sin()


def apply_rope_to_patches(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: int) -> torch.Tensor:
    """Rotate the patch tokens of x [B, heads, N, hd] (in float32); the class and register tokens pass through."""
    patches = x[:, :, prefix:].float()
    patches = patches * cos + rotate_half(patches) * sin
    return torch.cat([x[:, :, :prefix], patches.to(x.dtype)], dim=2)


# -- modules -------------------------------------------------------------------------------------------------------


class Attention(vit.Attention):
    """q and v biases (the released key bias is masked to zero), 2-D RoPE on the patch tokens."""

    def __init__(self, c: DINOv3Config):
        super().__init__(c.embed_dim, c.num_heads, bias="qv" if c.qkv_bias else None, proj_bias=c.proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: int) -> torch.Tensor:
        return super().forward(x, rope=lambda t: apply_rope_to_patches(t, cos, sin, prefix))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1 x)), then + ls2(ffn(norm2 x))."""

    def __init__(self, c: DINOv3Config):
        super().__init__()
        d = c.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=c.norm_eps)
        self.attn = Attention(c)
        self.ls1 = LayerScale(d) if c.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=c.norm_eps)
        self.mlp = Mlp(d, c.ffn_hidden) if c.ffn == "mlp" else GatedMLP(d, c.ffn_hidden, bias=True)
        self.ls2 = LayerScale(d) if c.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: int) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), cos, sin, prefix))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, c: DINOv3Config):
        super().__init__()
        self.proj = nn.Conv2d(c.in_chans, c.embed_dim, c.patch_size, stride=c.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, D], row-major


class DINOv3Features(NamedTuple):
    cls_token: torch.Tensor  # [B, D], after the final norm
    patch_tokens: torch.Tensor  # [B, D, H/16, W/16], after the final norm (a dense feature map)
    register_tokens: torch.Tensor  # [B, registers, D], after the final norm


class DINOv3(nn.Module):
    def __init__(self, c: DINOv3Config):
        super().__init__()
        self.config = c
        d = c.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, c.num_register_tokens, d))
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.num_features = d

    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_chans:
            raise ValueError(f"DINOv3 takes images as a [batch, {c.in_chans}, height, width] tensor; got shape "
                             f"{tuple(x.shape)}")
        if x.shape[2] % c.patch_size or x.shape[3] % c.patch_size:
            raise ValueError(f"image height and width must be multiples of the patch size {c.patch_size}; got "
                             f"{x.shape[2]}x{x.shape[3]}")

    def run_blocks(self, x: torch.Tensor, keep: set[int] = frozenset()) -> tuple[torch.Tensor, dict[int, torch.Tensor],
                                                                                  tuple[int, int]]:
        """All blocks on an image; returns the last tokens, the (un-normed) tokens after each block in `keep`,
        and the patch grid."""
        self.check_input(x)
        c = self.config
        h, w = x.shape[2] // c.patch_size, x.shape[3] // c.patch_size
        patches = self.patch_embed(x)
        B = patches.shape[0]
        tokens = torch.cat([self.cls_token.expand(B, -1, -1).to(patches.dtype),
                            self.register_tokens.expand(B, -1, -1).to(patches.dtype), patches], dim=1)
        periods = rope_periods(c.head_dim, c.rope_base, c.rope_periods, device=x.device)
        cos, sin = rope_cos_sin(h, w, periods)
        kept = {}
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, cos, sin, c.num_prefix_tokens)
            if i in keep:
                kept[i] = tokens
        return tokens, kept, (h, w)

    def split(self, tokens: torch.Tensor, grid: tuple[int, int]) -> DINOv3Features:
        """Normed tokens [B, 1+R+N, D] -> class token, patch feature map, registers."""
        B, _, D = tokens.shape
        p = self.config.num_prefix_tokens
        patches = tokens[:, p:].transpose(1, 2).reshape(B, D, *grid)
        return DINOv3Features(tokens[:, 0], patches, tokens[:, 1:p])

    def forward_features(self, x: torch.Tensor) -> DINOv3Features:
        """Class token [B, D], dense patch features [B, D, H/16, W/16] and register tokens, all final-normed."""
        tokens, _, grid = self.run_blocks(x)
        return self.split(self.norm(tokens), grid)

    def intermediate_layers(self, x: torch.Tensor, layers: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(patch tokens [B, N, D], class token [B, D]) after each listed block, through the final norm (as the
        official get_intermediate_layers(n=layers, return_class_token=True) gives them)."""
        bad = [i for i in layers if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"layers {bad} do not exist in a {len(self.blocks)}-block DINOv3")
        _, kept, _ = self.run_blocks(x, set(layers))
        p = self.config.num_prefix_tokens
        out = []
        for i in layers:
            normed = self.norm(kept[i])
            out.append((normed[:, p:], normed[:, 0]))
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The global image descriptor: the final-normed class token [B, D]."""
        return self.forward_features(x).cls_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build(c: DINOv3Config) -> DINOv3:
    return DINOv3(c)


def count_params(c: DINOv3Config) -> int:
    d, h = c.embed_dim, c.ffn_hidden
    ffn_in = 2 if c.ffn == "swiglu" else 1
    ffn = ffn_in * (d * h + h) + h * d + d
    attn = 3 * d * d + (2 * d if c.qkv_bias else 0) + d * d + (d if c.proj_bias else 0)
    block = 4 * d + attn + ffn + (2 * d if c.layerscale else 0)
    embed = c.in_chans * c.patch_size**2 * d + d + d + c.num_register_tokens * d
    return embed + c.depth * block + 2 * d


# -- published models (facebookresearch/dinov3 hub/backbones.py; timm vit_*_patch16_dinov3*) -----------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # the satellite (SAT-493M) models' statistics
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov3/dinov3_{arch}/dinov3_{arch}_pretrain_{data}-{hash}.pth"
LICENSE = "dinov3-license"
LICENSE_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
DATASETS = {"lvd1689m": "LVD-1689M (1.7B curated web images)", "sat493m": "SAT-493M (493M satellite images)"}


def preprocessing(data: str = "lvd1689m") -> dict:
    """timm's eval transform for the DINOv3 weights: 256 px, short side resize + center crop 1.0, bicubic."""
    mean, std = (SAT_MEAN, SAT_STD) if data == "sat493m" else (IMAGENET_MEAN, IMAGENET_STD)
    return {"resolution": 256, "crop_pct": 1.0, "interpolation": "bicubic", "mean": list(mean), "std": list(std)}


# arch: embed_dim, depth, heads, ffn, hidden, qkv_bias, timm architecture, README parameter count
SIZES = {
    "vits16": (384, 12, 6, "mlp", 1536, True, "vit_small_patch16_dinov3_qkvb", "21M"),
    "vits16plus": (384, 12, 6, "swiglu", 1536, True, "vit_small_plus_patch16_dinov3_qkvb", "29M"),
    "vitb16": (768, 12, 12, "mlp", 3072, True, "vit_base_patch16_dinov3_qkvb", "86M"),
    "vitl16": (1024, 24, 16, "mlp", 4096, True, "vit_large_patch16_dinov3_qkvb", "300M"),
    "vith16plus": (1280, 32, 20, "swiglu", 5120, True, "vit_huge_plus_patch16_dinov3_qkvb", "840M"),
    "vit7b16": (4096, 40, 32, "swiglu", 8192, False, "vit_7b_patch16_dinov3", "6,716M"),
}
HEADS_BY_DIM = {v[0]: v[2] for v in SIZES.values()}  # head dim 64 in every published model
NAMES = {"vits16": "ViT-S/16", "vits16plus": "ViT-S+/16", "vitb16": "ViT-B/16", "vitl16": "ViT-L/16",
         "vith16plus": "ViT-H+/16", "vit7b16": "ViT-7B/16"}
HASHES = {("vits16", "lvd1689m"): "08c60483", ("vits16plus", "lvd1689m"): "4057cbaa",
          ("vitb16", "lvd1689m"): "73cec8be", ("vitl16", "lvd1689m"): "8aa4cbdd", ("vitl16", "sat493m"): "eadcf0ff",
          ("vith16plus", "lvd1689m"): "7c1da9a5", ("vit7b16", "lvd1689m"): "a955f4ea",
          ("vit7b16", "sat493m"): "a6675841"}


def size_config(arch: str, **kw) -> DINOv3Config:
    d, depth, heads, ffn, hidden, qkv_bias, _, _ = SIZES[arch]
    return DINOv3Config(embed_dim=d, depth=depth, num_heads=heads, ffn=ffn, ffn_hidden=hidden, qkv_bias=qkv_bias,
                        **kw)


def _entries() -> list[Entry]:
    out = []
    for (arch, data), h in HASHES.items():
        c = size_config(arch)
        timm_arch = SIZES[arch][6]
        distilled = "" if arch == "vit7b16" else ", distilled from the 7B teacher"
        out.append(Entry(
            name=f"dinov3-{arch}-{data}",
            family="dinov3",
            config=asdict(c),
            source=Source(repo=f"timm/{timm_arch}.{data}", layout="timm-dinov3"),
            license=LICENSE,
            paper="https://arxiv.org/abs/2508.10104",
            task="image-feature-extraction",
            params=count_params(c),
            description=f"DINOv3 {NAMES[arch]} backbone (self-supervised{distilled}) pre-trained on "
                        f"{DATASETS[data]}; class token and dense patch features",
            tags=("vision", "dinov3", "backbone", data),
            extra={**preprocessing(data), "official_url": OFFICIAL_URL.format(arch=arch, data=data, hash=h),
                   "hf_transformers_repo": f"facebook/dinov3-{arch}-pretrain-{data}", "license_url": LICENSE_URL,
                   "readme_params": SIZES[arch][7]},
        ))
    return out


FAMILY = Family(
    name="dinov3",
    config_cls=DINOv3Config,
    build=build,
    task="image-feature-extraction",
    entries=tuple(_entries()),
    card_template="dinov3.md",
)
