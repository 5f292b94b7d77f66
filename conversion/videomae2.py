"""VideoMAE V2 in its published layouts: the official .pth files, the custom-code hub repos, transformers' VideoMAE.

Same backbone everywhere; the layouts differ in names, nesting and norm epsilons:
- official (OpenGVLab/VideoMAEv2, mirrored on the Hub as OpenGVLab/VideoMAE2): a DeepSpeed/torch .pth with the
  weights under 'module' or 'model'; fine-tuned/distilled keys are bare (patch_embed.*, blocks.*, fc_norm, head),
  pre-training files hold encoder.* (with a final encoder.norm) and decoder.* (dropped: inference only).
  No config inside: widths and depth come from the shapes, heads from the published width table,
  16 frames x 224 x 224 as every release; LayerNorm eps 1e-6 everywhere.
- hub custom code (OpenGVLab/VideoMAEv2-Base/-Large/-Huge/-giant): the official ViT nested as `model.`, with the
  official kwargs in config.json["model_config"].
- transformers VideoMAE: q/k/v projections (no key bias), layer_norm_eps from config.json (the library default is
  1e-12), and a classifier fc_norm that always uses LayerNorm's default 1e-5.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from zoo.architectures.videomae2 import HEADS_BY_DIM, PREPROCESSING, VideoMAEv2Config
from zoo.conversion.base import Format, read_json
from zoo.conversion.hf_decoder import TransformersFormat
from zoo.conversion.rules import Drop, KeyMap, Rule, rename
from zoo.conversion.sources import TensorSource
from zoo.conversion.swinv2 import concat, id2label, keys_of, source, weight_file_or_dir
from zoo.weights.format import CheckpointError

BLOCK = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
         "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
         "mlp.fc2.bias")
TOP = ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias", "fc_norm.weight",
       "fc_norm.bias", "head.weight", "head.bias")
OFFICIAL_PREFIXES = ("", "module.", "encoder.", "backbone.")  # what the official loader strips
KINETICS = {400: "kinetics-400", 600: "kinetics-600", 700: "kinetics-700", 710: "kinetics-710"}


def kinetics_labels(n: int) -> list[str] | None:
    from zoo.labels import label_set

    return label_set(KINETICS[n]) if n in KINETICS else None


def official_rules(prefix: str) -> list[Rule]:
    return [rename(prefix + k, k) for k in TOP] + [rename(f"{prefix}blocks.{{i}}.{k}", f"blocks.{{i}}.{k}")
                                                   for k in BLOCK]


def pretrain_decoder_drops() -> list[Drop]:
    why = "pre-training decoder (masked reconstruction only)"
    drops = [Drop(f"decoder.blocks.{{i}}.{k}", why) for k in BLOCK]
    drops += [Drop(f"decoder.{k}", why) for k in ("norm.weight", "norm.bias", "head.weight", "head.bias")]
    return drops + [Drop("encoder_to_decoder.weight", why), Drop("mask_token", why)]


def geometry(t: TensorSource, where: Path, prefix: str) -> dict[str, Any]:
    """Config fields from the official tensor names and shapes."""
    keys = set(t.keys())
    dim, in_chans, tubelet, patch, _ = t.meta(prefix + "patch_embed.proj.weight").shape
    depth = len({m.group(1) for k in keys if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k))})
    if dim not in HEADS_BY_DIM:
        raise CheckpointError(f"{where}: width {dim} is no published VideoMAE V2 size "
                              f"({', '.join(map(str, HEADS_BY_DIM))}); its head count is unknown")
    head = prefix + "head.weight"
    final = "fc_norm" if prefix + "fc_norm.weight" in keys else "norm" if prefix + "norm.weight" in keys else "none"
    return dict(patch_size=int(patch), tubelet_size=int(tubelet), in_chans=int(in_chans), embed_dim=int(dim),
                depth=depth, num_heads=HEADS_BY_DIM[dim], mlp_hidden=int(t.meta(prefix + "blocks.0.mlp.fc1.weight")
                                                                         .shape[0]),
                qkv_bias=prefix + "blocks.0.attn.q_bias" in keys, final_norm=final,
                num_classes=int(t.meta(head).shape[0]) if head in keys else 0)


class OfficialVideoMAEv2(Format):
    name = "videomae2-official"
    family = "videomae2"
    description = "OpenGVLab/VideoMAEv2 .pth (fine-tuned, distilled or pre-training; under 'module' or 'model')"
    copy_files = ()

    def prefix(self, src: Path) -> str | None:
        keys = keys_of(src)
        for p in OFFICIAL_PREFIXES:
            if p + "patch_embed.proj.weight" in keys and p + "blocks.0.attn.qkv.weight" in keys:
                if len(source(src).meta(p + "patch_embed.proj.weight").shape) == 5:  # Conv3d: a video ViT
                    return p
        return None

    def detect(self, src: Path) -> bool:
        return weight_file_or_dir(src) and self.prefix(src) is not None

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        source(src)  # a file that cannot be read (or is refused) says why here, not "no tensors"
        prefix = self.prefix(src)
        if prefix is None:
            raise CheckpointError(f"{src}: no VideoMAE V2 tensors (patch_embed.proj.weight as a Conv3d)")
        fields = geometry(source(src), src, prefix)
        fields.update(img_size=224, num_frames=16)  # every published model
        extra: dict[str, Any] = dict(PREPROCESSING)
        labels = kinetics_labels(fields["num_classes"])
        if labels:
            extra["labels"] = labels
        return fields, extra

    def open(self, src: Path) -> TensorSource:
        return source(src)

    def keymap(self, config: VideoMAEv2Config) -> KeyMap:
        rules = [r for p in OFFICIAL_PREFIXES for r in official_rules(p)]
        return KeyMap(rules, pretrain_decoder_drops())


class HubVideoMAEv2(Format):
    name = "videomae2-hub"
    family = "videomae2"
    description = "OpenGVLab/VideoMAEv2-{Base,Large,Huge,giant} (custom code: config.json model_config, model.*)"
    copy_files = ("preprocessor_config.json",)

    def detect(self, src: Path) -> bool:
        if not (src.is_dir() and (src / "config.json").is_file()):
            return False
        cfg = read_json(src / "config.json")
        return isinstance(cfg.get("model_config"), dict) and (
            "videomaev2" in str(cfg.get("model_type", "")).lower() or "VideoMAEv2" in str(cfg.get("auto_map", "")))

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        mc = read_json(src / "config.json")["model_config"]
        where = src / "config.json"
        for key, ok in (("init_values", 0), ("use_learnable_pos_emb", False), ("cos_attn", False)):
            if mc.get(key, ok) not in (ok, None, 0.0):
                raise CheckpointError(f"{where}: model_config.{key}={mc[key]} is not supported (no released model "
                                      "uses it)")
        if not mc.get("use_mean_pooling", True):
            raise CheckpointError(f"{where}: use_mean_pooling=false (token-0 pooling) is not supported")
        dim = mc.get("embed_dim", 768)
        eps = mc.get("layer_norm_eps", 1e-6)
        fields = dict(img_size=mc.get("img_size", 224), patch_size=mc.get("patch_size", 16),
                      num_frames=mc.get("num_frames", mc.get("all_frames", 16)), tubelet_size=mc.get("tubelet_size", 2),
                      in_chans=mc.get("in_chans", 3), embed_dim=dim, depth=mc.get("depth", 12),
                      num_heads=mc.get("num_heads", 12), mlp_hidden=int(dim * mc.get("mlp_ratio", 4.0)),
                      qkv_bias=bool(mc.get("qkv_bias", True)), num_classes=mc.get("num_classes", 0),
                      final_norm="fc_norm", norm_eps=eps, fc_norm_eps=eps)
        return fields, video_preprocessing(src, fields)

    def keymap(self, config: VideoMAEv2Config) -> KeyMap:
        return KeyMap(official_rules("model."), [])


def video_preprocessing(src: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """transformers' VideoMAEImageProcessor config (short side, crop, resample, mean/std) if present, else the
    published eval pipeline at the model's own size and clip length."""
    extra = {**PREPROCESSING, "resolution": fields["img_size"], "short_side": fields["img_size"],
             "num_frames": fields["num_frames"]}
    path = src / "preprocessor_config.json"
    if path.is_file():
        p = read_json(path)
        size, crop = p.get("size") or {}, p.get("crop_size") or {}
        if "shortest_edge" in size:
            extra["short_side"] = size["shortest_edge"]
        if "height" in crop:
            extra["resolution"] = crop["height"]
        extra["interpolation"] = {2: "bilinear", 3: "bicubic"}.get(p.get("resample", 2), "bilinear")
        extra["mean"], extra["std"] = list(p.get("image_mean", extra["mean"])), list(p.get("image_std", extra["std"]))
    return extra


