"""WaLa's shape representation: a wavelet tree of a 256^3 signed distance field, compressed by a VQ-VAE.

Wavelet tree (3 levels of a 3-D bior6.8 DWT, per axis 256 -> 136 -> 76 -> 46 coefficients): the published models
keep the coarse approximation (46^3) and the detail subbands of the two coarsest levels; the finest details are
dropped (zero at reconstruction). They are packed into one 64-channel volume on the 46^3 grid:
  channel 0                 the approximation;
  channels 1 .. 7*8^e       level e (e = kept-1 .. 0, finer first): 7 subbands x (2^e)^3 children per grid cell,
                            channel 1 + ((xc * 7 + s) * 2^e + yc) * 2^e + zc holding subband s at index
                            cell * 2^e + child - pad on each axis, where the level's grid is padded by
                            pad = (46 * 2^e - size) / 2 to fill 46 * 2^e;
  e = 0 is the 46^3 level (7 channels, last), e = 1 the 76^3 level (56 channels).
Subband s in 0..6 is detail along axis 0, 1, 2 given by the bits of s + 1 (1 = axis 0: pywt key 'daa', 2 = 'ada',
3 = 'dda', 4 = 'aad', ... 7 = 'ddd').

VQ-VAE (General_Encoder_Down_2 / General_Decoder_Up_2, no transformer layers in any published model):
  encoder 64 x 46^3 -> conv -> 2 ResBlocks -> avgpool -> 2 ResBlocks -> avgpool -> 2 ResBlocks -> ResBlock -> GN,
  SiLU, conv -> 4 x 12^3 (the diffusion model's latent, before quantisation);
  decoder: nearest codebook vector (1024 x 4), conv -> ResBlock -> 2 ResBlocks -> trilinear x2, crop to 23 ->
  2 ResBlocks -> trilinear x2 -> 2 ResBlocks -> GN, SiLU, conv -> 64 x 46^3.
The inverse wavelet transform runs in torch (upsampled convolution with the synthesis filters, as PyWavelets'
idwt does for its non-periodic modes); the filters are PyWavelets' and are derived buffers, never stored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.wala_uvit import GroupNorm32


class ResBlock(nn.Module):
    """GN-SiLU-conv3, GN-SiLU-conv3, plus the input (through a conv when the width changes)."""

    def __init__(self, channels: int, out_channels: int | None = None, skip_kernel: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = GroupNorm32(channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        if out_channels != channels:
            self.skip = nn.Conv3d(channels, out_channels, skip_kernel, padding=skip_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.skip(x) if hasattr(self, "skip") else x) + h


def downsample(x: torch.Tensor) -> torch.Tensor:
    """The published 'Downsample' without a conv: 3^3 average, stride 2, zero padding counted."""
    return F.avg_pool3d(x, kernel_size=3, stride=2, padding=1)


class WaveletEncoder(nn.Module):
    def __init__(self, in_channels: int, latent_channels: int, hidden: int):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, hidden, 3, padding=1)
        self.res1a, self.res1b = ResBlock(hidden), ResBlock(hidden)
        self.res2a, self.res2b = ResBlock(hidden), ResBlock(hidden)
        self.res3a, self.res3b = ResBlock(hidden), ResBlock(hidden)
        self.res_out = ResBlock(hidden)
        self.out_norm = GroupNorm32(hidden)
        self.out_conv = nn.Conv3d(hidden, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.res1b(self.res1a(self.conv_in(x)))
        h = self.res2b(self.res2a(downsample(h)))
        h = self.res3b(self.res3a(downsample(h)))
        return self.out_conv(F.silu(self.out_norm(self.res_out(h))))


class WaveletDecoder(nn.Module):
    def __init__(self, latent_channels: int, out_channels: int, hidden: int):
        super().__init__()
        self.conv_in = nn.Conv3d(latent_channels, hidden, 3, padding=1)
        self.res_in = ResBlock(hidden)
        self.res1a, self.res1b = ResBlock(hidden), ResBlock(hidden)
        self.res2a, self.res2b = ResBlock(hidden), ResBlock(hidden)
        self.res3a, self.res3b = ResBlock(hidden), ResBlock(hidden)
        self.out_norm = GroupNorm32(hidden)
        self.out_conv = nn.Conv3d(hidden, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, grid: int) -> torch.Tensor:
        """z [B, 4, g, g, g] -> [B, C, grid, grid, grid]; the first x2 upsampling is cropped to ceil(grid / 2)."""
        h = self.res1b(self.res1a(self.res_in(self.conv_in(z))))
        mid = (grid + 1) // 2
        h = F.interpolate(h, scale_factor=2, mode="trilinear")[..., :mid, :mid, :mid]
        h = self.res2b(self.res2a(h))
        h = F.interpolate(h, scale_factor=2, mode="trilinear")
        h = self.res3b(self.res3a(h))
        return self.out_conv(F.silu(self.out_norm(h)))


class WaveletVQVAE(nn.Module):
    def __init__(self, channels: int, latent_channels: int, hidden: int, codebook_size: int, l2_normalize: bool):
        super().__init__()
        self.encoder = WaveletEncoder(channels, latent_channels, hidden)
        self.decoder = WaveletDecoder(latent_channels, channels, hidden)
        self.codebook = nn.Parameter(torch.zeros(codebook_size, latent_channels))
        self.l2_normalize = l2_normalize

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Each latent vector (channels of one cell) -> its nearest codebook vector (squared L2, first on ties)."""
        B, C = z.shape[:2]
        flat = z.permute(0, 2, 3, 4, 1).reshape(-1, C)
        codes = self.codebook
        if self.l2_normalize:
            flat, codes = F.normalize(flat, dim=-1), F.normalize(codes, dim=-1)
        d = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        q = codes[d.argmin(dim=1)]
        return q.view(B, *z.shape[2:], C).permute(0, 4, 1, 2, 3).contiguous()


