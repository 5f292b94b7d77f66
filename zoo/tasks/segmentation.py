"""Semantic segmentation: `model(x)` -> logits [B, classes, H, W]; `segment(image)` -> a label mask and class names.

`model(x)` takes an already-normalised [B, C, H, W] tensor (H, W as the network needs them). `segment` (also
`predict`) does what nnU-Net's predictor does around the network, from facts the converter stored in the native
config's `extra`:
  transpose_forward (in-plane axes), crop to the non-zero bounding box, the per-channel normalisation of the plans
  (normalization: ZScore / CT with the dataset's statistics / none / rescale to [0, 1] / RGB to [0, 1]; never
  ImageNet statistics), resampling from the image's pixel spacing to the training spacing (spacing; PNGs have
  spacing 1), sliding windows of the training patch (patch_size) with step 1/2 and Gaussian weighting (padding to
  at least one patch), optional mirroring (mirror_axes), logits resampled back, argmax, un-cropped.
Resampling uses bicubic interpolation for the image (nnU-Net: a third-order spline) and bilinear for the logits
(nnU-Net: first order), so masks near class borders can differ by a pixel from nnU-Net's. Class names are
extra["labels"]; the result saves as a palette PNG (pixel value = class index) plus an overlay picture.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from zoo.tasks import Command, ZooModel, is_main_process, register_task
from zoo.tasks.vision import open_pil

# class colours for masks and overlays (index 0, the background, is black / transparent)
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128)]


def colour(i: int) -> tuple[int, int, int]:
    if i < len(PALETTE):
        return PALETTE[i]
    g = np.random.default_rng(i)  # beyond the table: a fixed colour per class
    return tuple(int(v) for v in g.integers(40, 256, 3))


@dataclass
class Segmentation:
    """A label mask [H, W] (class indices) with its class names, and the image it was computed from."""

    mask: np.ndarray
    labels: list[str]
    image: np.ndarray | None = None  # [C, H, W] raw intensities, for the overlay

    def areas(self) -> dict[str, int]:
        """Pixels per class present in the mask."""
        counts = np.bincount(self.mask.reshape(-1), minlength=len(self.labels))
        return {self.labels[i]: int(n) for i, n in enumerate(counts) if n}

    def to_image(self) -> Image.Image:
        """The mask as a palette PNG image: pixel values are class indices, the palette shows them in colour."""
        img = Image.fromarray(self.mask.astype(np.uint8), mode="P")
        img.putpalette([c for i in range(256) for c in colour(i)])
        return img

    def save(self, path: str | Path) -> Path:
        if len(self.labels) > 256:
            raise ValueError(f"{len(self.labels)} classes do not fit a PNG palette (256)")
        path = Path(path)
        self.to_image().save(path)
        return path

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The image (grey or RGB, intensities stretched to 0..255) with each class tinted in its colour."""
        base = display_image(self.image if self.image is not None else np.zeros((1, *self.mask.shape)))
        rgb = np.asarray(base, dtype=np.float32)
        tint = np.array([colour(i) for i in range(max(len(self.labels), int(self.mask.max()) + 1))], np.float32)
        fg = (self.mask > 0)[..., None]
        rgb = np.where(fg, (1 - alpha) * rgb + alpha * tint[self.mask], rgb)
        out = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
        return add_legend(out, {i: self.labels[i] for i in np.unique(self.mask) if i > 0}) if legend else out


def display_image(image: np.ndarray) -> Image.Image:
    """[C, H, W] raw intensities -> an RGB picture: 3 channels as they are, otherwise the first channel in grey."""
    a = np.asarray(image, dtype=np.float32)
    a = a[:3] if a.shape[0] >= 3 else a[:1].repeat(3, axis=0)
    lo, hi = float(a.min()), float(a.max())
    if not (lo >= 0 and hi <= 255 and hi > 1):  # not 8-bit pixels: stretch
        a = (a - lo) / max(hi - lo, 1e-8) * 255
    return Image.fromarray(a.transpose(1, 2, 0).clip(0, 255).astype(np.uint8), "RGB")


def add_legend(img: Image.Image, classes: dict[int, str]) -> Image.Image:
    if not classes:
        return img
    row = 14
    out = Image.new("RGB", (img.width, img.height + row * len(classes) + 4), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for n, (i, name) in enumerate(sorted(classes.items())):
        y = img.height + 2 + n * row
        draw.rectangle([4, y + 2, 14, y + 11], fill=colour(int(i)))
        draw.text((20, y), f"{i}: {name}", fill=(0, 0, 0))
    return out


# -- reading images -------------------------------------------------------------------------------------------


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """An image file -> [C, H, W] float32 raw intensities (as nnU-Net's natural-image reader gives them)."""
    img = open_pil(path)  # junk, empty files and decompression bombs are refused by name there
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: keep the values
        return np.asarray(img, dtype=np.float32)[None]
    a = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
    return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]


