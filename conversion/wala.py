"""WaLa's published checkpoints: ADSKAILab/WaLa-*-1B, a PyTorch Lightning `checkpoint.ckpt` beside `args.json`.

The Lightning file holds the training state: `state_dict` (what the published inference loads), `state_dict_ema`
(timm ModelEmaV2: the same keys under `module.`), optimizer and scheduler states, loops, callbacks. It is opened
with torch.load(weights_only=True, mmap=True); only the chosen state dict is read, tensor by tensor. Format "wala"
converts `state_dict` (detected automatically); "wala-ema" converts the EMA copy (`--format wala-ema`).

Key layout (after removing torch.compile's `_orig_mod.` wherever it appears; the published files were trained with
use_compile, so `network._orig_mod.unet.*`, `autoencoder._orig_mod.*`, `encoder._orig_mod.*`):
  network.unet.*                         the Latent_UVIT diffusion network         -> denoiser.*
  network.cond_mapping_network.{k}.0.*   mapping layers (Linear + SiLU)            -> condition.mapping.{k}.*
  network.cond_pos_emb                   condition position table                  -> condition.pos_emb
  network.camera_emb.weight              camera table                              -> condition.camera_emb
  autoencoder.{encoder,decoder}.*        wavelet VQ-VAE                            -> autoencoder.*
  autoencoder.quantize.embedding.weight  codebook 1024 x 4                         -> autoencoder.codebook
  clip_model.dinov2.*                    DINOv2 (image, sketch, depth models)      -> image_encoder.*
  encoder.*                              PointNet / voxel encoder                  -> point_encoder.* / voxel_encoder.*
Dropped: the wavelet filter buffers (`dwt_inverse_3d.*`, `dwt_sparse_composer.*`, at the top and in the
autoencoder; regenerated from PyWavelets), DINOv2's unused `mask_token`, a camera table the model never adds
(use_camera_index off) and a condition projection it never uses (add_condition_time_ch false).
Sizes come from args.json and the tensor shapes; what the published code cannot run is refused by name.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from zoo.architectures.wala import LICENSE, LICENSE_NAME, PAPER, WaLaConfig, build, generation_defaults
from zoo.conversion.base import Format
from zoo.conversion.rules import Drop, KeyMap, rename
from zoo.conversion.sources import TensorSource, load_pickle
from zoo.weights.format import CheckpointError

from zoo.family import _skip_init

CHECKPOINT, ARGS = "checkpoint.ckpt", "args.json"
ARGS_MARKERS = ("max_training_level", "network_type", "diffusion_rescale_timestep")


def paths(src: Path) -> tuple[Path, Path]:
    """(checkpoint, args.json) for a published directory, or a .ckpt file with args.json beside it."""
    src = Path(src)
    if src.is_file():
        return src, src.parent / ARGS
    ckpts = sorted(src.glob("*.ckpt")) if src.is_dir() else []
    ckpt = src / CHECKPOINT if (src / CHECKPOINT).is_file() else (ckpts[0] if len(ckpts) == 1 else src / CHECKPOINT)
    return ckpt, src / ARGS


def read_args(path: Path) -> dict[str, Any]:
    try:
        args = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; a WaLa checkpoint comes with its training args.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: expected a JSON object of training arguments")
    return args


class LightningSource(TensorSource):
    """One state dict of a Lightning checkpoint, keys cleaned of `_orig_mod.` (and of the EMA copy's `module.`)."""

    def __init__(self, path: Path, entry: str = "state_dict"):
        super().__init__()
        ckpt = load_pickle(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get(entry), dict):
            found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"{path}: no {entry!r} in this checkpoint (found {found}); a WaLa Lightning "
                                  f"checkpoint keeps its weights under 'state_dict'")
        for key, t in ckpt[entry].items():
            if not isinstance(t, torch.Tensor):
                continue
            clean = key.removeprefix("module.") if entry == "state_dict_ema" else key
            clean = clean.replace("_orig_mod.", "")
            if clean in self._where:
                raise CheckpointError(f"{path}: tensors {self._where[clean][2]} and {key} both mean {clean}")
            self._where[clean] = (path, t, key)

    def meta(self, key: str) -> torch.Tensor:
        t = self._where[key][1]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def get(self, key: str) -> torch.Tensor:
        return self._where[key][1]


@functools.lru_cache(maxsize=4)
def _source(path: Path, mtime: float, entry: str) -> LightningSource:
    return LightningSource(path, entry)


