"""transformers' Phi3ForCausalLM layout (model_type "phi3"): microsoft/phi-4, Phi-4-reasoning(-plus), Phi-4-mini-*.

The published attention has one fused `qkv_proj` whose rows are [Q (n_heads*hd) | K (n_kv*hd) | V (n_kv*hd)]
in contiguous blocks, and one fused `gate_up_proj` whose rows are [gate (I) | up (I)]; SiLU goes on gate.
They are split into the native q/k/v and gate/up projections, and concatenated back on export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.architectures.phi4 import Phi4Config
from zoo.conversion.base import read_json
from zoo.conversion.hf_decoder import (
    TransformersFormat,
    decoder_export_fields,
    decoder_fields,
    derived_drops,
    generation_extra,
    rope_parameters,
)
from zoo.conversion.rules import KeyMap, Rule, rename, split
from zoo.weights.format import CheckpointError, NativeConfig

# old Phi-3 configs say "su" / "yarn"; transformers reads both as longrope
LONGROPE_ALIASES = ("longrope", "su", "yarn")


def rope_fields(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """Rotary settings from a published config (top-level rope_theta + rope_scaling) or a transformers 5 one
    (everything folded into rope_parameters), resolved as transformers resolves them."""
    merged = rope_parameters(cfg)
    merged.setdefault("partial_rotary_factor", 1.0)  # Phi3Config's own default
    kind = merged["rope_type"]
    if kind in LONGROPE_ALIASES:
        kind = "longrope"
    elif kind != "default":
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported for Phi3 (default, longrope)")
    out: dict[str, Any] = dict(
        rope_theta=float(merged["rope_theta"]),
        partial_rotary_factor=float(merged["partial_rotary_factor"]),
        rope_type=kind,
        # standardize_rope_params puts Phi3Config's own field (default 4096) into the rope dict, over the dict's
        original_max_seq_len=int(cfg.get("original_max_position_embeddings") or 4096),
    )
    if kind == "longrope":
        for name in ("short_factor", "long_factor"):
            if not isinstance(merged.get(name), list):
                raise CheckpointError(f"{where}: longrope rope_scaling needs a {name} list")
            out[name] = [float(x) for x in merged[name]]
        out["rope_factor"] = merged.get("factor")
        out["rope_attention_factor"] = merged.get("attention_factor")
    return out


class HFPhi3(TransformersFormat):
    name = "hf-phi3"
    family = "phi4"
    description = "transformers Phi3ForCausalLM (microsoft/phi-4, Phi-4-reasoning, Phi-4-mini-* on the Hub)"
    model_type = "phi3"
    architecture = "Phi3ForCausalLM"

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        where = src / "config.json"
        cfg = read_json(where)
        fields = decoder_fields(cfg, where, norm_eps=1e-5, max_seq_len=4096, plain_rope=False)  # LongRoPE: below
        fields.update(intermediate_size=cfg["intermediate_size"], sliding_window=cfg.get("sliding_window"),
                      **rope_fields(cfg, where))
        return fields, {**generation_extra(src, cfg), "pad_token_id": cfg.get("pad_token_id")}

    def keymap(self, c: Phi4Config) -> KeyMap:
        q, kv, i = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate_size
        layer = "model.layers.{i}."
        rules: list[Rule] = [
            rename("model.embed_tokens.weight", "embed.weight"),
            rename("model.norm.weight", "norm.weight"),
            rename(layer + "input_layernorm.weight", "layers.{i}.attn_norm.weight"),
            rename(layer + "post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
            split(layer + "self_attn.qkv_proj.weight",
                  [f"layers.{{i}}.attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")], [q, kv, kv],
                  doc="rows [Q | K | V], contiguous blocks"),
            rename(layer + "self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
            split(layer + "mlp.gate_up_proj.weight",
                  ["layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"], [i, i],
                  doc="rows [gate | up]; SiLU on gate"),
            rename(layer + "mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
        ]
        if not c.tie_embeddings:
            rules.append(rename("lm_head.weight", "lm_head.weight"))
        return KeyMap(rules, derived_drops(c.tie_embeddings))

    def export_config(self, native: NativeConfig, c: Phi4Config) -> dict[str, Any]:
        out = decoder_export_fields(native, c, "phi3", "Phi3ForCausalLM")
        out.update(
            intermediate_size=c.intermediate_size,
            rope_theta=c.rope_theta,
            partial_rotary_factor=c.partial_rotary_factor,
            original_max_position_embeddings=c.original_max_seq_len,
            rope_scaling=None,
            sliding_window=c.sliding_window,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            pad_token_id=native.extra.get("pad_token_id"),
        )
        if c.rope_type == "longrope":
            scaling: dict[str, Any] = {"type": "longrope", "short_factor": c.short_factor, "long_factor": c.long_factor}
            if c.rope_factor is not None:
                scaling["factor"] = c.rope_factor
            if c.rope_attention_factor is not None:
                scaling["attention_factor"] = c.rope_attention_factor
            out["rope_scaling"] = scaling
        return out


FORMATS = [HFPhi3()]
