"""Semantic segmentation: `model(x)` -> logits [B, classes, H, W]; `segment(image)` -> a label mask and class names.

`model(x)` takes an already-normalised [B, C, H, W] tensor (H, W as the network needs them). `segment` (also
`predict`) runs nnU-Net v2's own inference around the network (nnUNetPredictor.predict_single_npy_array and the
DefaultPreprocessor it calls, reproduced step by step and tested against them), from facts the converter stored in
the native config's `extra`:
  the image as nnU-Net's readers give it, [C, Z, Y, X] with spacing (z, y, x) (a 2-D picture is one slice of
  spacing 999); transpose_forward; crop to the bounding box of the non-zero mask (holes filled with scipy's
  binary_fill_holes); the plans' per-channel normalisation (ZScore inside that mask or not / CT with the dataset's
  statistics / none / rescale / RGB; never ImageNet statistics); resampling to the training spacing in-plane with
  nnU-Net's resample_data_or_seg (scikit-image splines, order 3 for the image, 1 for the logits, nearest along a
  separate z); sliding windows of the training patch on every slice along the first axis (the 2-D configuration),
  step 1/2, Gaussian weights (scipy), test-time mirroring on by default, fp16 accumulators as nnU-Net keeps them;
  the average over the stored cross-validation folds; logits resampled back, softmax, argmax, un-cropped,
  transposed back; then nnU-Net's connected-component postprocessing when the result folder carried it.
On a GPU the network runs under autocast (nnU-Net's predictor) and the frozen DINOv3 backbone under bf16 autocast
(the published adapter); on a CPU everything stays fp32 unless autocast=True is asked for.

Volumes (NIfTI and the other formats SimpleITK reads; nibabel when the plans name NibabelIO) are read and written
back as nnU-Net's SimpleITKIO / NibabelIO do: the written segmentation keeps the source's spacing, origin and
direction (the affine). Needs `pip install 'zoo[medical]'` (scipy, scikit-image, SimpleITK, nibabel).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from zoo.tasks import Command, ZooModel, is_main_process, register_task
from zoo.tasks.vision import check_image_file, open_pil

# class colours for masks and overlays (index 0, the background, is black / transparent)
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128)]
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ANISO_THRESHOLD = 3  # nnunetv2.configuration: a spacing ratio above this resamples the low-resolution axis apart
DEFAULT_RESAMPLING = {"data": {"order": 3, "order_z": 0, "force_separate_z": None},
                      "probabilities": {"order": 1, "order_z": 0, "force_separate_z": None}}


def need(module: str) -> Any:
    """An optional dependency of the `medical` extra, or an ImportError saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = {"skimage": "scikit-image", "SimpleITK": "SimpleITK"}.get(module.split(".")[0], module)
        raise ImportError(f"segmentation with nnU-Net's inference needs {package}: pip install 'zoo[medical]'",
                          name=module.split(".")[0]) from e


def colour(i: int) -> tuple[int, int, int]:
    if i < len(PALETTE):
        return PALETTE[i]
    g = np.random.default_rng(i)  # beyond the table: a fixed colour per class
    return tuple(int(v) for v in g.integers(40, 256, 3))


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES + IMAGE_SUFFIXES if name.endswith(s)), Path(path).suffix.lower())


def stem_of(path: Path) -> str:
    return path.name[:len(path.name) - len(suffix_of(path))] if suffix_of(path) else path.stem


# -- volumes: read and written as nnU-Net's readers do -----------------------------------------------------------


@dataclass
class Volume:
    """An image as nnU-Net's readers give it: data [C, Z, Y, X] float32, spacing (z, y, x), and what writing a
    segmentation back needs (SimpleITK's spacing / origin / direction, or nibabel's affine)."""

    data: np.ndarray
    spacing: tuple[float, ...]
    geometry: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    ndim: int = 3  # 2 for a picture or a 2-D file: one slice


def check_volume(data: np.ndarray, spacing: Any, where: str) -> tuple[float, ...]:
    if data.size == 0:
        raise ValueError(f"{where}: an empty image (shape {tuple(data.shape)})")
    if not np.isfinite(data).all():
        raise ValueError(f"{where}: holds NaN or infinite intensities")
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: spacing={spacing!r}: must be numbers") from None
    if len(sp) != data.ndim - 1 or not all(math.isfinite(s) and s > 0 for s in sp):
        axes = "(z, y, x)" if data.ndim == 4 else "(row, column)"
        raise ValueError(f"{where}: spacing={spacing!r}: must be {data.ndim - 1} finite numbers > 0 {axes}")
    return sp


