"""Config fields that transformers resolves from more than one key (a default, a second name, a legacy form) are
read the way transformers builds the model: each config below is written by transformers itself
(`save_pretrained`) or as older transformers versions wrote it, and zoo's fields are compared with transformers'
own config read from the same file. (xLSTM's num_blocks / embedding_dim pairs: tests/test_xlstm.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from zoo.conversion.base import formats

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
LONGROPE = {"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6}  # 16 * 0.75 / 2 factors


def _saved(path: Path, config: transformers.PreTrainedConfig) -> Path:
    config.save_pretrained(path)
    return path


def _written(path: Path, fields: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(fields))
    return path


def _zoo_and_transformers(layout: str, src: Path) -> tuple[dict, transformers.PreTrainedConfig]:
    fields, _ = formats()[layout].native_config(src)
    return fields, transformers.AutoConfig.from_pretrained(src)


def check_common_fields(fields: dict, theirs: transformers.PreTrainedConfig) -> None:
    assert fields["dim"] == theirs.hidden_size
    assert fields["n_layers"] == theirs.num_hidden_layers
    assert fields["n_heads"] == theirs.num_attention_heads
    assert fields["n_kv_heads"] == theirs.num_key_value_heads
    assert fields["rope_theta"] == theirs.rope_parameters["rope_theta"]


QWEN2 = {
    "saved, kv heads left to default": lambda p: _saved(p, transformers.Qwen2Config(**SMALL, num_key_value_heads=None)),
    "saved, rope_theta as a keyword": lambda p: _saved(p, transformers.Qwen2Config(**SMALL, rope_theta=5e5)),
    "saved, rope_parameters": lambda p: _saved(p, transformers.Qwen2Config(
        **SMALL, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 2e5})),
    "legacy, top-level rope_theta": lambda p: _written(p, {"model_type": "qwen2", **SMALL, "rope_theta": 1e6,
                                                           "num_key_value_heads": 2}),
    "legacy, no rope_theta, no kv heads": lambda p: _written(p, {"model_type": "qwen2", **SMALL}),
    "both, the rope dict wins": lambda p: _written(p, {"model_type": "qwen2", **SMALL, "num_key_value_heads": 4,
                                                       "rope_theta": 1e6,
                                                       "rope_parameters": {"rope_type": "default",
                                                                           "rope_theta": 3e4}}),
}


@pytest.mark.parametrize("way", list(QWEN2))
def test_qwen2_configs_written_each_way_read_as_transformers_reads_them(tmp_path, way):
    fields, theirs = _zoo_and_transformers("hf-qwen2", QWEN2[way](tmp_path / "c"))
    check_common_fields(fields, theirs)


QWEN2_MOE = {
    "saved, defaults": lambda p: _saved(p, transformers.Qwen2MoeConfig(**SMALL, **MOE)),
    "saved, rope_theta as a keyword": lambda p: _saved(p, transformers.Qwen2MoeConfig(**SMALL, **MOE,
                                                                                      rope_theta=1e6)),
    "legacy, no rope_theta, null mlp_only_layers": lambda p: _written(p, {"model_type": "qwen2_moe", **SMALL, **MOE,
                                                                          "mlp_only_layers": None}),
}


@pytest.mark.parametrize("way", list(QWEN2_MOE))
def test_qwen2_moe_configs_written_each_way_read_as_transformers_reads_them(tmp_path, way):
    fields, theirs = _zoo_and_transformers("hf-qwen2-moe", QWEN2_MOE[way](tmp_path / "c"))
    check_common_fields(fields, theirs)
    assert fields["mlp_only_layers"] == theirs.mlp_only_layers


PHI3 = {
    "saved, defaults": lambda p: _saved(p, transformers.Phi3Config(**SMALL)),
    "saved, partial rotary as a keyword": lambda p: _saved(p, transformers.Phi3Config(
        **SMALL, num_key_value_heads=2, partial_rotary_factor=0.75, rope_theta=2.5e5)),
    "saved, longrope": lambda p: _saved(p, transformers.Phi3Config(
        **SMALL, partial_rotary_factor=0.75, max_position_embeddings=8192, original_max_position_embeddings=1024,
        rope_scaling=dict(LONGROPE))),
    "legacy, top-level rope fields": lambda p: _written(p, {
        "model_type": "phi3", **SMALL, "rope_theta": 1e4, "partial_rotary_factor": 0.75,
        "max_position_embeddings": 8192, "original_max_position_embeddings": 2048, "rope_scaling": LONGROPE}),
    "legacy, no kv heads": lambda p: _written(p, {"model_type": "phi3", **SMALL}),
    "legacy, rope dict's own original length": lambda p: _written(p, {
        "model_type": "phi3", **SMALL, "partial_rotary_factor": 0.75, "max_position_embeddings": 8192,
        "rope_scaling": {**LONGROPE, "original_max_position_embeddings": 512}}),
}


@pytest.mark.parametrize("way", list(PHI3))
def test_phi3_configs_written_each_way_read_as_transformers_reads_them(tmp_path, way):
    fields, theirs = _zoo_and_transformers("hf-phi3", PHI3[way](tmp_path / "c"))
    check_common_fields(fields, theirs)
    rope = theirs.rope_parameters
    assert fields["partial_rotary_factor"] == rope.get("partial_rotary_factor", 1.0)
    assert fields["rope_type"] == rope["rope_type"]
    if rope["rope_type"] == "longrope":
        theirs.standardize_rope_params()  # what the rotary embedding does before reading the original length
        assert fields["original_max_seq_len"] == theirs.rope_parameters["original_max_position_embeddings"]
        assert (fields["short_factor"], fields["long_factor"]) == (rope["short_factor"], rope["long_factor"])


MMFREE = {
    "saved, intermediate size left to the MLP's rule": dict(hidden_ratio=4, intermediate_size=None),
    "saved, no hidden_ratio": dict(hidden_ratio=None, intermediate_size=None),
    "saved, intermediate size given": dict(hidden_ratio=4, intermediate_size=96),
}


@pytest.mark.parametrize("way", list(MMFREE))
def test_mmfree_configs_saved_by_the_published_config_class_read_as_its_model_builds_them(tmp_path, way):
    from zoo.architectures.mmfree import MMfreeConfig

    from tests import mmfree_published as P

    published = P.HGRNBitConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, **MMFREE[way])
    published.save_pretrained(tmp_path / "c")
    fields, _ = formats()["hf-mmfree"].native_config(tmp_path / "c")
    with P.cpu():
        model = P.HGRNBitForCausalLM(published)
    mlp = model.model.layers[0].mlp
    assert MMfreeConfig(**fields).intermediate_size == mlp.intermediate_size == mlp.down_proj.in_features
    assert (fields["dim"], fields["n_layers"]) == (model.config.hidden_size, len(model.model.layers))
