"""WaLa: Sanghi et al., "Wavelet Latent Diffusion (WaLa): Billion-Parameter 3D Generative Model with Compact
Wavelet Encodings", arXiv 2411.08017 (AutodeskAILab/WaLa; weights ADSKAILab/WaLa-*-1B).

A 3-D shape is a 256^3 signed distance field, stored as a wavelet tree, compressed by a VQ-VAE to a 4 x 12^3 latent.
A latent U-ViT denoises that latent in a few DDPM steps, conditioned on tokens from an image / sketch / depth-map
encoder (DINOv2), a point-cloud encoder or a voxel encoder. Generation:

    condition -> encoder features [B, (V,) T, D] -> mapping layers, + condition position table, + camera rows
    x_T ~ N(0, I) [B, 4, 12^3] --respaced DDPM, classifier-free guidance with zeroed features--> x_0
    x_0 -> nearest codebook vectors -> VQ decoder -> 64-channel wavelet volume -> unpack -> inverse DWT -> SDF 256^3

Pieces: wala_uvit (the diffusion network), wala_vqvae (VQ-VAE, wavelet packing and inverse transform),
wala_conditions (DINOv2, PointNet, voxel encoder). Every size comes from the published args.json and tensor shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from zoo.architectures.wala_conditions import DinoV2, PointEncoder, VoxelEncoder
from zoo.architectures.wala_uvit import LatentUViT
from zoo.architectures.wala_vqvae import WaveletTree, WaveletVQVAE

from zoo.family import Family
from zoo.registry import Entry, Source

CONDITIONS = ("image", "depth", "pointcloud", "voxel")
LICENSE = "autodesk-non-commercial-3d-generative-v1.0"
LICENSE_NAME = "Autodesk Non-Commercial (3D Generative) v1.0"
PAPER = "https://arxiv.org/abs/2411.08017"


@dataclass
class WaLaConfig:
    # condition path (the published process_condition)
    condition: str = "image"  # image (also sketches) | depth | pointcloud | voxel
    views: int = 1  # condition images per shape (multi-view / multi-depth models: 4 or 6)
    context_dim: int = 1024  # width of the condition tokens
    condition_tokens: int = 256  # tokens per view
    mapping_layers: int = 0  # Linear + SiLU layers applied to the features
    condition_pos_emb: bool = True
    camera_rows: int = 0  # camera table rows (0: none); one view adds row 0, V views add the whole table in order
    classifier_free: bool = True  # dp_cond set in training: guidance mixes in zeroed features
    # diffusion network (Latent_UVIT)
    latent_channels: int = 4
    latent_grid: int = 12
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 32
    num_heads: int = 16
    mlp_hidden: int = 4608
    unet_channels: int = 128
    res_blocks: int = 2
    cross_attention: bool = True  # dit_block_type cross_dit
    time_condition: bool = True  # add_condition_time_ch: pooled condition added to the blocks' time vector
    res_condition: int = 0  # add_condition_res_ch: width of a condition FiLM in the ResBlocks (0: none)
    registers: int = 0
    skip_gate_reduction: int = 0  # learnable_skip_r (0: skips added as (h + s) / sqrt 2)
    fixed_pos_embedding: bool = False  # with_fix_pos (the 3-D sin-cos table is stored in the checkpoint either way)
    # diffusion process
    beta_schedule: str = "linear"
    train_steps: int = 1000
    beta_scale_ratio: float = 1.0
    prediction: str = "EPSILON"  # EPSILON | START_X | PREVIOUS_X
    variance: str = "FIXED_SMALL"  # FIXED_SMALL | FIXED_LARGE
    # shape representation and VQ-VAE
    resolution: int = 256
    wavelet: str = "bior6.8"
    wavelet_mode: str = "constant"
    wavelet_levels: int = 3
    kept_levels: int = 2
    codebook_size: int = 1024
    vq_hidden: int = 128
    vq_l2_normalize: bool = False
    # DINOv2 (image / sketch / depth models)
    image_size: int = 224
    image_encoder_depth: int = 24
    image_encoder_width: int = 1024
    image_encoder_heads: int = 16
    image_encoder_mlp: int = 4096
    image_encoder_patch: int = 14
    image_encoder_registers: int = 4
    image_encoder_pos_grid: int = 37
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    # point-cloud encoder
    point_encoder: str = "large"  # large (PointNet_Large) | simple (PointNet_Simple)
    point_dims: int = 1024
    point_heads: int = 16
    point_blocks: int = 4
    point_mlp: int = 4096
    # voxel encoder
    voxel_resolution: int = 16
    voxel_stem: int = 64
    voxel_hidden: int = 128

    def unused_fields(self) -> set[str]:
        """The other conditions' encoder numbers, which this model does not read (`zoo info` hides them)."""
        own = {"image": ("image_", "interpolate_"), "depth": ("image_", "interpolate_"), "pointcloud": ("point_",),
               "voxel": ("voxel_",)}[self.condition]
        encoders = ("image_", "interpolate_", "point_", "voxel_")
        return {n for n in self.__dataclass_fields__ if n.startswith(encoders) and not n.startswith(own)}

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition {self.condition!r} is not one of {CONDITIONS}")
        if self.views > 1 and self.camera_rows not in (0, self.views):
            raise ValueError(f"{self.views} views need a camera table of {self.views} rows (the published code adds "
                             f"the whole table in training-view order), not {self.camera_rows}")
        if self.views > 1 and self.condition not in ("image", "depth"):
            raise ValueError("only image and depth conditions come in several views")
        if self.latent_grid % self.patch_size:
            raise ValueError(f"latent grid {self.latent_grid} is not a multiple of patch size {self.patch_size}")
        if self.prediction not in ("EPSILON", "START_X", "PREVIOUS_X"):
            raise ValueError(f"prediction {self.prediction!r}: one of EPSILON, START_X, PREVIOUS_X")
        if self.variance not in ("FIXED_SMALL", "FIXED_LARGE"):
            raise ValueError(f"variance {self.variance!r}: the network predicts no variance, so FIXED_SMALL or "
                             "FIXED_LARGE")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"beta schedule {self.beta_schedule!r}: linear or cosine")
        if self.point_encoder not in ("large", "simple"):
            raise ValueError(f"point encoder {self.point_encoder!r}: large or simple")

    @property
    def wavelet_channels(self) -> int:
        return 8**self.kept_levels


