"""transformers' xLSTMForCausalLM layout (config.json model_type "xlstm"), as NX-AI publish xLSTM 7B.

Published weights are "single" (separate q, k, v, output-gate, input-gate and forget-gate projections);
transformers can also save a "fused" layout (q, k, v and the output gate in one matrix, the two gates in another,
the feed-forward's gate and up projections in a third), which converts into the same native tensors.
Export writes the published single layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.architectures.xlstm import XLSTMConfig
from zoo.conversion.base import read_json
from zoo.conversion.hf_decoder import TransformersFormat, generation_extra
from zoo.conversion.rules import KeyMap, Rule, rename, split
from zoo.weights.format import CheckpointError, NativeConfig

BLOCK = "backbone.blocks.{i}."


# transformers' xLSTMConfig class defaults for the two fields it keeps under two names
HIDDEN_SIZE, NUM_HIDDEN_LAYERS = 4096, 32


def _resolved(cfg: dict[str, Any], name: str, alias: str, default: int, where: Path) -> tuple[int, int]:
    """(name, alias) as xLSTMConfig.__post_init__ resolves them: each keeps its own value where it is set,
    a missing one takes the other's, and `name` has a class default (so it is set whenever it is absent)."""
    value = cfg.get(name, default)
    value = value if value is not None else cfg.get(alias)
    other = cfg.get(alias)
    other = other if other is not None else value
    if value is None:  # name given as null and no alias
        raise CheckpointError(f"{where}: neither {name} nor {alias} is set")
    return value, other


def xlstm_width_depth(cfg: dict[str, Any], where: Path) -> tuple[int, int]:
    """(width, block count) of the model transformers builds from this config: xLSTMModel makes
    `num_blocks` blocks (a config saved by transformers may carry num_blocks: 2 beside the class default
    num_hidden_layers: 32), an embedding `embedding_dim` wide, and everything else `hidden_size` wide."""
    hidden, embedding = _resolved(cfg, "hidden_size", "embedding_dim", HIDDEN_SIZE, where)
    if hidden != embedding:
        raise CheckpointError(f"{where}: embedding_dim={embedding} and hidden_size={hidden} disagree (transformers "
                              f"would build a {embedding}-wide embedding in front of {hidden}-wide blocks)")
    _, blocks = _resolved(cfg, "num_hidden_layers", "num_blocks", NUM_HIDDEN_LAYERS, where)
    return hidden, blocks


def xlstm_fields(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """transformers' xLSTMConfig fields -> zoo's XLSTMConfig fields (defaults: the published 7B's)."""
    unsupported = {"use_bias": True, "tie_word_embeddings": True, "norm_reduction_force_float32": False}
    for key, value in unsupported.items():
        if cfg.get(key) == value:
            raise CheckpointError(f"{where}: {key}={str(value).lower()} is not supported "
                                  "(the published xLSTM 7B has no biases besides the gates', an untied head and "
                                  "float32 norm reductions)")
    d = XLSTMConfig()
    dim, n_layers = xlstm_width_depth(cfg, where)
    return dict(
        vocab_size=cfg.get("vocab_size", d.vocab_size),
        dim=dim,
        n_layers=n_layers,
        n_heads=cfg.get("num_heads", d.n_heads),
        qk_dim_factor=cfg.get("qk_dim_factor", d.qk_dim_factor),
        v_dim_factor=cfg.get("v_dim_factor", d.v_dim_factor),
        ffn_proj_factor=cfg.get("ffn_proj_factor", d.ffn_proj_factor),
        ffn_round_up_to_multiple_of=cfg.get("ffn_round_up_to_multiple_of", d.ffn_round_up_to_multiple_of),
        mlstm_round_up_to_multiple_of=cfg.get("mlstm_round_up_to_multiple_of", d.mlstm_round_up_to_multiple_of),
        gate_soft_cap=cfg.get("gate_soft_cap", d.gate_soft_cap),
        output_logit_soft_cap=cfg.get("output_logit_soft_cap", d.output_logit_soft_cap),
        norm_eps=cfg.get("norm_eps", d.norm_eps),
        cell_eps=cfg.get("eps", d.cell_eps),
        chunk_size=cfg.get("chunk_size", d.chunk_size),
    )


def shared_rules() -> list[Rule]:
    """Everything but the projections that the fused layout merges."""
    rules = [
        rename("backbone.embeddings.weight", "embed.weight"),
        rename("backbone.out_norm.weight", "norm.weight"),
        rename("lm_head.weight", "lm_head.weight"),
        rename(BLOCK + "norm_mlstm.weight", "layers.{i}.mlstm_norm.weight"),
        rename(BLOCK + "norm_ffn.weight", "layers.{i}.ffn_norm.weight"),
        rename(BLOCK + "mlstm_layer.multihead_norm.weight", "layers.{i}.mlstm.head_norm.weight"),
        rename(BLOCK + "mlstm_layer.out_proj.weight", "layers.{i}.mlstm.out_proj.weight"),
        rename(BLOCK + "ffn.proj_down.weight", "layers.{i}.ffn.down_proj.weight"),
    ]
    return rules


def single_rules() -> list[Rule]:
    pairs = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "ogate_preact": "o_gate"}
    rules = [rename(BLOCK + f"mlstm_layer.{src}.weight", f"layers.{{i}}.mlstm.{dst}.weight")
             for src, dst in pairs.items()]
    for gate in ("i", "f"):
        for p in ("weight", "bias"):
            rules.append(rename(BLOCK + f"mlstm_layer.{gate}gate_preact.{p}", f"layers.{{i}}.mlstm.{gate}_gate.{p}"))
    rules.append(rename(BLOCK + "ffn.proj_up_gate.weight", "layers.{i}.ffn.gate_proj.weight"))  # the SiLU branch
    rules.append(rename(BLOCK + "ffn.proj_up.weight", "layers.{i}.ffn.up_proj.weight"))
    return rules


