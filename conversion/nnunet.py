"""Dino U-Net training checkpoints as nnU-Net v2 writes them (nnUNetTrainer.save_checkpoint).

What a converter meets (yifangao112/DinoUNet at 8cb6c9f):
- the file: `checkpoint_final.pth` / `checkpoint_best.pth` (/ `checkpoint_latest.pth`), alone or in its result
  folder (`DinoUNetTrainer_s__nnUNetPlans__2d/` with plans.json, dataset.json and `fold_*/checkpoint_*.pth`);
- the container: {'network_weights', 'optimizer_state', 'grad_scaler_state', 'logging', '_best_ema',
  'current_epoch', 'init_args' (plans, configuration, fold, dataset_json, ..., device=torch.device('cuda')),
  'trainer_name', 'inference_allowed_mirroring_axes'}, its storages tagged cuda:0. `logging` and `_best_ema` hold
  numpy scalars, so torch.load(weights_only=True) needs exactly four more names: numpy's scalar constructor,
  numpy.dtype and the float32 / float64 dtype classes (ALLOW); anything else, code above all, is refused;
- `network_weights`: the frozen DINOv3 backbone in Meta's layout under `encoder.dinov3_adapter.backbone.` (with
  its derived buffers), the adapter, `encoder.fapm`, `encoder.ups`, the decoder, and aliases of the same tensors:
  `decoder.encoder.*` (UNetDecoder keeps the encoder as a submodule) and `*.all_modules.*` (nnU-Net's conv blocks
  list their conv and norm twice); the aliases are dropped, never read. Three segmentation layers are stored
  (deep supervision); only the last runs;
- nothing says which ViT or which blocks were tapped: the trainer class does (`trainer_name`
  DinoUNetTrainer_{s,b,l,7b}); every size comes from the tensor shapes (widths, depth, head dim from the RoPE
  periods, FAPM rank, adapter width), the head's channels, classes, decoder and normalisation from the stored plans
  and dataset description (init_args, or plans.json / dataset.json next to the checkpoint).
A result folder with several fold_* folders converts to one checkpoint: the first fold under the native names, the
others' heads under extra_folds.{j}. (their backbone, the same frozen DINOv3, is checked equal and stored once);
fold_all is left out unless it is the only fold, as nnU-Net's predictor picks folds. nnU-Net's postprocessing
(postprocessing.json, or postprocessing.pkl read as data: torch's weights-only unpickler cannot read that plain
protocol-4 pickle, so Python's restricted-globals unpickler reads it with one allowed name, which it never calls)
is stored with the config.
A head-only checkpoint (the same container, or a bare state dict, without `encoder.dinov3_adapter.backbone.*`)
is completed with a DINOv3 backbone .pth in Meta's layout: the one in the result folder or above it
(`dinov3_vit*16_pretrain_*.pth`, where DinoUNet's trainers load it from), or given to `assemble`.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy
import torch
from zoo.architectures.dinounet import TAPPED_BY_DEPTH, VARIANTS
from zoo.architectures.dinov3 import LICENSE, LICENSE_URL
from zoo.conversion.base import Format, read_json
from zoo.conversion.dinov3 import official_drops, official_fields, official_rules
from zoo.conversion.rules import Drop, KeyMap, Rule, rename
from zoo.conversion.sources import TensorSource, load_pickle, open_source
from zoo.weights.format import CheckpointError

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")  # in order of preference
BACKBONE = "encoder.dinov3_adapter.backbone."
ADAPTER = "encoder.dinov3_adapter."
EXTRA_FOLDS = "extra_folds."  # the second and later folds' heads, in the source view and in the native module


def _numpy_allow() -> list[Any]:
    """The narrowest allow-list that reads nnU-Net checkpoints: numpy scalars (the logged metrics and _best_ema)
    are pickled as numpy's `scalar(dtype, bytes)`, and their dtypes as numpy.dtype plus a per-type class."""
    scalar = numpy._core.multiarray.scalar if hasattr(numpy, "_core") else numpy.core.multiarray.scalar
    allow: list[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), numpy.dtype]  # numpy 2.x and 1.x names
    dtypes = getattr(numpy, "dtypes", None)
    allow += [getattr(dtypes, n) for n in ("Float32DType", "Float64DType") if dtypes and hasattr(dtypes, n)]
    return allow


ALLOW = _numpy_allow()


# -- finding the pieces -------------------------------------------------------------------------------------------


