"""Dino U-Net: Gao et al., "Dino U-Net: Exploiting High-Fidelity Dense Features from Foundation Models for Medical
Image Segmentation", arXiv 2508.20909 (yifangao112/DinoUNet, an nnU-Net v2 fork).

2-D segmentation on a frozen DINOv3 ViT. Reading the network from the input to the logits:
1. channels: 1 channel is repeated to 3, 2 channels become [c0, c1, c0], more than 3 are cut to the first 3;
2. adapter (Meta's ViT-Adapter-style segmentation adapter, extractors only: the ViT itself is not modified):
   - a spatial prior module (conv stem, BatchNorm, ReLU) gives feature maps at 1/4, 1/8, 1/16 and 1/32, each
     projected to the ViT width; the 1/8..1/32 maps, plus a per-level embedding, become query tokens;
   - the ViT runs once; the final LayerNorm is applied to its tokens after each of four tapped blocks;
   - for each tapped block an extractor lets the queries attend to that block's patch tokens with multi-scale
     deformable attention (16 heads x 4 sampling points around each query's own position, bilinear sampling, one
     level), then a ConvFFN (a depth-wise 3x3 conv on each scale between two linear layers); the last tapped block
     has two more extractors;
   - the 1/8 map is upsampled (transposed conv) and added to the 1/4 map; each of the four maps gets the matching
     tapped ViT feature map added (bilinear resize), then a BatchNorm;
3. feature projection module (FAPM), per scale: a shared 1x1 basis (the same for all scales) and a scale-specific
   1x1 basis; FiLM: the shared branch gives (gamma, beta) and z = gamma * specific + beta; refinement: 1x1 conv,
   norm, act, depth-wise separable 3x3 (depth-wise, point-wise, norm, act), 1x1 conv, squeeze-excitation; plus a
   1x1 shortcut from z (none when the widths agree);
4. learnable upsampling: one transposed conv (k2 s2) applied repeatedly to reach H, H/2, H/4, H/8 (so every map is
   upsampled x4; a bilinear fix-up covers sizes that are not powers of two apart);
5. the nnU-Net decoder: from the H/8 map up, transposed conv x2, concatenation with the next skip, stacked
   conv-norm-nonlinearity blocks, and a 1x1 segmentation layer at full resolution (deep supervision is off).
Norm and nonlinearity of FAPM and decoder, conv biases, widths per stage and convs per decoder stage come from the
nnU-Net plans the model was trained with (InstanceNorm2d affine eps 1e-5, LeakyReLU 0.01, biases on). H and W
must be multiples of 32. Trained weights are not published: checkpoints come from users (conversion/nnunet.py).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.dinov3 import DINOv3, DINOv3Config, size_config

from zoo.family import Family

ADAPTER_NORM_EPS = 1e-6  # the extractors' LayerNorms (Meta's adapter)


@dataclass
class DinoUNetConfig:
    backbone: DINOv3Config = field(default_factory=DINOv3Config)
    tapped_layers: tuple[int, ...] = (2, 5, 8, 11)  # the ViT blocks the four extractors read ("interaction_indexes")
    in_channels: int = 1  # the dataset's channels (the network makes them 3)
    num_classes: int = 2  # including background
    spm_width: int = 64  # spatial prior module base width ("conv_inplane")
    deform_heads: int = 16
    deform_points: int = 4
    deform_value_ratio: float = 0.5  # value width = ratio x ViT width
    conv_ffn_ratio: float = 0.25
    extra_extractors: int = 2  # after the last tapped block
    fapm_rank: int = 256
    features_per_stage: tuple[int, ...] = (32, 64, 128, 256)  # decoder widths at H, H/2, H/4, H/8 (from the plans)
    decoder_convs: tuple[int, ...] = (2, 2, 2)  # conv blocks per decoder stage, deepest first (from the plans)
    conv_bias: bool = True
    norm: str = "instance"  # "instance" | "batch": FAPM and decoder normalisation (the plans' norm_op)
    norm_eps: float = 1e-5
    norm_affine: bool = True
    nonlin: str = "leaky_relu"  # "leaky_relu" | "relu" (the plans' nonlin)
    negative_slope: float = 0.01
    nonlin_first: bool = False  # conv -> nonlin -> norm in the decoder blocks
    folds: int = 1  # cross-validation folds stored together: one frozen backbone, one head (adapter..decoder) each

    def __post_init__(self):
        if isinstance(self.backbone, dict):
            self.backbone = DINOv3Config(**self.backbone)
        self.tapped_layers = tuple(self.tapped_layers)
        self.features_per_stage = tuple(self.features_per_stage)
        self.decoder_convs = tuple(self.decoder_convs)
        if len(self.tapped_layers) != 4 or len(self.features_per_stage) != 4 or len(self.decoder_convs) != 3:
            raise ValueError(f"Dino U-Net has 4 tapped layers, 4 stages and 3 decoder stages; got "
                             f"{self.tapped_layers}, {self.features_per_stage}, {self.decoder_convs}")
        if max(self.tapped_layers) >= self.backbone.depth:
            raise ValueError(f"tapped layers {self.tapped_layers} do not exist in a {self.backbone.depth}-block ViT")
        if self.backbone.patch_size != 16:
            raise ValueError("the adapter assumes 16x16 patches (its queries live at 1/8, 1/16, 1/32)")
        if self.norm not in ("instance", "batch") or self.nonlin not in ("leaky_relu", "relu"):
            raise ValueError(f"norm {self.norm!r} / nonlin {self.nonlin!r}: supported are instance|batch and "
                             "leaky_relu|relu")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 1:
            raise ValueError(f"folds={self.folds!r}: must be an integer >= 1")
        if int(self.backbone.embed_dim * self.deform_value_ratio) % self.deform_heads:
            raise ValueError("the deformable attention's value width must split evenly over its heads")


# -- channel handling ------------------------------------------------------------------------------------------


def to_three_channels(x: torch.Tensor) -> torch.Tensor:
    """The published network's rule: repeat the channels cyclically up to 3, or keep the first 3."""
    c = x.shape[1]
    if c == 3:
        return x
    return x.repeat(1, math.ceil(3 / c), 1, 1)[:, :3] if c < 3 else x[:, :3]


