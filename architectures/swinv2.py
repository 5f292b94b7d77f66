"""Swin Transformer V2: Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", arXiv 2111.09883.

A hierarchical vision transformer: 4x4 patches, then stages of window attention blocks separated by patch
merging (2x2 neighbours concatenated, linearly reduced). V2 changes three things from V1, all here:
- residual post-norm: x = x + LN(attn(x)), x = x + LN(mlp(x));
- scaled cosine attention: cos(q, k) * exp(min(logit_scale, ln 100)), no 1/sqrt(d);
- a continuous position bias: a small MLP maps log-spaced relative coordinates to a per-head bias, so a
  checkpoint trained with one window can run with another (the coordinates are normalised by the
  *pretrained* window size). Relative coordinate tables, indices and shifted-window masks are derived
  buffers: computed from the config, never loaded.
Input size is fixed by the window partition (as in the official code): the config's img_size.

How it runs (same math as the official code, fewer passes over memory): within a stage the tokens stay in
window order, [B, tokens, C] with each window's tokens consecutive, because every operation except attention
is per token. Going from one block's windows to the next (shifted) block's is then one gather with a
precomputed index, instead of roll + partition + reverse + roll; the stage's last gather puts the tokens in
2x2-neighbour order for patch merging (or back in row-major order). Attention is one fused
scaled_dot_product_attention call: the per-head temperature is folded into the normalised queries, and the
position bias and the shifted-window mask are one additive mask.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels.linear import gelu_mlp, linear
from zoo.architectures.layers import Mlp

from zoo.family import Family
from zoo.registry import Entry, Source

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # the clamp on the learnable temperature: ln 100
CPB_HIDDEN = 512  # hidden width of the continuous position bias MLP (all published models)


@dataclass
class SwinV2Config:
    img_size: int = 256
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 8
    # per stage; 0 = trained at this window. Fine-tuned-at-larger-window models keep their pre-training window
    # here so the position-bias coordinates are normalised as in pre-training.
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    norm_eps: float = 1e-5  # block and final norms (patch-embed and merging norms are 1e-5 everywhere)

    def __post_init__(self):
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)
        self.pretrained_window_sizes = tuple(self.pretrained_window_sizes)
        if not (len(self.depths) == len(self.num_heads) == len(self.pretrained_window_sizes)):
            raise ValueError(f"depths {self.depths}, num_heads {self.num_heads} and pretrained_window_sizes "
                             f"{self.pretrained_window_sizes} need one entry per stage")
        grid = self.img_size // self.patch_size
        if self.img_size % self.patch_size or grid % 2 ** (len(self.depths) - 1):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size * 2^(stages-1) = "
                             f"{self.patch_size * 2 ** (len(self.depths) - 1)}")
        for i, r in enumerate(self.resolutions()):
            w = min(self.window_size, r)
            if r % w:
                raise ValueError(f"stage {i} is {r}x{r} tokens, not a multiple of window {self.window_size}")

    def resolutions(self) -> list[int]:
        """Token grid side of each stage."""
        return [self.img_size // self.patch_size // 2**i for i in range(len(self.depths))]

    def dims(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]


# -- derived tables --------------------------------------------------------------------------------------------


def relative_coords_table(window: int, pretrained_window: int, device=None) -> torch.Tensor:
    """[(2W-1)^2, 2] log-spaced relative (dh, dw): normalised to [-8, 8], then sign(x) log2(1+|x|) / 3."""
    r = torch.arange(-(window - 1), window, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2)
    table = table / max((pretrained_window if pretrained_window > 0 else window) - 1, 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int, device=None) -> torch.Tensor:
    """[W*W, W*W]: row of the coords table for each (query, key) pair of a row-major window."""
    c = torch.arange(window, device=device)
    coords = torch.stack(torch.meshgrid(c, c, indexing="ij")).flatten(1)  # 2, W*W
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # shift to start at 0
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, w*w, C]"""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_order(res: int, window: int, shift: int, device=None) -> torch.Tensor:
    """[res*res]: the row-major grid index of each token when the grid, cyclically shifted by -shift, is cut
    into windows (window-major, row-major inside a window): the token order a block's attention works in."""
    grid = torch.arange(res * res, device=device).view(1, res, res, 1)
    if shift:
        grid = torch.roll(grid, (-shift, -shift), dims=(1, 2))
    return window_partition(grid, window).reshape(-1)