def fused_rules(c: XLSTMConfig) -> list[Rule]:
    """transformers' fused layout: [q; k; v; output gate], [input gates; forget gates], [SiLU branch; linear branch]."""
    mlstm = "layers.{i}.mlstm."
    return [
        split(BLOCK + "mlstm_layer.qkv_opreact.weight",
              [mlstm + "q_proj.weight", mlstm + "k_proj.weight", mlstm + "v_proj.weight", mlstm + "o_gate.weight"],
              [c.qk_dim, c.qk_dim, c.v_dim, c.v_dim], doc="q, k, v, output gate stacked by rows"),
        split(BLOCK + "mlstm_layer.ifgate_preact.weight", [mlstm + "i_gate.weight", mlstm + "f_gate.weight"],
              [c.n_heads, c.n_heads]),
        split(BLOCK + "mlstm_layer.ifgate_preact.bias", [mlstm + "i_gate.bias", mlstm + "f_gate.bias"],
              [c.n_heads, c.n_heads]),
        split(BLOCK + "ffn.proj_up_gate_z.weight", ["layers.{i}.ffn.gate_proj.weight", "layers.{i}.ffn.up_proj.weight"],
              [c.ffn_dim, c.ffn_dim]),
    ]


class HFXLSTM(TransformersFormat):
    name = "hf-xlstm"
    family = "xlstm"
    description = "transformers xLSTMForCausalLM (NX-AI/xLSTM-7b on the Hub)"
    model_type = "xlstm"
    architecture = "xLSTMForCausalLM"
    weight_mode = "single"

    def detect(self, src: Path) -> bool:
        return super().detect(src) and read_json(src / "config.json").get("weight_mode", "single") == self.weight_mode

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = read_json(src / "config.json")
        extra = generation_extra(src, cfg)
        extra["pad_token_id"] = cfg.get("pad_token_id")
        extra["force_bos_token_insert"] = bool(cfg.get("force_bos_token_insert", True))
        fields = xlstm_fields(cfg, src / "config.json")
        blocks = {k.split(".")[2] for k in self.open(src).keys() if k.startswith("backbone.blocks.")}
        if len(blocks) != fields["n_layers"]:
            raise CheckpointError(
                f"{src / 'config.json'}: transformers builds {fields['n_layers']} blocks from it (num_blocks="
                f"{cfg.get('num_blocks')}, num_hidden_layers={cfg.get('num_hidden_layers')}), the weights hold "
                f"{len(blocks)} (backbone.blocks.*)")
        return fields, extra

    def keymap(self, c: XLSTMConfig) -> KeyMap:
        return KeyMap(shared_rules() + single_rules())

    def export_config(self, native: NativeConfig, c: XLSTMConfig) -> dict[str, Any]:
        eos = native.extra.get("eos_token_id") or []
        return {
            "architectures": ["xLSTMForCausalLM"],
            "model_type": "xlstm",
            "vocab_size": c.vocab_size,
            "embedding_dim": c.dim,
            "hidden_size": c.dim,
            "num_blocks": c.n_layers,
            "num_hidden_layers": c.n_layers,
            "num_heads": c.n_heads,
            "qk_dim_factor": c.qk_dim_factor,
            "v_dim_factor": c.v_dim_factor,
            "ffn_proj_factor": c.ffn_proj_factor,
            "ffn_round_up_to_multiple_of": c.ffn_round_up_to_multiple_of,
            "mlstm_round_up_to_multiple_of": c.mlstm_round_up_to_multiple_of,
            "gate_soft_cap": c.gate_soft_cap,
            "output_logit_soft_cap": c.output_logit_soft_cap,
            "norm_eps": c.norm_eps,
            "eps": c.cell_eps,
            "chunk_size": c.chunk_size,
            "use_bias": False,
            "norm_reduction_force_float32": True,
            "add_out_norm": True,
            "tie_word_embeddings": False,
            "weight_mode": "single",
            # kernels that run anywhere (the published config names Triton ones, which need a GPU)
            "chunkwise_kernel": "chunkwise--native_autograd",
            "sequence_kernel": "native_sequence__native",
            "step_kernel": "native",
            "mode": "inference",
            "return_last_states": True,
            "inference_state_dtype": "float32",
            "force_bos_token_insert": native.extra.get("force_bos_token_insert", True),
            "bos_token_id": native.extra.get("bos_token_id"),
            "pad_token_id": native.extra.get("pad_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "torch_dtype": native.dtype,
        }


class HFXLSTMFused(HFXLSTM):
    name = "hf-xlstm-fused"
    description = "transformers xLSTMForCausalLM saved with weight_mode 'fused' (exports as hf-xlstm)"
    weight_mode = "fused"
    exports_as = None

    def keymap(self, c: XLSTMConfig) -> KeyMap:
        return KeyMap(shared_rules() + fused_rules(c))


FORMATS = [HFXLSTM(), HFXLSTMFused()]