def fold_id(folder: Path) -> int | str | None:
    """fold_3 -> 3, fold_all -> "all" (nnU-Net's names); None for a folder that is no fold."""
    m = re.fullmatch(r"fold_(\d+|all)", folder.name)
    return None if m is None else int(m.group(1)) if m.group(1).isdigit() else m.group(1)


def fold_checkpoints(src: Path) -> list[tuple[int | str | None, Path]]:
    """(fold id, checkpoint) for every fold a path stands for: a checkpoint file or a fold folder (one), or a result
    folder with fold_* folders (all of them but fold_all, as nnU-Net's predictor picks them; fold_all when it is the
    only one), each fold's checkpoint in the order of preference of CHECKPOINTS."""
    src = Path(src)
    if src.is_file():
        return [(fold_id(src.parent), src)] if src.name in CHECKPOINTS else []
    if not src.is_dir():
        return []
    for name in CHECKPOINTS:
        if (src / name).is_file():
            return [(fold_id(src), src / name)]
    found = []
    for d in src.glob("fold_*"):
        ckpt = next((d / n for n in CHECKPOINTS if (d / n).is_file()), None) if d.is_dir() else None
        if ckpt is not None and fold_id(d) is not None:
            found.append((fold_id(d), ckpt))
    found.sort(key=lambda f: (isinstance(f[0], str), f[0] if isinstance(f[0], int) else 0))
    numbered = [f for f in found if f[0] != "all"]
    return numbered or found


def checkpoint_file(src: Path) -> Path | None:
    """The checkpoint a path stands for (the first fold's in a result folder with several)."""
    folds = fold_checkpoints(src)
    return folds[0][1] if folds else None


def _up(path: Path, levels: int = 3) -> list[Path]:
    """The checkpoint's folder and the folders above it (fold_0 -> the result folder -> the dataset folder)."""
    out = [path.parent]
    while len(out) <= levels and out[-1].parent != out[-1]:
        out.append(out[-1].parent)
    return out


def find_beside(ckpt: Path, name: str) -> Path | None:
    return next((d / name for d in _up(ckpt) if (d / name).is_file()), None)


@functools.lru_cache(maxsize=4)
def _container(path: Path, mtime: float) -> dict[str, Any]:
    data = load_pickle(path, allow=ALLOW)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not an nnU-Net checkpoint (a {type(data).__name__}, not a dict)")
    if "network_weights" not in data:  # a bare state dict (a head-only export, say)
        if not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{path}: no 'network_weights' in this checkpoint and not a plain state dict")
        data = {"network_weights": data}
    if not isinstance(data["network_weights"], dict):
        raise CheckpointError(f"{path}: 'network_weights' is not a state dict")
    return data


def container(path: Path) -> dict[str, Any]:
    path = Path(path).resolve()
    return _container(path, path.stat().st_mtime)