def read_volume(paths: str | Path | list[str | Path], io: str = "SimpleITKIO") -> Volume:
    """One file per channel (nnU-Net's case_0000.nii.gz, case_0001.nii.gz, ...) -> a Volume. io: "SimpleITKIO" (any
    format SimpleITK reads) or "NibabelIO" (NIfTI through nibabel), as the plans' image_reader_writer says."""
    files = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    if not files:
        raise ValueError("no image files given")
    arrays, spacings, geometry = [], [], {}
    for f in files:
        check_image_file(f)
        a, sp, geo = (read_nibabel if io.startswith("NibabelIO") else read_sitk)(f)
        if a.ndim not in (2, 3):
            raise ValueError(f"{f}: a {a.ndim}-D image of shape {tuple(a.shape)}; zoo reads 2-D and 3-D images, one "
                             "file per channel")
        if a.ndim == 2:  # nnU-Net: one slice with an out-of-plane spacing of 999 x the largest
            a, sp = a[None], (max(sp) * 999, *sp)
        arrays.append(a.astype(np.float32))
        spacings.append(check_volume(a[None], sp, str(f)))
        geometry = geometry or {**geo, "dim": 2 if a.shape[0] == 1 and len(geo.get("spacing", (0, 0, 0))) == 2
                                else 3}
        if a.shape != arrays[0].shape or not np.allclose(spacings[-1], spacings[0], rtol=1e-5):
            raise ValueError(f"{f}: shape {a.shape} and spacing {spacings[-1]} do not match {files[0]} (shape "
                             f"{arrays[0].shape}, spacing {spacings[0]}); every channel must be on the same grid")
    return Volume(np.stack(arrays), spacings[0], geometry, str(files[0]), ndim=2 if geometry.get("dim") == 2 else 3)


def read_sitk(path: Path) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    sitk = need("SimpleITK")
    try:
        img = sitk.ReadImage(str(path))
        a = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        why = " ".join(str(e).split())[-300:]
        raise ValueError(f"{path}: not a readable image ({why})") from None
    if suffix_of(path) in (".nii", ".nii.gz"):
        check_nifti(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: {img.GetNumberOfComponentsPerPixel()} components per voxel; give one file per "
                         "channel")
    geo = {"io": "SimpleITKIO", "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
           "direction": list(img.GetDirection())}
    return a, tuple(abs(s) for s in img.GetSpacing()[::-1]), geo


def check_nifti(path: Path) -> None:
    """What SimpleITK lets pass in a NIfTI file: a dimension of 0 (read as 1) and voxel data cut short (read as
    zeros) are refused here, from the header nibabel reads and the bytes the file really holds."""
    import gzip
    import zlib

    nib = need("nibabel")
    try:
        header = nib.load(str(path)).header
        shape = tuple(int(n) for n in header.get_data_shape())
        wanted = int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for a damaged header
        raise ValueError(f"{path}: not a readable NIfTI image ({' '.join(str(e).split())[:300]})") from None
    if 0 in shape:
        raise ValueError(f"{path}: an empty volume (its header gives the shape {shape})")
    try:
        if suffix_of(path) == ".nii.gz":
            with gzip.open(path, "rb") as f:  # streamed: a truncated stream fails here
                held = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 22), b""))
        else:
            held = path.stat().st_size
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: truncated or damaged ({' '.join(str(e).split()) or type(e).__name__})") from None
    if held < wanted:
        raise ValueError(f"{path}: truncated: {held} bytes where its header needs {wanted}")


def read_nibabel(path: Path) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    nib = need("nibabel")
    try:
        img = nib.load(str(path))
        a = np.asarray(img.get_fdata())
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for a damaged header
        raise ValueError(f"{path}: not a readable NIfTI image ({' '.join(str(e).split())[:300]})") from None
    zooms = [float(z) for z in img.header.get_zooms()]
    return a.transpose(tuple(range(a.ndim))[::-1]), tuple(zooms[:a.ndim][::-1]), \
        {"io": "NibabelIO", "affine": np.asarray(img.affine).tolist()}


