"""transformers' Qwen2MoeForCausalLM layout (model_type "qwen2_moe"): Qwen/Qwen2-57B-A14B(-Instruct).

The published files keep one tensor per expert (`mlp.experts.{e}.gate_proj.weight` ...; transformers 5 fuses
them only in memory and writes them back per expert). We stack them into [E, I, H] tensors, one stacked
tensor at a time, and unstack on export. The router is published as `mlp.gate.weight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.architectures.qwen2_moe import Qwen2MoeConfig
from zoo.conversion.base import read_json
from zoo.conversion.hf_decoder import (
    TransformersFormat,
    decoder_export_fields,
    decoder_fields,
    decoder_rules,
    derived_drops,
    generation_extra,
    rope_theta,
)
from zoo.conversion.rules import KeyMap, Rule, rename, stack
from zoo.weights.format import NativeConfig


class HFQwen2Moe(TransformersFormat):
    name = "hf-qwen2-moe"
    family = "qwen2_moe"
    description = "transformers Qwen2MoeForCausalLM (Qwen/Qwen2-57B-A14B on the Hub)"
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        where = src / "config.json"
        cfg = read_json(where)
        fields = decoder_fields(cfg, where, norm_eps=1e-6, max_seq_len=32768, kv_heads=16)
        fields.update(
            n_experts=cfg["num_experts"],
            n_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"],
            intermediate_size=cfg.get("intermediate_size", 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
            qkv_bias=bool(cfg.get("qkv_bias", True)),
            rope_theta=rope_theta(cfg),
        )
        return fields, generation_extra(src, cfg)

    def keymap(self, c: Qwen2MoeConfig) -> KeyMap:
        rules: list[Rule] = decoder_rules(attn_bias=c.qkv_bias, lm_head=not c.tie_embeddings)
        mlp = "model.layers.{i}.mlp."
        # Layers are dense or sparse by index; each rule only matches the keys its kind of layer has.
        projections = ("gate_proj", "up_proj", "down_proj")
        rules += [rename(f"{mlp}{p}.weight", f"layers.{{i}}.mlp.{p}.weight") for p in projections]
        rules += [
            rename(f"{mlp}gate.weight", "layers.{i}.mlp.router.weight"),
            rename(f"{mlp}shared_expert_gate.weight", "layers.{i}.mlp.shared_expert_gate.weight"),
        ]
        for p in projections:
            rules.append(rename(f"{mlp}shared_expert.{p}.weight", f"layers.{{i}}.mlp.shared_expert.{p}.weight"))
            rules.append(stack([f"{mlp}experts.{e}.{p}.weight" for e in range(c.n_experts)],
                               f"layers.{{i}}.mlp.experts.{p}", doc=f"{c.n_experts} experts stacked on dim 0"))
        return KeyMap(rules, derived_drops(c.tie_embeddings))

    def export_config(self, native: NativeConfig, c: Qwen2MoeConfig) -> dict[str, Any]:
        out = decoder_export_fields(native, c, "qwen2_moe", "Qwen2MoeForCausalLM")
        out.update(
            intermediate_size=c.intermediate_size,
            moe_intermediate_size=c.moe_intermediate_size,
            shared_expert_intermediate_size=c.shared_expert_intermediate_size,
            num_experts=c.n_experts,
            num_experts_per_tok=c.n_experts_per_tok,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=c.decoder_sparse_step,
            mlp_only_layers=c.mlp_only_layers,
            qkv_bias=c.qkv_bias,
            rope_theta=c.rope_theta,
            use_sliding_window=False,
        )
        return out


FORMATS = [HFQwen2Moe()]