# -- the condition path the published network applies itself ----------------------------------------------------


class ConditionPath(nn.Module):
    """Encoder features -> the tokens the diffusion network attends to (process_condition in the published code):
    mapping layers (Linear + SiLU), + the learned condition position table, + camera rows; views flattened."""

    def __init__(self, c: WaLaConfig):
        super().__init__()
        self.views = c.views
        self.mapping = nn.ModuleList(nn.Linear(c.context_dim, c.context_dim) for _ in range(c.mapping_layers))
        if c.condition_pos_emb:
            self.pos_emb = nn.Parameter(torch.zeros(1, c.condition_tokens, c.context_dim))
        if c.camera_rows:
            self.camera_emb = nn.Parameter(torch.zeros(c.camera_rows, c.context_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, T, D] (one view) or [B, V, T, D] -> [B, V * T, D]."""
        multi = features.dim() == 4
        if multi != (self.views > 1):
            want = f"[B, {self.views}, tokens, dim]" if self.views > 1 else "[B, tokens, dim]"
            raise ValueError(f"condition features have shape {tuple(features.shape)}; this model takes {want}")
        x = features
        for layer in self.mapping:
            x = torch.nn.functional.silu(layer(x))
        if hasattr(self, "pos_emb"):
            x = x + (self.pos_emb.unsqueeze(0) if multi else self.pos_emb)
        if hasattr(self, "camera_emb"):
            # one view: camera row 0 (the published single-view data pass index 0); several: the whole table
            x = x + (self.camera_emb[None, :, None] if multi else self.camera_emb[:1, None])
        return x.reshape(x.shape[0], -1, x.shape[-1]) if multi else x


# -- the sampler -------------------------------------------------------------------------------------------------


def beta_schedule(name: str, steps: int, scale_ratio: float) -> np.ndarray:
    if name == "linear":  # Ho et al.'s 1e-4 .. 0.02, scaled to the step count
        scale = 1000 / steps * scale_ratio
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    alpha_bar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731 (Nichol & Dhariwal's cosine)
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])


def spaced_timesteps(train_steps: int, steps: int) -> list[int]:
    """`steps` indices spread evenly over 0 .. train_steps-1 (improved-diffusion's space_timesteps, one section)."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be between 1 and {train_steps}, got {steps}")
    stride = (train_steps - 1) / (steps - 1) if steps > 1 else 1
    taken, cur = [], 0.0
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


class RespacedDDPM:
    """Ancestral DDPM on a respaced schedule (SpacedDiffusion.p_sample); float64 tables, float32 per step."""

    def __init__(self, c: WaLaConfig, steps: int):
        base = beta_schedule(c.beta_schedule, c.train_steps, c.beta_scale_ratio)
        base_cumprod = np.cumprod(1.0 - base)
        self.timesteps = spaced_timesteps(c.train_steps, steps)  # original indices, ascending
        last, betas = 1.0, []
        for i in self.timesteps:
            betas.append(1 - base_cumprod[i] / last)
            last = base_cumprod[i]
        self.prediction, self.variance = c.prediction, c.variance
        b = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        # improved-diffusion clips the first (zero) posterior variance to the second; a one-step schedule has no
        # second (the published code raises IndexError there) and never adds noise at its only step, so any
        # finite value will do
        first = post_var[1] if len(b) > 1 else b[0]
        self.tables = {
            "sqrt_recip_ac": np.sqrt(1.0 / ac),
            "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1),
            "coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
            "log_var": np.log(np.append(first, post_var[1:] if c.variance == "FIXED_SMALL" else b[1:])),
        }

    def __len__(self) -> int:
        return len(self.timesteps)

    def coef(self, name: str, i: int, ref: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.tables[name][i], dtype=torch.float32, device=ref.device)

    def step(self, out: torch.Tensor, x: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """x_t (respaced index i) and the network output -> x_{t-1}; no noise at i = 0."""
        if self.prediction == "PREVIOUS_X":
            mean = out
        else:
            x0 = out if self.prediction == "START_X" else (
                self.coef("sqrt_recip_ac", i, x) * x - self.coef("sqrt_recipm1_ac", i, x) * out)
            mean = self.coef("coef1", i, x) * x0 + self.coef("coef2", i, x) * x
        if i == 0:
            return mean
        return mean + torch.exp(0.5 * self.coef("log_var", i, x)) * noise


# -- the model ---------------------------------------------------------------------------------------------------


class WaLa(nn.Module):
    def __init__(self, c: WaLaConfig):
        super().__init__()
        self.config = c
        self.condition = ConditionPath(c)
        self.denoiser = LatentUViT(
            latent_channels=c.latent_channels, latent_grid=c.latent_grid, patch_size=c.patch_size,
            hidden=c.hidden_size, depth=c.depth, heads=c.num_heads, mlp_hidden=c.mlp_hidden,
            unet_channels=c.unet_channels, res_blocks=c.res_blocks, context_dim=c.context_dim,
            cross_attention=c.cross_attention, time_condition=c.time_condition, res_condition=c.res_condition,
            registers=c.registers, skip_reduction=c.skip_gate_reduction)
        self.autoencoder = WaveletVQVAE(c.wavelet_channels, c.latent_channels, c.vq_hidden, c.codebook_size,
                                        c.vq_l2_normalize)
        self.wavelet = WaveletTree(c.wavelet, c.resolution, c.wavelet_levels, c.kept_levels)
        if c.condition in ("image", "depth"):
            self.image_encoder = DinoV2(c.image_encoder_depth, c.image_encoder_width, c.image_encoder_heads,
                                        c.image_encoder_mlp, c.image_encoder_patch, c.image_encoder_registers,
                                        c.image_encoder_pos_grid, c.interpolate_offset, c.interpolate_antialias)
        elif c.condition == "pointcloud":
            self.point_encoder = PointEncoder(c.point_encoder, c.point_dims, c.context_dim, c.condition_tokens,
                                              c.point_heads, c.point_blocks, c.point_mlp)
        else:
            self.voxel_encoder = VoxelEncoder(c.voxel_stem, c.voxel_hidden, c.context_dim)

    # the diffusion network, with the condition path in front
    def denoise(self, x: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Raw network output for noisy latents x [B, 4, 12^3], timestep indices t [B] (0..train_steps-1) and
        encoder features [B, T, D] ([B, V, T, D] for multi-view models)."""
        return self.denoiser(x, t, self.condition(features))

    forward = denoise

    def encode_condition(self, inputs: torch.Tensor) -> torch.Tensor:
        """Preprocessed condition -> encoder features as the network receives them:
        images [B, 3, H, W] or [B, V, 3, H, W] (normalised), points [B, N, 3], voxels [B, 1, R, R, R]."""
        c = self.config
        if c.condition in ("image", "depth"):
            if inputs.dim() == 5:
                B, V = inputs.shape[:2]
                return self.image_encoder(inputs.flatten(0, 1)).view(B, V, -1, c.image_encoder_width).float()
            return self.image_encoder(inputs).float()
        if c.condition == "pointcloud":
            return self.point_encoder(inputs)
        return self.voxel_encoder(inputs)

    def guided(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, null_tokens: torch.Tensor | None,
               guidance: float) -> torch.Tensor:
        """One network evaluation of the sampler: unconditional and conditional halves in one batch, mixed."""
        if null_tokens is None:
            return self.denoiser(x, t, tokens)
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_tokens, tokens]))
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    @torch.no_grad()
    def sample(self, features: torch.Tensor, steps: int, guidance: float, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Latents [B, 4, 12^3] for encoder features [B, (V,) T, D]: respaced ancestral DDPM from x_T ~ N(0, I)
        (drawn from `generator`, then one draw per step, as the published loop draws them)."""
        c = self.config
        sampler = RespacedDDPM(c, steps)
        B = features.shape[0]
        shape = (B, c.latent_channels, c.latent_grid, c.latent_grid, c.latent_grid)
        device = features.device
        tokens = self.condition(features)
        null_tokens = self.condition(torch.zeros_like(features)) if c.classifier_free else None
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        x = x.to(device=device, dtype=tokens.dtype)
        for n, i in enumerate(reversed(range(len(sampler)))):
            t = torch.full((B,), sampler.timesteps[i], dtype=torch.long, device=device)
            out = self.guided(x, t, tokens, null_tokens, guidance)
            step_noise = torch.randn(shape, generator=generator, device=device).to(x.dtype)
            x = sampler.step(out, x, i, step_noise)
            if callback is not None:
                callback(n + 1, len(sampler))
        return x

    # latents <-> shapes
    def decode_wavelets(self, latents: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents -> nearest codebook vectors -> VQ decoder -> wavelet volume [B, 64, 46^3]."""
        return self.autoencoder.decoder(self.autoencoder.quantize(latents), self.wavelet.grid)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents [B, 4, 12^3] -> signed distance grid [B, 256, 256, 256] (fp32)."""
        low, details = self.wavelet.unpack(self.decode_wavelets(latents).float())
        return self.wavelet.inverse(low, details)

    @torch.no_grad()
    def encode(self, wavelet_volume: torch.Tensor) -> torch.Tensor:
        """Packed wavelet volume [B, 64, 46^3] -> pre-quantisation latents [B, 4, 12^3] (the VQ-VAE encoder)."""
        return self.autoencoder.encoder(wavelet_volume)


def build(c: WaLaConfig) -> WaLa:
    return WaLa(c)


# -- published models --------------------------------------------------------------------------------------------

# Sizes below are the authors' (experiment names udit_1152_32_16 / udit_1152_30_16, hidden 1152, 32 or 30 blocks,
# 16 heads; DINOv2 ViT-L/14 + 4 registers); the rest of each published args.json was not readable offline. The
# converter reads args.json and the tensor shapes, so a converted model always has its real config.

@dataclass(frozen=True)
class Published:
    repo: str
    what: str
    condition: str
    views: int
    steps: int
    guidance: float
    readme_guidance: float | None = None  # where the README recommends other than what the published code runs
    depth: int = 32
    context_dim: int = 1024
    condition_tokens: int = 256

    @property
    def config(self) -> WaLaConfig:
        return WaLaConfig(condition=self.condition, views=self.views, context_dim=self.context_dim,
                          condition_tokens=self.condition_tokens, camera_rows=self.views if self.views > 1 else 0,
                          depth=self.depth)


PUBLISHED: dict[str, Published] = {
    "wala-sv-1b": Published("ADSKAILab/WaLa-SV-1B", "a single RGB image", "image", 1, 5, 1.8),
    "wala-sk-1b": Published("ADSKAILab/WaLa-SK-1B", "a sketch", "image", 1, 5, 1.8),
    "wala-rgb4-1b": Published("ADSKAILab/WaLa-RGB4-1B", "4 RGB views (in training-view order)", "image", 4, 5, 1.3),
    "wala-dm1-1b": Published("ADSKAILab/WaLa-DM1-1B", "a single depth map", "depth", 1, 5, 1.8),
    "wala-dm4-1b": Published("ADSKAILab/WaLa-DM4-1B", "4 depth maps (in training-view order)", "depth", 4, 5, 1.3),
    "wala-dm6-1b": Published("ADSKAILab/WaLa-DM6-1B", "6 depth maps (in training-view order)", "depth", 6, 10, 1.5),
    # run.py passes no guidance scale for point clouds and voxels, so the published pipeline uses its default 3
    "wala-vx16-1b": Published("ADSKAILab/WaLa-VX16-1B", "a 16^3 voxel grid", "voxel", 1, 5, 3.0, 1.5, depth=30,
                              condition_tokens=512),
    "wala-pc-1b": Published("ADSKAILab/WaLa-PC-1B", "a point cloud", "pointcloud", 1, 8, 3.0, 1.3),
}


def generation_defaults(condition: str, views: int) -> dict:
    """Recommended steps / guidance for a converted model, by what it is conditioned on (the published table)."""
    for p in PUBLISHED.values():
        if p.condition == condition and p.views == views:
            return {"steps": p.steps, "guidance": p.guidance}
    return {"steps": 5, "guidance": 3.0}


def count_params(c: WaLaConfig) -> int:
    """Parameters of the model a config builds (closed form: the registry is built at import; a test checks it)."""
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    conv = lambda i, o, k=3: i * o * k**3 + o  # noqa: E731
    H, D, M, Cu, hd = c.hidden_size, c.context_dim, c.mlp_hidden, c.unet_channels, c.hidden_size // c.num_heads
    glob = lambda i, o: lin(i, H) + 2 * H + lin(H, H) + 2 * H + lin(H, o) + lin(o, o)  # noqa: E731
    n = c.mapping_layers * lin(D, D) + c.condition_pos_emb * c.condition_tokens * D + c.camera_rows * D
    # diffusion network
    n += lin(256, H) + lin(H, H) + (glob(D, c.res_condition) if c.res_condition else 0)
    n += (lin(D, H) + lin(H, H) if c.cross_attention else 0) + (glob(D, H) if c.time_condition else 0)
    res = 4 * Cu + 2 * conv(Cu, Cu) + lin(H, 2 * Cu) + (lin(c.res_condition, Cu) if c.res_condition else 0)
    r = c.skip_gate_reduction
    skip = 2 * Cu + (lin(Cu, Cu // r) + lin(Cu // r, Cu) if r else 0)
    P = c.patch_size**3 * Cu
    block = lin(H, 3 * H) + 4 * hd + lin(H, H) + lin(H, M) + lin(M, H) + lin(H, 6 * H)
    block += lin(H, H) + lin(H, 2 * H) + 4 * hd + lin(H, H) if c.cross_attention else 0
    n += conv(c.latent_channels, Cu) + c.res_blocks * (2 * res + skip) + 2 * P + lin(P, H)
    n += (c.latent_grid // c.patch_size) ** 3 * H + c.registers * H + c.depth * block + 2 * H + lin(H, P)
    n += 2 * Cu + conv(Cu, c.latent_channels)
    # VQ-VAE
    h, C = c.vq_hidden, c.wavelet_channels
    vq_res = 4 * h + 2 * conv(h, h)
    n += 2 * (7 * vq_res + 2 * h) + conv(C, h) + conv(h, c.latent_channels) + conv(c.latent_channels, h) + conv(h, C)
    n += c.codebook_size * c.latent_channels
    # condition encoder
    if c.condition in ("image", "depth"):
        W, F_ = c.image_encoder_width, c.image_encoder_mlp
        n += 3 * W * c.image_encoder_patch**2 + W + W * (2 + c.image_encoder_pos_grid**2 + c.image_encoder_registers)
        n += c.image_encoder_depth * (6 * W + lin(W, 3 * W) + lin(W, W) + lin(W, F_) + lin(F_, W)) + 2 * W
    elif c.condition == "pointcloud":
        Pd, ph = c.point_dims, c.point_dims // c.point_heads
        widths = (3, 64, 256, 1024, Pd)
        n += sum(lin(a, b) + 2 * b for a, b in zip(widths[:-1], widths[1:])) + c.condition_tokens * Pd
        big = c.point_encoder == "large"
        n += lin(Pd, Pd, big) + lin(Pd, 2 * Pd, big) + 4 * ph + lin(Pd, Pd)
        if big:
            n += lin(Pd, 4 * Pd) + lin(4 * Pd, D)
            n += c.point_blocks * (lin(D, 3 * D, False) + 4 * (D // c.point_heads) + lin(D, D) + lin(D, c.point_mlp)
                                   + lin(c.point_mlp, D))
        else:
            n += lin(Pd, D) + 2 * lin(D, D) + 4 * D
    else:
        s, h = c.voxel_stem, c.voxel_hidden
        n += conv(1, s) + 2 * s + conv(s, h) + 2 * h + conv(h, h) + conv(s, h) + 5 * (4 * h + 2 * conv(h, h))
        n += 2 * h + conv(h, D)
    return n


def _entries() -> list[Entry]:
    out = []
    for name, p in PUBLISHED.items():
        c = p.config
        out.append(Entry(
            name=name,
            family="wala",
            config=asdict(c),
            source=Source(repo=p.repo, layout="wala", file_format="ckpt", files=("checkpoint.ckpt",)),
            license=LICENSE,
            paper=PAPER,
            task="shape-generation",
            params=count_params(c),
            description=f"WaLa 1B: a 3-D shape (256^3 signed distance field, mesh) from {p.what}. "
                        f"Non-commercial license ({LICENSE_NAME}).",
            tags=("3d", "wala", "shape-generation", p.condition),
            extra={"generation": {"steps": p.steps, "guidance": p.guidance},
                   **({"readme_guidance": p.readme_guidance} if p.readme_guidance else {}),
                   "license_name": LICENSE_NAME, "config_verified": False},
        ))
    return out


FAMILY = Family(
    name="wala",
    config_cls=WaLaConfig,
    build=build,
    task="shape-generation",
    entries=tuple(_entries()),
    card_template="wala.md",
)