def write_volume(mask: np.ndarray, path: Path, geometry: dict[str, Any]) -> None:
    """The mask [Z, Y, X] with the source's geometry untouched (nnU-Net's SimpleITKIO / NibabelIO write_seg)."""
    dtype = np.uint8 if mask.max(initial=0) < 255 else np.uint16
    if geometry.get("io") == "NibabelIO":
        nib = need("nibabel")
        nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).astype(dtype), affine=np.asarray(geometry["affine"])),
                 str(path))
        return
    sitk = need("SimpleITK")
    img = sitk.GetImageFromArray((mask[0] if geometry.get("dim") == 2 else mask).astype(dtype))
    img.SetSpacing(geometry["spacing"])
    img.SetOrigin(geometry["origin"])
    img.SetDirection(geometry["direction"])
    sitk.WriteImage(img, str(path), True)


# -- the result ---------------------------------------------------------------------------------------------------


@dataclass
class Segmentation:
    """A label mask (class indices; [H, W] for a picture, [Z, Y, X] for a volume) with its class names, the image
    it was computed from, the class probabilities when asked for, and the source's geometry for writing it back."""

    mask: np.ndarray
    labels: list[str]
    image: np.ndarray | None = None  # [C, H, W] or [C, Z, Y, X] raw intensities, for the overlay
    probabilities: np.ndarray | None = None  # [classes, *mask.shape] (segment(..., probabilities=True))
    geometry: dict[str, Any] = field(default_factory=dict)

    def areas(self) -> dict[str, int]:
        """Pixels (voxels) per class present in the mask."""
        counts = np.bincount(self.mask.reshape(-1), minlength=len(self.labels))
        return {self.labels[i]: int(n) for i, n in enumerate(counts) if n}

    def to_image(self, slice: int | None = None) -> Image.Image:
        """The mask (one slice of a volume) as a palette PNG: pixel values are class indices, shown in colour."""
        img = Image.fromarray(self.plane(slice)[0].astype(np.uint8), mode="P")
        img.putpalette([c for i in range(256) for c in colour(i)])
        return img

    def default_slice(self) -> int:
        """The slice with the most foreground (the first one on a tie), for a quick look at a volume."""
        if self.mask.ndim == 2:
            return 0
        return int(np.argmax((self.mask > 0).reshape(self.mask.shape[0], -1).sum(1)))

    def plane(self, slice: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(mask [H, W], image [C, H, W]) of a picture, or of one slice along a volume's first axis."""
        if self.mask.ndim == 2:
            return self.mask, self.image
        k = self.default_slice() if slice is None else check_slice(slice, self.mask.shape[0])
        return self.mask[k], None if self.image is None else self.image[:, k]

    def save(self, path: str | Path) -> Path:
        """A volume format (.nii.gz, .nrrd, .mha, ...) writes the mask with the source's geometry; .png writes a
        picture's mask (a volume's: pass its slice to to_image)."""
        path = Path(path)
        kind = check_output(path, volume=self.mask.ndim == 3)
        if len(self.labels) > (256 if kind == "image" else 65536):
            raise ValueError(f"{len(self.labels)} classes do not fit {path.name}")
        if kind == "volume":
            if not self.geometry:
                raise ValueError(f"{path}: this mask has no source geometry (it was computed from an array); save it "
                                 "as .png or segment the image file")
            write_volume(self.mask[None] if self.mask.ndim == 2 else self.mask, path, self.geometry)
        else:
            self.to_image().save(path)
        return path

    def overlay(self, alpha: float = 0.5, legend: bool = True, slice: int | None = None) -> Image.Image:
        """The image (grey or RGB, intensities stretched to 0..255) with each class tinted in its colour; for a
        volume, the given slice along the first axis (default: the one with the most foreground)."""
        mask, image = self.plane(slice)
        base = display_image(image if image is not None else np.zeros((1, *mask.shape)))
        rgb = np.asarray(base, dtype=np.float32)
        tint = np.array([colour(i) for i in range(max(len(self.labels), int(mask.max(initial=0)) + 1))], np.float32)
        fg = (mask > 0)[..., None]
        rgb = np.where(fg, (1 - alpha) * rgb + alpha * tint[mask], rgb)
        out = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
        return add_legend(out, {i: self.labels[i] for i in np.unique(mask) if i > 0}) if legend else out


def check_slice(k: Any, n: int, arg: str = "slice") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < n:
        raise ValueError(f"{arg}={k!r}: this volume has {n} slices along its first axis; give 0..{n - 1}")
    return int(k)


def check_output(path: Path, volume: bool, arg: str = "out") -> str:
    """'volume' or 'image': what an output file's name asks for, refused when it cannot hold the result."""
    kind = "volume" if suffix_of(path) in VOLUME_SUFFIXES else "image" if suffix_of(path) == ".png" else None
    if kind is None:
        raise ValueError(f"{arg}={str(path)!r}: write a mask as .png or as a volume ({', '.join(VOLUME_SUFFIXES)})")
    if volume and kind == "image":
        raise ValueError(f"{arg}={str(path)!r}: a volume's mask is written as a volume ({', '.join(VOLUME_SUFFIXES)});"
                         " the overlay PNG of one slice is written beside it")
    return kind


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


# -- reading pictures and arrays ---------------------------------------------------------------------------------


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """An image file -> [C, H, W] float32 raw intensities (as nnU-Net's natural-image reader gives them)."""
    img = open_pil(path)  # junk, empty files and decompression bombs are refused by name there
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: keep the values
        return np.asarray(img, dtype=np.float32)[None]
    a = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
    return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]


