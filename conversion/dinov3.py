"""DINOv3 ViT in its three published layouts: Meta's official .pth, timm's vit_*_patch16_dinov3*, transformers'
DINOv3ViTModel.

- official (dl.fbaipublicfiles.com/dinov3/..., loaded by dinov3/hub/backbones.py): a raw state dict with no
  config. Sizes come from the shapes: width from cls_token, depth from the block count, head dim from the RoPE
  periods buffer (4 x its length), FFN kind and width from mlp.fc1 (MLP) or mlp.w1 (SwiGLU). Derived buffers are
  checked and dropped: `rope_embed.periods` (must be base^(2k/(head_dim/2)); the released files hold them rounded
  to bfloat16, recorded as rope_periods="bfloat16" so the numbers stay the official ones) and
  `blocks.*.attn.qkv.bias_mask` (must be 1 for q, 0 for k, 1 for v: the stored key bias is masked out, so it is
  dropped). `mask_token` (masked-image pre-training) and `local_cls_norm.*` (local crops, training only) are
  dropped too.
- timm (timm/vit_*_patch16_dinov3[_qkvb].{lvd1689m,sat493m}: model.safetensors + config.json): reg_token,
  gamma_1/gamma_2, q_bias/v_bias (the `_qkvb` variants), SwiGLU as fc1_g (gate) / fc1_x (up) / fc2 (down). Heads
  from config.json model_args, else the published width table.
- transformers (facebook/dinov3-*-pretrain-*: DINOv3ViTModel): separate q/k/v projections (no key bias),
  layer_scale{1,2}.lambda1, up/down (+gate) projections; `layer.{i}` in the files (`model.layer.{i}` in memory).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from zoo.architectures.dinov3 import (
    HEADS_BY_DIM,
    LICENSE,
    LICENSE_URL,
    DINOv3Config,
    preprocessing,
    rope_periods,
)
from zoo.conversion.base import Format, read_json
from zoo.conversion.hf_decoder import TransformersFormat
from zoo.conversion.rules import Drop, KeyMap, Rule, rename
from zoo.conversion.sources import TensorSource
from zoo.conversion.swinv2 import concat, hf_preprocessing, keys_of, source, timm_config, weight_file_or_dir
from zoo.weights.format import CheckpointError

# native block parameters that are named alike in the official layout
SHARED_BLOCK = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                "norm2.weight", "norm2.bias")
MLP = {"mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.weight": "mlp.fc2.weight",
       "mlp.fc2.bias": "mlp.fc2.bias"}
OFFICIAL_SWIGLU = {"mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w1.bias": "mlp.gate_proj.bias",
                   "mlp.w2.weight": "mlp.up_proj.weight", "mlp.w2.bias": "mlp.up_proj.bias",
                   "mlp.w3.weight": "mlp.down_proj.weight", "mlp.w3.bias": "mlp.down_proj.bias"}
TIMM_SWIGLU = {"mlp.fc1_g.weight": "mlp.gate_proj.weight", "mlp.fc1_g.bias": "mlp.gate_proj.bias",
               "mlp.fc1_x.weight": "mlp.up_proj.weight", "mlp.fc1_x.bias": "mlp.up_proj.bias",
               "mlp.fc2.weight": "mlp.down_proj.weight", "mlp.fc2.bias": "mlp.down_proj.bias"}
OFFICIAL_PREFIXES = ("", "backbone.")


def block_count(keys: set[str], prefix: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k))})


def q_and_v_of_qkv_bias(dim: int, src: str, q: str, v: str) -> Rule:
    """The official fused [q, k, v] bias -> query and value biases; the key part is masked out in the model."""
    def forward(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        if ts[0].shape != (3 * dim,):
            raise ValueError(f"expected a [{3 * dim}] q/k/v bias, got shape {tuple(ts[0].shape)}")
        return [ts[0][:dim].contiguous(), ts[0][2 * dim:].contiguous()]

    return Rule((src,), (q, v), forward=forward, doc="drop the masked key bias")


def official_rules(src: str, dst: str, config: DINOv3Config) -> list[Rule]:
    """Official names under prefix `src` -> native DINOv3 names under prefix `dst`."""
    top = {"cls_token": "cls_token", "storage_tokens": "register_tokens", "patch_embed.proj.weight":
           "patch_embed.proj.weight", "patch_embed.proj.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight",
           "norm.bias": "norm.bias"}
    block = {k: k for k in SHARED_BLOCK}
    block.update({"ls1.gamma": "ls1.gamma", "ls2.gamma": "ls2.gamma"})
    block.update(MLP if config.ffn == "mlp" else OFFICIAL_SWIGLU)
    rules = [rename(src + s, dst + d) for s, d in top.items()]
    rules += [rename(f"{src}blocks.{{i}}.{s}", f"{dst}blocks.{{i}}.{d}") for s, d in block.items()]
    rules.append(q_and_v_of_qkv_bias(config.embed_dim, f"{src}blocks.{{i}}.attn.qkv.bias",
                                     f"{dst}blocks.{{i}}.attn.q_bias", f"{dst}blocks.{{i}}.attn.v_bias"))
    return rules


def official_drops(src: str) -> list[Drop]:
    return [Drop(f"{src}rope_embed.periods", "derived: RoPE periods are computed from the config"),
            Drop(f"{src}blocks.{{i}}.attn.qkv.bias_mask", "derived: the key-bias mask (1, 0, 1), checked"),
            Drop(f"{src}mask_token", "masked-image pre-training only"),
            Drop(f"{src}local_cls_norm.weight", "local-crop class norm: pre-training only"),
            Drop(f"{src}local_cls_norm.bias", "local-crop class norm: pre-training only")]


def official_fields(t: TensorSource, where: Path | str, prefix: str = "") -> dict[str, Any]:
    """DINOv3Config fields read from an official state dict's names, shapes and derived buffers (which are
    checked against what the config regenerates)."""
    keys = set(t.keys())
    for need in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        if prefix + need not in keys:
            raise CheckpointError(f"{where}: missing tensor {prefix + need}")
    if prefix + "cls_norm.weight" in keys:
        raise CheckpointError(f"{where}: tensor {prefix}cls_norm.weight: untied class/patch norms are not in any "
                              "released DINOv3 and not supported")
    dim, in_chans, patch, _ = t.meta(prefix + "patch_embed.proj.weight").shape
    depth = block_count(keys, prefix)
    periods_key = prefix + "rope_embed.periods"
    if periods_key in keys:
        periods = t.get(periods_key).float()
        head_dim = 4 * periods.numel()
    elif dim in HEADS_BY_DIM:
        periods, head_dim = None, dim // HEADS_BY_DIM[dim]
    else:
        raise CheckpointError(f"{where}: no {periods_key} and width {dim} is no published size; head count unknown")
    if dim % head_dim:
        raise CheckpointError(f"{where}: {periods_key} gives head dim {head_dim}, which does not divide width {dim}")
    fields: dict[str, Any] = dict(patch_size=int(patch), in_chans=int(in_chans), embed_dim=int(dim), depth=depth,
                                  num_heads=int(dim // head_dim), rope_base=100.0, rope_periods="float32")
    if periods is not None:
        fields.update(periods_kind(periods, head_dim, f"{where}: tensor {periods_key}"))
    if prefix + "blocks.0.mlp.fc1.weight" in keys:
        fields.update(ffn="mlp", ffn_hidden=int(t.meta(prefix + "blocks.0.mlp.fc1.weight").shape[0]))
    elif prefix + "blocks.0.mlp.w1.weight" in keys:
        fields.update(ffn="swiglu", ffn_hidden=int(t.meta(prefix + "blocks.0.mlp.w1.weight").shape[0]))
    else:
        raise CheckpointError(f"{where}: missing tensor {prefix}blocks.0.mlp.fc1.weight (or mlp.w1.weight)")
    fields["qkv_bias"] = prefix + "blocks.0.attn.qkv.bias" in keys
    fields["proj_bias"] = prefix + "blocks.0.attn.proj.bias" in keys
    fields["layerscale"] = prefix + "blocks.0.ls1.gamma" in keys
    reg = prefix + "storage_tokens"
    fields["num_register_tokens"] = int(t.meta(reg).shape[1]) if reg in keys else 0
    if fields["qkv_bias"]:
        for i in range(depth):
            check_key_bias(t, f"{prefix}blocks.{i}.attn.qkv", int(dim), where)
    return fields


def periods_kind(periods: torch.Tensor, head_dim: int, what: str) -> dict[str, Any]:
    """Which base and rounding regenerate a stored periods buffer (float32, or rounded to bfloat16 as released)."""
    n = periods.numel()
    if n != head_dim // 4 or float(periods[0]) != 1.0:
        raise CheckpointError(f"{what}: {periods.tolist()[:4]}... are not base^(2k/(head_dim/2)) periods")
    estimate = float(periods[-1].double() ** (n / (n - 1))) if n > 1 else 100.0  # periods[-1] = base^((n-1)/n)
    for base in dict.fromkeys((100.0, float(round(estimate)), estimate)):
        for kind in ("float32", "bfloat16"):
            if torch.allclose(rope_periods(head_dim, base, kind), periods, rtol=1e-6, atol=0):
                return {"rope_base": base, "rope_periods": kind}
    raise CheckpointError(f"{what}: the periods are not base^(2k/(head_dim/2)) (base ~{estimate:.4g}) in float32 "
                          "or bfloat16 (min/max-period RoPE is in no released DINOv3)")


def check_key_bias(t: TensorSource, qkv: str, dim: int, where: Path | str) -> None:
    """The released mask is 1 (q), 0 (k), 1 (v): the model has no key bias. Anything else changes the numbers."""
    mask_key = qkv + ".bias_mask"
    if mask_key in t:
        mask = t.get(mask_key).float()
        expect = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        if mask.shape != expect.shape or not torch.equal(mask, expect):
            raise CheckpointError(f"{where}: tensor {mask_key} is not the released key-bias mask (1 for q, 0 for k, "
                                  "1 for v; NaN means the model was never initialised)")
    else:
        k_bias = t.get(qkv + ".bias")[dim:2 * dim]
        if k_bias.abs().max() > 0:
            raise CheckpointError(f"{where}: tensor {qkv}.bias has a non-zero key bias and no bias_mask; DINOv3 "
                                  "masks the key bias out, this checkpoint would compute something else")


def official_prefix(keys: set[str]) -> str | None:
    for p in OFFICIAL_PREFIXES:
        if p + "blocks.0.attn.qkv.weight" in keys and p + "cls_token" in keys and (
                p + "rope_embed.periods" in keys or p + "storage_tokens" in keys):
            return p
    return None


def data_of(name: str) -> str:
    return "sat493m" if "sat493m" in name.lower() else "lvd1689m"


def dinov3_source_info(src: Path) -> dict[str, Any]:
    """What every DINOv3 conversion records about the weights: Meta's license and the paper."""
    return {"license": LICENSE, "license_url": LICENSE_URL, "paper": "https://arxiv.org/abs/2508.10104"}