# -- native name -> published name ---------------------------------------------------------------------------------

_RES = [(r"\.norm1\.", ".in_norm."), (r"\.conv1\.", ".in_conv."), (r"\.norm2\.", ".out_layers.0."),
        (r"\.conv2\.", ".out_layers.3."), (r"\.skip\.", ".skip_connection.")]
_OUT = [(r"\.out_conv\.(weight|bias)$", r".out_conv.2.\1"), (r"\.out_norm\.(weight|bias)$", r".out_conv.0.\1")]
_GLOBAL = "(global_proj|res_cond_proj_layer)"
_UNET_RES = "((?:input|output)_blocks\\.\\d+)"
_PUBLISHED = {  # native prefix -> ordered substitutions (native name -> published, uncompiled name)
    "condition": [(r"^condition\.mapping\.(\d+)\.", r"network.cond_mapping_network.\1.0."),
                  (r"^condition\.pos_emb$", "network.cond_pos_emb"),
                  (r"^condition\.camera_emb$", "network.camera_emb.weight")],
    "denoiser": [(r"^denoiser\.", "network.unet."),
                 (r"\.time_embed\.fc1\.", ".t_embedder.mlp.0."), (r"\.time_embed\.fc2\.", ".t_embedder.mlp.2."),
                 (r"\.time_condition\.", ".global_proj."), (r"\.res_condition\.", ".res_cond_proj_layer."),
                 (rf"{_GLOBAL}\.proj1\.", r"\1.proj_layer.0."), (rf"{_GLOBAL}\.norm1\.", r"\1.proj_layer.1."),
                 (rf"{_GLOBAL}\.proj2\.", r"\1.proj_layer.3."), (rf"{_GLOBAL}\.norm2\.", r"\1.proj_layer.4."),
                 (rf"{_GLOBAL}\.mlp1\.", r"\1.mlp.0."), (rf"{_GLOBAL}\.mlp2\.", r"\1.mlp.2."),
                 (r"\.context_proj\.fc1\.", ".context_mlp.0."), (r"\.context_proj\.fc2\.", ".context_mlp.2."),
                 (r"\.patch_norm\.", ".to_patch_att_embedding_input.1."),
                 (r"\.patch_proj\.", ".to_patch_att_embedding_input.2."),
                 (r"\.unpatch_norm\.", ".to_patch_att_embedding_output.0."),
                 (r"\.unpatch_proj\.", ".to_patch_att_embedding_output.1."),
                 (r"\.registers$", ".register_emb"), (r"\.modulation\.", ".adaLN_modulation.1."),
                 (r"^network\.unet\.out_norm\.", "network.unet.out.0."),
                 (r"^network\.unet\.out_conv\.", "network.unet.out.2."),
                 (rf"{_UNET_RES}\.norm1\.", r"\1.in_norm."), (rf"{_UNET_RES}\.conv1\.", r"\1.in_conv."),
                 (rf"{_UNET_RES}\.norm2\.", r"\1.out_layers.0."), (rf"{_UNET_RES}\.conv2\.", r"\1.out_layers.3."),
                 (r"\.time_proj\.", ".emb_layers.1."), (r"\.cond_proj\.", ".linear_res_emb."),
                 (r"\.skip_gate\.fc1\.", ".skip_learn_f.0."), (r"\.skip_gate\.fc2\.", ".skip_learn_f.2.")],
    "autoencoder": [(r"^autoencoder\.codebook$", "autoencoder.quantize.embedding.weight"),
                    (r"\.conv_in\.", ".in_conv."), (r"\.res(\d)a\.", r".res_\1."), (r"\.res(\d)b\.", r".res_\1_1."),
                    *_RES, *_OUT],
    "image_encoder": [(r"^image_encoder\.", "clip_model.dinov2."), (r"\.patch_embed\.", ".patch_embed.proj."),
                      (r"\.registers$", ".register_tokens"), (r"\.scale1$", ".ls1.gamma"),
                      (r"\.scale2$", ".ls2.gamma")],
    "point_encoder": [(r"^point_encoder\.embed\.(\d+)\.", lambda m: f"encoder.linear{int(m[1]) + 1}."),
                      (r"^point_encoder\.embed_norms\.(\d+)\.", lambda m: f"encoder.ln{int(m[1]) + 1}."),
                      (r"^point_encoder\.inducing_points$", "encoder.pooling.I"),
                      (r"^point_encoder\.pool_attn\.", "encoder.pooling.mab0."),
                      (r"^point_encoder\.pool_mlp\.", "encoder.pooling.mlp."),
                      (r"^point_encoder\.blocks\.", "encoder.t_blocks."),
                      (r"^point_encoder\.head\.(\d+)\.", lambda m: f"encoder.linear_f{int(m[1]) + 1}."),
                      (r"^point_encoder\.head_norms\.(\d+)\.", lambda m: f"encoder.ln_f{int(m[1]) + 1}.")],
    "voxel_encoder": [(r"^voxel_encoder\.", "encoder."), (r"\.conv_in\.", ".in_conv."), (r"\.res(\d)\.", r".res_\1."),
                      *_RES, *_OUT],
}