def training_setup(ckpt: Path, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(plans, dataset.json, configuration name): from the checkpoint's init_args, else the files beside it."""
    init = data.get("init_args") or {}
    plans, dataset = init.get("plans"), init.get("dataset_json")
    if plans is None:
        p = find_beside(ckpt, "plans.json")
        if p is None:
            raise CheckpointError(f"{ckpt}: no init_args.plans in the checkpoint and no plans.json beside it; the "
                                  "decoder and the normalisation are described there")
        plans = read_json(p)
    if dataset is None:
        p = find_beside(ckpt, "dataset.json")
        if p is None:
            raise CheckpointError(f"{ckpt}: no init_args.dataset_json in the checkpoint and no dataset.json beside "
                                  "it; the channels and class names are described there")
        dataset = read_json(p)
    configs = plans.get("configurations") or {}
    name = init.get("configuration") or ("2d" if "2d" in configs else None)
    if name not in configs:
        raise CheckpointError(f"{ckpt}: the plans have no configuration {name!r} (have: {sorted(configs)})")
    return plans, dataset, name


def configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A plans configuration with what it inherits from its parent (nnU-Net's `inherits_from`)."""
    cfg = dict(plans["configurations"][name])
    parent = cfg.pop("inherits_from", None)
    return {**configuration(plans, parent), **cfg} if parent else cfg


def backbone_file(ckpt: Path, arch: str | None) -> Path:
    """A DINOv3 backbone in Meta's layout near a head-only checkpoint (the trainers load dinov3_<arch>_pretrain_*)."""
    for d in _up(ckpt):
        for sub in (d, d / "checkpoints", d / "dinounet" / "checkpoints"):
            hits = sorted(sub.glob(f"dinov3_{arch or 'vit*'}_pretrain_*.pth")) if sub.is_dir() else []
            if hits:
                return hits[0]
    raise CheckpointError(f"{ckpt}: holds the Dino U-Net head only (no {BACKBONE}* tensors) and no DINOv3 backbone "
                          f"file dinov3_{arch or 'vit*'}_pretrain_*.pth is in its folder or above it; put the one it "
                          "was trained with there, or use zoo.conversion.nnunet.assemble(head, backbone, out)")


# -- tensors ------------------------------------------------------------------------------------------------------


def fold_weights(path: Path, first: dict[str, Any], first_weights: dict[str, Any]) -> dict[str, Any]:
    """Another fold's network_weights, checked against the first fold's: the same trainer and configuration, and
    the same frozen backbone (it is stored once)."""
    data = container(path)
    weights = data["network_weights"]
    for key in ("trainer_name",):
        if data.get(key) != first.get(key):
            raise CheckpointError(f"{path}: {key} {data.get(key)!r} differs from the first fold's {first.get(key)!r}")
    mine, theirs = (data.get("init_args") or {}).get("configuration"), (first.get("init_args") or {}).get(
        "configuration")
    if mine != theirs:
        raise CheckpointError(f"{path}: configuration {mine!r} differs from the first fold's {theirs!r}")
    if has_backbone(weights) != has_backbone(first_weights):
        raise CheckpointError(f"{path}: holds {'a' if has_backbone(weights) else 'no'} backbone where the first fold "
                              f"holds {'one' if has_backbone(first_weights) else 'none'}")
    for key, t in weights.items():
        if key.startswith(BACKBONE) and isinstance(t, torch.Tensor):
            ref = first_weights.get(key)
            if not isinstance(ref, torch.Tensor) or ref.shape != t.shape or not torch.equal(ref, t):
                raise CheckpointError(f"{path}: tensor {key} differs from the first fold's; the DINOv3 backbone is "
                                      "frozen, so every fold should hold the same one (convert the folds apart)")
    return weights


class NNUNetSource(TensorSource):
    """`network_weights` of the checkpoint, plus (for a head-only checkpoint) a backbone file's tensors presented
    under the backbone prefix, plus the other folds' tensors but their backbone under `extra_folds.{j}.`."""

    def __init__(self, ckpt: Path, weights: dict[str, Any], backbone: TensorSource | None = None,
                 backbone_path: Path | None = None, folds: list[tuple[str, Path, dict[str, Any]]] = ()):
        super().__init__()
        self.backbone = backbone
        for key, t in weights.items():
            if isinstance(t, torch.Tensor):
                self._where[key] = (ckpt, t)
        for prefix, path, more in folds:
            for key, t in more.items():
                if isinstance(t, torch.Tensor) and not key.startswith(BACKBONE):
                    self._where[prefix + key] = (path, t)
        if backbone is not None:
            for key in backbone.keys():
                self._where[BACKBONE + key] = (backbone_path or ckpt, key)

    def meta(self, key: str) -> torch.Tensor:
        path, t = self._where[key]
        if isinstance(t, str):
            return self.backbone.meta(t)
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def get(self, key: str) -> torch.Tensor:
        t = self._where[key][1]
        return self.backbone.get(t) if isinstance(t, str) else t


def has_backbone(weights: dict[str, Any]) -> bool:
    return BACKBONE + "cls_token" in weights


def count_index(keys: set[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


# -- config ---------------------------------------------------------------------------------------------------------


def class_names(dataset: dict[str, Any], where: str) -> list[str]:
    labels = dataset.get("labels") or {}
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise CheckpointError(f"{where}: region-based labels (sigmoid outputs) are not supported")
    named = {int(v): str(k) for k, v in labels.items() if str(k) != "ignore"}
    if sorted(named) != list(range(len(named))):
        raise CheckpointError(f"{where}: labels {labels} are not consecutive from 0")
    return [named[i] for i in range(len(named))]


def norm_fields(arch: dict[str, Any], where: str) -> dict[str, Any]:
    """The plans' arch_kwargs -> our head config (conv_op must be 2-D; norm and nonlinearity by class name)."""
    conv = str(arch.get("conv_op", "Conv2d"))
    if not conv.endswith("Conv2d"):
        raise CheckpointError(f"{where}: conv_op {conv} is not 2-D; Dino U-Net is a 2-D network")
    norm, nonlin = str(arch.get("norm_op", "")), str(arch.get("nonlin", ""))
    kinds = {"InstanceNorm2d": "instance", "BatchNorm2d": "batch"}
    acts = {"LeakyReLU": "leaky_relu", "ReLU": "relu"}
    norm_kind = next((v for k, v in kinds.items() if norm.endswith(k)), None)
    act_kind = next((v for k, v in acts.items() if nonlin.endswith(k)), None)
    if norm_kind is None or act_kind is None:
        raise CheckpointError(f"{where}: norm_op {norm!r} / nonlin {nonlin!r} are not supported (InstanceNorm2d or "
                              "BatchNorm2d; LeakyReLU or ReLU)")
    nk, ak = arch.get("norm_op_kwargs") or {}, arch.get("nonlin_kwargs") or {}
    if arch.get("dropout_op"):
        raise CheckpointError(f"{where}: dropout_op {arch['dropout_op']} is not supported")
    return dict(norm=norm_kind, norm_eps=float(nk.get("eps", 1e-5)), norm_affine=bool(nk.get("affine", True)),
                nonlin=act_kind, negative_slope=float(ak.get("negative_slope", 0.01)),
                conv_bias=bool(arch.get("conv_bias", False)), nonlin_first=bool(arch.get("nonlin_first", False)))


def head_fields(t: TensorSource, where: str) -> dict[str, Any]:
    """Adapter and FAPM sizes read from the shapes (the published numbers are hard-coded upstream)."""
    keys = set(t.keys())
    need = [ADAPTER + "spm.stem.0.weight", ADAPTER + "interactions.0.extractor.attn.value_proj.weight",
            "encoder.fapm.shared_basis.weight"]
    for k in need:
        if k not in keys:
            raise CheckpointError(f"{where}: missing tensor {k}")
    dim = t.meta(BACKBONE + "cls_token").shape[-1]
    attn = ADAPTER + "interactions.0.extractor.attn."
    heads, points = 16, 4  # DINOv3_Adapter(deform_num_heads=16, n_points=4): not recoverable from the shapes
    outputs = t.meta(attn + "attention_weights.weight").shape[0]
    if outputs != heads * points:
        raise CheckpointError(f"{where}: tensor {attn}attention_weights.weight has {outputs} outputs, not 16 heads x "
                              "4 points x 1 level as published")
    last = count_index(keys, rf"{re.escape(ADAPTER)}interactions\.(\d+)\.extractor\.") - 1
    return dict(spm_width=int(t.meta(ADAPTER + "spm.stem.0.weight").shape[0]), deform_heads=heads,
                deform_points=points, deform_value_ratio=t.meta(attn + "value_proj.weight").shape[0] / dim,
                conv_ffn_ratio=t.meta(ADAPTER + "interactions.0.extractor.ffn.fc1.weight").shape[0] / dim,
                extra_extractors=count_index(keys, rf"{re.escape(ADAPTER)}interactions\.{last}\.extra_extractors\."
                                                   r"(\d+)\."),
                fapm_rank=int(t.meta("encoder.fapm.shared_basis.weight").shape[0]))


def tapped_layers(trainer: str, depth: int, where: str) -> tuple[int, ...]:
    if trainer in VARIANTS:
        tapped = VARIANTS[trainer][1]
        if max(tapped) >= depth:
            raise CheckpointError(f"{where}: {trainer} taps blocks {tapped}, but the stored ViT has {depth} blocks")
        return tapped
    if depth in TAPPED_BY_DEPTH:
        return TAPPED_BY_DEPTH[depth]
    raise CheckpointError(f"{where}: trainer {trainer or '(none)'} is no DinoUNetTrainer_{{s,b,l,7b}} and a {depth}-"
                          "block ViT matches no published variant; the tapped blocks are unknown")


def normalization(plans: dict[str, Any], cfg: dict[str, Any], n: int, where: str) -> list[dict[str, Any]]:
    """Per channel: the nnU-Net scheme, whether it uses the non-zero mask, and the dataset's intensity statistics
    (CT normalisation clips to the 0.5 / 99.5 percentiles and z-scores with the foreground mean / std)."""
    schemes = list(cfg.get("normalization_schemes") or ["ZScoreNormalization"] * n)
    masks = list(cfg.get("use_mask_for_norm") or [False] * n)
    props = plans.get("foreground_intensity_properties_per_channel") or {}
    known = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
             "RGBTo01Normalization")
    out = []
    for c in range(n):
        scheme = schemes[c] if c < len(schemes) else schemes[-1]
        if scheme not in known:
            raise CheckpointError(f"{where}: normalisation scheme {scheme!r} (channel {c}) is not one of {known}")
        entry: dict[str, Any] = {"scheme": scheme, "use_mask": bool(masks[c] if c < len(masks) else False)}
        if scheme == "CTNormalization":
            p = props.get(str(c)) or props.get(c)
            if not p:
                raise CheckpointError(f"{where}: CTNormalization of channel {c} needs the plans' "
                                      "foreground_intensity_properties_per_channel")
            entry.update({k: float(p[k]) for k in ("mean", "std", "percentile_00_5", "percentile_99_5")})
        out.append(entry)
    return out


RESAMPLING_FN = "resample_data_or_seg_to_shape"  # nnU-Net's default; zoo runs exactly this one


def resampling(cfg: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The plans' resampling of the image and of the logits: the function (nnU-Net's default only) and its
    spline orders and separate-z rule."""
    out = {}
    for what, default_order in (("data", 3), ("probabilities", 1)):
        fn = cfg.get(f"resampling_fn_{what}", RESAMPLING_FN)
        if fn != RESAMPLING_FN:
            raise CheckpointError(f"{where}: the plans resample the {what} with {fn}; zoo runs nnU-Net's "
                                  f"{RESAMPLING_FN} only")
        kw = cfg.get(f"resampling_fn_{what}_kwargs") or {}
        force = kw.get("force_separate_z")
        out[what] = {"order": int(kw.get("order", default_order)), "order_z": int(kw.get("order_z", 0)),
                     "force_separate_z": None if force is None else bool(force)}
    return out


POSTPROCESS_FN = "remove_all_but_largest_component_from_segmentation"
POSTPROCESS_PATH = f"nnunetv2.postprocessing.remove_connected_components.{POSTPROCESS_FN}"


class _PostprocessFn:
    """What the allow-listed function name in postprocessing.pkl unpickles to: a name, never the function."""

    def __init__(self, *args: Any) -> None:
        raise pickle.UnpicklingError("postprocessing.pkl calls a function; it should only name one")


class _DataUnpickler(pickle.Unpickler):
    """Python's restricted-globals recipe: plain data, plus the one nnU-Net function name, mapped to a marker."""

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" == POSTPROCESS_PATH:
            return _PostprocessFn
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not plain data")


def read_postprocessing_pkl(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """postprocessing.pkl ((functions, kwargs) pickled by nnU-Net's determine_postprocessing) read as data: the one
    known function by name, anything else refused; nothing in it runs."""
    try:
        with open(path, "rb") as f:
            fns, kwargs = _DataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: {e}; zoo never runs code from a file") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}: not nnU-Net's postprocessing ({type(e).__name__}: {e})") from None
    if not isinstance(fns, list) or not isinstance(kwargs, list):
        raise CheckpointError(f"{path}: not nnU-Net's postprocessing (expected two lists)")
    return [POSTPROCESS_FN if f is _PostprocessFn else repr(f) for f in fns], kwargs


def postprocessing_steps(src: Path, folds: list[Any], classes: int) -> list[dict[str, Any]]:
    """nnU-Net's postprocessing for the converted folds, when the result folder carries it: postprocessing.json (or,
    without it, postprocessing.pkl read as data) in the folder or in its crossval_results_folds_* (the one named for
    these folds, else the only one). Each step keeps the largest connected component of some labels."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    if fold_id(folder) is not None:
        folder = folder.parent
    named = folder / ("crossval_results_folds_" + "_".join(str(f) for f in folds))
    others = sorted(d for d in folder.glob("crossval_results_folds_*") if d.is_dir())
    places = [folder, named] + (others if len(others) == 1 else [])
    place = next((d for d in places if (d / "postprocessing.json").is_file() or (d / "postprocessing.pkl").is_file()),
                 None)
    if place is None:
        return []
    if (place / "postprocessing.json").is_file():
        path = place / "postprocessing.json"
        js = read_json(path)
        fns, kwargs = js.get("postprocessing_fns"), js.get("postprocessing_kwargs")
    else:
        path = place / "postprocessing.pkl"
        fns, kwargs = read_postprocessing_pkl(path)
    if not isinstance(fns, list) or not isinstance(kwargs, list) or len(fns) != len(kwargs):
        raise CheckpointError(f"{path}: not nnU-Net's postprocessing (postprocessing_fns / postprocessing_kwargs)")
    steps = []
    for fn, kw in zip(fns, kwargs):
        if fn != POSTPROCESS_FN or not isinstance(kw, dict) or "labels_or_regions" not in kw:
            raise CheckpointError(f"{path}: postprocessing step {fn!r} is not nnU-Net's {POSTPROCESS_FN}")
        what = kw["labels_or_regions"]
        flat = [v for item in (what if isinstance(what, (list, tuple)) else [what])
                for v in (item if isinstance(item, (list, tuple)) else [item])]
        if not flat or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < classes for v in flat):
            raise CheckpointError(f"{path}: labels_or_regions {what!r} names no foreground label of the "
                                  f"{classes} classes")
        steps.append({"labels_or_regions": json.loads(json.dumps(what)),
                      "background_label": int(kw.get("background_label", 0))})
    return steps


TRAINING_DATA_KEYS = ("name", "description", "reference", "licence", "license", "release", "tensorImageSize",
                      "numTraining", "file_ending")


class NNUNetDinoUNet(Format):
    name = "nnunet-dinounet"
    family = "dinounet"
    description = ("nnU-Net v2 checkpoint of a DinoUNetTrainer_{s,b,l,7b} (checkpoint_final.pth / checkpoint_best"
                   ".pth, or its result folder with plans.json and dataset.json)")
    copy_files = ()

    def __init__(self, backbone: Path | None = None):
        self.backbone = backbone  # a DINOv3 .pth for head-only checkpoints (assemble); else looked up near it

    def detect(self, src: Path) -> bool:
        return checkpoint_file(src) is not None

    def _parts(self, src: Path) -> tuple[Path, dict[str, Any], NNUNetSource]:
        folds = fold_checkpoints(src)
        if not folds:
            raise CheckpointError(f"{src}: no {' / '.join(CHECKPOINTS)} here")
        ckpt = folds[0][1]
        data = container(ckpt)
        weights = data["network_weights"]
        if ADAPTER + "spm.stem.0.weight" not in weights:
            raise CheckpointError(f"{ckpt}: not a Dino U-Net checkpoint (trainer {data.get('trainer_name')!r}): no "
                                  f"{ADAPTER}* tensors; only DinoUNetTrainer checkpoints are supported")
        others = [(f"{EXTRA_FOLDS}{j}.", path, fold_weights(path, data, weights)) for j, (_, path) in
                  enumerate(folds[1:])]
        if has_backbone(weights):
            return ckpt, data, NNUNetSource(ckpt, weights, folds=others)
        arch = VARIANTS.get(str(data.get("trainer_name")), (None,))[0]
        path = Path(self.backbone) if self.backbone else backbone_file(ckpt, arch)
        return ckpt, data, NNUNetSource(ckpt, weights, open_source(path), path, folds=others)

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        folds = fold_checkpoints(src)
        ckpt, data, t = self._parts(src)
        where = str(ckpt)
        plans, dataset, cfg_name = training_setup(ckpt, data)
        cfg = configuration(plans, cfg_name)
        arch = (cfg.get("architecture") or {}).get("arch_kwargs") or {}
        keys = set(t.keys())
        backbone = official_fields(t, where, BACKBONE)
        trainer = str(data.get("trainer_name") or "")
        names = class_names(dataset, where)
        channels = dataset.get("channel_names") or dataset.get("modality") or {}
        fields: dict[str, Any] = dict(backbone=backbone, folds=len(folds),
                                      tapped_layers=tapped_layers(trainer, backbone["depth"], where),
                                      in_channels=len(channels), num_classes=len(names), **head_fields(t, where),
                                      **norm_fields(arch, where))
        stored = [int(t.meta(f"encoder.fapm.refinement_blocks.{i}.0.weight").shape[0]) for i in range(4)]
        fields["features_per_stage"] = list(arch.get("features_per_stage") or stored)[:4]
        if fields["features_per_stage"] != stored:
            raise CheckpointError(f"{where}: the plans' features_per_stage {arch.get('features_per_stage')} do not "
                                  f"match the stored FAPM widths {stored}")
        convs = [count_index(keys, rf"decoder\.stages\.{s}\.convs\.(\d+)\.conv\.weight") for s in range(3)]
        fields["decoder_convs"] = convs
        seg = f"decoder.seg_layers.{len(convs) - 1}.weight"
        if seg not in keys or t.meta(seg).shape[0] != len(names):
            got = t.meta(seg).shape[0] if seg in keys else "no"
            raise CheckpointError(f"{where}: tensor {seg}: {got} outputs, dataset.json names {len(names)} classes")
        if not fields["in_channels"]:
            raise CheckpointError(f"{where}: dataset.json names no channels (channel_names)")
        extra = {
            "labels": names,
            "channel_names": [str(channels[k]) for k in sorted(channels, key=int)],
            "normalization": normalization(plans, cfg, len(channels), where),
            "patch_size": [int(p) for p in cfg.get("patch_size", (512, 512))],
            "spacing": [float(s) for s in cfg.get("spacing", (1.0, 1.0))],
            "transpose_forward": [int(a) for a in plans.get("transpose_forward", (0, 1, 2))],
            "transpose_backward": [int(a) for a in plans.get("transpose_backward", (0, 1, 2))],
            "image_reader_writer": str(plans.get("image_reader_writer") or "SimpleITKIO"),
            "resampling": resampling(cfg, where),
            "mirror_axes": [int(a) for a in (data.get("inference_allowed_mirroring_axes") or ())],
            "trainer": trainer, "configuration": cfg_name, "plans_name": plans.get("plans_name", ""),
            "dataset_name": plans.get("dataset_name", ""),
            "fold": (data.get("init_args") or {}).get("fold"), "epoch": data.get("current_epoch"),
            "folds": [f if f is not None else (data.get("init_args") or {}).get("fold", 0) for f, _ in folds],
            "postprocessing": postprocessing_steps(src, [f for f, _ in folds], len(names)),
            "training_data": {k: dataset[k] for k in TRAINING_DATA_KEYS if k in dataset},
        }
        return fields, json.loads(json.dumps(extra, default=float))  # numpy scalars -> plain numbers

    def source_info(self, src: Path) -> dict[str, Any]:
        ckpt, data, _ = self._parts(src)
        plans, dataset, _ = training_setup(ckpt, data)
        trained = dataset.get("name") or plans.get("dataset_name") or "the user's dataset"
        what = dataset.get("description")
        return {"license": LICENSE, "license_url": LICENSE_URL, "paper": "https://arxiv.org/abs/2508.20909",
                "description": f"Dino U-Net ({data.get('trainer_name') or 'DinoUNetTrainer'}) trained on {trained}"
                               + (f": {what}" if what else "")}

    def open(self, src: Path) -> TensorSource:
        return self._parts(src)[2]

    def keymap(self, config: Any) -> KeyMap:
        rules: list[Rule] = official_rules(BACKBONE, "backbone.", config.backbone)
        drops: list[Drop] = official_drops(BACKBONE)
        p = ADAPTER
        bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        wb = ("weight", "bias")
        rules.append(rename(p + "level_embed", "adapter.level_embed"))
        for seq in ("stem", "conv2", "conv3", "conv4"):
            rules += [rename(f"{p}spm.{seq}.{{n}}.{w}", f"adapter.spm.{seq}.{{n}}.{w}") for w in bn]
        rules += [rename(f"{p}spm.fc{k}.{w}", f"adapter.spm.fc{k}.{w}") for k in range(1, 5) for w in wb]
        extractor = ["query_norm", "feat_norm", "attn.sampling_offsets", "attn.attention_weights", "attn.value_proj",
                     "attn.output_proj", "ffn.fc1", "ffn.fc2", "ffn_norm"]
        for where in ("interactions.{k}.extractor", "interactions.{k}.extra_extractors.{j}"):
            rules += [rename(f"{p}{where}.{m}.{w}", f"adapter.{where}.{m}.{w}") for m in extractor for w in wb]
            rules += [rename(f"{p}{where}.ffn.dwconv.dwconv.{w}", f"adapter.{where}.ffn.dwconv.{w}") for w in wb]
        rules += [rename(f"{p}up.{w}", f"adapter.up.{w}") for w in wb]
        rules += [rename(f"{p}norm{k}.{w}", f"adapter.norm{k}.{w}") for k in range(1, 5) for w in bn]
        f = "encoder.fapm."
        norms = bn if config.norm == "batch" else wb
        rules += [rename(f + "shared_basis." + w, "fapm.shared_basis." + w) for w in wb]
        per_scale = {"specific_bases.{i}": "specific_basis", "film_generators.{i}": "film",
                     "refinement_blocks.{i}.0": "reduce", "refinement_blocks.{i}.3.depthwise": "depthwise",
                     "refinement_blocks.{i}.3.pointwise": "pointwise", "refinement_blocks.{i}.4": "refine",
                     "refinement_blocks.{i}.5.fc.0": "se_squeeze", "refinement_blocks.{i}.5.fc.2": "se_excite",
                     "shortcut_projections.{i}": "shortcut"}
        rules += [rename(f"{f}{s}.{w}", f"fapm.scales.{{i}}.{d}.{w}") for s, d in per_scale.items() for w in wb]
        rules += [rename(f"{f}refinement_blocks.{{i}}.1.{w}", f"fapm.scales.{{i}}.reduce_norm.{w}") for w in norms]
        rules += [rename(f"{f}refinement_blocks.{{i}}.3.bn.{w}", f"fapm.scales.{{i}}.dw_norm.{w}") for w in norms]
        rules += [rename(f"encoder.ups.{{i}}.up2.{w}", f"upsample.{{i}}.{w}") for w in wb]
        rules += [rename(f"decoder.transpconvs.{{s}}.{w}", f"decoder.transpconvs.{{s}}.{w}") for w in wb]
        rules += [rename(f"decoder.stages.{{s}}.convs.{{j}}.conv.{w}", f"decoder.stages.{{s}}.{{j}}.conv.{w}")
                  for w in wb]
        rules += [rename(f"decoder.stages.{{s}}.convs.{{j}}.norm.{w}", f"decoder.stages.{{s}}.{{j}}.norm.{w}")
                  for w in norms]
        last = len(config.decoder_convs) - 1
        rules += [rename(f"decoder.seg_layers.{last}.{w}", f"decoder.seg_layer.{w}") for w in wb]
        drops += [Drop(f"decoder.seg_layers.{{s}}.{w}", "deep-supervision output, unused at inference") for w in wb]
        drops += [Drop(f"decoder.stages.{{s}}.convs.{{j}}.all_modules.{{m}}.{w}", "alias of the block's conv/norm")
                  for w in bn]
        alias = "alias: UNetDecoder keeps the encoder as a submodule"
        drops += [Drop("decoder." + r.src[0], alias) for r in rules if r.src[0].startswith("encoder.")]
        drops += [Drop("decoder." + d.pattern, alias) for d in list(drops) if d.pattern.startswith("encoder.")]
        if config.folds > 1:  # the other folds' heads (their backbone, the same frozen one, is stored once)
            p = EXTRA_FOLDS + "{fold}."
            rules += [rename(p + r.src[0], p + r.dst[0]) for r in list(rules) if not r.src[0].startswith(BACKBONE)]
            drops += [Drop(p + d.pattern, d.why) for d in list(drops)]
        return KeyMap(rules, drops)


def assemble(head: str | os.PathLike, backbone: str | os.PathLike, out: str | os.PathLike, **kwargs: Any) -> Path:
    """Convert a head-only Dino U-Net checkpoint with the DINOv3 backbone .pth (Meta's layout) it was trained on.

    head: the checkpoint file or its result folder; plans.json / dataset.json are taken from the checkpoint's
    init_args or from beside it. kwargs go to zoo.convert (name, dtype, overwrite, ...)."""
    from zoo.conversion.base import convert

    head, backbone = Path(head), Path(backbone)
    if not backbone.is_file():
        raise CheckpointError(f"{backbone}: no such DINOv3 backbone file")
    ckpt = checkpoint_file(head)
    if ckpt is None:
        raise CheckpointError(f"{head}: no {' / '.join(CHECKPOINTS)} here")
    if has_backbone(container(ckpt)["network_weights"]):
        raise CheckpointError(f"{ckpt}: already holds a backbone ({BACKBONE}*); convert it directly")
    with tempfile.TemporaryDirectory(prefix="dinounet-assemble-") as tmp:
        folder = Path(tmp)  # the checkpoint with its JSON files and the backbone, as a result folder
        os.symlink(ckpt.resolve(), folder / ckpt.name)
        for name in ("plans.json", "dataset.json"):
            found = find_beside(ckpt, name)
            if found:
                os.symlink(found.resolve(), folder / name)
        arch = VARIANTS.get(str(container(ckpt).get("trainer_name")), ("vit",))[0]
        os.symlink(backbone.resolve(), folder / f"dinov3_{arch}_pretrain_{backbone.stem}.pth")  # found by its name
        kwargs.setdefault("source", {"path": f"{ckpt} + {backbone}"})
        kwargs.setdefault("command", f"zoo.conversion.nnunet.assemble({str(head)!r}, {str(backbone)!r}, "
                                     f"{str(out)!r})")
        return convert(folder, out, format=NNUNetDinoUNet.name, **kwargs)


FORMATS = [NNUNetDinoUNet()]
