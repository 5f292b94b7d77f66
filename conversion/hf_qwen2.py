"""transformers' Qwen2ForCausalLM layout (config.json model_type "qwen2", safetensors shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.architectures.qwen2 import Qwen2Config
from zoo.conversion.base import read_json
from zoo.conversion.hf_decoder import (
    TransformersFormat,
    decoder_export_fields,
    decoder_fields,
    decoder_rules,
    dense_mlp_rules,
    derived_drops,
    generation_extra,
    rope_theta,
)
from zoo.conversion.rules import KeyMap
from zoo.weights.format import NativeConfig


class HFQwen2(TransformersFormat):
    name = "hf-qwen2"
    family = "qwen2"
    description = "transformers Qwen2ForCausalLM (Qwen/Qwen2-* on the Hub)"
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = read_json(src / "config.json")
        fields = decoder_fields(cfg, src / "config.json", norm_eps=1e-6, max_seq_len=32768, kv_heads=32)
        fields.update(intermediate_size=cfg["intermediate_size"], rope_theta=rope_theta(cfg))
        return fields, generation_extra(src, cfg)

    def keymap(self, c: Qwen2Config) -> KeyMap:
        rules = decoder_rules(lm_head=not c.tie_embeddings) + dense_mlp_rules()
        return KeyMap(rules, derived_drops(c.tie_embeddings))

    def export_config(self, native: NativeConfig, c: Qwen2Config) -> dict[str, Any]:
        out = decoder_export_fields(native, c, "qwen2", "Qwen2ForCausalLM")
        out.update(intermediate_size=c.intermediate_size, rope_theta=c.rope_theta, use_sliding_window=False)
        return out


FORMATS = [HFQwen2()]
