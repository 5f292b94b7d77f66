"""transformers' Qwen2ForCausalLM layout (config.json model_type "qwen2", safetensors shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.architectures.qwen2 import Qwen2Config
from zoo.conversion.base import Format, read_json
from zoo.conversion.rules import Drop, KeyMap, Rule, rename
from zoo.weights.format import NativeConfig


def rope_theta(cfg: dict[str, Any], default: float) -> float:
    # transformers 5 folds rope_theta into rope_parameters; older configs keep it top-level
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", default)))


def generation_extra(src: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    gen = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    return {
        "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id")),
        "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
        "generation": {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p") if k in gen},
    }


def decoder_rules(prefix: str = "model.", attn_bias: bool = True, lm_head: bool = True) -> list[Rule]:
    """transformers' Llama-style decoder names <-> ours (attention and norms; the MLP is the caller's)."""
    rules = [
        rename(f"{prefix}embed_tokens.weight", "embed.weight"),
        rename(f"{prefix}norm.weight", "norm.weight"),
        rename(f"{prefix}layers.{{i}}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
        rename(f"{prefix}layers.{{i}}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
        rename(f"{prefix}layers.{{i}}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
    ]
    for p in ("q_proj", "k_proj", "v_proj"):
        rules.append(rename(f"{prefix}layers.{{i}}.self_attn.{p}.weight", f"layers.{{i}}.attn.{p}.weight"))
        if attn_bias:
            rules.append(rename(f"{prefix}layers.{{i}}.self_attn.{p}.bias", f"layers.{{i}}.attn.{p}.bias"))
    if lm_head:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    return rules


def dense_mlp_rules(prefix: str = "model.") -> list[Rule]:
    return [
        rename(f"{prefix}layers.{{i}}.mlp.{p}.weight", f"layers.{{i}}.mlp.{p}.weight")
        for p in ("gate_proj", "up_proj", "down_proj")
    ]


class HFQwen2(Format):
    name = "hf-qwen2"
    family = "qwen2"
    description = "transformers Qwen2ForCausalLM (Qwen/Qwen2-* on the Hub)"
    exports_as = "hf"

    def detect(self, src: Path) -> bool:
        cfg = src / "config.json" if src.is_dir() else None
        if cfg is None or not cfg.is_file():
            return False
        data = read_json(cfg)
        return data.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in data.get("architectures", [])

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = read_json(src / "config.json")
        if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise ValueError(f"{src / 'config.json'}: rope scaling is not supported for Qwen2 yet")
        fields = dict(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            rope_theta=rope_theta(cfg, 1e6),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=cfg.get("max_position_embeddings", 32768),
        )
        return fields, generation_extra(src, cfg)

    def keymap(self, config: Qwen2Config) -> KeyMap:
        rules = decoder_rules(lm_head=not config.tie_embeddings) + dense_mlp_rules()
        # a tied checkpoint may still carry lm_head.weight (a copy of the embedding): drop it
        drops = [Drop("lm_head.weight", "tied to the embedding")] if config.tie_embeddings else []
        return KeyMap(rules, drops + [Drop("model.layers.{i}.self_attn.rotary_emb.inv_freq", "derived")])

    def export_config(self, native: NativeConfig, c: Qwen2Config) -> dict[str, Any]:
        extra = native.extra
        eos = extra.get("eos_token_id") or []
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "intermediate_size": c.intermediate_size,
            "head_dim": c.head_dim,
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


FORMATS = [HFQwen2()]
