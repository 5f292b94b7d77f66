"""MatMul-free LM: checkpoints written in the published layout, converted, loaded and run against the plain
reference in tests/mmfree_reference.py (its quantisers are the published ones; its greedy tokens the published
model's, run on CPU; tests/test_mmfree_published.py holds the other comparisons with the published code).

Tolerance for activation rounding. Every BitLinear rounds x * 127 / max|x| to an integer. Two correct fp32
implementations that sum in a different order (our parallel scan against the reference's loop, one BLAS call
against another) differ by an ulp or so, and an element within an ulp of a .5 then rounds one step apart; with
some 10^5 roundings per forward this happens a few times. A flip moves that projection's output by one int8
step times the weight scale (around 1e-2 here), and the recurrence carries it to the later tokens of the row,
so no fixed fraction of fp32 logits can be promised to agree within 1e-4. Hence two checks:
  - in fp64 (model and reference both run everything in fp64, which makes a flip vanishingly unlikely) the
    logits agree within 1e-9: this is the proof that the math is the same;
  - in fp32 the logits agree within 0.05 everywhere (a few flips, each bounded, never a wrong formula; random
    logits here are of order 1) and within 1e-4 for at least 3/4 of them, and greedy tokens are identical.
"""

from __future__ import annotations

import pytest
import torch
from zoo.weights.format import CheckpointError

import zoo
from tests.mmfree_reference import reference_greedy, reference_logits, save_published

V, D, L, HIDDEN = 256, 64, 3, 128


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    path = tmp_path_factory.mktemp("mmfree") / "hf"
    return path, save_published(path, V, D, L, HIDDEN)


@pytest.fixture(scope="module")
def native(published, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmfree") / "native"
    zoo.convert(published[0], out, progress=False)
    return out


def ids(batch: int, steps: int, seed: int) -> torch.Tensor:
    return torch.randint(3, V, (batch, steps), generator=torch.Generator().manual_seed(seed))


def test_converted_model_computes_the_reference_exactly_in_fp64(published, native):
    model = zoo.load(native, dtype=torch.float64)
    x = ids(2, 24, 1)
    with torch.no_grad():
        got = model(x)
    expected = reference_logits(published[1], L, x, dtype=torch.float64)
    assert (got - expected).abs().max() < 1e-9


def test_fp32_logits_match_the_reference_up_to_rounding_flips_and_greedy_tokens_are_identical(published, native):
    model = zoo.load(native, dtype=torch.float32)
    x = ids(2, 24, 1)
    with torch.no_grad():
        diff = (model(x) - reference_logits(published[1], L, x)).abs()
    assert diff.max() < 0.05 and (diff < 1e-4).float().mean() > 0.75

    prompt = [5, 17, 42, 99]
    tokens = model.generate(prompt, max_new_tokens=16)
    assert len(set(tokens)) > 4  # a varied continuation, so equality means something
    assert tokens == reference_greedy(published[1], L, prompt, 16)


def test_prompt_scan_and_token_by_token_decoding_agree(native):
    model = zoo.load(native, dtype=torch.float64)
    x = ids(2, 20, 2)
    with torch.no_grad():
        full = model(x)
        state = model.module.new_state(2, 20)
        stepped = torch.cat([model(x[:, :12], state)] + [model(x[:, t:t + 1], state) for t in range(12, 20)], 1)
        last = model(x, model.module.new_state(2, 20), last_only=True)
    assert (full - stepped).abs().max() < 1e-9
    assert last.shape == (2, 1, V) and (last[:, 0] - full[:, -1]).abs().max() < 1e-9


def test_generation_state_has_the_same_size_after_10_and_1000_tokens(native):
    model = zoo.load(native, dtype=torch.float32)
    state = model.module.new_state(2, 1000)
    memory = state.h.data_ptr()
    with torch.no_grad():
        model(ids(2, 10, 3), state)  # a prompt
        after_10 = state.nbytes()
        for t in range(10):  # decoding steps
            model(ids(2, 1, t), state)
        model(ids(2, 980, 4), state)  # and a long continuation
    assert state.length == 1000
    assert state.nbytes() == after_10 == L * 2 * D * 4  # one fp32 vector per layer and row, nothing else
    assert state.h.data_ptr() == memory  # updated in place, never reallocated


def test_left_padded_batch_equals_each_row_alone(native):
    model = zoo.load(native, dtype=torch.float64)
    a, b = [5, 6, 7, 8, 9, 10, 11], [40, 41, 42]
    with torch.no_grad():
        padded = torch.tensor([a, [0] * 4 + b])
        state = model.module.new_state(2, 7, torch.tensor([0, 4]))
        both = model(padded, state)
        alone = model(torch.tensor([b]))
    assert (both[1, 4:] - alone[0]).abs().max() < 1e-9  # pads left the state untouched

    model = zoo.load(native, dtype=torch.float32)
    assert model.generate([a, b], max_new_tokens=12) == [model.generate(a, max_new_tokens=12),
                                                          model.generate(b, max_new_tokens=12)]


def test_packed_ternary_checkpoint_gives_the_same_outputs_as_latent_in_an_eighth_of_the_bytes(published, native,
                                                                                                tmp_path):
    from safetensors import safe_open
    from zoo.architectures.quant import PackedLinear

    # The published model ternarises its weights in their own dtype: codes packed from the fp16 checkpoint are
    # the fp16 model's; packing after loading in fp32 gives the fp32 model's.
    zoo.convert(published[0], tmp_path / "packed", quantize="ternary", progress=False)
    packed = zoo.load(tmp_path / "packed", dtype=torch.float16)
    assert packed.native.quantization["scheme"] == "ternary"
    assert len(packed.native.quantization["modules"]) == 6 * L + 1  # every BitLinear, the output head too
    assert isinstance(packed.module.layers[0].attn.i_proj.linear, PackedLinear)
    latent16 = zoo.load(native, dtype=torch.float16)
    latent = zoo.load(native, dtype=torch.float32)
    on_load = zoo.load(native, dtype=torch.float32, quantize="ternary")  # packed layer by layer while loading
    in_memory = zoo.load(native, dtype=torch.float32)
    in_memory.module.pack_()
    x = ids(2, 16, 4)
    with torch.no_grad():
        assert torch.equal(packed(x), latent16(x))
        expected = latent(x)
        for model in (on_load, in_memory):
            assert torch.equal(model(x), expected)
    assert packed.generate([5, 6, 7], max_new_tokens=8) == latent16.generate([5, 6, 7], max_new_tokens=8)

    def weight_bytes(directory):
        total = 0
        for path in directory.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                total += sum(f.get_tensor(k).nbytes for k in f.keys() if k.endswith(".linear.weight"))
        return total

    assert weight_bytes(tmp_path / "packed") * 8 == weight_bytes(native)  # fp16 latent -> 2 bits each


def test_export_writes_the_published_tensors_back(published, native, tmp_path):
    from safetensors.torch import load_file

    zoo.export(native, tmp_path / "back", to="hf", progress=False)
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == published[1].keys()
    assert all(torch.equal(back[k], published[1][k]) for k in back)


@pytest.mark.parametrize("field,value,message", [("use_short_conv", True, "use_short_conv"),
                                                 ("expand_ratio", 2, "expand_ratio"),
                                                 ("tie_word_embeddings", True, "tie_word_embeddings")])
def test_converter_refuses_published_options_it_does_not_implement(tmp_path, field, value, message):
    import json

    save_published(tmp_path / "hf", V, D, 1, HIDDEN)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message) as err:
        zoo.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert "config.json" in str(err.value)