def merge_order(res: int, device=None) -> torch.Tensor:
    """[res*res]: row-major grid index of the 2x2 neighbours of each merged token, merged tokens in row-major
    order, neighbours in the published concatenation order (0,0), (1,0), (0,1), (1,1) as (row, col) offsets."""
    r = torch.arange(0, res, 2, device=device)
    top_left = (r[:, None] * res + r[None, :]).reshape(-1, 1)
    return (top_left + torch.tensor([0, res, 1, res + 1], device=device)).reshape(-1)


def gather_index(current: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor | None:
    """Index that reorders tokens laid out as `current` (grid index of each position) into `wanted`;
    None when the orders are the same."""
    if torch.equal(current, wanted):
        return None
    return torch.argsort(current)[wanted]


def to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def shifted_window_mask(res: int, window: int, shift: int, device=None) -> torch.Tensor:
    """[nW, w*w, w*w]: -100 between tokens that the cyclic shift brought together from different regions."""
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    regions = torch.zeros(1, res, res, 1, device=device)
    for n, (h, w) in enumerate((h, w) for h in bands for w in bands):
        regions[:, h, w, :] = n
    ids = window_partition(regions, window).squeeze(-1)  # nW, w*w
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


# -- modules ---------------------------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, pretrained_window: int):
        super().__init__()
        self.heads, self.window, self.pretrained_window = heads, window, pretrained_window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))  # no key bias: it would cancel in the softmax
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN), nn.ReLU(inplace=True),
                                     nn.Linear(CPB_HIDDEN, heads, bias=False))
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("relative_coords_table", relative_coords_table(window, pretrained_window),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        self.relative_coords_table = relative_coords_table(self.window, self.pretrained_window, device)
        self.relative_position_index = relative_position_index(self.window, device)

    def position_bias(self) -> torch.Tensor:
        """[heads, w*w, w*w] = 16 * sigmoid(MLP(coords))[index]"""
        table = self.cpb_mlp(self.relative_coords_table.to(self.proj.weight.dtype))  # (2w-1)^2, heads
        n = self.window * self.window
        bias = table[self.relative_position_index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [windows, N, C], the windows of one image consecutive; mask: [windows per image, N, N] or None."""
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = linear(self.qkv, x, bias=bias).view(B, N, 3, self.heads, -1)
        # cos(q, k) * temperature + bias: queries and keys scaled to unit length together (F.normalize's
        # x / max(|x|, 1e-12), read in qkv's own layout), then the per-head temperature multiplies the queries
        qk = qkv[:, :, :2]
        q, k = (qk / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min(1e-12)).permute(2, 0, 3, 1, 4)
        q = q * torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()
        v = qkv[:, :, 2].transpose(1, 2)
        bias = self.position_bias()[None]  # 1, heads, N, N
        if mask is not None:  # one additive mask per window of an image, repeated for each image
            nw = mask.shape[0]
            bias = (bias + mask[:, None]).expand(B // nw, nw, self.heads, N, N).reshape(B, self.heads, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return linear(self.proj, x.transpose(1, 2).reshape(B, N, C))


class SwinV2Block(nn.Module):
    """Window attention (shifted on odd blocks) and an MLP, each with residual post-norm."""

    def __init__(self, dim: int, heads: int, res: int, window: int, shift: bool, pretrained_window: int,
                 mlp_ratio: float, eps: float):
        super().__init__()
        self.res = res
        self.window = min(window, res)  # a stage no larger than the window is one unshifted window
        self.shift = self.window // 2 if shift and res > window else 0
        self.attn = WindowAttention(dim, heads, self.window, pretrained_window)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        mask = shifted_window_mask(res, self.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        self.attn_mask = shifted_window_mask(self.res, self.window, self.shift, device)

    def order(self, device=None) -> torch.Tensor:
        """Grid index of each token in this block's window order."""
        return window_order(self.res, self.window, self.shift, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, res*res, C] in this block's window order (see window_order); returns the same layout."""
        B, L, C = x.shape
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        y = self.attn(x.view(-1, self.window * self.window, C), mask).view(B, L, C)
        x = x + self.norm1(y)
        return x + self.norm2(gelu_mlp(self.mlp, x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order: (0,0), (1,0), (0,1), (1,1)) -> Linear(4C, 2C) -> LayerNorm(2C).

    The stage hands the neighbours over already side by side (merge_order), so the concatenation is a view."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, neighbours: torch.Tensor) -> torch.Tensor:  # [B, H/2, W/2, 4C]
        return self.norm(linear(self.reduction, neighbours))


class Stage(nn.Module):
    def __init__(self, c: SwinV2Config, i: int):
        super().__init__()
        dim, self.res = c.dims()[i], c.resolutions()[i]
        self.blocks = nn.ModuleList(
            SwinV2Block(dim, c.num_heads[i], self.res, c.window_size, j % 2 == 1, c.pretrained_window_sizes[i],
                        c.mlp_ratio, c.norm_eps)
            for j in range(c.depths[i])
        )
        # merging ends a stage (the official layout; timm starts the next stage with it)
        self.downsample = PatchMerging(dim) if i < len(c.depths) - 1 else None
        self.init_buffers(None)

    def init_buffers(self, device: torch.device | None) -> None:
        """Token gathers (derived buffers): into each block's window order, then out of the last one.

        Computed on the CPU (they are small and data-dependent, which the meta device is not), then moved."""
        device, cpu = device or torch.get_default_device(), torch.device("cpu")
        current = torch.arange(self.res * self.res, device=cpu)  # row-major, as the stage receives them
        for j, block in enumerate(self.blocks):
            wanted = block.order(cpu)
            self.register_buffer(f"gather_{j}", to(gather_index(current, wanted), device), persistent=False)
            current = wanted
        out = merge_order(self.res, cpu) if self.downsample is not None else torch.arange(self.res**2, device=cpu)
        self.register_buffer("gather_out", to(gather_index(current, out), device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C] -> [B, H', W', C']
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for j, block in enumerate(self.blocks):
            index = getattr(self, f"gather_{j}")
            x = block(x if index is None else x[:, index])
        x = x if self.gather_out is None else x[:, self.gather_out]
        if self.downsample is None:
            return x.view(B, H, W, C)
        return self.downsample(x.view(B, H // 2, W // 2, 4 * C))


class PatchEmbed(nn.Module):
    def __init__(self, c: SwinV2Config):
        super().__init__()
        self.proj = nn.Conv2d(c.in_chans, c.embed_dim, c.patch_size, stride=c.patch_size)
        self.norm = nn.LayerNorm(c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # [B, H, W, C]


class SwinTransformerV2(nn.Module):
    def __init__(self, c: SwinV2Config):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.layers = nn.ModuleList(Stage(c, i) for i in range(len(c.depths)))
        self.num_features = c.dims()[-1]
        self.norm = nn.LayerNorm(self.num_features, eps=c.norm_eps)
        self.head = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_chans, c.img_size, c.img_size)

    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4:
            raise ValueError(f"Swin V2 takes images as a [batch, channels, height, width] tensor; got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != c.in_chans:
            raise ValueError(f"this Swin V2 model takes {c.in_chans}-channel images; got {x.shape[1]} channels")
        if tuple(x.shape[2:]) != (c.img_size, c.img_size):
            raise ValueError(f"this Swin V2 model takes {c.img_size}x{c.img_size} images (its window partition "
                             f"fixes the size); got {x.shape[2]}x{x.shape[3]}. predict() resizes images for you; "
                             "other sizes need another window/img_size (ImageClassifier.reconfigure)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised feature map [B, H/32, W/32, C]."""
        self.check_input(x)
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, C] (the classifier's input)."""
        return self.forward_features(x).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return f if self.head is None else linear(self.head, f)


def build(c: SwinV2Config) -> SwinTransformerV2:
    return SwinTransformerV2(c)


def count_params(c: SwinV2Config) -> int:
    hidden = lambda d: int(d * c.mlp_ratio)
    n = c.in_chans * c.patch_size**2 * c.embed_dim + 3 * c.embed_dim  # conv + bias + norm
    for i, (dim, heads) in enumerate(zip(c.dims(), c.num_heads)):
        attn = 3 * dim * dim + 2 * dim + heads + (2 * CPB_HIDDEN + CPB_HIDDEN + CPB_HIDDEN * heads) + dim * dim + dim
        mlp = 2 * dim * hidden(dim) + hidden(dim) + dim
        n += c.depths[i] * (attn + mlp + 4 * dim)
        if i < len(c.depths) - 1:
            n += 4 * dim * 2 * dim + 2 * 2 * dim
    d = c.dims()[-1]
    return n + 2 * d + (d * c.num_classes + c.num_classes if c.num_classes else 0)


# -- published models --------------------------------------------------------------------------------------------

SIZES = {  # embed_dim, depths, num_heads (paper Table 1; official configs/swinv2/*.yaml)
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFFICIAL_URL = "https://github.com/SwinTransformer/storage/releases/download/v2.0.0/{}.pth"


@dataclass(frozen=True)
class Published:
    size: str
    img: int
    window: int
    pretrained: tuple[int, ...]  # per-stage pretrained windows
    labels: str  # label set: imagenet-1k | imagenet-22k
    timm: str  # timm architecture.tag (weights on the Hub as timm/<this>)
    official: str  # official release file stem
    hf: str  # transformers repo

    @property
    def config(self) -> SwinV2Config:
        dim, depths, heads = SIZES[self.size]
        return SwinV2Config(img_size=self.img, embed_dim=dim, depths=depths, num_heads=heads,
                            window_size=self.window, pretrained_window_sizes=self.pretrained,
                            num_classes=21841 if self.labels == "imagenet-22k" else 1000)


FT = (12, 12, 12, 6)  # 22k pre-training at 192 px / window 12: stage 4 is 6x6
PUBLISHED: dict[str, Published] = {}
for _size in ("tiny", "small", "base"):
    for _w in (8, 16):
        PUBLISHED[f"swinv2-{_size}-w{_w}-256-in1k"] = Published(
            _size, 256, _w, (0, 0, 0, 0), "imagenet-1k", f"swinv2_{_size}_window{_w}_256.ms_in1k",
            f"swinv2_{_size}_patch4_window{_w}_256", f"microsoft/swinv2-{_size}-patch4-window{_w}-256")
for _size in ("base", "large"):
    PUBLISHED[f"swinv2-{_size}-w12-192-in22k"] = Published(
        _size, 192, 12, (0, 0, 0, 0), "imagenet-22k", f"swinv2_{_size}_window12_192.ms_in22k",
        f"swinv2_{_size}_patch4_window12_192_22k", f"microsoft/swinv2-{_size}-patch4-window12-192-22k")
    for _w, _img in ((16, 256), (24, 384)):
        PUBLISHED[f"swinv2-{_size}-w12to{_w}-192to{_img}-in22k-ft-in1k"] = Published(
            _size, _img, _w, FT, "imagenet-1k", f"swinv2_{_size}_window12to{_w}_192to{_img}.ms_in22k_ft_in1k",
            f"swinv2_{_size}_patch4_window12to{_w}_192to{_img}_22kto1k_ft",
            f"microsoft/swinv2-{_size}-patch4-window12to{_w}-192to{_img}-22kto1k-ft")


def preprocessing(img: int, crop_pct: float | None = None) -> dict:
    """timm's published eval transform: resize the short side to img/crop_pct (bicubic), center crop, normalise."""
    return {"resolution": img, "crop_pct": crop_pct if crop_pct is not None else (1.0 if img >= 384 else 0.9),
            "interpolation": "bicubic", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _entries() -> list[Entry]:
    out = []
    for name, p in PUBLISHED.items():
        c = p.config
        data = "ImageNet-22k (21,841 classes)" if p.labels == "imagenet-22k" else "ImageNet-1k"
        ft = " pre-trained on ImageNet-22k at 192 px / window 12, fine-tuned on ImageNet-1k" if p.pretrained[0] else ""
        out.append(Entry(
            name=name,
            family="swinv2",
            config=asdict(c),
            source=Source(repo=f"timm/{p.timm}", layout="timm-swinv2"),
            license="mit",
            paper="https://arxiv.org/abs/2111.09883",
            task="image-classification",
            params=count_params(c),
            description=f"Swin Transformer V2-{p.size.capitalize()}, {p.img}x{p.img}, window {p.window}, "
                        f"{data} classifier{ft}",
            tags=("vision", "swinv2", p.labels),
            extra={**preprocessing(p.img), "label_set": p.labels, "official_url": OFFICIAL_URL.format(p.official),
                   "hf_transformers_repo": p.hf},
        ))
    return out


FAMILY = Family(
    name="swinv2",
    config_cls=SwinV2Config,
    build=build,
    task="image-classification",
    entries=tuple(_entries()),
    card_template="swinv2.md",
)