def as_channels_first(image: Any, channels: int) -> np.ndarray:
    """An array / tensor [H, W], [C, H, W] or [H, W, C] (C = the model's channels) -> [C, H, W] float32; a 4-D
    [C, Z, Y, X] array is a volume."""
    if not isinstance(image, (np.ndarray, torch.Tensor, list, tuple)):
        raise ValueError(f"image: expected a file, an array or a tensor, got {type(image).__name__}")
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"image: expected numbers, got an array of {a.dtype}")
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[0] != channels and a.shape[-1] == channels:
        a = a.transpose(2, 0, 1)
    if a.ndim not in (3, 4) or a.shape[0] != channels:
        raise ValueError(f"this model segments images of {channels} channel(s); got an array of shape "
                         f"{tuple(a.shape)} (give [H, W], [C, H, W], [H, W, C] or a volume [C, Z, Y, X])")
    return a.astype(np.float32)


def as_volume(image: Any, channels: int, spacing: Any, io: str = "SimpleITKIO") -> Volume:
    """Any input segment() takes -> a Volume [C, Z, Y, X] with nnU-Net's spacing (z, y, x)."""
    if isinstance(image, Volume):
        if spacing is not None:
            raise ValueError("spacing: a Volume carries its own spacing")
        check_volume(image.data, image.spacing, image.source or "volume")
        return image
    if isinstance(image, (list, tuple)) and image and all(isinstance(p, (str, Path)) for p in image):
        if spacing is not None:
            raise ValueError("spacing: image files carry their own spacing")
        return read_volume(list(image), io)
    if isinstance(image, (str, Path)):
        if suffix_of(image) in VOLUME_SUFFIXES:
            if spacing is not None:
                raise ValueError(f"spacing: {image} carries its own spacing")
            return read_volume(image, io)
        raw = read_image(image, channels)
    else:
        raw = as_channels_first(image, channels)
    if raw.ndim == 3:  # a picture: one slice; spacing (y, x) in-plane, 999 x the largest out of plane
        sp = tuple(spacing) if spacing is not None else (1.0, 1.0)
        if len(sp) != 2:
            raise ValueError(f"spacing={spacing!r}: a 2-D image takes (row, column) spacing")
        sp = check_volume(raw, sp, "image")
        return Volume(raw[:, None], (max(sp) * 999, *sp), {}, str(image) if isinstance(image, (str, Path)) else "",
                      ndim=2)
    if spacing is None:
        raise ValueError(f"spacing: a volume array of shape {tuple(raw.shape)} needs its spacing (z, y, x)")
    return Volume(raw, check_volume(raw, spacing, "volume"), {}, "", ndim=3)


