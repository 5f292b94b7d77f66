"""Plain-PyTorch references of the published WaLa code (AutodeskAILab/WaLa @ bc2bdd9), written from reading it.

Module and attribute names follow the published ones, so a reference model's state_dict has the published key
names: the tests save it as a Lightning checkpoint in the published layout and convert it with zoo. Only what
inference runs is here: Latent_UVIT (latent_uvit_utils.py, latent_dit_utils.py), the condition processing and one
sampler step with classifier-free guidance (continous_diffusion_interface.py, gaussian_diffusion.py), the VQ-VAE
decoder path (abstract_volume_nn.py, quantize.py), the wavelet unpacking (WaveletData.convert_low_highs) and
DWTInverse3d, DINOv2 (facebookresearch/dinov2 vision_transformer.py as torch.hub builds it for WaLa),
PointNet_Large / PointNet_Simple and Encoder_Down_2. timm's Attention / Mlp are used where the published code uses them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from timm.models.vision_transformer import Attention, Mlp


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(ch):
    return GroupNorm32(32, ch)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq = freq

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Global_Proj_Layer(nn.Module):
    def __init__(self, input_dim, output_dim, hidden_dim):
        super().__init__()
        act = nn.SiLU()
        self.proj_layer = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.LayerNorm(hidden_dim), act,
                                        nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), act)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, output_dim), act, nn.Linear(output_dim, output_dim))

    def forward(self, x):
        return self.mlp(torch.mean(self.proj_layer(x), 1))


class UResBlock(nn.Module):
    """latent_uvit_utils.ResBlock with use_scale_shift_norm=True, dims=3, same in/out channels."""

    def __init__(self, ch, emb, skip_h=None, learnable_skip_r=None, res_emb_channels=None):
        super().__init__()
        if skip_h is not None:
            self.skip_norm = normalization(ch)
            self.learnable_skip_r = learnable_skip_r
            if learnable_skip_r is not None:
                self.skip_learn_f = nn.Sequential(nn.Linear(ch, ch // learnable_skip_r), nn.ReLU(),
                                                  nn.Linear(ch // learnable_skip_r, ch), nn.Sigmoid())
        self.res_emb_channels = res_emb_channels
        self.in_norm = normalization(ch)
        self.act1 = nn.SiLU()
        self.in_conv = nn.Conv3d(ch, ch, 3, padding=1)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * ch))
        self.out_layers = nn.Sequential(normalization(ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv3d(ch, ch, 3, padding=1))
        if res_emb_channels is not None:
            self.linear_res_emb = nn.Linear(res_emb_channels, ch)

    def forward(self, x, emb, skip_h=None, res_emb=None):
        h = self.in_norm(x)
        if skip_h is not None:
            skip_h = self.skip_norm(skip_h)
            if self.learnable_skip_r is not None:
                k = self.skip_learn_f(skip_h.mean(dim=(-3, -2, -1)))
                h = h + k.unsqueeze(-1).unsqueeze(-1).unsqueeze(-1) * skip_h
            else:
                h = (h + skip_h) / math.sqrt(2)
        h = self.in_conv(self.act1(h))
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        scale, shift = torch.chunk(emb_out, 2, dim=1)
        if self.res_emb_channels is not None:
            z = self.linear_res_emb(res_emb)
            while len(z.shape) < len(scale.shape):
                z = z[..., None]
            h = (out_norm(h) * (1 + scale) + shift) * z
        else:
            h = out_norm(h) * (1 + scale) + shift
        return x + out_rest(h)


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(context_dim, dim * 2, bias=True)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, C = x.shape
        Bc, Nc, _ = context.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        k, v = self.kv(context).reshape(Bc, Nc, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.head_dim**-0.5  # the non-fused branch, written out
        x = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio=4.0, cross=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden, hidden_features=int(hidden * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.cross = cross
        if cross:
            self.cross_attn = CrossAttention(hidden, hidden, heads)

    def forward(self, x, c, context=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross:
            x = x + self.cross_attn(x, context)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, context


def sincos_3d(embed_dim, grid_size):
    """get_3d_sincos_pos_embed: np.meshgrid (xy indexing) of (w, h, l) -> [emb(grid[0]), emb(grid[1]), emb(grid[2])]."""
    g = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g, g), axis=0).reshape([3, 1, grid_size, grid_size, grid_size])

    def emb1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([emb1d(embed_dim // 3, grid[i]) for i in range(3)], axis=1)


class Latent_UVIT(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, context_dim,
                 add_condition_time_ch, block_type, add_num_register, unet_model_channels, num_res_blocks,
                 add_condition_res_ch, learnable_skip_r, with_fix_pos, mlp_ratio=4.0):
        super().__init__()
        self.context_dim, self.add_condition_time_ch = context_dim, add_condition_time_ch
        self.add_condition_res_ch, self.add_num_register = add_condition_res_ch, add_num_register
        self.t_embedder = TimestepEmbedder(hidden_size)
        if add_condition_res_ch is not None:
            self.res_cond_proj_layer = Global_Proj_Layer(context_dim, add_condition_res_ch, hidden_size)
        if context_dim is not None:
            self.context_mlp = (nn.Sequential(nn.Linear(context_dim, hidden_size), nn.SiLU(),
                                              nn.Linear(hidden_size, hidden_size))
                                if block_type == "cross_dit" else nn.Identity())
            if add_condition_time_ch is not None:
                self.global_proj = Global_Proj_Layer(context_dim, hidden_size, hidden_size)
        Cu, p = unet_model_channels, patch_size
        self.conv_in = nn.Conv3d(in_channels, Cu, 3, padding=1)
        self.input_blocks = nn.ModuleList(UResBlock(Cu, hidden_size, res_emb_channels=add_condition_res_ch)
                                          for _ in range(num_res_blocks[0]))
        self.to_patch_att_embedding_input = nn.Sequential(
            Rearrange("b c (h p1) (w p2) (l p3) -> b  (h w l) (p1 p2 p3 c)", p1=p, p2=p, p3=p),
            nn.LayerNorm(p**3 * Cu), nn.Linear(p**3 * Cu, hidden_size))
        att = input_size // p
        self.pos_emb = nn.Parameter(torch.zeros(1, att**3, hidden_size), requires_grad=with_fix_pos is None)
        if with_fix_pos is not None:
            self.pos_emb.data.copy_(torch.from_numpy(sincos_3d(hidden_size, att)).float().unsqueeze(0))
        else:
            nn.init.trunc_normal_(self.pos_emb, 0.0, 0.01)
        if add_num_register > 0:
            self.register_emb = nn.Parameter(torch.randn(1, add_num_register, hidden_size) * 0.01)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, cross=block_type == "cross_dit")
                                    for _ in range(depth))
        self.to_patch_att_embedding_output = nn.Sequential(
            nn.LayerNorm(hidden_size), nn.Linear(hidden_size, p**3 * Cu),
            Rearrange("b (h w l) (p1 p2 p3 c) -> b c (h p1) (w p2) (l p3)", p1=p, p2=p, p3=p, h=att, w=att, l=att))
        self.output_blocks = nn.ModuleList(
            UResBlock(Cu, hidden_size, skip_h=True, learnable_skip_r=learnable_skip_r,
                      res_emb_channels=add_condition_res_ch) for _ in range(num_res_blocks[0]))
        self.out = nn.Sequential(normalization(Cu), nn.SiLU(), nn.Conv3d(Cu, in_channels, 3, padding=1))

    def forward(self, x, t, latent_codes=None):
        t = self.t_embedder(t)
        res_cond_emb = self.res_cond_proj_layer(latent_codes) if self.add_condition_res_ch is not None else None
        latent_codes_local = self.context_mlp(latent_codes) if self.context_dim is not None else None
        if self.add_condition_time_ch and self.context_dim is not None:
            att_t = t + self.global_proj(latent_codes)
        else:
            att_t = t
        h = self.conv_in(x)
        hs = []
        for module in self.input_blocks:
            h = module(h, t, res_emb=res_cond_emb)
            hs.append(h)
        h = self.to_patch_att_embedding_input(h) + self.pos_emb
        if self.add_num_register > 0:
            h = torch.cat([h, self.register_emb.repeat(h.size(0), 1, 1).type(h.type())], dim=1)
        for block in self.blocks:
            h, latent_codes_local = block(h, att_t, context=latent_codes_local)
        if self.add_num_register > 0:
            h = h[:, : -self.add_num_register, :]
        h = self.to_patch_att_embedding_output(h)
        for module in self.output_blocks:
            h = module(h, t, skip_h=hs.pop(), res_emb=res_cond_emb)
        return self.out(h)


# -- continous_diffusion_interface.get_model: condition networks, process_condition, and the sampler ----------------


class DiffusionInterface(nn.Module):
    def __init__(self, args: dict, unet: nn.Module, context_dim: int):
        super().__init__()
        self.args = args
        L = args["cond_num_mapping_layers"]
        self.cond_mapping_network = nn.ModuleList(
            nn.Sequential(nn.Linear(context_dim, context_dim), nn.SiLU()) for _ in range(L))
        tokens = (args["num_inds"] if args.get("use_pointcloud_conditions") else
                  args["voxel_dim"] ** 3 if args.get("use_voxel_conditions") else args["cond_grid_size"])
        self.cond_pos_emb = nn.Parameter(torch.randn(1, tokens, context_dim) * 0.02)
        if args.get("use_multiple_views_grids") or args.get("use_camera_index"):
            rows = len(args["training_views"]) if args.get("training_views") is not None else args["max_images_num"]
            self.camera_emb = nn.Embedding(rows, context_dim)
        else:
            self.camera_emb = None
        self.unet = unet

    def process_condition(self, condition, image_index=None):
        x = condition
        for layer in self.cond_mapping_network:
            x = layer(x)
        x = x + (self.cond_pos_emb.unsqueeze(0) if self.args.get("use_multiple_views_grids") else self.cond_pos_emb)
        if image_index is not None:
            cam = self.camera_emb(image_index) if self.args.get("training_views") is None else self.camera_emb.weight
            if self.args.get("use_multiple_views_grids"):
                cam = cam.unsqueeze(0).unsqueeze(2)
            elif cam.dim() != x.dim():
                cam = cam.unsqueeze(1)
            x = x + cam
        if self.args.get("use_multiple_views_grids"):
            x = x.view(x.size(0), -1, x.size(-1))
        return x

    def cfg_conditions(self, condition, image_index=None):
        """The top of inference(): zeros and the condition through the same processing, then split."""
        if self.args.get("dp_cond") is not None:
            both = self.process_condition(torch.cat([torch.zeros_like(condition), condition]), image_index)
            zero, cond = both.chunk(2)
            return cond, zero
        return self.process_condition(condition, image_index), None


def get_named_beta_schedule(name, n, scale_ratio=1.0):
    if name == "linear":
        scale = 1000 / n * scale_ratio
        return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)
    ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - ab((i + 1) / n) / ab(i / n), 0.999) for i in range(n)])


def space_timesteps(num_timesteps, section_counts):
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            all_steps.append(start_idx + round(cur))
            cur += frac
        start_idx += size
    return set(all_steps)


def _extract(arr, t, shape):
    res = torch.from_numpy(arr).to(device=t.device)[t].float()
    while len(res.shape) < len(shape):
        res = res[..., None]
    return res.expand(shape)


class SpacedDiffusion:
    """GaussianDiffusion respaced (SpacedDiffusion) with p_mean_variance's CFG branch and p_sample."""

    def __init__(self, betas, use_timesteps, mean_type, var_type):
        base_ac = np.cumprod(1.0 - betas)
        last, new, self.timestep_map = 1.0, [], []
        for i, ac in enumerate(base_ac):
            if i in use_timesteps:
                new.append(1 - ac / last)
                last = ac
                self.timestep_map.append(i)
        b = np.array(new, dtype=np.float64)
        self.betas, self.num_timesteps = b, len(b)
        self.mean_type, self.var_type = mean_type, var_type
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)

    def model(self, unet, x, ts, **kw):  # _WrappedModel: respaced index -> original timestep
        return unet(x, torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)[ts], **kw)

    def p_sample(self, unet, x, t, condition, condition_zero, guidance_scale, noise):
        if condition_zero is None:
            model_output = self.model(unet, x, t, latent_codes=condition)
        else:
            e_uncond, e_t = self.model(unet, torch.cat([x] * 2), torch.cat([t] * 2),
                                       latent_codes=torch.cat([condition_zero, condition])).chunk(2)
            model_output = e_uncond + (3 if guidance_scale is None else guidance_scale) * (e_t - e_uncond)
        if self.var_type == "FIXED_LARGE":
            log_var = np.log(np.append(self.posterior_variance[1], self.betas[1:]))
        else:
            log_var = self.posterior_log_variance_clipped
        log_var = _extract(log_var, t, x.shape)
        if self.mean_type == "PREVIOUS_X":
            mean = model_output
        else:
            x0 = model_output if self.mean_type == "START_X" else (
                _extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output)
            mean = _extract(self.posterior_mean_coef1, t, x.shape) * x0 + _extract(self.posterior_mean_coef2, t,
                                                                                  x.shape) * x
        nonzero = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return mean + nonzero * torch.exp(0.5 * log_var) * noise


