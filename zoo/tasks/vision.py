"""Image and video classification: `model(x)` -> logits, `predict(inputs, top_k)` -> [(label, score)], `features(x)`.

Preprocessing is the published one, stored in the native config's `extra` by the converter:
  resolution, mean, std, interpolation, and either crop_pct (resize the short side to resolution/crop_pct,
  center crop; timm's eval transform) or resize="squash" (resize to resolution x resolution); video adds
  short_side (instead of crop_pct), num_frames and frame_stride. Class names are extra["labels"].
Images and frames are resized with PIL, as torchvision's Resize does for PIL images.

Inputs are checked where they enter, with errors that name the file or argument:
- Image files: whatever PIL reads. Grayscale (L, 1, LA), palette and CMYK images are converted to RGB; RGBA
  drops its alpha channel, as the published loaders do (PIL's convert("RGB")); 16-bit images (I;16, I) are
  scaled to 8 bits (value / 257), which PIL's own convert would clip instead. 32-bit float images (F), whose
  value range is unknown, are refused; so are unreadable, empty and truncated files, and images larger than
  PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, about 89 megapixels; raise it for files you
  trust).
- Arrays and tensors: HxW (grayscale), HxWx1/3/4 (or CxHxW tensors), uint8 pixels; uint16 is scaled to 8
  bits; other integer arrays only if their values lie in 0..255. Float arrays are refused (0..1 or 0..255 is
  a guess); a float torch tensor is taken as already preprocessed.
- Videos: a file with no decodable frame, or an empty frame list, is refused. A video shorter than the clip
  (num_frames x frame_stride) is accepted: its frames are spread evenly over the clip, so some repeat.
  Only the frames of the clip are kept while decoding, so a long video does not fill memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from zoo.checks import check_int
from zoo.family import init_derived_buffers
from zoo.tasks import Command, ZooModel, is_main_process, register_task

INTERPOLATION = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                 "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


# -- images ----------------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image, what: str = "image") -> Image.Image:
    """Any PIL image as 8-bit RGB (see the module docstring for what each mode becomes)."""
    if img.width == 0 or img.height == 0:
        raise ValueError(f"the {what} is empty ({img.width}x{img.height})")
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"the {what} is a 32-bit integer image with values {a.min()}..{a.max()}, outside a "
                             "16-bit range; convert it to 8 bits first")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        raise ValueError(f"the {what} holds 32-bit floats, whose value range is unknown; convert it to 8-bit RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB; errors name the file and say why it was refused."""
    return to_rgb(open_pil(path), f"image {path}")