# -- nnU-Net's preprocessing (DefaultPreprocessor.run_case_npy) ---------------------------------------------------


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """nnU-Net's create_nonzero_mask: non-zero in any channel, holes filled (scipy's binary_fill_holes, in 3-D)."""
    ndimage = need("scipy.ndimage")
    return ndimage.binary_fill_holes(np.any(data != 0, axis=0))


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """The half-open bounding box of a mask (the whole array when it is empty, as acvl_utils' get_bbox_from_mask)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.where(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[axis]])
    return box


def normalize_channels(data: np.ndarray, seg: np.ndarray, schemes: list[dict[str, Any]]) -> np.ndarray:
    """nnU-Net's per-channel normalisation schemes with the statistics the plans recorded (in place, float32);
    seg >= 0 marks the non-zero region (ZScore with use_mask normalises inside it only)."""
    inside = seg >= 0
    for c, s in enumerate(schemes):
        x = data[c]
        kind = s["scheme"]
        if kind == "ZScoreNormalization":
            if s.get("use_mask"):
                mean, std = x[inside].mean(), x[inside].std()
                x[inside] = (x[inside] - mean) / max(std, 1e-8)
            else:
                mean, std = x.mean(), x.std()
                x -= mean
                x /= max(std, 1e-8)
        elif kind == "CTNormalization":
            np.clip(x, s["percentile_00_5"], s["percentile_99_5"], out=x)
            x -= s["mean"]
            x /= max(s["std"], 1e-8)
        elif kind == "RescaleTo01Normalization":
            x -= x.min()
            x /= np.clip(x.max(), a_min=1e-8, a_max=None)
        elif kind == "RGBTo01Normalization":
            if x.min() < 0 or x.max() > 255:
                raise ValueError(f"channel {c} is normalised as RGB (0..255) but holds values outside that range")
            x /= 255.0
        elif kind != "NoNormalization":
            raise ValueError(f"unknown normalisation scheme {kind!r}")
    return data


def new_shape_for(shape: tuple[int, ...], spacing: list[float], target: list[float]) -> list[int]:
    return [int(round(s / t * n)) for s, t, n in zip(spacing, target, shape)]


def separate_z(force: bool | None, spacing: list[float], target: list[float]) -> int | None:
    """nnU-Net's determine_do_sep_z_and_axis: the anisotropic axis resampled apart (None: resample in 3-D)."""
    def lowres(sp: list[float]) -> list[int]:
        return [i for i, s in enumerate(sp) if max(sp) / s == 1]

    if force is not None:
        axes = lowres(spacing) if force else None
    elif max(spacing) / min(spacing) > ANISO_THRESHOLD:
        axes = lowres(spacing)
    elif max(target) / min(target) > ANISO_THRESHOLD:
        axes = lowres(target)
    else:
        axes = None
    return axes[0] if axes is not None and len(axes) == 1 else None


def resample(data: np.ndarray, new_shape: list[int], spacing: list[float], target: list[float], order: int = 3,
             order_z: int = 0, force_separate_z: bool | None = None) -> np.ndarray:
    """nnU-Net's resample_data_or_seg_to_shape for images / logits [C, Z, Y, X] (is_seg=False): scikit-image's
    resize (spline `order`, edge mode, no anti-aliasing) slice by slice along an anisotropic axis, which is then
    resampled with scipy's map_coordinates of order_z, or in 3-D; the result in the input's dtype."""
    shape = np.array(data.shape[1:])
    new_shape = np.array(new_shape)
    if np.all(shape == new_shape):
        return data
    resize = need("skimage.transform").resize
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    data = data.astype(float, copy=False)
    axis = separate_z(force_separate_z, spacing, target)
    kw = {"mode": "edge", "anti_aliasing": False}
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = resize(data[c], new_shape, order, **kw)
            continue
        plane = [n for i, n in enumerate(new_shape) if i != axis]
        tmp = new_shape.copy()
        tmp[axis] = shape[axis]
        here = np.zeros(tmp)
        for k in range(shape[axis]):
            idx = tuple(k if i == axis else slice(None) for i in range(3))
            here[idx] = resize(data[c][idx], plane, order, **kw)
        if shape[axis] != new_shape[axis]:
            map_coordinates = need("scipy.ndimage").map_coordinates
            scale = [o / n for o, n in zip(here.shape, new_shape)]
            grid = np.mgrid[:new_shape[0], :new_shape[1], :new_shape[2]].astype(float)
            coords = np.array([s * (g + 0.5) - 0.5 for s, g in zip(scale, grid)])
            out[c] = map_coordinates(here, coords, order=order_z, mode="nearest")
        else:
            out[c] = here
    return out


# -- nnU-Net's sliding-window prediction ------------------------------------------------------------------------


def window_starts(size: int, tile: int, step: float) -> list[int]:
    """nnU-Net's tile positions along one axis: the fewest tiles spaced at most step x tile apart, spread evenly."""
    n = int(np.ceil((size - tile) / (tile * step))) + 1
    if n <= 1:
        return [0]
    spacing = (size - tile) / (n - 1)
    return [int(np.round(spacing * i)) for i in range(n)]


