"""Qwen2: zoo's own implementation against transformers' Qwen2ForCausalLM."""

import pytest
import torch

import zoo
from tests.helpers import hf_greedy, max_abs_diff, tiny_qwen2


@pytest.mark.parametrize("tie,shard", [(True, None), (False, None), (False, "60KB")])
def test_qwen2_logits_and_greedy_tokens_match_transformers(tmp_path, tie, shard):
    ref = tiny_qwen2(tmp_path / "hf", tie=tie, shard=shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native", dtype=torch.float32)

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert max_abs_diff(model(ids), expected) < 1e-4

    prompt = ids[:1, :8]
    tokens = model.generate(prompt, max_new_tokens=32)[0]
    assert len(set(tokens)) > 4  # a varied continuation, so equality means something
    assert tokens == hf_greedy(ref, prompt, 32)


def test_qwen2_kv_cache_decoding_equals_full_forward(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    state = model.module.new_state(1, 16)
    stepped = torch.cat([model(ids[:, :10], state)] + [model(ids[:, t:t + 1], state) for t in range(10, 16)], 1)
    assert max_abs_diff(full, stepped) < 1e-5


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    a, b = [5, 6, 7, 8, 9, 10, 11], [40, 41, 42]
    batch = model.generate([a, b], max_new_tokens=12)
    assert batch == [model.generate(a, max_new_tokens=12), model.generate(b, max_new_tokens=12)]


def test_export_to_hf_round_trips_to_identical_logits(tmp_path):
    from transformers import Qwen2ForCausalLM

    ref = tiny_qwen2(tmp_path / "hf", tie=False)
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    zoo.export(tmp_path / "native", tmp_path / "back", to="hf", progress=False)
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)
