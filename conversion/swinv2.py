"""Swin Transformer V2 in its three published layouts: the official .pth release, timm, transformers.

All three hold the same tensors (q/v biases, no k bias; post-norms; the CPB MLP); they differ in names,
in where patch merging sits (official and transformers: end of stage i; timm: start of stage i+1) and
in whether derived buffers were saved (official: relative_coords_table, relative_position_index and
attn_mask are in the file; we drop them, and regenerate them from the config on load). The official
files carry no config: geometry comes from tensor shapes, and window / image size / pretrained window
from those stored buffers (or the published file name).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import torch
from zoo.architectures.swinv2 import SwinV2Config, preprocessing, relative_coords_table
from zoo.conversion.base import Format, read_json
from zoo.conversion.hf_decoder import TransformersFormat
from zoo.conversion.rules import Drop, KeyMap, Rule, rename
from zoo.conversion.sources import PICKLE_SUFFIXES, TensorSource, open_source
from zoo.weights.format import CheckpointError

# native parameter names inside a block (also the official and timm names)
BLOCK_PARAMS = ("attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.logit_scale", "attn.cpb_mlp.0.weight",
                "attn.cpb_mlp.0.bias", "attn.cpb_mlp.2.weight", "attn.proj.weight", "attn.proj.bias",
                "norm1.weight", "norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                "norm2.weight", "norm2.bias")
STEM = ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias",
        "norm.weight", "norm.bias")
MERGE = ("reduction.weight", "norm.weight", "norm.bias")
DERIVED = ("attn.relative_coords_table", "attn.relative_position_index", "attn_mask")
PROBE = "layers.0.blocks.0.attn.cpb_mlp.0.weight"


@functools.lru_cache(maxsize=8)
def _source(path: Path, mtime: float) -> TensorSource:
    return open_source(path)


def weights_path(src: Path) -> Path:
    """A directory without config.json holding exactly one pickle (at any depth, e.g. a Hub snapshot of
    distill/vit_b_k710_dl_from_giant.pth) stands for that file."""
    src = Path(src)
    if src.is_dir() and not (src / "config.json").is_file():
        pickles = sorted(p for p in src.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if len(pickles) == 1:
            return pickles[0]
    return src


def source(src: Path) -> TensorSource:
    path = weights_path(src).resolve()
    return _source(path, path.stat().st_mtime)


def weight_file_or_dir(src: Path) -> bool:
    """A checkpoint file, or a directory of weights without a config.json (the official release is one .pth)."""
    src = weights_path(src)
    if src.is_file():
        return src.suffix in PICKLE_SUFFIXES or src.suffix == ".safetensors"
    return src.is_dir() and not (src / "config.json").is_file() and any(
        p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors" for p in src.iterdir())


def keys_of(src: Path) -> set[str]:
    try:
        return set(source(src).keys())
    except CheckpointError:
        return set()


def stage_count(keys: set[str], prefix: str = "layers.") -> int:
    return len({int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.blocks\.", k))})


def geometry(src: TensorSource, where: Path, head: str) -> dict[str, Any]:
    """Config fields read from the official/timm tensor names and shapes."""
    keys = set(src.keys())
    if "patch_embed.proj.weight" not in keys:
        raise CheckpointError(f"{where}: missing tensor patch_embed.proj.weight")
    dim, in_chans, patch, _ = src.meta("patch_embed.proj.weight").shape
    stages = stage_count(keys)
    depths = [len({k.split(".")[3] for k in keys if k.startswith(f"layers.{i}.blocks.")}) for i in range(stages)]
    heads = [src.meta(f"layers.{i}.blocks.0.attn.logit_scale").shape[0] for i in range(stages)]
    hidden = src.meta("layers.0.blocks.0.mlp.fc1.weight").shape[0]
    return dict(patch_size=int(patch), in_chans=int(in_chans), embed_dim=int(dim), depths=depths, num_heads=heads,
                mlp_ratio=hidden / dim, num_classes=int(src.meta(head).shape[0]) if head in keys else 0)


NAME = re.compile(r"window(\d+)(?:to(\d+))?_(\d+)(?:to(\d+))?")


def from_name(name: str, patch: int, stages: int) -> dict[str, Any] | None:
    """Window / size / pretrained windows from a published name: swinv2_base_patch4_window12to16_192to256_..."""
    m = NAME.search(name)
    if not m:
        return None
    w0, w1, s0, s1 = m.groups()
    out: dict[str, Any] = {"window_size": int(w1 or w0), "img_size": int(s1 or s0)}
    if w1:  # fine-tuned at a larger window: each stage's pre-training window, clamped to its pre-training grid
        out["pretrained_window_sizes"] = [min(int(w0), int(s0) // patch // 2**i) for i in range(stages)]
    return out


def label_names(num_classes: int) -> list[str] | None:
    from zoo.labels import label_set

    known = {1000: "imagenet-1k", 21841: "imagenet-22k"}
    return label_set(known[num_classes]) if num_classes in known else None


def pretrained_window(table: torch.Tensor, window: int) -> int:
    """Which pretrained window normalised this stored coords table (0 = the window itself)."""
    table = table.reshape(-1, 2).float()
    for pw in [0, *range(2, 129), 1]:  # 1 and 2 normalise alike (timm guards the 1 - 1 = 0 divisor)
        if torch.allclose(relative_coords_table(window, pw), table, atol=1e-5):
            return pw
    raise CheckpointError(f"relative_coords_table for window {window} matches no pretrained window size")


# -- official ------------------------------------------------------------------------------------------------------


class OfficialSwinV2(Format):
    name = "swinv2-official"
    family = "swinv2"
    description = "microsoft/Swin-Transformer release .pth (weights under 'model', derived buffers included)"
    copy_files = ()

    def detect(self, src: Path) -> bool:
        if not weight_file_or_dir(src):
            return False
        keys = keys_of(src)
        return PROBE in keys and "layers.0.downsample.reduction.weight" in keys and "head.fc.weight" not in keys

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        t = source(src)
        keys = set(t.keys())
        fields = geometry(t, src, "head.weight")
        stages = len(fields["depths"])
        named = from_name(weights_path(src).stem, fields["patch_size"], stages) or {}
        if "layers.0.blocks.0.attn.relative_position_index" in keys:
            windows = [math.isqrt(t.meta(f"layers.{i}.blocks.0.attn.relative_position_index").shape[0])
                       for i in range(stages)]
            fields["window_size"] = max(windows)
            mask = next((f"layers.{i}.blocks.{j}.attn_mask" for i in range(stages) for j in range(1, 99, 2)
                         if f"layers.{i}.blocks.{j}.attn_mask" in keys), None)
            if mask is not None:  # nW windows of the stage grid fix the image size
                i = int(mask.split(".")[1])
                grid = windows[i] * math.isqrt(t.meta(mask).shape[0])
                fields["img_size"] = grid * fields["patch_size"] * 2**i
            elif "img_size" in named:
                fields["img_size"] = named["img_size"]
            else:  # no shifted block anywhere: every stage is a single window
                fields["img_size"] = windows[0] * fields["patch_size"]
            if "layers.0.blocks.0.attn.relative_coords_table" in keys:
                fields["pretrained_window_sizes"] = [
                    pretrained_window(t.get(f"layers.{i}.blocks.0.attn.relative_coords_table"), windows[i])
                    for i in range(stages)]
        elif named:
            fields.update(named)
        else:
            raise CheckpointError(f"{src}: no relative_position_index/attn_mask buffers and no published file name "
                                  "(swinv2_*_window{W}_{SIZE}) to tell the window and image size")
        fields.setdefault("pretrained_window_sizes", named.get("pretrained_window_sizes", [0] * stages))
        extra: dict[str, Any] = preprocessing(fields["img_size"], crop_pct=0.875)  # data/build.py: size/0.875
        labels = label_names(fields["num_classes"])
        if labels:
            extra["labels"] = labels
        return fields, extra

    def open(self, src: Path) -> TensorSource:
        return source(src)

    def keymap(self, config: SwinV2Config) -> KeyMap:
        return KeyMap(official_rules(), [Drop(f"layers.{{i}}.blocks.{{j}}.{d}", "derived") for d in DERIVED])


def official_rules(head: str = "head") -> list[Rule]:
    rules = [rename(k, k) for k in STEM]
    rules += [rename(f"layers.{{i}}.blocks.{{j}}.{p}", f"layers.{{i}}.blocks.{{j}}.{p}") for p in BLOCK_PARAMS]
    rules += [rename(f"layers.{{i}}.downsample.{p}", f"layers.{{i}}.downsample.{p}") for p in MERGE]
    return rules + [rename(f"{head}.weight", "head.weight"), rename(f"{head}.bias", "head.bias")]


# -- timm -----------------------------------------------------------------------------------------------------------


def concat(src: list[str], dst: str) -> Rule:
    """Separate q, k, v projections <-> one fused qkv (stacked along the output dim)."""
    return Rule(tuple(src), (dst,), forward=lambda ts: [torch.cat(ts, 0)],
                backward=lambda ts: [t.contiguous() for t in torch.chunk(ts[0], len(src), 0)], doc="fuse q, k, v")


def timm_config(src: Path) -> dict[str, Any]:
    path = src / "config.json" if src.is_dir() else src.parent / "config.json"
    return read_json(path) if path.is_file() else {}


class TimmSwinV2(Format):
    name = "timm-swinv2"
    family = "swinv2"
    description = "timm swinv2_* (timm/swinv2_*.ms_in1k etc. on the Hub: model.safetensors + config.json)"
    copy_files = ()

    def detect(self, src: Path) -> bool:
        arch = str(timm_config(src).get("architecture", ""))
        if arch:  # swinv2_cr_* is claimed too, so that converting it says it is not supported (native_config)
            return arch.startswith("swinv2_")
        if not weight_file_or_dir(src):
            return False
        keys = keys_of(src)
        return PROBE in keys and "layers.0.downsample.reduction.weight" not in keys and (
            "head.fc.weight" in keys or "layers.1.downsample.reduction.weight" in keys)

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = timm_config(src)
        if str(cfg.get("architecture", "")).startswith("swinv2_cr"):  # timm's own variant: other blocks and norms
            raise CheckpointError(f"{src}: {cfg['architecture']} is timm's swinv2_cr, a different architecture; "
                                  "swinv2_cr is not supported; zoo reads swinv2_* (timm)")
        fields = geometry(source(src), src, "head.fc.weight")
        stages = len(fields["depths"])
        arch = cfg.get("architecture") or (src.stem if src.is_file() else src.name)
        named = from_name(arch, fields["patch_size"], stages)
        args = cfg.get("model_args") or {}
        if named is None and "img_size" not in args:
            raise CheckpointError(f"{src}: cannot tell the window and image size: no model_args in config.json "
                                  f"and {arch!r} is not a published swinv2_*_window{{W}}_{{SIZE}} name")
        fields.update(named or {})
        if "img_size" in args:
            size = args["img_size"]
            fields["img_size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
        if "window_size" in args:
            w = args["window_size"]
            ws = set(w if isinstance(w, (list, tuple)) else [w])
            if len(ws) != 1 or isinstance(next(iter(ws)), (list, tuple)):
                raise CheckpointError(f"{src}: per-stage window sizes {w} are not supported (one window for all)")
            fields["window_size"] = int(next(iter(ws)))
        if "pretrained_window_sizes" in args:
            fields["pretrained_window_sizes"] = list(args["pretrained_window_sizes"])
        fields.setdefault("pretrained_window_sizes", [0] * stages)
        pcfg = cfg.get("pretrained_cfg") or {}
        extra: dict[str, Any] = preprocessing(fields["img_size"], pcfg.get("crop_pct"))
        for k in ("interpolation", "mean", "std"):
            if k in pcfg:
                extra[k] = list(pcfg[k]) if isinstance(pcfg[k], (list, tuple)) else pcfg[k]
        if pcfg.get("crop_mode") == "squash":
            extra["resize"] = "squash"
        labels = cfg.get("label_names")
        if isinstance(labels, dict):
            labels = [labels[str(i)] if str(i) in labels else labels[i] for i in range(len(labels))]
        labels = labels or label_names(fields["num_classes"])
        if labels:
            extra["labels"] = list(labels)
        return fields, extra

    def keymap(self, config: SwinV2Config) -> KeyMap:
        rules = [r for r in official_rules(head="head.fc") if ".downsample." not in r.src[0]]
        for i in range(len(config.depths) - 1):  # timm: merging opens stage i+1
            rules += [rename(f"layers.{i + 1}.downsample.{p}", f"layers.{i}.downsample.{p}") for p in MERGE]
        return KeyMap(rules, [Drop(f"layers.{{i}}.blocks.{{j}}.{d}", "derived") for d in (*DERIVED, "attn.k_bias")])


# -- transformers ---------------------------------------------------------------------------------------------------

HF_BLOCK = {
    "attention.self.logit_scale": "attn.logit_scale",
    "attention.self.continuous_position_bias_mlp.0.weight": "attn.cpb_mlp.0.weight",
    "attention.self.continuous_position_bias_mlp.0.bias": "attn.cpb_mlp.0.bias",
    "attention.self.continuous_position_bias_mlp.2.weight": "attn.cpb_mlp.2.weight",
    "attention.self.query.bias": "attn.q_bias",
    "attention.self.value.bias": "attn.v_bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight",  # transformers' names; applied after attention in V2
    "layernorm_before.bias": "norm1.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
}

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def hf_preprocessing(src: Path, img: int) -> dict[str, Any]:
    """preprocessor_config.json (transformers' image processors) as our preprocessing fields."""
    path = src / "preprocessor_config.json"
    p = read_json(path) if path.is_file() else {}
    extra = {"resolution": img, "crop_pct": 1.0, "resize": "squash",
             "interpolation": RESAMPLE.get(p.get("resample", 3), "bicubic"),
             "mean": list(p.get("image_mean", (0.485, 0.456, 0.406))),
             "std": list(p.get("image_std", (0.229, 0.224, 0.225)))}
    size = p.get("size", {})
    if isinstance(size, dict) and "shortest_edge" in size:  # resize the short side, then (maybe) crop
        extra["resize"] = "shortest"
        extra["crop_pct"] = img / size["shortest_edge"] if p.get("do_center_crop", True) else 1.0
    return extra


def id2label(cfg: dict[str, Any], n: int) -> list[str] | None:
    labels = cfg.get("id2label") or {}
    if n and len(labels) == n:
        return [labels.get(str(i), labels.get(i)) for i in range(n)]
    return None


class HFSwinV2(TransformersFormat):
    name = "hf-swinv2"
    family = "swinv2"
    description = "transformers Swinv2ForImageClassification / Swinv2Model (microsoft/swinv2-* on the Hub)"
    copy_files = ("preprocessor_config.json",)
    model_type = "swinv2"
    exports_as = None

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = read_json(src / "config.json")
        if cfg.get("use_absolute_embeddings"):
            raise CheckpointError(f"{src / 'config.json'}: use_absolute_embeddings=true is not Swin V2 as published")
        if not cfg.get("qkv_bias", True) or cfg.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{src / 'config.json'}: only qkv_bias=true and hidden_act=gelu are supported")
        keys = set(source(src).keys())
        head = "classifier.weight"
        n = int(source(src).meta(head).shape[0]) if head in keys else 0
        depths = list(cfg.get("depths", (2, 2, 6, 2)))
        fields = dict(
            img_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 4),
            in_chans=cfg.get("num_channels", 3), embed_dim=cfg.get("embed_dim", 96), depths=depths,
            num_heads=list(cfg.get("num_heads", (3, 6, 12, 24))), window_size=cfg.get("window_size", 7),
            pretrained_window_sizes=list(cfg.get("pretrained_window_sizes") or [0] * len(depths)),
            mlp_ratio=cfg.get("mlp_ratio", 4.0), num_classes=n, norm_eps=cfg.get("layer_norm_eps", 1e-5),
        )
        extra = hf_preprocessing(src, fields["img_size"])
        labels = id2label(cfg, n) or label_names(n)
        if labels:
            extra["labels"] = labels
        return fields, extra

    def keymap(self, config: SwinV2Config) -> KeyMap:
        rules: list[Rule] = [rename("classifier.weight", "head.weight"), rename("classifier.bias", "head.bias")]
        drops = []
        for p in ("swinv2.", ""):  # Swinv2ForImageClassification nests the backbone; Swinv2Model does not
            blk = f"{p}encoder.layers.{{i}}.blocks.{{j}}."
            rules += [
                rename(f"{p}embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
                rename(f"{p}embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
                rename(f"{p}embeddings.norm.weight", "patch_embed.norm.weight"),
                rename(f"{p}embeddings.norm.bias", "patch_embed.norm.bias"),
                rename(f"{p}layernorm.weight", "norm.weight"),
                rename(f"{p}layernorm.bias", "norm.bias"),
                concat([blk + f"attention.self.{n}.weight" for n in ("query", "key", "value")],
                       "layers.{i}.blocks.{j}.attn.qkv.weight"),
            ]
            rules += [rename(blk + s, "layers.{i}.blocks.{j}." + d) for s, d in HF_BLOCK.items()]
            rules += [rename(f"{p}encoder.layers.{{i}}.downsample.{m}", f"layers.{{i}}.downsample.{m}") for m in MERGE]
            drops += [Drop(blk + f"attention.self.{d}", "derived (old transformers saved it)")
                      for d in ("relative_coords_table", "relative_position_index")]
            drops.append(Drop(f"{p}embeddings.mask_token", "masked-image-modeling only"))
        return KeyMap(rules, drops)


FORMATS = [OfficialSwinV2(), TimmSwinV2(), HFSwinV2()]