class OfficialDINOv3(Format):
    name = "dinov3-official"
    family = "dinov3"
    description = "facebookresearch/dinov3 release .pth (dinov3_vit*16_pretrain_*.pth: a raw state dict)"
    copy_files = ()

    def detect(self, src: Path) -> bool:
        if src.is_dir() and (any(src.glob("checkpoint_*.pth")) or any(src.glob("fold_*/checkpoint_*.pth"))):
            return False  # an nnU-Net result folder (Dino U-Net) that also holds its backbone .pth
        return weight_file_or_dir(src) and official_prefix(keys_of(src)) is not None

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        t = source(src)
        prefix = official_prefix(set(t.keys()))
        if prefix is None:
            raise CheckpointError(f"{src}: no DINOv3 tensors (cls_token, storage_tokens, blocks.0.attn.qkv.weight)")
        return official_fields(t, src, prefix), preprocessing(data_of(str(src)))

    def open(self, src: Path) -> TensorSource:
        return source(src)

    def source_info(self, src: Path) -> dict[str, Any]:
        return dinov3_source_info(src)

    def keymap(self, config: DINOv3Config) -> KeyMap:
        rules = [r for p in OFFICIAL_PREFIXES for r in official_rules(p, "", config)]
        return KeyMap(rules, [d for p in OFFICIAL_PREFIXES for d in official_drops(p)])