def make_norm(c: DinoUNetConfig, channels: int) -> nn.Module:
    cls = nn.InstanceNorm2d if c.norm == "instance" else nn.BatchNorm2d
    return cls(channels, eps=c.norm_eps, affine=c.norm_affine)


def make_nonlin(c: DinoUNetConfig) -> nn.Module:
    return nn.LeakyReLU(c.negative_slope) if c.nonlin == "leaky_relu" else nn.ReLU()


# -- adapter ---------------------------------------------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SpatialPrior(nn.Module):
    """Conv stem -> 1/4 (c1), then stride-2 convs -> 1/8, 1/16, 1/32; 1x1 projections to the ViT width."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        w = width
        self.stem = nn.Sequential(*conv_bn_relu(3, w, 2), *conv_bn_relu(w, w, 1), *conv_bn_relu(w, w, 1),
                                  nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*conv_bn_relu(w, 2 * w, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * w, 4 * w, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * w, 4 * w, 2))
        self.fc1 = nn.Conv2d(w, dim, 1)
        self.fc2 = nn.Conv2d(2 * w, dim, 1)
        self.fc3 = nn.Conv2d(4 * w, dim, 1)
        self.fc4 = nn.Conv2d(4 * w, dim, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


def reference_points(h: int, w: int, device: torch.device) -> torch.Tensor:
    """[h*w, 2] (x, y) cell centres of an h x w grid, normalised to [0, 1]."""
    ys = torch.arange(0.5, h, device=device) / h
    xs = torch.arange(0.5, w, device=device) / w
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


class MSDeformAttention(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR) in plain PyTorch: every query samples
    `points` locations per head and level around its reference point (offsets in units of the level's cells),
    bilinearly (grid_sample, zeros outside), and sums them with softmax weights."""

    def __init__(self, dim: int, heads: int, points: int, value_ratio: float, levels: int = 1):
        super().__init__()
        self.heads, self.points, self.levels = heads, points, levels
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, int(dim * value_ratio))
        self.output_proj = nn.Linear(int(dim * value_ratio), dim)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, feat: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        B, Lq, _ = query.shape
        H, L, P = self.heads, self.levels, self.points
        value = self.value_proj(feat)  # [B, sum(h*w), Dv]
        dh = value.shape[-1] // H
        offsets = self.sampling_offsets(query).view(B, Lq, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Lq, H, L * P).softmax(-1).view(B, Lq, H, L, P)
        out = query.new_zeros(B * H, dh, Lq)
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            v = value[:, start:start + h * w].view(B, h, w, H, dh).permute(0, 3, 4, 1, 2).reshape(B * H, dh, h, w)
            start += h * w
            cells = torch.tensor([w, h], dtype=offsets.dtype, device=offsets.device)
            where = reference[None, :, None, None, :] + offsets[:, :, :, lvl] / cells  # [B, Lq, H, P, 2] in [0, 1]
            grid = (2 * where - 1).permute(0, 2, 1, 3, 4).reshape(B * H, Lq, P, 2)
            sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            w_lvl = weights[:, :, :, lvl].permute(0, 2, 1, 3).reshape(B * H, 1, Lq, P)
            out = out + (sampled * w_lvl).sum(-1)  # [B*H, dh, Lq]
        return self.output_proj(out.view(B, H * dh, Lq).transpose(1, 2))


