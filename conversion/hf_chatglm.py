"""ChatGLM-6B (first generation) as published on the Hub: THUDM/chatglm-6b, transformers remote code.

    config.json                      model_type "chatglm", inner_hidden_size, position_encoding_2d, token ids
    pytorch_model-0000i-of-00008.bin fp16 pickles (read with torch.load(weights_only=True, mmap=True))
    pytorch_model.bin.index.json
    ice_text.model, tokenizer_config.json

The tensor names are GLM-130B's SAT names (transformer.layers.{i}.attention.query_key_value, per-head
[q, k, v]) plus lm_head.weight, so the key map is conversion/sat_glm.py's, with a plain (not GeGLU)
dense_h_to_4h. ChatGLM2/3 share the model_type but are another architecture: not this format.

THUDM/chatglm-6b-int8 and -int4 (config.json "quantization_bit": 8 / 4) store the four linear weights of each
layer as their quantization.py's QuantizedLinear holds them: `weight` int8 codes [out, in] (INT4: two signed
nibbles per byte, column 2j in the high nibble, 2j+1 in the low one: int4WeightCompression) and `weight_scale`
fp16 [out], w = code * scale[row]. That is GLM-130B's rowwise arithmetic and nibble order, so the weights convert
as they are, packed ("int8-row" / "int4-row"), never re-quantised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from zoo.architectures.glm import GLMConfig
from zoo.conversion.base import Format, read_json
from zoo.conversion.rules import Drop, KeyMap
from zoo.conversion.sat_glm import glm_keymap
from zoo.conversion.sources import PickleSource
from zoo.weights.format import CheckpointError
from zoo.weights.reader import safe_child

INDEX = "pytorch_model.bin.index.json"
# the linear layers quantization.py's quantize() replaces by QuantizedLinear, as zoo names them
QUANTIZED = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def _weight_files(src: Path) -> list[Path]:
    index = src / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = [safe_child(src, n) for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing shard listed in {INDEX}")
        return files
    if (src / "pytorch_model.bin").is_file():
        return [src / "pytorch_model.bin"]
    raise CheckpointError(f"{src}: no pytorch_model.bin or {INDEX}")


def _same_rows(source: PickleSource, a: str, b: str, rows: int = 4096) -> bool:
    """Whether two [V, H] tensors are equal, compared a block of rows at a time."""
    if tuple(source.meta(a).shape) != tuple(source.meta(b).shape):
        return False
    ra, rb = source.readers[a], source.readers[b]
    n = source.meta(a).shape[0]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        x = torch.empty((stop - start, *source.meta(a).shape[1:]), dtype=source.meta(a).dtype)
        y = torch.empty_like(x)
        ra.read_into(a, x, (slice(start, stop),))
        rb.read_into(b, y, (slice(start, stop),))
        if not torch.equal(x, y):
            return False
    return True


def _quantization_bits(cfg: dict[str, Any], where: Path) -> int | None:
    """8 or 4 for THUDM/chatglm-6b-int8 / -int4, None for the float release; refuses what is neither."""
    bits = cfg.get("quantization_bit") or None
    if bits is not None and (type(bits) is not int or bits not in (4, 8)):
        raise CheckpointError(f"{where}: quantization_bit={bits!r}; ChatGLM-6B publishes 4 and 8 only")
    if bits and cfg.get("quantization_embeddings"):
        raise CheckpointError(f"{where}: quantization_embeddings=true (chatglm-6b-int4-qe: quantised embedding "
                              "tables) is not supported; convert THUDM/chatglm-6b-int4 or -int8")
    return bits


class HFChatGLM(Format):
    name = "hf-chatglm"
    family = "glm"
    description = "transformers remote code of ChatGLM-6B (THUDM/chatglm-6b: config.json, pytorch_model-*.bin)"
    copy_files = ("ice_text.model", "tokenizer_config.json")

    def source_info(self, src: Path) -> dict[str, Any]:
        from zoo.architectures.glm import PAPER

        return {"license": "chatglm-6b", "license_url": "https://huggingface.co/THUDM/chatglm-6b/blob/main/MODEL_LICENSE",
                "paper": PAPER}

    def detect(self, src: Path) -> bool:
        if not (src.is_dir() and (src / "config.json").is_file()):
            return False
        cfg = read_json(src / "config.json")
        return cfg.get("model_type") == "chatglm" and "inner_hidden_size" in cfg and "position_encoding_2d" in cfg

    def open(self, src: Path) -> PickleSource:
        return PickleSource(_weight_files(src))

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        where = src / "config.json"
        cfg = read_json(where)
        _quantization_bits(cfg, where)
        if cfg.get("pre_seq_len"):
            raise CheckpointError(f"{where}: pre_seq_len={cfg['pre_seq_len']} (P-tuning prefix) is not supported")
        vocab = cfg["vocab_size"]
        early = vocab == 150528  # the first revisions kept the 20k image tokens: MASK/gMASK at 150000/150001
        mask = cfg.get("mask_token_id", 150000 if early else 130000)
        gmask = cfg.get("gmask_token_id", mask + 1)
        source = self.open(src)
        tied = "lm_head.weight" not in source or _same_rows(source, "lm_head.weight",
                                                            "transformer.word_embeddings.weight")
        fields = dict(
            vocab_size=vocab, dim=cfg["hidden_size"], n_layers=cfg["num_layers"], n_heads=cfg["num_attention_heads"],
            inner_size=cfg.get("inner_hidden_size") or 4 * cfg["hidden_size"], mlp="gelu_tanh",
            position_2d=bool(cfg.get("position_encoding_2d", True)), tie_embeddings=tied,
            rope_fp16_angles=True,  # RotaryEmbedding(precision=torch.half) whatever the compute dtype
            norm_eps=cfg.get("layernorm_epsilon", 1e-5),
            deepnorm_alpha=math.sqrt(2 * 28),  # GLMBlock's default num_layers=28, never overridden by the model
            max_seq_len=cfg.get("max_sequence_length", 2048),
            mask_token_id=mask, gmask_token_id=gmask, smask_token_id=gmask + 1,
            sop_token_id=cfg.get("bos_token_id", 150004 if early else 130004),
        )
        eos = cfg.get("eos_token_id", 150005 if early else 130005)
        extra = {"eos_token_id": [eos], "bos_token_id": fields["sop_token_id"],
                 "generation": {"do_sample": True, "temperature": 0.95, "top_p": 0.7}}  # chat()'s defaults
        return fields, extra

    def quantization(self, src: Path) -> dict[str, Any]:
        cfg = read_json(src / "config.json")
        bits = _quantization_bits(cfg, src / "config.json")
        if bits is None:
            return {}
        paths = [f"layers.{i}.{p}" for i in range(cfg["num_layers"]) for p in QUANTIZED]
        return {"scheme": f"int{bits}-row", "modules": paths}

    def keep_dtype(self, key: str) -> bool:
        return key.endswith(".weight_scale")  # the published fp16 scales, exactly, whatever --dtype says

    def keymap(self, c: GLMConfig) -> KeyMap:
        km = glm_keymap(c, quantized=True, lm_head=None if c.tie_embeddings else "lm_head.weight")
        if c.tie_embeddings:  # the published lm_head equals the embedding: keep one copy
            km.drops.append(Drop("lm_head.weight", "identical to transformer.word_embeddings.weight"))
        return km


FORMATS = [HFChatGLM()]
