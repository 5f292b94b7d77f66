"""VideoMAE V2: Wang et al., "VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking", arXiv 2303.16727.

V2 changes the training recipe (dual masking: the encoder sees 10% of the tubes, the decoder reconstructs
half of the rest; progressive pre-train -> post-pre-train -> fine-tune; a billion-parameter ViT-g), not the
network that runs at inference: a plain ViT over video tubelets.
- tubelet embedding: Conv3d with kernel = stride = (2 frames, p, p), p = 16 (14 for the giant);
- a fixed 1-D sine-cosine position table over the flattened (t, h, w) token index (derived, never stored);
- pre-norm blocks, exact GELU, attention with q and v biases only (the key bias is zero);
- no class token: the classifier reads fc_norm(mean of all tokens).
Masking exists only in pre-training; this module runs the full token set (inference and feature extraction).
Input: [B, C, T, H, W] (the official layout; transformers' VideoMAE takes [B, T, C, H, W]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from zoo.architectures import vit
from zoo.architectures.kernels.linear import gelu_mlp, linear
from zoo.architectures.layers import Mlp

from zoo.family import Family
from zoo.registry import Entry, Source

FINAL_NORMS = ("fc_norm", "norm", "none")


@dataclass
class VideoMAEv2Config:
    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072  # int(embed_dim * mlp_ratio); 6144 for the giant (ratio 48/11)
    qkv_bias: bool = True  # q and v biases (never a k bias)
    num_classes: int = 0  # 0: a backbone, model(x) returns pooled features
    # how tokens become one vector: "fc_norm" = LayerNorm(mean(tokens)) (fine-tuned models and the hub backbones);
    # "norm" = mean(LayerNorm(tokens)) (a pre-training encoder's own final norm); "none" = mean(tokens)
    final_norm: str = "fc_norm"
    norm_eps: float = 1e-6  # block norms and "norm"
    fc_norm_eps: float = 1e-6  # the official code uses 1e-6; transformers' VideoMAE classifier uses 1e-5

    def __post_init__(self):
        if self.final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm must be one of {FINAL_NORMS}, not {self.final_norm!r}")
        if self.img_size % self.patch_size or self.num_frames % self.tubelet_size:
            raise ValueError(f"img_size {self.img_size} / num_frames {self.num_frames} must be multiples of the "
                             f"patch {self.patch_size} / tubelet {self.tubelet_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")

    @property
    def num_tokens(self) -> int:
        return (self.num_frames // self.tubelet_size) * (self.img_size // self.patch_size) ** 2


def sinusoid_table(n: int, dim: int, device=None) -> torch.Tensor:
    """[1, n, dim]: angle pos / 10000^(2 (j // 2) / dim); sin on even j, cos on odd j (computed in float64)."""
    pos = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    j = torch.arange(dim, device=device, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class TubeletEmbed(nn.Module):
    def __init__(self, c: VideoMAEv2Config):
        super().__init__()
        k = (c.tubelet_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_chans, c.embed_dim, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, T/2 * H/p * W/p, D], order (t, h, w)


class Attention(vit.Attention):
    """q and v biases only (the key bias is zero), as BEiT."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__(dim, heads, bias="qv" if qkv_bias else None)


class Block(nn.Module):
    def __init__(self, c: VideoMAEv2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.attn = Attention(c.embed_dim, c.num_heads, c.qkv_bias)
        self.norm2 = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.mlp = Mlp(c.embed_dim, c.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + gelu_mlp(self.mlp, self.norm2(x))


class VideoMAEv2(nn.Module):
    def __init__(self, c: VideoMAEv2Config):
        super().__init__()
        self.config = c
        self.patch_embed = TubeletEmbed(c)
        self.register_buffer("pos_embed", sinusoid_table(c.num_tokens, c.embed_dim), persistent=False)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps) if c.final_norm == "norm" else None
        self.fc_norm = nn.LayerNorm(c.embed_dim, eps=c.fc_norm_eps) if c.final_norm == "fc_norm" else None
        self.head = nn.Linear(c.embed_dim, c.num_classes) if c.num_classes > 0 else None
        self.num_features = c.embed_dim

    def init_buffers(self, device: torch.device) -> None:
        self.pos_embed = sinusoid_table(self.config.num_tokens, self.config.embed_dim, device)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        c = self.config
        return (c.in_chans, c.num_frames, c.img_size, c.img_size)

    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 5:
            raise ValueError("VideoMAE V2 takes video as a [batch, channels, frames, height, width] tensor; got "
                             f"shape {tuple(x.shape)}")
        if x.shape[1] != c.in_chans:
            raise ValueError(f"this VideoMAE V2 model takes {c.in_chans}-channel frames; got {x.shape[1]} channels "
                             "(the layout is [batch, channels, frames, height, width])")
        if tuple(x.shape[2:]) != (c.num_frames, c.img_size, c.img_size):
            raise ValueError(f"this VideoMAE V2 model takes {c.num_frames} frames of {c.img_size}x{c.img_size} "
                             f"(its position table has {c.num_tokens} tokens); got {x.shape[2]} frames of "
                             f"{x.shape[3]}x{x.shape[4]}. predict() samples and resizes videos for you")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [B, N, D] (after the per-token norm for pre-training encoders)."""
        self.check_input(x)
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return x if self.norm is None else self.norm(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, D] (the classifier's input)."""
        x = self.forward_features(x).mean(dim=1)
        return x if self.fc_norm is None else self.fc_norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return f if self.head is None else linear(self.head, f)


def build(c: VideoMAEv2Config) -> VideoMAEv2:
    return VideoMAEv2(c)


def count_params(c: VideoMAEv2Config) -> int:
    d, h = c.embed_dim, c.mlp_hidden
    embed = c.in_chans * c.tubelet_size * c.patch_size**2 * d + d
    block = 4 * d + 3 * d * d + (2 * d if c.qkv_bias else 0) + d * d + d + 2 * d * h + h + d
    final = 0 if c.final_norm == "none" else 2 * d
    return embed + c.depth * block + final + (d * c.num_classes + c.num_classes if c.num_classes else 0)


# -- published models (official models/modeling_finetune.py; docs/MODEL_ZOO.md) ---------------------------------

SIZES = {  # embed_dim, depth, heads, mlp hidden, patch
    "s": (384, 12, 6, 1536, 16),
    "b": (768, 12, 12, 3072, 16),
    "l": (1024, 24, 16, 4096, 16),
    "h": (1280, 32, 16, 5120, 16),
    "g": (1408, 40, 16, 6144, 14),
}
HEADS_BY_DIM = {v[0]: v[2] for v in SIZES.values()}  # the official files carry no config: heads follow the width
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Kinetics eval pipeline (dataset/datasets.py, scripts/finetune/*k710*.sh): 16 frames every 4th frame,
# short side -> 224 (bilinear), center crop 224, ImageNet mean/std.
PREPROCESSING = {"resolution": 224, "short_side": 224, "interpolation": "bilinear", "num_frames": 16,
                 "frame_stride": 4, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def size_config(size: str, **kw) -> VideoMAEv2Config:
    d, depth, heads, hidden, patch = SIZES[size]
    return VideoMAEv2Config(patch_size=patch, embed_dim=d, depth=depth, num_heads=heads, mlp_hidden=hidden, **kw)


@dataclass(frozen=True)
class Published:
    size: str
    num_classes: int
    repo: str
    layout: str
    file: str  # file inside the repo ("" = the repo's model.safetensors)
    labels: str  # label set name, "" for backbones
    license: str
    what: str


# OpenGVLab/VideoMAE2 (the mirror of the form-gated release) states no license we could read offline; the code is
# MIT, the same release's backbones on the Hub say cc-by-nc-4.0, so the K710 weights are recorded under that too.
UNVERIFIED_LICENSE = "cc-by-nc-4.0"
PUBLISHED = {
    "videomae2-s-k710-distilled": Published(
        "s", 710, "OpenGVLab/VideoMAE2", "videomae2-official", "distill/vit_s_k710_dl_from_giant.pth",
        "kinetics-710", UNVERIFIED_LICENSE,
        "ViT-S distilled from the K710-fine-tuned ViT-g (K710 top-1 77.6, K400 83.7)"),
    "videomae2-b-k710-distilled": Published(
        "b", 710, "OpenGVLab/VideoMAE2", "videomae2-official", "distill/vit_b_k710_dl_from_giant.pth",
        "kinetics-710", UNVERIFIED_LICENSE,
        "ViT-B distilled from the K710-fine-tuned ViT-g (K710 top-1 81.5, K400 86.6)"),
    "videomae2-g-k710": Published(
        "g", 710, "OpenGVLab/VideoMAE2", "videomae2-official", "mae-g/vit_g_hybrid_pt_1200e_k710_ft.pth",
        "kinetics-710", UNVERIFIED_LICENSE, "ViT-g pre-trained on UnlabeledHybrid, fine-tuned on K710 (top-1 83.8)"),
    "videomae2-base": Published(
        "b", 0, "OpenGVLab/VideoMAEv2-Base", "videomae2-hub", "", "", "cc-by-nc-4.0",
        "ViT-B backbone pre-trained on UnlabeledHybrid-1M (feature extraction)"),
    "videomae2-large": Published(
        "l", 0, "OpenGVLab/VideoMAEv2-Large", "videomae2-hub", "", "", "cc-by-nc-4.0",
        "ViT-L backbone pre-trained on UnlabeledHybrid-1M (feature extraction)"),
    "videomae2-huge": Published(
        "h", 0, "OpenGVLab/VideoMAEv2-Huge", "videomae2-hub", "", "", "cc-by-nc-4.0",
        "ViT-H backbone pre-trained on UnlabeledHybrid-1M (feature extraction)"),
    "videomae2-giant": Published(
        "g", 0, "OpenGVLab/VideoMAEv2-giant", "videomae2-hub", "", "", "cc-by-nc-4.0",
        "ViT-g (1B) backbone pre-trained on UnlabeledHybrid-1M (feature extraction)"),
}


def _entries() -> list[Entry]:
    out = []
    for name, p in PUBLISHED.items():
        c = size_config(p.size, num_classes=p.num_classes)
        extra = dict(PREPROCESSING)
        if p.labels:
            extra["label_set"] = p.labels
        out.append(Entry(
            name=name,
            family="videomae2",
            config=asdict(c),
            source=Source(repo=p.repo, layout=p.layout, files=(p.file,) if p.file else (),
                          file_format="pth" if p.file.endswith(".pth") else "safetensors"),
            license=p.license,
            paper="https://arxiv.org/abs/2303.16727",
            task="video-classification",
            params=count_params(c),
            description=f"VideoMAE V2 {p.what}; 16 frames x 224x224, tubelet 2x{c.patch_size}x{c.patch_size}",
            tags=("vision", "video", "videomae2") + ((p.labels,) if p.labels else ("backbone",)),
            extra=extra,
        ))
    return out


FAMILY = Family(
    name="videomae2",
    config_cls=VideoMAEv2Config,
    build=build,
    task="video-classification",
    entries=tuple(_entries()),
    card_template="videomae2.md",
)