def published_key(native: str) -> str:
    """The published (uncompiled) name of a native tensor."""
    key = native
    for pattern, repl in _PUBLISHED[native.split(".")[0]]:
        key = re.sub(pattern, repl, key)
    return key


# -- config from args.json and shapes ------------------------------------------------------------------------------


def _count(keys: set[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pat.match(k))})


def config_from(args: dict[str, Any], src: TensorSource, where: Path) -> dict[str, Any]:
    keys = set(src.keys())
    a = lambda name, default=None: args.get(name, default)  # noqa: E731 (DotDict: a missing field reads None)

    def shape(key: str) -> tuple[int, ...]:
        if key not in keys:
            raise CheckpointError(f"{where}: missing tensor {key}")
        return tuple(src.meta(key).shape)

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {why}")

    if a("use_wavelet_conditions"):
        raise refuse("a wavelet-conditioned model (use_wavelet_conditions): not a published WaLa model")
    kinds = [k for k, flag in (("image", "use_image_conditions"), ("depth", "use_depth_conditions"),
                               ("pointcloud", "use_pointcloud_conditions"), ("voxel", "use_voxel_conditions"))
             if a(flag)]
    if len(kinds) != 1:
        raise refuse(f"args.json sets {len(kinds)} condition types ({kinds}); WaLa's published inference takes one "
                     "(the unconditional WaLa-UN's inference was never released)")
    condition = kinds[0]
    if a("network_type") == "latent_dit":
        raise refuse("network_type latent_dit (a plain DiT): every published WaLa model is a latent U-ViT")
    if a("dp_cond_type") is not None:
        raise refuse(f"dp_cond_type {a('dp_cond_type')!r}: the published inference only guides with zeroed features")
    for side in ("encoder", "decoder"):
        if a(f"{side}_num_tran"):
            raise refuse(f"{side}_num_tran {a(f'{side}_num_tran')}: a VQ-VAE with transformer layers is not "
                         "a published WaLa autoencoder")
        if a(f"{side}_type") not in (None, f"General_{'Encoder_Down' if side == 'encoder' else 'Decoder_Up'}_2"):
            raise refuse(f"{side}_type {a(f'{side}_type')!r} is not WaLa's General_*_2 autoencoder")

    pos = shape("network.cond_pos_emb")
    context_dim, tokens = pos[2], pos[1]
    views = 1
    if a("use_multiple_views_grids"):
        if a("training_views") is None:
            raise refuse("multi-view model without training_views: the published code cannot guide it")
        views = len(a("training_views"))
    camera_rows = shape("network.camera_emb.weight")[0] if a("use_camera_index") else 0
    if views == 1 and camera_rows > 1 and a("training_views") is not None:
        raise refuse(f"single view with a {camera_rows}-row camera table added whole: the published code cannot run it")

    conv_in = shape("network.unet.conv_in.weight")
    hidden = shape("network.unet.t_embedder.mlp.0.weight")[0]
    unet = conv_in[0]
    patch = round((shape("network.unet.to_patch_att_embedding_input.2.weight")[1] / unet) ** (1 / 3))
    head_dim = shape("network.unet.blocks.0.attn.q_norm.weight")[0]
    skip_gate = shape("network.unet.output_blocks.0.skip_learn_f.0.weight") if (
        "network.unet.output_blocks.0.skip_learn_f.0.weight" in keys) else None
    res_condition = (shape("network.unet.res_cond_proj_layer.mlp.2.weight")[0]
                     if "network.unet.res_cond_proj_layer.mlp.2.weight" in keys else 0)
    grid = int(a("grid_size", 12))
    if a("att_patch_size") is not None and int(a("att_patch_size")) != patch:
        raise refuse(f"att_patch_size {a('att_patch_size')} does not fit the patch projection (patch {patch})")

    vq_in = shape("autoencoder.encoder.in_conv.weight")
    kept = int(a("max_training_level", 2))
    if vq_in[1] != 8**kept:
        raise refuse(f"the VQ-VAE reads {vq_in[1]} channels, max_training_level {kept} packs {8**kept}")
    if int(a("resolution", 256)) != 256 or int(a("max_depth", 3)) != 3:
        raise refuse(f"resolution {a('resolution')} / max_depth {a('max_depth')}: the published decoder's fixed "
                     "12 -> 23 -> 46 path only lines up with a 3-level transform of 256^3")
    codebook = shape("autoencoder.quantize.embedding.weight")

    cfg: dict[str, Any] = dict(
        condition=condition, views=views, context_dim=context_dim, condition_tokens=tokens,
        mapping_layers=_count(keys, "network.cond_mapping_network."), condition_pos_emb=True,
        camera_rows=camera_rows, classifier_free=a("dp_cond") is not None,
        latent_channels=conv_in[1], latent_grid=grid, patch_size=patch, hidden_size=hidden,
        depth=_count(keys, "network.unet.blocks."), num_heads=hidden // head_dim,
        mlp_hidden=shape("network.unet.blocks.0.mlp.fc1.weight")[0], unet_channels=unet,
        res_blocks=_count(keys, "network.unet.input_blocks."),
        cross_attention="network.unet.blocks.0.cross_attn.q.weight" in keys,
        time_condition=bool(a("add_condition_time_ch")) and "network.unet.global_proj.mlp.2.weight" in keys,
        res_condition=res_condition,
        registers=shape("network.unet.register_emb")[1] if "network.unet.register_emb" in keys else 0,
        skip_gate_reduction=unet // skip_gate[0] if skip_gate else 0,
        fixed_pos_embedding=a("with_fix_pos") is not None,
        beta_schedule=a("diffusion_beta_schedule", "linear"), train_steps=int(a("diffusion_step", 1000)),
        beta_scale_ratio=float(a("diffusion_scale_ratio", 1.0) or 1.0),
        prediction=a("diffusion_model_mean_type", "EPSILON"), variance=a("diffusion_model_var_type", "FIXED_SMALL"),
        resolution=256, wavelet=a("wavelet", "bior6.8"), wavelet_mode=a("padding_mode", "constant"),
        wavelet_levels=3, kept_levels=kept, codebook_size=codebook[0], vq_hidden=vq_in[0],
        vq_l2_normalize=a("normalize_latent") == "l2_norm",
    )
    if codebook[1] != cfg["latent_channels"]:
        raise refuse(f"codebook vectors have {codebook[1]} channels, the latent {cfg['latent_channels']}")

    if condition in ("image", "depth"):
        if not str(a("clip_model_type", "")).startswith("dino"):
            raise refuse(f"clip_model_type {a('clip_model_type')!r}: the published models use DINOv2 ('dino-*')")
        if any(k.startswith("clip_model.dinov2.blocks.0.mlp.w12") for k in keys):
            raise refuse("a DINOv2 with a SwiGLU feed-forward (ViT-g): not in any published WaLa model")
        pe = shape("clip_model.dinov2.pos_embed")
        width = pe[2]
        cfg.update(image_encoder_depth=_count(keys, "clip_model.dinov2.blocks."), image_encoder_width=width,
                   image_encoder_heads=width // 64,
                   image_encoder_mlp=shape("clip_model.dinov2.blocks.0.mlp.fc1.weight")[0],
                   image_encoder_patch=shape("clip_model.dinov2.patch_embed.proj.weight")[-1],
                   image_encoder_registers=(shape("clip_model.dinov2.register_tokens")[1]
                                            if "clip_model.dinov2.register_tokens" in keys else 0),
                   image_encoder_pos_grid=math.isqrt(pe[1] - 1))
        if width != context_dim:
            raise refuse(f"DINOv2 width {width} does not match the condition width {context_dim}")
    elif condition == "pointcloud":
        large = a("pc_encoder_type") != "PointNet_Simple"
        pd = shape("encoder.linear4.weight")[0]
        for k, width in enumerate((64, 256, 1024), start=1):
            if shape(f"encoder.linear{k}.weight")[0] != width:
                raise refuse(f"encoder.linear{k} has width {shape(f'encoder.linear{k}.weight')[0]}, not {width}")
        cfg.update(point_encoder="large" if large else "simple", point_dims=pd,
                   point_heads=pd // shape("encoder.pooling.mab0.q_norm.weight")[0])
        if shape("encoder.pooling.I")[1] != tokens:
            raise refuse(f"{shape('encoder.pooling.I')[1]} inducing points, {tokens} condition positions")
        if large:
            cfg.update(point_blocks=_count(keys, "encoder.t_blocks."),
                       point_mlp=shape("encoder.t_blocks.0.mlp.fc1.weight")[0] if _count(keys, "encoder.t_blocks.")
                       else 4 * context_dim)
    else:
        res = int(a("voxel_resolution", 16))
        cfg.update(voxel_resolution=res, voxel_stem=shape("encoder.in_conv.weight")[0],
                   voxel_hidden=shape("encoder.res_2.in_conv.weight")[0])
        if (res // 2) ** 3 != tokens:
            raise refuse(f"a {res}^3 voxel grid gives {(res // 2) ** 3} tokens, the condition table has {tokens}")
    return cfg


class WaLaFormat(Format):
    name = "wala"
    family = "wala"
    description = "WaLa Lightning checkpoint.ckpt + args.json (ADSKAILab/WaLa-*): the state_dict weights"
    copy_files = ()
    entry = "state_dict"

    def detect(self, src: Path) -> bool:
        ckpt, args = paths(src)
        if not (ckpt.is_file() and ckpt.suffix == ".ckpt" and args.is_file()):
            return False
        try:
            data = json.loads(args.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return isinstance(data, dict) and all(k in data for k in ARGS_MARKERS)

    def open(self, src: Path) -> TensorSource:
        ckpt, _ = paths(src)
        if not ckpt.is_file():
            raise CheckpointError(f"{ckpt}: not found; a published WaLa repo has {CHECKPOINT} beside {ARGS}")
        ckpt = ckpt.resolve()
        return _source(ckpt, ckpt.stat().st_mtime, self.entry)

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        ckpt, args_path = paths(src)
        cfg = config_from(read_args(args_path), self.open(src), ckpt)
        views, condition = cfg["views"], cfg["condition"]
        extra: dict[str, Any] = {"generation": generation_defaults(condition, views), "license_name": LICENSE_NAME}
        if condition in ("image", "depth"):
            # the published latent-model transform: Resize(224) (bilinear), CenterCrop(224), ToTensor, Normalize(0.5,
            # 0.5); single images: alpha dropped (PIL convert RGB); views and depth sets: LA images over white (run.py)
            extra["preprocessing"] = {"resolution": 224, "interpolation": "bilinear", "mean": [0.5] * 3,
                                      "std": [0.5] * 3, "la_over_white": views > 1}
        return cfg, extra

    def source_info(self, src: Path) -> dict[str, Any]:
        return {"license": LICENSE, "paper": PAPER}

    def keymap(self, config: Any) -> KeyMap:
        c = config if isinstance(config, WaLaConfig) else WaLaConfig(**config)
        with torch.device("meta"), _skip_init():
            native = list(build(c).state_dict())
        rules = [rename(published_key(k), k) for k in native]
        drops = [Drop(p, "derived wavelet filters (regenerated from PyWavelets)") for p in _FILTER_KEYS]
        drops.append(Drop("clip_model.dinov2.mask_token", "unused at inference"))
        if not c.camera_rows:
            drops.append(Drop("network.camera_emb.weight", "the model never adds it (use_camera_index off)"))
        if not c.time_condition:
            drops += [Drop(f"network.unet.global_proj.{p}", "unused (add_condition_time_ch off)") for p in _GLOBAL_KEYS]
        return KeyMap(rules, drops)


_FILTER_KEYS = [f"{where}{module}.{f}_{axis}" for where in ("", "autoencoder.")
                for module, fs in (("dwt_inverse_3d", ("g0", "g1")), ("dwt_sparse_composer", ("h0", "h1", "g0", "g1")))
                for f in fs for axis in ("dep", "col", "row")]
_GLOBAL_KEYS = [f"{layer}.{p}" for layer in ("proj_layer.0", "proj_layer.1", "proj_layer.3", "proj_layer.4", "mlp.0",
                                             "mlp.2") for p in ("weight", "bias")]


class WaLaEMAFormat(WaLaFormat):
    name = "wala-ema"
    description = "WaLa Lightning checkpoint: the EMA weights (state_dict_ema); pass --format wala-ema"
    entry = "state_dict_ema"

    def detect(self, src: Path) -> bool:
        return False  # chosen by name only: the published inference uses state_dict


FORMATS = [WaLaFormat(), WaLaEMAFormat()]