HF_BLOCK = {
    "attention.attention.q_bias": "attn.q_bias",  # transformers < 5 saved these names
    "attention.attention.v_bias": "attn.v_bias",
    "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.value.bias": "attn.v_bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
}


class HFVideoMAE(TransformersFormat):
    name = "hf-videomae"
    family = "videomae2"
    description = "transformers VideoMAEForVideoClassification / VideoMAEModel / VideoMAEForPreTraining (encoder)"
    copy_files = ("preprocessor_config.json",)
    model_type = "videomae"
    exports_as = None

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = read_json(src / "config.json")
        keys = set(source(src).keys())
        mean_pool = cfg.get("use_mean_pooling", True)
        n = int(source(src).meta("classifier.weight").shape[0]) if "classifier.weight" in keys else 0
        if n and not mean_pool:
            raise CheckpointError(f"{src / 'config.json'}: a classifier on token 0 (use_mean_pooling=false) is not "
                                  "VideoMAE V2's head; not supported")
        final = "fc_norm" if "fc_norm.weight" in keys else "norm" if not mean_pool else "none"
        eps = cfg.get("layer_norm_eps", 1e-12)  # transformers' default, which VideoMAE V2 configs must override
        fields = dict(img_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 16),
                      num_frames=cfg.get("num_frames", 16), tubelet_size=cfg.get("tubelet_size", 2),
                      in_chans=cfg.get("num_channels", 3), embed_dim=cfg.get("hidden_size", 768),
                      depth=cfg.get("num_hidden_layers", 12), num_heads=cfg.get("num_attention_heads", 12),
                      mlp_hidden=cfg.get("intermediate_size", 3072),
                      qkv_bias=bool(cfg.get("qv_bias", cfg.get("qkv_bias", True))), num_classes=n,
                      final_norm=final, norm_eps=eps, fc_norm_eps=1e-5)  # fc_norm: nn.LayerNorm default in transformers
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{src / 'config.json'}: hidden_act {cfg['hidden_act']!r} is not supported")
        extra = video_preprocessing(src, fields)
        labels = id2label(cfg, n) or kinetics_labels(n)
        if labels:
            extra["labels"] = labels
        return fields, extra

    def keymap(self, config: VideoMAEv2Config) -> KeyMap:
        rules = [rename("fc_norm.weight", "fc_norm.weight"), rename("fc_norm.bias", "fc_norm.bias"),
                 rename("classifier.weight", "head.weight"), rename("classifier.bias", "head.bias")]
        drops = [Drop("encoder_to_decoder.weight", "pre-training decoder"), Drop("mask_token", "pre-training decoder"),
                 Drop("decoder.norm.weight", "pre-training decoder"), Drop("decoder.norm.bias", "pre-training decoder"),
                 Drop("decoder.head.weight", "pre-training decoder"), Drop("decoder.head.bias", "pre-training decoder")]
        dec = "decoder.decoder_layers.{i}."
        drops += [Drop(dec + k, "pre-training decoder") for k in HF_BLOCK]
        drops += [Drop(dec + f"attention.attention.{n}.weight", "pre-training decoder")
                  for n in ("query", "key", "value")]
        for p in ("videomae.", ""):  # the classification / pre-training wrappers nest the encoder
            layer = f"{p}encoder.layer.{{i}}."
            rules += [
                rename(f"{p}embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
                rename(f"{p}embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
                rename(f"{p}layernorm.weight", "norm.weight"),
                rename(f"{p}layernorm.bias", "norm.bias"),
                concat([layer + f"attention.attention.{n}.weight" for n in ("query", "key", "value")],
                       "blocks.{i}.attn.qkv.weight"),
            ]
            rules += [rename(layer + s, "blocks.{i}." + d) for s, d in HF_BLOCK.items()]
        return KeyMap(rules, drops)


FORMATS = [OfficialVideoMAEv2(), HubVideoMAEv2(), HFVideoMAE()]
