"""What transformers' decoder-only layouts share: detection by config.json, the common config fields,
the Llama-style tensor names, and generation facts. Each family's converter adds only what differs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.conversion.base import Format, read_json
from zoo.conversion.rules import Drop, Rule, rename
from zoo.weights.format import CheckpointError, NativeConfig


class TransformersFormat(Format):
    """A repo saved by transformers: recognised by config.json's model_type or architectures."""

    model_type: str = ""
    architecture: str = ""
    exports_as = "hf"

    def detect(self, src: Path) -> bool:
        if not (src.is_dir() and (src / "config.json").is_file()):
            return False
        data = read_json(src / "config.json")
        return data.get("model_type") == self.model_type or self.architecture in data.get("architectures", [])


DEFAULT_THETA = 10_000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta (Qwen2, Qwen2-MoE, Phi3)


def rope_parameters(cfg: dict[str, Any], default_theta: float = DEFAULT_THETA) -> dict[str, Any]:
    """The rotary parameters transformers builds the model with (convert_rope_params_to_dict, one global dict):
    a legacy `rope_scaling` replaces `rope_parameters` whole; rope_theta is the dict's own, else the top-level
    key, else the class default; partial_rotary_factor likewise; a legacy "type" names the rope_type."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", default_theta))
    if cfg.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_theta(cfg: dict[str, Any], default: float = DEFAULT_THETA) -> float:
    return float(rope_parameters(cfg, default)["rope_theta"])


def decoder_fields(cfg: dict[str, Any], where: Path, norm_eps: float, max_seq_len: int,
                   plain_rope: bool = True, kv_heads: int | None = None) -> dict[str, Any]:
    """The fields every decoder config has, in zoo's names (defaults are the family's published ones).

    kv_heads: the family's transformers config class default for num_key_value_heads (None: the query heads).
    Refuses what the shared decoder does not implement: another activation than SiLU, sliding-window
    attention, and (unless the family maps it itself, plain_rope=False) any rope scaling.
    """
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
    rope_type = rope_parameters(cfg)["rope_type"]
    if plain_rope and rope_type != "default":
        raise CheckpointError(f"{where}: rope scaling ({cfg.get('rope_scaling') or rope_type}) is not supported yet")
    n_heads = cfg["num_attention_heads"]
    return dict(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        # absent: the config class's default (Qwen2 32, Qwen2-MoE 16, Phi3 None); None: the query heads
        n_kv_heads=cfg.get("num_key_value_heads", kv_heads) or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        norm_eps=cfg.get("rms_norm_eps", norm_eps),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=cfg.get("max_position_embeddings", max_seq_len),
    )


def decoder_export_fields(native: NativeConfig, c: Any, model_type: str, architecture: str) -> dict[str, Any]:
    """decoder_fields read backwards, plus the token ids and dtype transformers' config carries."""
    eos = native.extra.get("eos_token_id") or []
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "max_position_embeddings": c.max_seq_len,
        "attention_dropout": 0.0,
        "bos_token_id": native.extra.get("bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": native.dtype,
    }


def generation_extra(src: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    gen = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    return {
        "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id")),
        "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
        "generation": {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p") if k in gen},
    }


def decoder_rules(prefix: str = "model.", attn_bias: bool = True, lm_head: bool = True) -> list[Rule]:
    """transformers' Llama-style names <-> ours: embedding, norms, separate q/k/v/o, output head."""
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


def derived_drops(tied: bool, prefix: str = "model.") -> list[Drop]:
    """Buffers some saved checkpoints carry, and the copy of the embedding a tied one may still hold."""
    drops = [Drop(f"{prefix}layers.{{i}}.self_attn.rotary_emb.inv_freq", "derived")]
    return drops + ([Drop("lm_head.weight", "tied to the embedding")] if tied else [])