class ConvFFN(nn.Module):
    """fc1 -> depth-wise 3x3 conv on each scale's token grid -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x = self.fc1(x)
        B, _, C = x.shape
        parts = x.split([h * w for h, w in grids], dim=1)
        x = torch.cat([self.dwconv(p.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
                       for p, (h, w) in zip(parts, grids)], dim=1)
        return self.fc2(F.gelu(x))


class Extractor(nn.Module):
    """query += deformable attention into the ViT tokens; query += ConvFFN."""

    def __init__(self, c: DinoUNetConfig):
        super().__init__()
        d = c.backbone.embed_dim
        self.query_norm = nn.LayerNorm(d, eps=ADAPTER_NORM_EPS)
        self.feat_norm = nn.LayerNorm(d, eps=ADAPTER_NORM_EPS)
        self.attn = MSDeformAttention(d, c.deform_heads, c.deform_points, c.deform_value_ratio)
        self.ffn = ConvFFN(d, int(d * c.conv_ffn_ratio))
        self.ffn_norm = nn.LayerNorm(d, eps=ADAPTER_NORM_EPS)

    def forward(self, query, reference, feat, feat_shape, grids):
        query = query + self.attn(self.query_norm(query), reference, self.feat_norm(feat), [feat_shape])
        return query + self.ffn(self.ffn_norm(query), grids)


class Interaction(nn.Module):
    def __init__(self, c: DinoUNetConfig, extra: int):
        super().__init__()
        self.extractor = Extractor(c)
        self.extra_extractors = nn.ModuleList(Extractor(c) for _ in range(extra)) if extra else None

    def forward(self, query, reference, feat, feat_shape, grids):
        query = self.extractor(query, reference, feat, feat_shape, grids)
        for extractor in self.extra_extractors or ():
            query = extractor(query, reference, feat, feat_shape, grids)
        return query


class DinoAdapter(nn.Module):
    """Dense multi-scale features from a frozen ViT: 4 maps of the ViT width at 1/4, 1/8, 1/16, 1/32."""

    def __init__(self, c: DinoUNetConfig):
        super().__init__()
        d = c.backbone.embed_dim
        self.tapped_layers = list(c.tapped_layers)
        self.level_embed = nn.Parameter(torch.zeros(3, d))
        self.spm = SpatialPrior(c.spm_width, d)
        self.interactions = nn.ModuleList(
            Interaction(c, c.extra_extractors if k == len(c.tapped_layers) - 1 else 0)
            for k in range(len(c.tapped_layers)))
        self.up = nn.ConvTranspose2d(d, d, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(d) for _ in range(4))

    def forward(self, x: torch.Tensor, taps: list[torch.Tensor], vit_grid: tuple[int, int]) -> list[torch.Tensor]:
        """x: the 3-channel input; taps: the backbone's normed patch tokens after each tapped block."""
        B = x.shape[0]
        c1, c2, c3, c4 = self.spm(x)
        grids = [tuple(m.shape[2:]) for m in (c2, c3, c4)]
        queries = torch.cat([m.flatten(2).transpose(1, 2) + e for m, e in zip((c2, c3, c4), self.level_embed)], 1)
        reference = torch.cat([reference_points(h, w, x.device) for h, w in grids]).to(queries.dtype)
        vit_maps = []
        for tokens, interaction in zip(taps, self.interactions):
            queries = interaction(queries, reference, tokens, vit_grid, grids)
            vit_maps.append(tokens.transpose(1, 2).reshape(B, -1, *vit_grid))
        c2, c3, c4 = (q.transpose(1, 2).reshape(B, -1, h, w)
                      for q, (h, w) in zip(queries.split([h * w for h, w in grids], dim=1), grids))
        c1 = self.up(c2) + c1
        maps = [c + F.interpolate(v, size=c.shape[2:], mode="bilinear", align_corners=False)
                for c, v in zip((c1, c2, c3, c4), vit_maps)]
        return [norm(m) for norm, m in zip((self.norm1, self.norm2, self.norm3, self.norm4), maps)]


