"""Phi-4 family: zoo's implementation against transformers' Phi3ForCausalLM (fused qkv / gate_up layout)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo.weights.format import CheckpointError

import zoo
from tests.helpers import hf_greedy, max_abs_diff, tiny_phi3, tiny_tokenizer
from zoo.cli import main as cli_main

ORIGINAL_MAX = 32  # tiny_phi3's original_max_position_embeddings: LongRoPE switches factor sets past it

# Phi-4-mini-instruct's chat template (tokenizer_config.json), tools branch included.
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
SPECIALS = {"<|endoftext|>": 100, "<|end|>": 101, "<|user|>": 102, "<|assistant|>": 103, "<|system|>": 104}


def convert_and_load(tmp_path, **kw):
    ref = tiny_phi3(tmp_path / "hf", **kw)
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    return ref, zoo.load(tmp_path / "native", dtype=torch.float32)


@pytest.mark.parametrize("longrope", [True, False], ids=["mini-longrope-tied", "phi4-full-rotary"])
@pytest.mark.parametrize("length", [20, 48], ids=["short", "long"])
def test_phi3_logits_match_transformers_below_and_above_original_length(tmp_path, longrope, length):
    ref, model = convert_and_load(tmp_path, longrope=longrope)
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert max_abs_diff(model(ids), expected) < 1e-4


@pytest.mark.parametrize("longrope,prompt_len", [(True, 8), (True, 40), (False, 8)],
                         ids=["mini-crosses-boundary-while-decoding", "mini-long-prompt", "phi4"])
def test_phi3_greedy_tokens_match_transformers_generate(tmp_path, longrope, prompt_len):
    ref, model = convert_and_load(tmp_path, longrope=longrope, eos_token_id=None)  # no eos: all 32 tokens count
    prompt = torch.randint(3, 128, (1, prompt_len), generator=torch.Generator().manual_seed(3))  # no pad/eos ids
    tokens = model.generate(prompt, max_new_tokens=32)[0]
    assert len(set(tokens)) > 4  # a varied continuation, so equality means something
    assert tokens == hf_greedy(ref, prompt, 32)


def test_longrope_cache_is_rebuilt_when_decoding_crosses_the_original_length(tmp_path):
    """Before the boundary, stepped logits equal a short forward; after it, an uncached forward of everything."""
    _, model = convert_and_load(tmp_path, longrope=True)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(2))
    state = model.module.new_state(1, 48)
    with torch.no_grad():
        stepped = torch.cat([model(ids[:, :20], state)] + [model(ids[:, t:t + 1], state) for t in range(20, 48)], 1)
        short, full = model(ids[:, :ORIGINAL_MAX]), model(ids)
    assert max_abs_diff(stepped[:, :ORIGINAL_MAX], short) < 1e-4
    assert max_abs_diff(stepped[:, ORIGINAL_MAX:], full[:, ORIGINAL_MAX:]) < 1e-4
    assert max_abs_diff(short, full[:, :ORIGINAL_MAX]) > 1e-3  # the two factor sets really differ


@pytest.mark.parametrize("longrope", [True, False], ids=["mini-longrope-tied", "phi4-full-rotary"])
def test_phi3_export_to_hf_round_trips_to_identical_logits(tmp_path, longrope):
    from transformers import Phi3ForCausalLM

    ref, _ = convert_and_load(tmp_path, longrope=longrope)
    zoo.export(tmp_path / "native", tmp_path / "back", to="hf", progress=False)
    back = Phi3ForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert {k for k in back.state_dict()} == {k for k in ref.state_dict()}
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_published_config_style_converts_like_the_transformers5_style(tmp_path):
    """Hub configs keep rope_theta / partial_rotary_factor top-level and LongRoPE under rope_scaling ("type")."""
    import json

    from zoo.weights.format import read_config

    tiny_phi3(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    params = cfg.pop("rope_parameters")
    cfg.update(rope_theta=params["rope_theta"], rope_scaling={
        "type": "longrope", "short_factor": params["short_factor"], "long_factor": params["long_factor"]})
    cfg_file.write_text(json.dumps(cfg))
    zoo.convert(tmp_path / "hf", tmp_path / "published", progress=False)
    native = read_config(tmp_path / "native").config
    assert native["rope_type"] == "longrope" and native["partial_rotary_factor"] == 0.75
    assert read_config(tmp_path / "published").config == native


def test_qkv_proj_with_wrong_row_count_names_the_tensor(tmp_path):
    tiny_phi3(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = load_file(file)
    key = "model.layers.1.self_attn.qkv_proj.weight"
    state[key] = torch.cat([state[key], state[key][:4]])  # 4 rows too many
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".*132"):
        zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    assert not (tmp_path / "native").exists()


def test_longrope_factor_list_of_wrong_length_is_a_clear_error(tmp_path):
    import json

    tiny_phi3(tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for section in ("rope_parameters", "rope_scaling"):
        if cfg.get(section):
            cfg[section]["long_factor"] = cfg[section]["long_factor"][:-1]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="long_factor has 5 values"):
        zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)


def test_phi_end_token_stops_generation_and_chat_matches_transformers(tmp_path, capsys):
    ref = tiny_phi3(tmp_path / "hf")
    tiny_tokenizer(tmp_path / "hf", SPECIALS, PHI4_MINI_TEMPLATE, eos_token="<|endoftext|>")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native", dtype=torch.float32)
    assert {SPECIALS["<|end|>"], SPECIALS["<|endoftext|>"]} <= model.stop_ids()  # the family's stop token

    messages = [{"role": "user", "content": "hello world how are you ?"}]
    prompt = model.tokenizer.apply_chat_template(messages)
    assert prompt == "<|user|>hello world how are you ?<|end|><|assistant|>"
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


def test_registry_has_published_phi4_configs():
    from zoo.registry import model_info

    mini = model_info("phi-4-mini-instruct")
    assert mini["params"] == 3_836_021_760  # the published checkpoint's parameter count (tied head)
    assert len(mini["config"]["long_factor"]) == 48 and mini["config"]["long_factor"][-1] == 47.77
    assert mini["config"]["partial_rotary_factor"] == 0.75 and mini["config"]["tie_embeddings"]
    phi4 = model_info("phi-4")
    assert phi4["config"]["rope_theta"] == 250000.0 and phi4["license"] == "mit"
    assert 14.6e9 < phi4["params"] < 14.8e9
