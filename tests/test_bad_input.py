"""Every kind of bad input gets a clear error naming the file, key or tensor, and nothing half-written."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo.weights import CheckpointError

import zoo
from tests.helpers import tiny_qwen2
from zoo.registry import UnknownModelError


@pytest.fixture
def hf_dir(tmp_path):
    tiny_qwen2(tmp_path / "hf", tie=False)
    return tmp_path / "hf"


@pytest.fixture
def native_dir(hf_dir, tmp_path):
    return zoo.convert(hf_dir, tmp_path / "native", progress=False)


def _rewrite_source(hf_dir, edit):
    path = hf_dir / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_source_tensor_is_named(hf_dir, tmp_path):
    _rewrite_source(hf_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        zoo.convert(hf_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unexpected_source_tensor_is_named(hf_dir, tmp_path):
    _rewrite_source(hf_dir, lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.extra\.weight"):
        zoo.convert(hf_dir, tmp_path / "out", progress=False)


def test_wrong_shape_names_tensor_and_both_shapes(hf_dir, tmp_path):
    _rewrite_source(hf_dir, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(16, 64\).*needs \(32, 64\)"):
        zoo.convert(hf_dir, tmp_path / "out", progress=False)


def test_unknown_format_is_refused_with_the_known_ones(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(CheckpointError, match=r"no known format.*--format.*hf-qwen2"):
        zoo.convert(tmp_path / "src", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="unknown format 'nope'"):
        zoo.convert(tmp_path / "src", tmp_path / "out", format="nope", progress=False)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UnknownModelError, match="qwen2-7b"):
        zoo.load("qwen2-7bb")


def test_existing_output_is_refused_unless_overwrite(hf_dir, native_dir):
    with pytest.raises(FileExistsError, match="--overwrite"):
        zoo.convert(hf_dir, native_dir, progress=False)
    zoo.convert(hf_dir, native_dir, overwrite=True, progress=False)
    assert zoo.load(native_dir) is not None


def test_failure_mid_conversion_leaves_nothing_behind(hf_dir, tmp_path, monkeypatch):
    from zoo.conversion.sources import SafetensorsSource

    calls = {"n": 0}
    real_get = SafetensorsSource.get

    def failing_get(self, key):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk went away")
        return real_get(self, key)

    monkeypatch.setattr(SafetensorsSource, "get", failing_get)
    with pytest.raises(OSError):
        zoo.convert(hf_dir, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no OUT, no partial temp dir


def test_missing_shard_is_named(tmp_path):
    tiny_qwen2(tmp_path / "hf", tie=False, shard="60KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1].name}: missing shard"):
        zoo.convert(tmp_path / "hf", tmp_path / "out", progress=False)


def test_truncated_source_shard_is_named(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        zoo.convert(hf_dir, tmp_path / "out", progress=False)


def test_truncated_native_shard_is_refused_on_load(native_dir):
    path = native_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        zoo.load(native_dir)


def test_sha256_mismatch_is_refused_on_load(native_dir):
    path = native_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        zoo.load(native_dir)


def test_missing_native_shard_is_named(native_dir):
    (native_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing shard"):
        zoo.load(native_dir)


def test_native_checkpoint_with_wrong_shape_for_its_config_is_refused(native_dir):
    cfg = json.loads((native_dir / "config.json").read_text())
    cfg["config"]["intermediate_size"] = 96
    (native_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor layers\.0\.mlp\.gate_proj\.weight has shape \(128, 64\)"):
        zoo.load(native_dir)


def test_published_checkpoint_given_to_load_says_to_convert(hf_dir):
    with pytest.raises(CheckpointError, match="zoo convert"):
        zoo.load(hf_dir)


def test_pickle_that_needs_code_is_refused(tmp_path):
    import argparse

    from zoo.conversion.sources import load_pickle

    path = tmp_path / "evil.pth"  # any class outside plain tensors/containers would run code on unpickling
    torch.save({"model": argparse.Namespace(w=torch.zeros(2))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused"):
        load_pickle(path)


def test_a_verified_file_is_not_hashed_again_until_it_changes(native_dir, monkeypatch):
    import zoo.weights.reader as reader

    zoo.load(native_dir)  # hashes and remembers
    calls = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda p: calls.append(p) or real(p))
    zoo.load(native_dir)
    assert calls == []
    path = native_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, new bytes, new mtime
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        zoo.load(native_dir)
    assert calls


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, "rope scaling"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_config_features_the_decoder_lacks_are_refused_naming_the_config(hf_dir, tmp_path, change, message):
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        zoo.convert(hf_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