# -- VQ-VAE (abstract_volume_nn.py, quantize.py) ---------------------------------------------------------------------


class VResBlock(nn.Module):
    def __init__(self, ch, out=None, skip_kernel=1):
        super().__init__()
        out = out or ch
        self.in_norm = normalization(ch)
        self.in_conv = nn.Conv3d(ch, out, 3, padding=1)
        self.out_layers = nn.Sequential(normalization(out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv3d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == ch else nn.Conv3d(ch, out, skip_kernel, padding=skip_kernel // 2)

    def forward(self, x):
        h = self.in_conv(F.silu(self.in_norm(x)))
        return self.skip_connection(x) + self.out_layers(h)


class General_Encoder_Down_2(nn.Module):
    def __init__(self, channel_in, channel_out, hidden=128):
        super().__init__()
        self.in_conv = nn.Conv3d(channel_in, hidden, 3, padding=1)
        for name in ("res_1", "res_1_1", "res_2", "res_2_1", "res_3", "res_3_1", "res_out"):
            setattr(self, name, VResBlock(hidden))
        self.down = nn.AvgPool3d(kernel_size=3, stride=2, padding=1)
        self.out_conv = nn.Sequential(normalization(hidden), nn.SiLU(), nn.Conv3d(hidden, channel_out, 3, padding=1))

    def forward(self, x):
        x = self.res_1_1(self.res_1(self.in_conv(x)))
        x = self.res_2_1(self.res_2(self.down(x)))
        x = self.res_3_1(self.res_3(self.down(x)))
        return self.out_conv(self.res_out(x))


class General_Decoder_Up_2(nn.Module):
    def __init__(self, channel_in, channel_out, hidden=128):
        super().__init__()
        self.in_conv = nn.Conv3d(channel_in, hidden, 3, padding=1)
        for name in ("res_in", "res_1", "res_1_1", "res_2", "res_2_1", "res_3", "res_3_1"):
            setattr(self, name, VResBlock(hidden))
        self.out_conv = nn.Sequential(normalization(hidden), nn.SiLU(), nn.Conv3d(hidden, channel_out, 3, padding=1))

    def forward(self, x):
        x = self.res_in(self.in_conv(x))
        x = self.res_1_1(self.res_1(x))
        x = F.interpolate(x, scale_factor=2, mode="trilinear")[..., :-1, :-1, :-1]  # odd
        x = self.res_2_1(self.res_2(x))
        x = F.interpolate(x, scale_factor=2, mode="trilinear")
        return self.out_conv(self.res_3_1(self.res_3(x)))


class VectorQuantizer2(nn.Module):
    def __init__(self, n_e, e_dim):
        super().__init__()
        self.e_dim = e_dim
        self.embedding = nn.Embedding(n_e, e_dim)

    def forward(self, z):
        z = z.permute(0, 2, 3, 4, 1).contiguous()
        zf = z.view(-1, self.e_dim)
        w = self.embedding.weight
        d = torch.sum(zf**2, dim=1, keepdim=True) + torch.sum(w**2, dim=1) - 2 * torch.einsum("bd,dn->bn", zf, w.t())
        z_q = self.embedding(torch.argmin(d, dim=1)).view(z.shape)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 4, 1, 2, 3).contiguous()


class WaveletVQ(nn.Module):
    def __init__(self, channels=64, e_dim=4, n_e=1024, hidden=128):
        super().__init__()
        self.encoder = General_Encoder_Down_2(channels, e_dim, hidden)
        self.decoder = General_Decoder_Up_2(e_dim, channels, hidden)
        self.quantize = VectorQuantizer2(n_e, e_dim)

    def decode_from_pre_quant(self, h):
        return self.decoder(self.quantize(h))


# -- WaveletData.convert_low_highs and DWTInverse3d ------------------------------------------------------------------


def dwt_coeff_len(n, L):
    return (n + L - 1) // 2


def create_coordinates(resolution, space_range, channel_dim):
    ch = np.linspace(0, channel_dim - 1, channel_dim)
    d = np.linspace(space_range[0], space_range[1], resolution)
    grids = np.meshgrid(ch, d, d, d)
    return torch.from_numpy(np.stack(grids, axis=-1).reshape(-1, 4)).long()


def extract_full_indices(max_depth, shape_list, output_stage):
    """The published function builds all 511 per-cell index rows and convert_low_highs keeps the last
    8^output_stage - 1; the levels are independent, so only the kept ones are built here (memory)."""
    last = create_coordinates(shape_list[-1][0], (0, shape_list[-1][0] - 1), 1)
    out = []
    for idx in range(max_depth - output_stage, max_depth):
        e = max_depth - 1 - idx
        grid = create_coordinates(2**e, (0, 2**e - 1), 7)
        mult = torch.tensor([1, 2**e, 2**e, 2**e]).unsqueeze(0)
        out.append((grid.unsqueeze(0) + last.unsqueeze(1) * mult).reshape(-1, 7 * (2**e) ** 3, 4))
    return torch.cat(out, dim=1)


def convert_low_highs(volume, shape_list, output_stage, max_depth):
    low = volume[:, :1]
    B = volume.shape[0]
    output_dim = 8**output_stage - 1
    indices = extract_full_indices(max_depth, shape_list, output_stage)[:, -output_dim:]
    pad_b = torch.arange(B)[:, None, None, None].repeat(1, indices.size(0), indices.size(1), 1)
    indices = torch.cat((pad_b, indices.unsqueeze(0).repeat(B, 1, 1, 1)), dim=-1)
    values = volume[:, 1:].permute(0, 2, 3, 4, 1).reshape(B, -1, output_dim)
    cnt, highs = 0, []
    for idx in range(max_depth):
        stage = max_depth - 1 - idx
        pad = (shape_list[-1][0] * 2**stage - shape_list[idx + 1][0]) // 2
        n = shape_list[idx + 1][0] + 2 * pad
        high = torch.zeros(B, 1, 7, n, n, n)
        if stage < output_stage:
            length = 7 * (2**stage) ** 3
            v = values[:, :, cnt:cnt + length].reshape(-1)
            i = indices[:, :, cnt:cnt + length].reshape(-1, 5).long()
            high[i[:, 0], 0, i[:, 1], i[:, 2], i[:, 3], i[:, 4]] = v
            cnt += length
        highs.append(high[:, :, :, pad:n - pad, pad:n - pad, pad:n - pad])
    return low, highs


def sfb1d(lo, hi, g0, g1, dim):
    C, L = lo.shape[1], g0.numel()
    d = dim % 5
    shape = [1, 1, 1, 1, 1]
    shape[d] = L
    g0, g1 = torch.cat([g0.reshape(*shape)] * C, dim=0), torch.cat([g1.reshape(*shape)] * C, dim=0)
    s = [1, 1, 1]
    s[d - 2] = 2
    pad = [0, 0, 0]
    pad[d - 2] = L - 2
    return (F.conv_transpose3d(lo, g0, stride=s, padding=pad, groups=C)
            + F.conv_transpose3d(hi, g1, stride=s, padding=pad, groups=C))


def dwt_inverse_3d(low, highs, wave="bior6.8"):
    import pywt

    w = pywt.Wavelet(wave)
    g0, g1 = torch.tensor(w.rec_lo, dtype=torch.float32), torch.tensor(w.rec_hi, dtype=torch.float32)
    ll = low
    for h in highs[::-1]:
        for ax in (-3, -2, -1):
            if ll.shape[ax] > h.shape[ax]:
                ll = ll.narrow(ax, 0, h.shape[ax])
        hll, lhl, hhl, llh, hlh, lhh, hhh = torch.unbind(h, dim=2)
        a = sfb1d(ll, hll, g0, g1, 2)
        b = sfb1d(lhl, hhl, g0, g1, 2)
        c = sfb1d(llh, hlh, g0, g1, 2)
        d = sfb1d(lhh, hhh, g0, g1, 2)
        ll = sfb1d(sfb1d(a, b, g0, g1, 3), sfb1d(c, d, g0, g1, 3), g0, g1, 4)
    return ll


# -- DINOv2 as torch.hub builds it for WaLa (num_register_tokens=4, interpolate_antialias=False, offset 0.1) ---------


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DinoAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # MemEffAttention without xformers falls back to this
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        x = ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class DinoBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), DinoAttention(dim, heads), LayerScale(dim)
        self.norm2, self.ls2 = nn.LayerNorm(dim, eps=1e-6), LayerScale(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=hidden, act_layer=nn.GELU)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size, patch, dim, depth, heads, registers=4, interpolate_offset=0.1,
                 interpolate_antialias=False):
        super().__init__()
        self.patch_size, self.num_register_tokens = patch, registers
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
        self.patch_embed = PatchEmbed(patch, dim)
        n = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(1, registers, dim) * 0.02)
        self.blocks = nn.ModuleList(DinoBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def interpolate_pos_encoding(self, x, w, h):
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos = self.pos_embed.float()
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        M = int(math.sqrt(N))
        kw = ({"scale_factor": (float(w0 + self.interpolate_offset) / M, float(h0 + self.interpolate_offset) / M)}
              if self.interpolate_offset else {"size": (w0, h0)})
        p = F.interpolate(pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                          antialias=self.interpolate_antialias, **kw)
        p = p.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((pos[:, 0].unsqueeze(0), p), dim=1).to(x.dtype)

    def forward_features(self, x):
        B, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return {"x_norm_patchtokens": x[:, self.num_register_tokens + 1:]}


class DINO(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.dinov2 = DinoVisionTransformer(**kw)

    def get_image_features(self, image):
        return None, [self.dinov2.forward_features(image)["x_norm_patchtokens"]]


# -- point-cloud and voxel encoders ----------------------------------------------------------------------------------


class MAB(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.kv = nn.Linear(dim, dim, bias=qkv_bias), nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, Q, K):
        B, N, _ = Q.shape
        q = self.q(Q).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        k, v = self.kv(K).reshape(B, K.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class IAB(nn.Module):
    def __init__(self, dim, heads, num_inds, proj_out=None, qkv_bias=False, with_mlp=True):
        super().__init__()
        self.I = nn.Parameter(torch.empty(1, num_inds, dim))
        nn.init.xavier_uniform_(self.I)
        self.mab0 = MAB(dim, heads, qkv_bias)
        self.with_mlp = with_mlp
        if with_mlp:
            self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(in_features=dim, hidden_features=4 * dim, out_features=proj_out,
                           act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)

    def forward(self, X):
        H = self.mab0(self.I.repeat(X.size(0), 1, 1), X)
        return self.mlp(self.norm(H)) if self.with_mlp else H


class DiTBlock_Basic(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=False, qk_norm=True, norm_layer=nn.LayerNorm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden, hidden_features=int(hidden * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PointNet(nn.Module):
    """PointNet_Large (large=True) / PointNet_Simple."""

    def __init__(self, output_dim, pc_dims, num_inds, num_heads=16, depth=4, large=True):
        super().__init__()
        self.large = large
        self.linear1, self.linear2 = nn.Linear(3, 64), nn.Linear(64, 256)
        self.linear3, self.linear4 = nn.Linear(256, 1024), nn.Linear(1024, pc_dims)
        self.ln1, self.ln2, self.ln3, self.ln4 = (nn.LayerNorm(64), nn.LayerNorm(256), nn.LayerNorm(1024),
                                                  nn.LayerNorm(pc_dims))
        if large:
            self.pooling = IAB(pc_dims, num_heads, num_inds, proj_out=output_dim, qkv_bias=True)
            self.t_blocks = nn.ModuleList(DiTBlock_Basic(output_dim, num_heads, 4) for _ in range(depth))
        else:
            self.pooling = IAB(pc_dims, num_heads, num_inds, with_mlp=False)
            self.linear_f1, self.linear_f2 = nn.Linear(pc_dims, output_dim), nn.Linear(output_dim, output_dim)
            self.linear_f3 = nn.Linear(output_dim, output_dim)
            self.ln_f1, self.ln_f2 = nn.LayerNorm(output_dim), nn.LayerNorm(output_dim)

    def forward(self, x):
        act = F.silu if self.large else F.relu
        x = act(self.ln1(self.linear1(x)))
        x = act(self.ln2(self.linear2(x)))
        x = act(self.ln3(self.linear3(x)))
        x = act(self.ln4(self.linear4(x)))
        x = self.pooling(x)
        if self.large:
            for b in self.t_blocks:
                x = b(x)
            return x
        x = F.relu(self.ln_f1(self.linear_f1(x)))
        x = F.relu(self.ln_f2(self.linear_f2(x)))
        return self.linear_f3(x)


class Encoder_Down_2(nn.Module):
    def __init__(self, channel_out, hidden=128, stem=64):
        super().__init__()
        self.in_conv = nn.Conv3d(1, stem, 3, padding=1)
        self.res_1 = VResBlock(stem, hidden, skip_kernel=3)
        for name in ("res_2", "res_3", "res_4", "res_5", "res_6"):
            setattr(self, name, VResBlock(hidden))
        self.down = nn.AvgPool3d(kernel_size=3, stride=2, padding=1)
        self.out_conv = nn.Sequential(normalization(hidden), nn.SiLU(), nn.Conv3d(hidden, channel_out, 3, padding=1))

    def forward(self, x):
        x = self.res_3(self.res_2(self.res_1(self.in_conv(x))))
        x = self.res_6(self.res_5(self.res_4(self.down(x))))
        x = self.out_conv(x).permute(0, 2, 3, 4, 1)
        return x.reshape(x.size(0), -1, x.size(-1))  # extract_input_features' Voxel branch