# -- feature projection module, upsampling, decoder ---------------------------------------------------------------


class ProjectionScale(nn.Module):
    """One scale of the FAPM: FiLM of the specific basis by the shared one, refinement + squeeze-excitation,
    shortcut."""

    def __init__(self, c: DinoUNetConfig, out: int):
        super().__init__()
        d, r, bias = c.backbone.embed_dim, c.fapm_rank, c.conv_bias
        self.specific_basis = nn.Conv2d(d, r, 1, bias=bias)
        self.film = nn.Conv2d(r, 2 * r, 1, bias=bias)
        self.reduce = nn.Conv2d(r, out, 1, bias=bias)
        self.reduce_norm = make_norm(c, out)
        self.depthwise = nn.Conv2d(out, out, 3, 1, 1, groups=out, bias=bias)
        self.pointwise = nn.Conv2d(out, out, 1, bias=bias)
        self.dw_norm = make_norm(c, out)
        self.refine = nn.Conv2d(out, out, 1, bias=bias)
        squeezed = max(1, out // 16)
        self.se_squeeze = nn.Conv2d(out, squeezed, 1)
        self.se_excite = nn.Conv2d(squeezed, out, 1)
        self.shortcut = nn.Conv2d(r, out, 1, bias=bias) if r != out else nn.Identity()
        self.act = make_nonlin(c)

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(shared).chunk(2, dim=1)
        z = gamma * self.specific_basis(x) + beta
        y = self.act(self.reduce_norm(self.reduce(z)))
        y = self.act(self.dw_norm(self.pointwise(self.depthwise(y))))
        y = self.refine(y)
        y = y * torch.sigmoid(self.se_excite(F.relu(self.se_squeeze(y.mean(dim=(2, 3), keepdim=True)))))
        return y + self.shortcut(z)


class FeatureProjection(nn.Module):
    def __init__(self, c: DinoUNetConfig):
        super().__init__()
        self.shared_basis = nn.Conv2d(c.backbone.embed_dim, c.fapm_rank, 1, bias=c.conv_bias)
        self.scales = nn.ModuleList(ProjectionScale(c, out) for out in c.features_per_stage)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [scale(x, self.shared_basis(x)) for scale, x in zip(self.scales, maps)]


def upsample_to(x: torch.Tensor, up: nn.ConvTranspose2d, size: tuple[int, int]) -> torch.Tensor:
    """The same transposed conv (x2) repeated while it does not overshoot, then a bilinear fix-up if needed."""
    while x.shape[2] * 2 <= size[0] and x.shape[3] * 2 <= size[1]:
        x = up(x)
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


class ConvNormAct(nn.Module):
    def __init__(self, c: DinoUNetConfig, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=c.conv_bias)
        self.norm = make_norm(c, cout)
        self.act = make_nonlin(c)
        self.nonlin_first = c.nonlin_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.norm(self.act(x)) if self.nonlin_first else self.act(self.norm(x))


class Decoder(nn.Module):
    """nnU-Net's decoder: from the deepest skip up, transposed conv x2, concat with the next skip, conv blocks;
    the segmentation layer at full resolution."""

    def __init__(self, c: DinoUNetConfig):
        super().__init__()
        ch = c.features_per_stage
        self.transpconvs = nn.ModuleList()
        self.stages = nn.ModuleList()
        for s in range(1, len(ch)):
            below, skip = ch[-s], ch[-(s + 1)]
            self.transpconvs.append(nn.ConvTranspose2d(below, skip, 2, 2, bias=c.conv_bias))
            n = c.decoder_convs[s - 1]
            self.stages.append(nn.Sequential(ConvNormAct(c, 2 * skip, skip),
                                             *(ConvNormAct(c, skip, skip) for _ in range(n - 1))))
        self.seg_layer = nn.Conv2d(ch[0], c.num_classes, 1)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat([up(x), skips[-(s + 2)]], dim=1))
        return self.seg_layer(x)


