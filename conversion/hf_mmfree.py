"""The published MatMul-free LM layout (ridger/MMfreeLM-*: config.json model_type "hgrn_bit", safetensors with
the 16-bit latent weights, saved by transformers from mmfreelm's HGRNBitForCausalLM).

Every projection is a BitLinear with its own RMSNorm weight (`<proj>.norm.weight`); ours keeps the weight in
an inner linear layer (`<proj>.linear.weight`), which `zoo convert --quantize ternary` stores packed 2 bits per
value with its scale (`<proj>.linear.weight`, `<proj>.linear.weight_scale`). The MLP's gate and up
projections are one published tensor (`mlp.gate_proj`, [2I, D], gate first); it stays one tensor here
(`mlp.gate_up_proj`), because the ternary scale is the mean |W| of the whole matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.architectures.mmfree import LICENSE, PAPER, MMfreeConfig
from zoo.conversion.base import read_json
from zoo.conversion.hf_decoder import TransformersFormat, generation_extra
from zoo.conversion.rules import KeyMap, rename
from zoo.weights.format import CheckpointError, NativeConfig

BITLINEARS = {  # published module path under a block -> ours
    "attn.i_proj": "attn.i_proj",
    "attn.f_proj": "attn.f_proj",
    "attn.g_proj": "attn.g_proj",
    "attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate_up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


class HFMMfree(TransformersFormat):
    name = "hf-mmfree"
    family = "mmfree"
    description = "mmfreelm HGRNBitForCausalLM (ridger/MMfreeLM-* on the Hub), 16-bit latent weights"
    model_type = "hgrn_bit"
    architecture = "HGRNBitForCausalLM"

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        where = src / "config.json"
        cfg = read_json(where)
        # What the published code can switch on but no published checkpoint uses: refuse rather than run wrong.
        if cfg.get("use_short_conv"):
            raise CheckpointError(f"{where}: use_short_conv=true is not supported (no published model uses it)")
        if cfg.get("expand_ratio", 1) not in (1, None):
            raise CheckpointError(f"{where}: expand_ratio={cfg['expand_ratio']} is not supported (published: 1)")
        if cfg.get("tie_word_embeddings"):
            raise CheckpointError(f"{where}: tie_word_embeddings=true does not fit a BitLinear output head")
        # num_heads only regroups channels of an elementwise recurrence: it changes nothing and is not kept.
        fields = dict(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            intermediate_size=cfg.get("intermediate_size") or 0,
            hidden_ratio=cfg.get("hidden_ratio") or 4,
            use_lower_bound=bool(cfg.get("use_lower_bound", True)),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
        )
        return fields, generation_extra(src, cfg)

    def source_info(self, src: Path) -> dict[str, Any]:
        return {"license": LICENSE, "paper": PAPER}

    def keymap(self, c: MMfreeConfig) -> KeyMap:
        block = "model.layers.{i}."
        rules = [
            rename("model.embeddings.weight", "embed.weight"),
            rename("model.norm.weight", "norm.weight"),
            rename(block + "attn_norm.weight", "layers.{i}.attn_norm.weight"),
            rename(block + "attn.g_norm.weight", "layers.{i}.attn.g_norm.weight"),
            rename(block + "mlp_norm.weight", "layers.{i}.mlp_norm.weight"),
            rename("lm_head.weight", "lm_head.linear.weight"),
            rename("lm_head.norm.weight", "lm_head.norm.weight"),
        ]
        if c.use_lower_bound:
            rules.append(rename("model.lower_bounds", "lower_bounds"))
        for theirs, ours in BITLINEARS.items():
            rules.append(rename(block + f"{theirs}.weight", f"layers.{{i}}.{ours}.linear.weight"))
            rules.append(rename(block + f"{theirs}.norm.weight", f"layers.{{i}}.{ours}.norm.weight"))
        return KeyMap(rules)

    def export_config(self, native: NativeConfig, c: MMfreeConfig) -> dict[str, Any]:
        eos = native.extra.get("eos_token_id") or []
        return {
            "architectures": ["HGRNBitForCausalLM"],
            "model_type": "hgrn_bit",
            "attn_mode": "fused_recurrent",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers,
            "num_heads": 1,
            "expand_ratio": 1,
            "use_short_conv": False,
            "conv_size": 4,
            "share_conv_kernel": True,
            "use_lower_bound": c.use_lower_bound,
            "hidden_ratio": c.hidden_ratio,
            "intermediate_size": c.intermediate_size,
            "hidden_act": "swish",
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.norm_eps,
            "tie_word_embeddings": False,
            "bos_token_id": native.extra.get("bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "torch_dtype": native.dtype,
        }


FORMATS = [HFMMfree()]