def test_registry_has_the_three_published_sizes():
    info = {name: zoo.model_info(name) for name in ("mmfree-370m", "mmfree-1.3b", "mmfree-2.7b")}
    shapes = {n: (i["config"]["dim"], i["config"]["n_layers"], i["config"]["intermediate_size"])
              for n, i in info.items()}
    assert shapes == {"mmfree-370m": (1024, 24, 2816), "mmfree-1.3b": (2048, 24, 5632),
                      "mmfree-2.7b": (2560, 32, 6912)}
    assert all(i["config"]["vocab_size"] == 32000 and i["license"] == "apache-2.0" for i in info.values())
    assert all(i["paper"].endswith("2406.02528") and i["source"]["layout"] == "hf-mmfree" for i in info.values())
    # 16-bit latent parameters: the published 370M file is 748 MB, the 2.7B shards 4.98 GB + 429 MB
    assert round(info["mmfree-370m"]["params"] * 2 / 1e6) == 748
    assert round(info["mmfree-2.7b"]["params"] * 2 / 1e9, 2) == 5.40


def test_zoo_convert_packed_and_zoo_generate_from_the_command_line(published, tmp_path, capsys):
    import json
    import shutil

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from zoo.cli import main

    src = tmp_path / "hf"
    shutil.copytree(published[0], src)
    # a word-level tokenizer over the whole vocabulary, with Llama's specials: <unk> 0, <s> 1, </s> 2
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{n}": n for n in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": True}))
    assert main(["convert", str(src), str(tmp_path / "packed"), "--quantize", "ternary"]) == 0
    assert main(["generate", str(tmp_path / "packed"), "w5 w17 w42", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    model = zoo.load(tmp_path / "packed", dtype=torch.float32)
    new = reference_greedy(published[1], L, [1, 5, 17, 42], 8)  # the prompt starts with BOS <s> = 1, as published
    new = new[:new.index(2)] if 2 in new else new  # generation stops at EOS </s>
    text = model.generate("w5 w17 w42", max_new_tokens=8)
    assert text.split() == [f"w{t}" for t in new] and len(new) > 2
    assert out.strip() == "w5 w17 w42" + text  # the prompt, then the streamed continuation