# -- the wavelet tree ----------------------------------------------------------------------------------------------


def coefficient_sizes(resolution: int, filter_length: int, levels: int) -> list[int]:
    """Per-axis sizes of the DWT pyramid, finest first: [256, 136, 76, 46] (PyWavelets' non-periodic modes)."""
    sizes = [resolution]
    for _ in range(levels):
        sizes.append((sizes[-1] + filter_length - 1) // 2)
    return sizes


class WaveletTree(nn.Module):
    """Packing, unpacking and the inverse transform. The synthesis filters are derived buffers (PyWavelets)."""

    def __init__(self, wavelet: str, resolution: int, levels: int, kept_levels: int):
        super().__init__()
        self.wavelet, self.resolution, self.levels, self.kept = wavelet, resolution, levels, kept_levels
        self.register_buffer("rec_lo", torch.empty(0, device="meta"), persistent=False)
        self.register_buffer("rec_hi", torch.empty(0, device="meta"), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        import pywt  # optional dependency: pip install zoo[shapes]

        w = pywt.Wavelet(self.wavelet)
        self.rec_lo = torch.tensor(w.rec_lo, dtype=torch.float64, device=device)
        self.rec_hi = torch.tensor(w.rec_hi, dtype=torch.float64, device=device)

    @property
    def sizes(self) -> list[int]:
        return coefficient_sizes(self.resolution, self.rec_lo.numel(), self.levels)

    @property
    def grid(self) -> int:
        return self.sizes[-1]

    @property
    def channels(self) -> int:
        return 8**self.kept

    def _level(self, e: int) -> tuple[int, int]:
        """(size, pad) of the detail level 2^e times finer than the coarsest grid (e = 0: the coarsest)."""
        size = self.sizes[self.levels - e]
        return size, (self.grid * 2**e - size) // 2

    def unpack(self, volume: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """[B, 8^kept, g, g, g] -> (approximation [B, g, g, g], details coarsest first: [B, 7, n, n, n] or None)."""
        B, C, g = volume.shape[0], volume.shape[1], self.grid
        if C != self.channels or volume.shape[-1] != g:
            raise ValueError(f"wavelet volume has shape {tuple(volume.shape)}; expected [B, {self.channels}, {g}, "
                             f"{g}, {g}]")
        details: list[torch.Tensor | None] = []
        start = C  # levels sit finer first after channel 0: walk from the back (coarsest) to the front
        for e in range(self.levels):
            if e >= self.kept:
                details.append(None)
                continue
            n = 2**e
            start -= 7 * n**3
            size, pad = self._level(e)
            v = volume[:, start:start + 7 * n**3].reshape(B, n, 7, n, n, g, g, g)
            v = v.permute(0, 2, 5, 1, 6, 3, 7, 4).reshape(B, 7, g * n, g * n, g * n)
            details.append(v[:, :, pad:pad + size, pad:pad + size, pad:pad + size])
        return volume[:, 0], details

    def pack(self, low: torch.Tensor, details: list[torch.Tensor | None]) -> torch.Tensor:
        """The inverse of unpack for the kept levels (coefficients outside the padded grid cannot be stored)."""
        B, g = low.shape[0], self.grid
        parts = [low[:, None]]
        for e in reversed(range(self.kept)):
            n = 2**e
            size, pad = self._level(e)
            full = low.new_zeros(B, 7, g * n, g * n, g * n)
            full[:, :, pad:pad + size, pad:pad + size, pad:pad + size] = details[e]
            v = full.view(B, 7, g, n, g, n, g, n).permute(0, 3, 1, 5, 7, 2, 4, 6)
            parts.append(v.reshape(B, 7 * n**3, g, g, g))
        return torch.cat(parts, dim=1)

    def _synthesis_matrix(self, g: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
        """[2n - L + 2, n]: S[m, k] = g[m + L - 2 - 2k], the upsampled convolution with L - 2 samples cut from each
        end (PyWavelets' idwt for its non-periodic modes), as a banded matrix."""
        L = g.numel()
        taps = torch.arange(2 * n - L + 2, device=g.device)[:, None] + L - 2 - 2 * torch.arange(n, device=g.device)
        inside = (taps >= 0) & (taps < L)
        return torch.where(inside, g[taps.clamp(0, L - 1)], 0).to(like.dtype)

    def _synthesis(self, lo: torch.Tensor, hi: torch.Tensor | None, axis: int) -> torch.Tensor:
        """One axis (1, 2 or 3 of [B, D, H, W]) of the inverse DWT: y = S_lo lo + S_hi hi along that axis; matrix
        products keep it fast on any device."""
        n = lo.shape[axis]

        def apply(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            S = self._synthesis_matrix(g, n, x)
            if axis == 3:
                return x @ S.t()
            if axis == 2:
                return S @ x
            return (S @ x.reshape(x.shape[0], n, -1)).view(x.shape[0], -1, *x.shape[2:])

        y = apply(self.rec_lo, lo)
        return y if hi is None else y + apply(self.rec_hi, hi)

    def inverse(self, low: torch.Tensor, details: list[torch.Tensor | None]) -> torch.Tensor:
        """Multilevel inverse 3-D DWT: approximation [B, g, g, g] and details (coarsest first) -> [B, R, R, R]."""
        x = low
        for d in details:
            if d is not None and x.shape[-1] > d.shape[-1]:  # a level one larger than its details: crop the end
                n = d.shape[-1]
                x = x[..., :n, :n, :n]
            # bands indexed by (detail on axis 0) + 2 (axis 1) + 4 (axis 2); merge axis 0, then 1, then 2
            bands = [x] + (list(d.unbind(1)) if d is not None else [None] * 7)
            for axis in (1, 2, 3):
                bands = [self._synthesis(bands[i], bands[i + 1], axis) if bands[i] is not None else None
                         for i in range(0, len(bands), 2)]
            x = bands[0]
        return x
