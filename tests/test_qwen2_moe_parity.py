"""Qwen2-MoE: zoo's implementation against transformers' Qwen2MoeForCausalLM (per-expert published layout)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from zoo.architectures.qwen2_moe import Experts
from zoo.weights.format import CheckpointError

import zoo
from tests.helpers import hf_greedy, max_abs_diff, tiny_qwen2_moe, tiny_tokenizer
from zoo.cli import main as cli_main

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = {"<|endoftext|>": 100, "<|im_start|>": 101, "<|im_end|>": 102}

VARIANTS = {
    "top2-no-renorm": dict(norm_topk_prob=False),
    "top2-renorm-dense-layer1": dict(norm_topk_prob=True, mlp_only_layers=[1]),
    "sharded": dict(norm_topk_prob=False, shard="40KB"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qwen2_moe_logits_and_greedy_tokens_match_transformers(tmp_path, variant):
    ref = tiny_qwen2_moe(tmp_path / "hf", eos_token_id=None, **VARIANTS[variant])  # no eos: all 32 tokens count
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native", dtype=torch.float32)

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert max_abs_diff(model(ids), expected) < 1e-4

    prompt = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(3))  # no pad/eos ids
    tokens = model.generate(prompt, max_new_tokens=32)[0]
    assert len(set(tokens)) > 4  # a varied continuation, so equality means something
    assert tokens == hf_greedy(ref, prompt, 32)


def test_grouped_experts_equal_a_per_token_loop():
    torch.manual_seed(0)
    experts = Experts(5, 16, 8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(11, 16)
    chosen = torch.stack([torch.randperm(5)[:3] for _ in range(11)])
    weights = torch.rand(11, 3)
    expected = torch.zeros_like(x)
    for n in range(11):
        for j in range(3):
            e = chosen[n, j]
            h = F.silu(experts.gate_proj[e] @ x[n]) * (experts.up_proj[e] @ x[n])
            expected[n] += weights[n, j] * (experts.down_proj[e] @ h)
    with torch.no_grad():
        assert max_abs_diff(experts(x, chosen, weights), expected) < 1e-5


def test_qwen2_moe_experts_are_stored_stacked(tmp_path):
    from zoo.weights.reader import Checkpoint

    tiny_qwen2_moe(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    ckpt = Checkpoint(tmp_path / "native")
    assert ckpt.shape("layers.0.mlp.experts.gate_proj") == (4, 32, 64)
    assert ckpt.shape("layers.0.mlp.experts.down_proj") == (4, 64, 32)
    assert ckpt.shape("layers.0.mlp.router.weight") == (4, 64)


def test_qwen2_moe_export_to_hf_round_trips_to_identical_logits(tmp_path):
    from transformers import Qwen2MoeForCausalLM

    ref = tiny_qwen2_moe(tmp_path / "hf", norm_topk_prob=True, mlp_only_layers=[1])
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    zoo.export(tmp_path / "native", tmp_path / "back", to="hf", progress=False)
    published = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert set(load_file(tmp_path / "back" / "model.safetensors")) == published  # per-expert names again
    back = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_missing_or_misshapen_expert_is_a_clear_error(tmp_path):
    tiny_qwen2_moe(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = load_file(file)
    bad = state.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)

    state["model.layers.1.mlp.experts.3.up_proj.weight"] = bad[:30]
    save_file(state, file, metadata={"format": "pt"})
    bad_shape = r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight has shape \(30, 64\)"
    with pytest.raises(CheckpointError, match=bad_shape):
        zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    assert not (tmp_path / "native").exists()


def test_qwen2_moe_chat_uses_the_checkpoint_template_and_stops_at_im_end(tmp_path, capsys):
    ref = tiny_qwen2_moe(tmp_path / "hf")
    tiny_tokenizer(tmp_path / "hf", SPECIALS, CHATML, eos_token="<|im_end|>")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native", dtype=torch.float32)
    assert {SPECIALS["<|im_end|>"], SPECIALS["<|endoftext|>"]} <= model.stop_ids()

    messages = [{"role": "user", "content": "hello world"}]
    prompt = model.tokenizer.apply_chat_template(messages)
    assert prompt == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = model.tokenizer.encode(prompt)
    full = hf_greedy(ref, torch.tensor([ids]), 16)
    stops = [n for n, t in enumerate(full) if t in model.stop_ids()]
    expected = full[: stops[0] + 1] if stops else full
    assert model.generate(ids, max_new_tokens=16) == expected
    reply = model.chat(messages, max_new_tokens=16)
    assert reply == model.tokenizer.decode(expected)

    assert cli_main(["generate", str(tmp_path / "native"), messages[0]["content"], "--chat",
                     "--max-new-tokens", "16", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == reply.strip()


def test_registry_has_qwen2_57b_a14b_with_total_and_active_params():
    from zoo.registry import model_info

    info = model_info("qwen2-57b-a14b")
    assert info["config"]["n_experts"] == 64 and info["config"]["n_experts_per_tok"] == 8
    assert info["config"]["norm_topk_prob"] is False and info["license"] == "apache-2.0"
    assert 57.0e9 < info["params"] < 57.8e9  # "57B"
    assert 14.0e9 < info["extra"]["active_params"] < 14.6e9  # "A14B"
    assert model_info("qwen2-57b-a14b-instruct")["source"]["repo"] == "Qwen/Qwen2-57B-A14B-Instruct"