def check_image_file(path: str | Path) -> Path:
    """An image file that exists and is not empty, refused by name otherwise (before any reader opens it)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: not a readable image (the file is empty)")
    return path


def open_pil(path: str | Path) -> Image.Image:
    """An image file, decoded, in its own mode (L, RGBA, I;16, ...): unreadable, empty and truncated files,
    directories and images past PIL's decompression-bomb limit are refused with errors that name the file.
    Task modules that convert modes their own way (segmentation keeps 16-bit values) read files through this."""
    import warnings

    path = check_image_file(path)
    try:
        with warnings.catch_warnings():  # past MAX_IMAGE_PIXELS PIL only warns (errors at twice that): refuse
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: refused: {e} (PIL's decompression-bomb limit is PIL.Image.MAX_IMAGE_PIXELS = "
                         f"{Image.MAX_IMAGE_PIXELS}; raise it only for a file you trust)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{path}: not a readable image ({' '.join(str(e).split()) or type(e).__name__})") from None


def as_pil(frame: Any, what: str = "image") -> Image.Image:
    """A PIL image, or pixels as an array/tensor: HxW, HxWxC or (tensor) CxHxW with C = 1, 3 or 4 -> RGB."""
    if isinstance(frame, Image.Image):
        return to_rgb(frame, what)
    if isinstance(frame, (str, Path)):
        return open_image(frame)
    if isinstance(frame, torch.Tensor):
        a = frame.detach().cpu().numpy()
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = a.transpose(1, 2, 0)  # CHW -> HWC
    elif isinstance(frame, np.ndarray):
        a = frame
    else:
        raise ValueError(f"the {what} must be a file path, a PIL image, or pixels as an HxWx3 uint8 array; got "
                         f"{type(frame).__name__}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        channels = f"; got {a.shape[-1]} channels" if a.ndim == 3 else ""
        raise ValueError(f"the {what} must be HxW or HxWx3 pixels (RGB; 1 or 4 channels are converted), "
                         f"and needs 3 channels{channels} (shape {a.shape})")
    if a.size == 0:
        raise ValueError(f"the {what} is empty (shape {a.shape})")
    if a.dtype == np.uint16:
        a = ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"the {what} must hold uint8 pixels (0..255) or uint16 (0..65535); got {a.dtype} "
                             f"(shape {a.shape}); a float tensor is taken as already preprocessed")
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"the {what} has {a.dtype} values {a.min()}..{a.max()}; give uint8 pixels (0..255) "
                             "or uint16 (0..65535)")
        a = a.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")  # L, RGB or RGBA by shape


def resize_short(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return img.resize(new, INTERPOLATION[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the {size}x{size} crop")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def transform_image(img: Image.Image, p: dict[str, Any]) -> torch.Tensor:
    """One PIL image -> [3, R, R] with the published eval transform in `p` (a native config's extra)."""
    res, interp = int(p["resolution"]), p.get("interpolation", "bicubic")
    if p.get("resize") == "squash":
        img = img.resize((res, res), INTERPOLATION[interp])
    else:
        short = p.get("short_side") or math.floor(res / p.get("crop_pct", 1.0))
        img = center_crop(resize_short(img, int(short), interp), res)
    return normalize(img, p.get("mean", (0.485, 0.456, 0.406)), p.get("std", (0.229, 0.224, 0.225)))


# -- video -----------------------------------------------------------------------------------------------------


def sample_indices(total: int, num_frames: int, stride: int) -> list[int]:
    """The middle clip of num_frames frames, stride apart; a shorter video is spread evenly (frames repeat)."""
    if total <= 0:
        raise ValueError("the video has no frames")
    span = (num_frames - 1) * stride + 1
    if total >= span:
        start = (total - span) // 2
        return [start + i * stride for i in range(num_frames)]
    return [round(i * (total - 1) / max(num_frames - 1, 1)) for i in range(num_frames)]


def read_video(path: str | Path, num_frames: int, stride: int) -> list[Image.Image]:
    """The clip's frames of a video file, as RGB images: counted first (from the container, or by reading its
    packets), then decoded once keeping only the frames the clip takes."""
    try:
        import av
    except ImportError:
        raise ImportError("reading a video file needs PyAV: pip install 'zoo[video]' (or pip install av)",
                          name="av") from None

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a video file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: not a readable video (the file is empty)")

    def decode(wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
        kept, n = {}, 0
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                if n in wanted:
                    kept[n] = to_rgb(frame.to_image(), f"frame {n} of {path}")
                n += 1
        return kept, n

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        if total <= 0:
            raise ValueError(f"{path}: the video has no frames")
        indices = sample_indices(total, num_frames, stride)
        kept, decoded = decode(set(indices))
        if decoded != total:  # the container's count was off: choose again from what really decodes
            if decoded == 0:
                raise ValueError(f"{path}: no video frames could be decoded")
            indices = sample_indices(decoded, num_frames, stride)
            if not set(indices) <= set(kept):
                kept, _ = decode(set(indices))
    except (av.FFmpegError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: not a readable video ({' '.join(str(e).split()) or type(e).__name__})") from None
    return [kept[i] for i in indices]


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """write(tmp) into a temporary file beside `path`, then renamed over it: a failure leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- task classes ----------------------------------------------------------------------------------------------


PREDICT = Command(options=frozenset({"top_k", "out", "onednn"}), out=(".json",))  # --out: the labels and scores as JSON
FEATURES = Command(options=frozenset({"out", "dense", "onednn"}), out=(".safetensors",))


class VisionModel(ZooModel):
    """Shared by image and video classifiers: labels, top-k, features, reconfigure."""

    commands = {"predict": PREDICT, "features": FEATURES}

    @classmethod
    def refuse(cls, command: str, config: dict[str, Any]) -> str | None:
        if command == "predict" and not config.get("num_classes"):
            return "is a backbone without a classifier, so it has no labels to predict; try `zoo features`"
        return None

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.native.extra

    @property
    def labels(self) -> list[str]:
        labels = self.native.extra.get("labels")
        n = getattr(self.config, "num_classes", 0)
        return list(labels) if labels and len(labels) == n else [f"class {i}" for i in range(n)]

    def to_batch(self, inputs: Any) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Logits for a batch that is already preprocessed: a float tensor (predict() takes files and pixels)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else \
                type(x).__name__
            raise ValueError(f"model(x): x must be a preprocessed float tensor (see model.preprocess), got {what}; "
                             "predict() and features() take image/video files, PIL images and uint8 pixels")
        return self.module(x, *args, **kwargs)

    def _run(self, x: torch.Tensor, fn) -> torch.Tensor:
        with torch.inference_mode():
            return fn(x.to(device=self.device, dtype=self.dtype))

    def predict(self, inputs: Any, top_k: int = 5) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """Top-k (label, probability) pairs; a list of them per item for batched inputs."""
        check_int(top_k, "top_k", minimum=1)
        if not getattr(self.config, "num_classes", 0):
            raise ValueError(f"{self.name or 'this model'} is a backbone without a classifier; use features()")
        x, single = self.to_batch(inputs)
        probs = self._run(x, self.module).float().softmax(dim=-1)
        scores, ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        labels = self.labels
        out = [[(labels[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist())] for row_s, row_i in
               zip(scores, ids)]
        return out[0] if single else out

    def cli_predict(self, args: Any) -> None:
        top = self.predict(args.file, top_k=args.top_k)
        if not is_main_process():
            return
        for label, score in top:
            print(f"{score:7.4f}  {label}")
        if getattr(args, "out", None):
            data = {"model": self.name, "input": str(args.file), "top_k": [{"label": k, "score": v} for k, v in top]}
            write_atomically(args.out, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))
            print(f"wrote {args.out}", file=sys.stderr)

    def cli_features(self, args: Any) -> None:
        """`zoo features`: the pooled features [1, D], or with --dense every tensor the backbone gives (a dense
        feature map, tokens), printed as shapes and written to --out as safetensors."""
        feats = self.features(args.file, pooled=not getattr(args, "dense", False))
        named = feats._asdict() if hasattr(feats, "_asdict") else {"features": feats}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in named.items()}
        if not is_main_process():
            return
        for k, v in tensors.items():
            print(f"{k}  {list(v.shape)}")
        if getattr(args, "out", None):
            from safetensors.torch import save_file

            meta = {"model": self.name or "", "input": str(args.file)}
            write_atomically(args.out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print("(pass --out feats.safetensors to write them)", file=sys.stderr)

    def features(self, inputs: Any, pooled: bool = True) -> torch.Tensor:
        """Backbone features: pooled [B, D] (the classifier's input), or the final tokens / feature map."""
        x, _ = self.to_batch(inputs)
        return self._run(x, self.module.features if pooled else self.module.forward_features)

    def reconfigure(self, **changes: Any) -> VisionModel:
        """The same weights under other config values (e.g. a Swin V2 img_size / window_size / pretrained windows,
        a VideoMAE num_frames); derived tables are recomputed. Returns a new model."""
        unknown = set(changes) - set(self.native.config)
        if unknown:
            raise ValueError(f"{self.family.name} config has no fields {sorted(unknown)}")
        fields = {**self.native.config, **changes}
        try:
            config = self.family.config_from_dict(fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"reconfigure({', '.join(f'{k}={v!r}' for k, v in changes.items())}): {e}") from None
        module = self.family.build_meta(config)
        try:
            module.load_state_dict(self.module.state_dict(), strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"the weights do not fit {changes}: {str(e).splitlines()[-1].strip()}") from None
        init_derived_buffers(module, self.device)
        extra = dict(self.native.extra)
        for field, key in (("img_size", "resolution"), ("num_frames", "num_frames")):
            if field in changes and key in extra:
                extra[key] = changes[field]
        native = dataclasses.replace(self.native, config=dataclasses.asdict(config), extra=extra)
        return type(self)(module.eval(), native, self.family, self.directory)


@register_task("image-classification")
class ImageClassifier(VisionModel):
    """inputs: an image path, a PIL image, an HxWx3 uint8 array, or a list of these; or a float tensor that is
    already preprocessed ([3, H, W] or [B, 3, H, W])."""

    def preprocess(self, image: Any) -> torch.Tensor:
        img = open_image(image) if isinstance(image, (str, Path)) else as_pil(image)
        return transform_image(img, self.preprocessing)

    def to_batch(self, inputs: Any) -> tuple[torch.Tensor, bool]:
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
            if inputs.ndim == 3:
                return inputs[None], True
            if inputs.ndim != 4:
                raise ValueError(f"a preprocessed image is a float tensor [3, H, W] or [batch, 3, H, W]; got shape "
                                 f"{tuple(inputs.shape)}")
            return inputs, False
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError("inputs: an empty list; give at least one image")
            return torch.stack([self.preprocess(i) for i in inputs]), False
        return self.preprocess(inputs)[None], True


@register_task("image-feature-extraction")
class ImageFeatureExtractor(ImageClassifier):
    """A backbone (DINOv3): features(inputs, pooled) only; `zoo features` on the command line."""

    commands = {"features": FEATURES}


@register_task("video-classification")
class VideoClassifier(VisionModel):
    """inputs: a video file, a list of frames (PIL images / HxWx3 uint8 arrays), a uint8 tensor [T, H, W, 3];
    or a float tensor that is already preprocessed ([C, T, H, W] or [B, C, T, H, W])."""

    commands = {name: dataclasses.replace(c, needs=("av",), extra="video")  # a video file is read with PyAV
                for name, c in VisionModel.commands.items()}

    def _frames_needed(self) -> tuple[int, int]:
        p = self.preprocessing
        return int(p.get("num_frames", getattr(self.config, "num_frames", 16))), int(p.get("frame_stride", 1))

    def preprocess(self, video: Any) -> torch.Tensor:
        num_frames, stride = self._frames_needed()
        if isinstance(video, (str, Path)):
            frames = read_video(video, num_frames, stride)
        else:
            if isinstance(video, (torch.Tensor, np.ndarray)) and video.ndim != 4:
                raise ValueError(f"a raw video tensor is [frames, height, width, 3] uint8; got shape "
                                 f"{tuple(video.shape)}")
            if not isinstance(video, (torch.Tensor, np.ndarray, list, tuple)):
                raise ValueError(f"a video is a file path, a list of frames or a [frames, H, W, 3] uint8 tensor; "
                                 f"got {type(video).__name__}")
            items = list(video)
            if not items:
                raise ValueError("the video has no frames")
            frames = [as_pil(items[i], "video frame") for i in sample_indices(len(items), num_frames, stride)]
        p = {**self.preprocessing, "short_side": self.preprocessing.get("short_side") or
             self.preprocessing.get("resolution")}
        return torch.stack([transform_image(f, p) for f in frames], dim=1)  # [C, T, H, W]

    def to_batch(self, inputs: Any) -> tuple[torch.Tensor, bool]:
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
            if inputs.ndim == 4:
                return inputs[None], True
            if inputs.ndim != 5:
                raise ValueError(f"a preprocessed video is a float tensor [3, T, H, W] or [batch, 3, T, H, W]; got "
                                 f"shape {tuple(inputs.shape)}")
            return inputs, False
        return self.preprocess(inputs)[None], True
