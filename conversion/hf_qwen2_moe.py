"""transformers' Qwen2MoeForCausalLM layout (model_type "qwen2_moe"): Qwen/Qwen2-57B-A14B(-Instruct).

The published files keep one tensor per expert (`mlp.experts.{e}.gate_proj.weight` ...; transformers 5 fuses
them only in memory and writes them back per expert). We stack them into [E, I, H] tensors, one stacked
tensor at a time, and unstack on export. The router is published as `mlp.gate.weight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.architectures.qwen2_moe import Qwen2MoeConfig
from zoo.conversion.base import Format, read_json
from zoo.conversion.hf_qwen2 import decoder_rules, generation_extra, rope_theta
from zoo.conversion.rules import Drop, KeyMap, Rule, rename, stack
from zoo.weights.format import CheckpointError, NativeConfig


class HFQwen2Moe(Format):
    name = "hf-qwen2-moe"
    family = "qwen2_moe"
    description = "transformers Qwen2MoeForCausalLM (Qwen/Qwen2-57B-A14B on the Hub)"
    exports_as = "hf"

    def detect(self, src: Path) -> bool:
        cfg = src / "config.json" if src.is_dir() else None
        if cfg is None or not cfg.is_file():
            return False
        data = read_json(cfg)
        return data.get("model_type") == "qwen2_moe" or "Qwen2MoeForCausalLM" in data.get("architectures", [])

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        where = src / "config.json"
        cfg = read_json(where)
        if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise CheckpointError(f"{where}: rope scaling is not supported for Qwen2-MoE")
        if cfg.get("use_sliding_window"):
            raise CheckpointError(f"{where}: use_sliding_window=true is not supported for Qwen2-MoE")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
        n_heads = cfg["num_attention_heads"]
        fields = dict(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            n_experts=cfg["num_experts"],
            n_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"],
            intermediate_size=cfg.get("intermediate_size", 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            qkv_bias=bool(cfg.get("qkv_bias", True)),
            rope_theta=rope_theta(cfg, 1e6),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=cfg.get("max_position_embeddings", 32768),
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
        drops = [Drop("model.layers.{i}.self_attn.rotary_emb.inv_freq", "derived")]
        if c.tie_embeddings:
            drops.append(Drop("lm_head.weight", "tied to the embedding"))
        return KeyMap(rules, drops)

    def export_config(self, native: NativeConfig, c: Qwen2MoeConfig) -> dict[str, Any]:
        extra = native.extra
        eos = extra.get("eos_token_id") or []
        return {
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "intermediate_size": c.intermediate_size,
            "moe_intermediate_size": c.moe_intermediate_size,
            "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
            "num_experts": c.n_experts,
            "num_experts_per_tok": c.n_experts_per_tok,
            "norm_topk_prob": c.norm_topk_prob,
            "decoder_sparse_step": c.decoder_sparse_step,
            "mlp_only_layers": c.mlp_only_layers,
            "qkv_bias": c.qkv_bias,
            "hidden_act": "silu",
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.norm_eps,
            "tie_word_embeddings": c.tie_embeddings,
            "max_position_embeddings": c.max_seq_len,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": extra.get("bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "torch_dtype": native.dtype,
        }


FORMATS = [HFQwen2Moe()]