# -- timm -----------------------------------------------------------------------------------------------------------


class TimmDINOv3(Format):
    name = "timm-dinov3"
    family = "dinov3"
    description = "timm vit_*_patch16_dinov3[_qkvb] (timm/vit_*_dinov3*.lvd1689m on the Hub: safetensors + config)"
    copy_files = ()

    def detect(self, src: Path) -> bool:
        arch = str(timm_config(src).get("architecture", ""))
        if arch:
            return "_dinov3" in arch
        if not weight_file_or_dir(src):
            return False
        keys = keys_of(src)
        return {"reg_token", "blocks.0.gamma_1", "blocks.0.attn.qkv.weight"} <= keys and "pos_embed" not in keys

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = timm_config(src)
        args = cfg.get("model_args") or {}
        t = source(src)
        keys = set(t.keys())
        where = src
        if "patch_embed.proj.weight" not in keys:
            raise CheckpointError(f"{where}: missing tensor patch_embed.proj.weight")
        dim, in_chans, patch, _ = t.meta("patch_embed.proj.weight").shape
        heads = args.get("num_heads") or HEADS_BY_DIM.get(int(dim))
        if not heads:
            raise CheckpointError(f"{where}: width {dim} is no published DINOv3 size and config.json has no "
                                  "model_args.num_heads")
        swiglu = "blocks.0.mlp.fc1_g.weight" in keys
        hidden = t.meta("blocks.0.mlp.fc1_g.weight" if swiglu else "blocks.0.mlp.fc1.weight").shape[0]
        if "head.weight" in keys:
            raise CheckpointError(f"{where}: tensor head.weight: a classifier on DINOv3 is not a published model")
        fields = dict(patch_size=int(patch), in_chans=int(in_chans), embed_dim=int(dim), depth=block_count(keys, ""),
                      num_heads=int(heads), ffn="swiglu" if swiglu else "mlp", ffn_hidden=int(hidden),
                      qkv_bias="blocks.0.attn.q_bias" in keys, proj_bias="blocks.0.attn.proj.bias" in keys,
                      num_register_tokens=int(t.meta("reg_token").shape[1]) if "reg_token" in keys else 0,
                      layerscale="blocks.0.gamma_1" in keys, rope_base=float(args.get("rope_temperature", 100.0)),
                      rope_periods="float32")
        arch = str(cfg.get("architecture", ""))
        pcfg = cfg.get("pretrained_cfg") or {}
        extra = preprocessing(data_of(arch + str(pcfg.get("tag", ""))))
        if pcfg.get("input_size"):
            extra["resolution"] = int(pcfg["input_size"][-1])
        for k in ("crop_pct", "interpolation", "mean", "std"):
            if k in pcfg:
                extra[k] = list(pcfg[k]) if isinstance(pcfg[k], (list, tuple)) else pcfg[k]
        return fields, extra

    def open(self, src: Path) -> TensorSource:
        return source(src)

    def source_info(self, src: Path) -> dict[str, Any]:
        return dinov3_source_info(src)

    def keymap(self, config: DINOv3Config) -> KeyMap:
        top = {"cls_token": "cls_token", "reg_token": "register_tokens", "patch_embed.proj.weight":
               "patch_embed.proj.weight", "patch_embed.proj.bias": "patch_embed.proj.bias",
               "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
        block = {k: k for k in SHARED_BLOCK}
        block.update({"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma", "attn.q_bias": "attn.q_bias",
                      "attn.v_bias": "attn.v_bias"})
        block.update(MLP if config.ffn == "mlp" else TIMM_SWIGLU)
        rules = [rename(s, d) for s, d in top.items()]
        rules += [rename(f"blocks.{{i}}.{s}", f"blocks.{{i}}.{d}") for s, d in block.items()]
        return KeyMap(rules, [Drop("blocks.{i}.attn.k_bias", "timm's zero key-bias buffer"),
                              Drop("rope.periods", "derived")])


# -- transformers ---------------------------------------------------------------------------------------------------


class HFDINOv3(TransformersFormat):
    name = "hf-dinov3"
    family = "dinov3"
    description = "transformers DINOv3ViTModel / DINOv3ViTBackbone (facebook/dinov3-vit*-pretrain-* on the Hub)"
    copy_files = ("preprocessor_config.json",)
    model_type = "dinov3_vit"
    exports_as = None

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        where = src / "config.json"
        cfg = read_json(where)
        gated = bool(cfg.get("use_gated_mlp", False))
        act = cfg.get("hidden_act", "gelu")
        if act != ("silu" if gated else "gelu"):
            raise CheckpointError(f"{where}: hidden_act {act!r} with use_gated_mlp={gated} is not DINOv3's "
                                  f"({'silu' if gated else 'gelu'})")
        if cfg.get("key_bias", False):
            raise CheckpointError(f"{where}: key_bias=true; DINOv3 masks the key bias out (no release has one)")
        if cfg.get("query_bias", True) != cfg.get("value_bias", True):
            raise CheckpointError(f"{where}: query_bias and value_bias differ; DINOv3 has both or neither")
        if not cfg.get("mlp_bias", True):
            raise CheckpointError(f"{where}: mlp_bias=false is not in any released DINOv3")
        fields = dict(patch_size=cfg.get("patch_size", 16), in_chans=cfg.get("num_channels", 3),
                      embed_dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                      num_heads=cfg["num_attention_heads"], ffn="swiglu" if gated else "mlp",
                      ffn_hidden=cfg["intermediate_size"], qkv_bias=bool(cfg.get("query_bias", True)),
                      proj_bias=bool(cfg.get("proj_bias", True)),
                      num_register_tokens=cfg.get("num_register_tokens", 0), layerscale=True,
                      rope_base=float(cfg.get("rope_theta", 100.0)), rope_periods="float32",
                      norm_eps=cfg.get("layer_norm_eps", 1e-5))
        size = cfg.get("image_size", 224)
        p = src / "preprocessor_config.json"
        if p.is_file():
            s = read_json(p).get("size") or {}
            size = s.get("height", s.get("shortest_edge", size))
        extra = hf_preprocessing(src, int(size))
        if not p.is_file():
            extra.update(preprocessing(data_of(src.name)), resolution=int(size))
        return fields, extra

    def source_info(self, src: Path) -> dict[str, Any]:
        return dinov3_source_info(src)

    def keymap(self, config: DINOv3Config) -> KeyMap:
        rules: list[Rule] = [
            rename("embeddings.cls_token", "cls_token"),
            rename("embeddings.register_tokens", "register_tokens"),
            rename("embeddings.patch_embeddings.weight", "patch_embed.proj.weight"),
            rename("embeddings.patch_embeddings.bias", "patch_embed.proj.bias"),
            rename("norm.weight", "norm.weight"),
            rename("norm.bias", "norm.bias"),
        ]
        block = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
                 "norm2.bias": "norm2.bias", "attention.q_proj.bias": "attn.q_bias",
                 "attention.v_proj.bias": "attn.v_bias", "attention.o_proj.weight": "attn.proj.weight",
                 "attention.o_proj.bias": "attn.proj.bias", "layer_scale1.lambda1": "ls1.gamma",
                 "layer_scale2.lambda1": "ls2.gamma"}
        if config.ffn == "mlp":
            block.update({"mlp.up_proj.weight": "mlp.fc1.weight", "mlp.up_proj.bias": "mlp.fc1.bias",
                          "mlp.down_proj.weight": "mlp.fc2.weight", "mlp.down_proj.bias": "mlp.fc2.bias"})
        else:
            block.update({f"mlp.{n}.{w}": f"mlp.{n}.{w}" for n in ("gate_proj", "up_proj", "down_proj")
                          for w in ("weight", "bias")})
        for p in ("layer.{i}.", "model.layer.{i}."):  # files hold layer.{i}; transformers 5 names it model.layer.{i}
            rules.append(concat([f"{p}attention.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")],
                                "blocks.{i}.attn.qkv.weight"))
            rules += [rename(p + s, "blocks.{i}." + d) for s, d in block.items()]
        return KeyMap(rules, [Drop("embeddings.mask_token", "masked-image pre-training only")])


FORMATS = [OfficialDINOv3(), TimmDINOv3(), HFDINOv3()]