def gaussian_weights(tile: tuple[int, ...], sigma_scale: float = 1 / 8, peak: float = 10.0,
                     dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """nnU-Net's compute_gaussian: a centred delta through scipy's gaussian_filter (sigma = tile / 8), scaled to a
    peak of 10, cast to fp16 as the predictor keeps it, zeros replaced by the smallest weight."""
    gaussian_filter = need("scipy.ndimage").gaussian_filter
    delta = np.zeros(tile)
    delta[tuple(n // 2 for n in tile)] = 1
    g = gaussian_filter(delta, [n * sigma_scale for n in tile], 0, mode="constant", cval=0)
    g = torch.from_numpy(g / (np.max(g) / peak)).to(dtype)
    g[g == 0] = torch.min(g[g != 0])
    return g


def pad_to(x: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """acvl_utils' pad_nd_image: zero-pad the last two axes to at least the tile, the image centred (the odd pixel
    after it); and the slices that undo it."""
    pads, keep = [], []
    for n, t in zip(x.shape[-2:], tile):
        d = max(t - n, 0)
        pads.append((d // 2, d - d // 2))
        keep.append(slice(d // 2, d // 2 + n))
    return torch.nn.functional.pad(x, (*pads[1], *pads[0])), tuple(keep)


# -- nnU-Net's postprocessing ---------------------------------------------------------------------------------------


def keep_largest_component(mask: np.ndarray, labels_or_regions: Any, background: int = 0) -> np.ndarray:
    """nnU-Net's remove_all_but_largest_component_from_segmentation: the voxels of the given label(s) (a label or a
    region, or a list of them) outside their largest connected component (full connectivity; every component of
    the largest size is kept) become background."""
    ndimage = need("scipy.ndimage")
    items = labels_or_regions if isinstance(labels_or_regions, list) else [labels_or_regions]
    selected = np.zeros(mask.shape, dtype=bool)
    for item in items:
        selected |= np.isin(mask, list(item) if isinstance(item, (list, tuple)) else [item])
    components, n = ndimage.label(selected, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    keep = np.isin(components, [i + 1 for i, s in enumerate(sizes) if s == sizes.max()]) if n else selected
    out = mask.copy()
    out[selected & ~keep] = background
    return out


def apply_postprocessing(mask: np.ndarray, steps: list[dict[str, Any]]) -> np.ndarray:
    """The steps of nnU-Net's postprocessing.pkl, in order (each: keep the largest component of its labels)."""
    for s in steps:
        mask = keep_largest_component(mask, s["labels_or_regions"], s.get("background_label", 0))
    return mask


# -- the task ------------------------------------------------------------------------------------------------------


def check_step(step: Any) -> float:
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not 0 < step <= 1:
        raise ValueError(f"step={step!r}: the sliding-window step is a fraction of the patch, 0 < step <= 1")
    return float(step)


@register_task("image-segmentation")
class Segmenter(ZooModel):
    """`model(x)` -> logits (of the first stored fold); `segment(image)` / `predict(image)` -> Segmentation."""

    commands = {"predict": Command(  # what `zoo predict` may pass (checked before loading): the mask and an overlay
        options=frozenset({"out", "slice", "folds", "mirror", "postprocess"}), out=(".png",) + VOLUME_SUFFIXES,
        companions=("{stem}_overlay.png",))}

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

    @property
    def reader(self) -> str:
        """How volumes are read and written: nibabel where the plans name NibabelIO, else SimpleITK (nnU-Net's
        default reader for NIfTI and the other ITK formats)."""
        io = str(self.preprocessing.get("image_reader_writer", ""))
        return "NibabelIO" if io.startswith("NibabelIO") else "SimpleITKIO"

    @property
    def folds(self) -> list[Any]:
        """The published ids of the stored cross-validation folds (fold_0 -> 0), in storage order."""
        n = int(getattr(self.config, "folds", 1))
        stored = self.native.extra.get("folds")
        return list(stored) if isinstance(stored, list) and len(stored) == n else \
            [self.native.extra.get("fold", 0)] if n == 1 else list(range(n))

    def fold_indices(self, folds: Any) -> list[int]:
        if folds is None:
            return list(range(len(self.folds)))
        given = [folds] if isinstance(folds, (int, str)) and not isinstance(folds, bool) else folds
        if not isinstance(given, (list, tuple)) or not given:
            raise ValueError(f"folds={folds!r}: give fold ids from {self.folds} (default: all of them)")
        names = [str(f) for f in self.folds]
        bad = [f for f in given if isinstance(f, bool) or str(f) not in names]
        if bad or len(set(map(str, given))) != len(given):
            raise ValueError(f"folds={folds!r}: this checkpoint holds folds {self.folds}; give each at most once")
        return [names.index(str(f)) for f in given]

    def logits(self, x: torch.Tensor, folds: list[int] | None = None) -> list[torch.Tensor]:
        """Each listed fold's logits for a batch of tiles (the backbone runs once)."""
        x = x.to(device=self.device, dtype=self.dtype)
        folds = folds or [0]
        run = getattr(self.module, "forward_folds", None)
        return run(x, folds) if run is not None else [self.module(x)]

    def sliding_window(self, x: torch.Tensor, step: float = 0.5, mirror: bool = True, folds: list[int] | None = None,
                       autocast: bool | None = None) -> torch.Tensor:
        """nnU-Net's predict_logits_from_preprocessed_data for a preprocessed [C, Z, Y, X] tensor: per fold, every
        slice in tiles of the training patch (step x patch apart, Gaussian-weighted, mirrored when asked), summed in
        fp16 as nnUNetPredictor does; the folds averaged. Logits [classes, Z, Y, X] (fp16)."""
        tile = tuple(int(p) for p in self.preprocessing.get("patch_size", (512, 512)))
        multiple = getattr(self.module, "input_multiple", 1)
        if any(t % multiple for t in tile):
            raise ValueError(f"patch size {tile} is not a multiple of {multiple}, which this network needs")
        folds = folds or [0]
        device = self.device
        cuda = device.type == "cuda"
        autocast = cuda if autocast is None else autocast
        data, keep = pad_to(x, tile)
        Z, Hp, Wp = data.shape[1:]
        # the sums live on the model's device for one fold (nnU-Net's perform_everything_on_device); one per fold
        # would multiply that memory, so several folds sum on the CPU (fp16 adds round the same everywhere)
        home = device if len(folds) == 1 else torch.device("cpu")
        weight = gaussian_weights(tile).to(home)
        sums = [torch.zeros((self.config.num_classes, Z, Hp, Wp), dtype=torch.half, device=home) for _ in folds]
        counts = torch.zeros((Z, Hp, Wp), dtype=torch.half, device=home)
        axes = [int(a) + 2 for a in self.preprocessing.get("mirror_axes", (0, 1))] if mirror else []
        flips = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
        corners = [(d, r, c) for d in range(Z) for r in window_starts(Hp, tile[0], step)
                   for c in window_starts(Wp, tile[1], step)]
        previous = getattr(self.module, "backbone_autocast", None)
        self.module.backbone_autocast = bool(autocast)
        try:
            # nnU-Net's predictor autocasts (fp16) on CUDA only; other devices run as loaded
            amp = torch.autocast("cuda") if cuda and autocast else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                for d, r, c in corners:
                    where = (slice(None), d, slice(r, r + tile[0]), slice(c, c + tile[1]))
                    piece = data[where][None].contiguous()
                    preds = self.logits(piece, folds)
                    for f in flips:  # nnU-Net's _internal_maybe_mirror_and_predict
                        for p, q in zip(preds, self.logits(piece.flip(f), folds)):
                            p += q.flip(f)
                    for p, total in zip(preds, sums):
                        p = p[0].to(home)
                        if flips:
                            p /= len(flips) + 1
                        p *= weight
                        total[where] += p
                    counts[where[1:]] += weight
        finally:
            self.module.backbone_autocast = previous if previous is not None else False
        out = None
        for total in sums:
            torch.div(total, counts, out=total)
            out = total.cpu() if out is None else out.add_(total.cpu())
        if len(sums) > 1:
            out /= len(sums)
        return out[(slice(None), slice(None), *keep)]

    def segment(self, image: Any, spacing: Any = None, step: float = 0.5, mirror: bool = True,
                folds: Any = None, postprocess: bool = True, probabilities: bool = False,
                autocast: bool | None = None) -> Segmentation:
        """A label mask for a picture, a volume, a file, an array or a tensor, as nnU-Net's predictor gives it.

        image: a picture file (.png, ...), a volume file (.nii.gz, .nrrd, .mha, ...; a list of files for several
        channels) or a Volume; an array / tensor [H, W], [C, H, W] or [H, W, C] (a picture) or [C, Z, Y, X] (a
        volume, with spacing (z, y, x)). spacing: a picture's (row, column) spacing (PNGs have 1 x 1, as nnU-Net
        reads them). step: the sliding-window step (a fraction of the patch). mirror: test-time mirroring along
        the axes the trainer allowed (nnU-Net's default; 4x the work). folds: the stored cross-validation folds to
        average (their ids, default all). postprocess: nnU-Net's connected-component postprocessing, when the
        result folder carried it. probabilities: keep the class probabilities. autocast: fp16 autocast around the
        network and bf16 around the backbone (default: on a GPU only)."""
        from zoo.checks import check_bool

        step = check_step(step)
        for name, v in (("mirror", mirror), ("postprocess", postprocess), ("probabilities", probabilities)):
            check_bool(v, name)
        if autocast is not None:
            check_bool(autocast, "autocast")
        fold_ids = self.fold_indices(folds)
        p = self.preprocessing
        volume = as_volume(image, self.channels, spacing, self.reader)
        if volume.data.shape[0] != self.channels:
            raise ValueError(f"{volume.source or 'image'}: {volume.data.shape[0]} channel(s); this model takes "
                             f"{self.channels} (one file per channel)")
        forward = [int(a) for a in p.get("transpose_forward", (0, 1, 2))]
        backward = [int(a) for a in p.get("transpose_backward", np.argsort(forward))]
        data = volume.data.astype(np.float32).transpose([0, *[i + 1 for i in forward]])
        spacing_t = [float(volume.spacing[i]) for i in forward]
        shape_before = data.shape[1:]
        mask = nonzero_mask(data)
        box = bbox_of(mask)
        crop = tuple(slice(a, b) for a, b in box)
        data = data[(slice(None), *crop)]
        seg = np.where(mask[crop], np.int8(0), np.int8(-1))
        cfg_spacing = [float(s) for s in p.get("spacing", spacing_t[1:])]
        target = [spacing_t[0], *cfg_spacing] if len(cfg_spacing) < 3 else cfg_spacing
        cropped_shape = data.shape[1:]
        new_shape = new_shape_for(cropped_shape, spacing_t, target)
        data = normalize_channels(data, seg, p.get("normalization") or
                                  [{"scheme": "ZScoreNormalization"}] * self.channels)
        resampling = {**DEFAULT_RESAMPLING, **(p.get("resampling") or {})}
        data = resample(data, new_shape, spacing_t, target, **resampling["data"])
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        logits = self.sliding_window(x, step=step, mirror=mirror, folds=fold_ids, autocast=autocast)
        back = resample(logits.numpy(), list(cropped_shape), target, spacing_t, **resampling["probabilities"])
        probs = torch.softmax(torch.from_numpy(np.asarray(back)).float(), 0)
        labels = np.zeros(shape_before, dtype=np.int64)
        labels[crop] = probs.argmax(0).numpy()
        labels = labels.transpose(backward)
        full = None
        if probabilities:
            full = np.zeros((probs.shape[0], *shape_before), dtype=np.float32)
            full[0] = 1
            full[(slice(None), *crop)] = probs.numpy()
            full = full.transpose([0, *[i + 1 for i in backward]])
        if postprocess and p.get("postprocessing"):
            labels = apply_postprocessing(labels, p["postprocessing"])
        if volume.ndim == 2:
            labels, raw = labels[0], volume.data[:, 0]
            full = None if full is None else full[:, 0]
        else:
            raw = volume.data
        return Segmentation(np.ascontiguousarray(labels), self.labels, raw, full, volume.geometry)

    predict = segment

    def cli_predict(self, args: Any) -> None:
        out = Path(args.out) if getattr(args, "out", None) else None
        volume = suffix_of(args.file) in VOLUME_SUFFIXES
        if out is not None:
            check_output(out, volume, "--out")
        k = getattr(args, "slice", None)
        if k is not None and not volume:
            raise ValueError(f"--slice {k}: {args.file} is a picture; --slice picks a volume's overlay slice")
        folds = [int(f) if f.isdigit() else f for f in getattr(args, "folds", None) or []] or None
        image: Any = args.file
        if volume:  # read first, so that a bad --slice costs nothing
            image = as_volume(args.file, self.channels, None, self.reader)
            check_slice(k if k is not None else 0, image.data.shape[1], "--slice")
        result = self.segment(image, mirror=getattr(args, "mirror", True), folds=folds,
                              postprocess=getattr(args, "postprocess", True))
        if not is_main_process():
            return
        total = result.mask.size
        for name, n in result.areas().items():
            print(f"{n / total:7.2%}  {name}  ({n} {'voxels' if result.mask.ndim == 3 else 'px'})")
        if out:
            mask_path = result.save(out)
            overlay_path = mask_path.with_name(f"{stem_of(mask_path)}_overlay.png")
            result.overlay(slice=k).save(overlay_path)
            where = f" (slice {result.default_slice() if k is None else k})" if result.mask.ndim == 3 else ""
            print(f"wrote {mask_path} (pixel value = class index) and {overlay_path}{where}")
        else:
            print("(pass --out mask.png, or --out seg.nii.gz for a volume, to write the mask and an overlay picture)")
