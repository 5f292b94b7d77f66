"""Image and video classification: `model(x)` -> logits, `predict(inputs, top_k)` -> [(label, score)], `features(x)`.

Preprocessing is the published one, stored in the native config's `extra` by the converter:
  resolution, mean, std, interpolation, and either crop_pct (resize the short side to resolution/crop_pct,
  center crop; timm's eval transform) or resize="squash" (resize to resolution x resolution); video adds
  short_side (instead of crop_pct), num_frames and frame_stride. Class names are extra["labels"].
Images and frames are resized with PIL, as torchvision's Resize does for PIL images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from zoo.family import init_derived_buffers
from zoo.tasks import ZooModel, register_task

INTERPOLATION = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                 "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


# -- images ----------------------------------------------------------------------------------------------------


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def as_pil(frame: Any, what: str = "image") -> Image.Image:
    """A PIL image, an HxWxC uint8 array or tensor, or a CxHxW uint8 tensor -> RGB PIL image."""
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    a = frame.numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if isinstance(frame, torch.Tensor) and a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim != 3 or a.dtype != np.uint8:
        raise ValueError(f"the {what} must be HxWx3 uint8 pixels (or a PIL image); got shape {a.shape}, {a.dtype}")
    if a.shape[-1] != 3:
        raise ValueError(f"the {what} needs 3 channels (RGB); got {a.shape[-1]} (shape {a.shape})")
    return Image.fromarray(a, "RGB")


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
    import av  # optional dependency: pip install zoo[video]

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            frames = [f.to_image() for f in container.decode(video=0)]
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable video ({e})") from None
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return [frames[i].convert("RGB") for i in sample_indices(len(frames), num_frames, stride)]


# -- task classes ----------------------------------------------------------------------------------------------


class VisionModel(ZooModel):
    """Shared by image and video classifiers: labels, top-k, features, reconfigure."""

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

    def _run(self, x: torch.Tensor, fn) -> torch.Tensor:
        with torch.inference_mode():
            return fn(x.to(device=self.device, dtype=self.dtype))

    def predict(self, inputs: Any, top_k: int = 5) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """Top-k (label, probability) pairs; a list of them per item for batched inputs."""
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
        for label, score in self.predict(args.file, top_k=args.top_k):
            print(f"{score:7.4f}  {label}")

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
        config = self.family.config_from_dict(fields)
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
            return inputs, False
        if isinstance(inputs, (list, tuple)):
            return torch.stack([self.preprocess(i) for i in inputs]), False
        return self.preprocess(inputs)[None], True


@register_task("video-classification")
class VideoClassifier(VisionModel):
    """inputs: a video file, a list of frames (PIL images / HxWx3 uint8 arrays), a uint8 tensor [T, H, W, 3];
    or a float tensor that is already preprocessed ([C, T, H, W] or [B, C, T, H, W])."""

    def _frames_needed(self) -> tuple[int, int]:
        p = self.preprocessing
        return int(p.get("num_frames", getattr(self.config, "num_frames", 16))), int(p.get("frame_stride", 1))

    def preprocess(self, video: Any) -> torch.Tensor:
        num_frames, stride = self._frames_needed()
        if isinstance(video, (str, Path)):
            frames = read_video(video, num_frames, stride)
        else:
            if isinstance(video, torch.Tensor) and video.ndim != 4:
                raise ValueError(f"a raw video tensor is [frames, height, width, 3] uint8; got shape "
                                 f"{tuple(video.shape)}")
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
            return inputs, False
        return self.preprocess(inputs)[None], True