class Head(nn.Module):
    """Everything a fold trains: adapter, FAPM, learnable upsampling, decoder (the backbone is frozen, shared)."""

    def __init__(self, c: DinoUNetConfig):
        super().__init__()
        self.adapter = DinoAdapter(c)
        self.fapm = FeatureProjection(c)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(f, f, 2, 2) for f in c.features_per_stage)
        self.decoder = Decoder(c)

    def forward(self, x: torch.Tensor, taps: list[torch.Tensor], vit_grid: tuple[int, int]) -> torch.Tensor:
        return run_head(self, x, taps, vit_grid)


def run_head(head: nn.Module, x: torch.Tensor, taps: list[torch.Tensor], vit_grid: tuple[int, int]) -> torch.Tensor:
    """Logits from the 3-channel input and the backbone's taps through one fold's adapter, FAPM and decoder."""
    H, W = x.shape[2:]
    maps = head.fapm(head.adapter(x, taps, vit_grid))
    skips = [upsample_to(m, up, (H // 2**i, W // 2**i)) for i, (m, up) in enumerate(zip(maps, head.upsample))]
    return head.decoder(skips)


class DinoUNet(nn.Module):
    """One fold's head under the native names (adapter, fapm, upsample, decoder) and, for a cross-validation
    ensemble, the other folds' heads in extra_folds; all share the one frozen backbone, which runs once per input."""

    input_multiple = 32  # H and W must be multiples of this (the adapter's 1/32 level)
    # The published adapter runs the frozen backbone under torch.autocast("cuda", dtype=torch.bfloat16); the task
    # sets this per call (on by default on GPUs, off on CPUs unless asked).
    backbone_autocast = False

    def __init__(self, c: DinoUNetConfig):
        super().__init__()
        self.config = c
        self.backbone = DINOv3(c.backbone)
        self.adapter = DinoAdapter(c)
        self.fapm = FeatureProjection(c)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(f, f, 2, 2) for f in c.features_per_stage)
        self.decoder = Decoder(c)
        self.extra_folds = nn.ModuleList(Head(c) for _ in range(c.folds - 1)) if c.folds > 1 else None

    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"this Dino U-Net takes [batch, {c.in_channels}, height, width] images (already "
                             f"normalised); got shape {tuple(x.shape)}")
        if x.shape[2] % self.input_multiple or x.shape[3] % self.input_multiple:
            raise ValueError(f"height and width must be multiples of {self.input_multiple}; got "
                             f"{x.shape[2]}x{x.shape[3]} (segment() pads or tiles images for you)")

    def taps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The frozen backbone's normed patch tokens after each tapped block (in the input's dtype), and its grid."""
        patch = self.backbone.config.patch_size
        amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.backbone_autocast else nullcontext()
        with torch.no_grad(), amp:
            taps = self.backbone.intermediate_layers(x, list(self.config.tapped_layers))
        return [tokens.to(x.dtype) for tokens, _ in taps], (x.shape[2] // patch, x.shape[3] // patch)

    def head(self, fold: int) -> nn.Module:
        if not 0 <= fold < self.config.folds:
            raise ValueError(f"fold={fold!r}: this checkpoint holds {self.config.folds} fold(s), numbered 0.."
                             f"{self.config.folds - 1}")
        return self if fold == 0 else self.extra_folds[fold - 1]

    def forward_folds(self, x: torch.Tensor, folds: list[int]) -> list[torch.Tensor]:
        """Logits of each listed fold (indices into the stored folds) for one input; the backbone runs once."""
        self.check_input(x)
        x = to_three_channels(x)
        taps, grid = self.taps(x)
        return [run_head(self.head(f), x, taps, grid) for f in folds]

    def forward(self, x: torch.Tensor, fold: int = 0) -> torch.Tensor:
        """Segmentation logits [B, classes, H, W] for a normalised input [B, in_channels, H, W] (of one fold)."""
        return self.forward_folds(x, [fold])[0]


def build(c: DinoUNetConfig) -> DinoUNet:
    return DinoUNet(c)


# -- published configurations (dinounet_training.py: DinoUNetTrainer_{s,b,l,7b}) -----------------------------------

# trainer -> (DINOv3 backbone, tapped blocks). The checkpoint stores neither: the trainer class hard-codes them.
VARIANTS = {
    "DinoUNetTrainer_s": ("vits16", (2, 5, 8, 11)),
    "DinoUNetTrainer_b": ("vitb16", (2, 5, 8, 11)),
    "DinoUNetTrainer_l": ("vitl16", (4, 11, 17, 23)),
    "DinoUNetTrainer_7b": ("vit7b16", (9, 19, 29, 39)),
}
TAPPED_BY_DEPTH = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}
PATCH_SIZE = (512, 512)  # plan_and_preprocess(force_target_shape=[512, 512], force_n_stages=4)


def variant_config(trainer: str, in_channels: int = 1, num_classes: int = 2, **kw) -> DinoUNetConfig:
    """The published configuration of a trainer with the nnU-Net 2-D defaults for the head."""
    arch, tapped = VARIANTS[trainer]
    return DinoUNetConfig(backbone=size_config(arch, rope_periods="bfloat16"), tapped_layers=tapped,
                          in_channels=in_channels, num_classes=num_classes, **kw)


def count_params(c: DinoUNetConfig, trainable_only: bool = False) -> int:
    """All parameters, or those the official trainer trains (everything but the frozen backbone)."""
    module = FAMILY.build_meta(c)
    part = [module.adapter, module.fapm, module.upsample, module.decoder] if trainable_only else [module]
    return sum(p.numel() for m in part for p in m.parameters())


FAMILY = Family(
    name="dinounet",
    config_cls=DinoUNetConfig,
    build=build,
    task="image-segmentation",
    entries=(),  # no trained Dino U-Net weights are published (yifangao112/DinoUNet#9); users convert their own
    card_template="dinounet.md",
)