def as_channels_first(image: Any, channels: int) -> np.ndarray:
    """An array / tensor [H, W], [C, H, W] or [H, W, C] (C = the model's channels) -> [C, H, W] float32."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[0] != channels and a.shape[-1] == channels:
        a = a.transpose(2, 0, 1)
    if a.ndim != 3 or a.shape[0] != channels:
        raise ValueError(f"this model segments images of {channels} channel(s); got an array of shape "
                         f"{tuple(a.shape)} (give [H, W], [C, H, W] or [H, W, C])")
    return a.astype(np.float32)


# -- nnU-Net's preprocessing and sliding-window inference ------------------------------------------------------------


def nonzero_box(image: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of pixels that are non-zero in any channel (nnU-Net crops to it before normalising)."""
    nz = np.any(image != 0, axis=0)
    if not nz.any():
        return slice(0, image.shape[1]), slice(0, image.shape[2])
    rows, cols = np.where(nz.any(axis=1))[0], np.where(nz.any(axis=0))[0]
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def normalize_channels(image: np.ndarray, schemes: list[dict[str, Any]]) -> np.ndarray:
    """nnU-Net's per-channel normalisation schemes with the statistics the plans recorded."""
    out = image.astype(np.float32).copy()
    inside = np.any(image != 0, axis=0)
    for c, s in enumerate(schemes):
        x = out[c]
        kind = s["scheme"]
        if kind == "ZScoreNormalization":
            if s.get("use_mask"):
                mean, std = x[inside].mean(), x[inside].std()
                x[inside] = (x[inside] - mean) / max(float(std), 1e-8)
                x[~inside] = 0
            else:
                x -= x.mean()
                x /= max(float(x.std()), 1e-8)
        elif kind == "CTNormalization":
            np.clip(x, s["percentile_00_5"], s["percentile_99_5"], out=x)
            x -= s["mean"]
            x /= max(s["std"], 1e-8)
        elif kind == "RescaleTo01Normalization":
            x -= x.min()
            x /= max(float(x.max()), 1e-8)
        elif kind == "RGBTo01Normalization":
            if x.min() < 0 or x.max() > 255:
                raise ValueError(f"channel {c} is normalised as RGB (0..255) but holds values outside that range")
            x /= 255.0
        elif kind != "NoNormalization":
            raise ValueError(f"unknown normalisation scheme {kind!r}")
    return out


def window_starts(size: int, tile: int, step: float) -> list[int]:
    """nnU-Net's tile positions along one axis: the fewest tiles spaced at most step x tile apart, spread evenly."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile * step)) + 1
    spacing = (size - tile) / (n - 1)
    return [int(round(spacing * i)) for i in range(n)]


def gaussian_weights(tile: tuple[int, int], sigma_scale: float = 1 / 8, peak: float = 10.0) -> torch.Tensor:
    """nnU-Net's tile weighting: a Gaussian (sigma = tile/8, truncated at 4 sigma as scipy's filter does) centred
    on the tile, scaled to a maximum of 10, zeros replaced by the smallest non-zero weight."""
    axes = []
    for n in tile:
        sigma = n * sigma_scale
        d = torch.arange(n, dtype=torch.float64) - n // 2
        w = torch.exp(-0.5 * (d / sigma) ** 2)
        axes.append(torch.where(d.abs() <= int(4 * sigma + 0.5), w, torch.zeros_like(w)))
    g = axes[0][:, None] * axes[1][None, :]
    g = g / g.max() * peak
    return torch.where(g == 0, g[g > 0].min(), g).float()


@register_task("image-segmentation")
class Segmenter(ZooModel):
    """`model(x)` -> logits; `segment(image)` / `predict(image)` -> Segmentation (mask + class names)."""

    commands = {"predict": Command(  # what `zoo predict` may pass (checked before loading): the mask and an overlay
        options=frozenset({"out"}), out=(".png",), companions=("{stem}_overlay.png",))}

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.native.extra

    @property
    def labels(self) -> list[str]:
        n = self.config.num_classes
        labels = self.native.extra.get("labels") or []
        return list(labels) if len(labels) == n else [f"class {i}" for i in range(n)]

    @property
    def channels(self) -> int:
        return int(self.config.in_channels)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(x.to(device=self.device, dtype=self.dtype)).float()

    def sliding_window(self, x: torch.Tensor, step: float = 0.5, mirror: bool = False,
                       batch_size: int = 4) -> torch.Tensor:
        """Logits [classes, H, W] for a normalised image [C, H, W] of any size, in tiles of the training patch."""
        tile = tuple(int(p) for p in self.preprocessing.get("patch_size", (512, 512)))
        multiple = getattr(self.module, "input_multiple", 1)
        if any(t % multiple for t in tile):
            raise ValueError(f"patch size {tile} is not a multiple of {multiple}, which this network needs")
        C, H, W = x.shape
        pad_h, pad_w = max(tile[0] - H, 0), max(tile[1] - W, 0)  # at least one patch, the image centred
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        Hp, Wp = x.shape[1:]
        weight = gaussian_weights(tile)
        out = torch.zeros(self.config.num_classes, Hp, Wp)
        norm = torch.zeros(1, Hp, Wp)
        corners = [(r, c) for r in window_starts(Hp, tile[0], step) for c in window_starts(Wp, tile[1], step)]
        axes = [int(a) + 2 for a in self.preprocessing.get("mirror_axes", (0, 1))] if mirror else []
        flips = [f for n in range(len(axes) + 1) for f in itertools.combinations(axes, n)]  # () = no flip
        for k in range(0, len(corners), batch_size):
            group = corners[k:k + batch_size]
            tiles = torch.stack([x[:, r:r + tile[0], c:c + tile[1]] for r, c in group])
            pred = sum(self.logits(tiles.flip(f)).flip(f) if f else self.logits(tiles) for f in flips) / len(flips)
            for (r, c), p in zip(group, pred.cpu()):
                out[:, r:r + tile[0], c:c + tile[1]] += p * weight
                norm[:, r:r + tile[0], c:c + tile[1]] += weight
        out = out / norm
        return out[:, pad_h // 2:pad_h // 2 + H, pad_w // 2:pad_w // 2 + W]

    def segment(self, image: Any, spacing: tuple[float, float] | None = None, step: float = 0.5,
                mirror: bool = False, batch_size: int = 4) -> Segmentation:
        """A label mask for an image file, array or tensor ([H, W], [C, H, W] or [H, W, C] raw intensities).

        spacing: the image's pixel spacing (PNG and JPEG images have 1 x 1, as nnU-Net reads them); the image is
        resampled to the training spacing for the network and the mask comes back at the image's own size.
        mirror: average over the flips nnU-Net's predictor uses (4x the work)."""
        raw = read_image(image, self.channels) if isinstance(image, (str, Path)) else \
            as_channels_first(image, self.channels)
        p = self.preprocessing
        swap = list(p.get("transpose_forward", (0, 1, 2)))[1:] == [2, 1]
        img = raw.transpose(0, 2, 1) if swap else raw
        spacing = tuple(spacing or (1.0, 1.0))
        if swap:
            spacing = spacing[::-1]
        rows, cols = nonzero_box(img)
        cropped = normalize_channels(img[:, rows, cols], p.get("normalization") or
                                     [{"scheme": "ZScoreNormalization"}] * self.channels)
        x = torch.from_numpy(cropped)
        target = [float(s) for s in p.get("spacing", spacing)]
        size = tuple(x.shape[1:])
        new = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(size, spacing, target))
        if new != size:
            x = F.interpolate(x[None], size=new, mode="bicubic", align_corners=False)[0]
        logits = self.sliding_window(x, step=step, mirror=mirror, batch_size=batch_size)
        if new != size:
            logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        mask = np.zeros(img.shape[1:], dtype=np.int64)
        mask[rows, cols] = logits.argmax(0).numpy()
        if swap:
            mask = mask.T
        return Segmentation(np.ascontiguousarray(mask), self.labels, raw)

    predict = segment

    def cli_predict(self, args: Any) -> None:
        result = self.segment(args.file)
        if not is_main_process():
            return
        total = result.mask.size
        for name, n in result.areas().items():
            print(f"{n / total:7.2%}  {name}  ({n} px)")
        out = getattr(args, "out", None)
        if out:
            mask_path = result.save(out)
            overlay_path = mask_path.with_name(f"{mask_path.stem}_overlay.png")
            result.overlay().save(overlay_path)
            print(f"wrote {mask_path} (pixel value = class index) and {overlay_path}")
        else:
            print("(pass --out mask.png to write the mask and an overlay picture)")
