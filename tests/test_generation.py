"""Generation through the embedded default (a real trained Qwen2 with a real tokenizer)."""

import pytest
import torch

import zoo
from zoo.generation import Sampling, sample


@pytest.fixture(scope="module")
def model():
    return zoo.load("qwen2-tiny-stdlib", dtype=torch.float32)


def test_string_prompt_returns_new_text(model):
    text = model.generate("def fibonacci(n):", max_new_tokens=24, temperature=0)
    assert isinstance(text, str) and text
    assert not text.startswith("def fibonacci(n):")


def test_streamed_pieces_join_to_the_unstreamed_text(model):
    kw = dict(max_new_tokens=24, temperature=0.8, top_k=40, seed=3)
    pieces = list(model.generate("import os\n", stream=True, **kw))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate("import os\n", **kw)


def test_same_seed_same_sample_and_top_k_1_is_greedy(model):
    a = model.generate("class Foo:", max_new_tokens=16, temperature=1.0, seed=7)
    b = model.generate("class Foo:", max_new_tokens=16, temperature=1.0, seed=7)
    assert a == b
    greedy = model.generate("class Foo:", max_new_tokens=16, temperature=0)
    assert model.generate("class Foo:", max_new_tokens=16, temperature=1.0, top_k=1, seed=1) == greedy


def test_stop_string_cuts_the_text(model):
    full = model.generate("def f(x):\n", max_new_tokens=40, temperature=0)
    assert "\n" in full.strip("\n")
    stop = "\n"
    cut = model.generate("def f(x):\n", max_new_tokens=40, temperature=0, stop=stop)
    assert stop not in cut and full.startswith(cut)
    streamed = "".join(model.generate("def f(x):\n", max_new_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == cut


def test_batch_of_strings_matches_each_prompt_alone(model):
    prompts = ["def add(a, b):", "import sys\nimport os\n\nclass"]
    batch = model.generate(prompts, max_new_tokens=12, temperature=0)
    assert batch == [model.generate(p, max_new_tokens=12, temperature=0) for p in prompts]


def test_token_ids_in_token_ids_out(model):
    ids = model.tokenizer.encode("for i in range(10):")
    out = model.generate(ids, max_new_tokens=8, temperature=0)
    assert isinstance(out, list) and all(isinstance(t, int) for t in out) and len(out) == 8
    assert model.tokenizer.decode(out) == model.generate("for i in range(10):", max_new_tokens=8, temperature=0)
    assert model.generate(torch.tensor([ids]), max_new_tokens=8, temperature=0) == [out]


def test_chat_uses_the_checkpoint_template(model):
    rendered = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in model.tokenizer.decode(model.tokenizer.encode(rendered), skip_special=False)
    reply = model.chat([{"role": "user", "content": "hi"}], max_new_tokens=8, seed=0)
    assert isinstance(reply, str)
    assert model.tokenizer.token_id("<|im_end|>") in model.stop_ids()


def test_logits_have_batch_time_vocab_shape(model):
    ids = torch.tensor([model.tokenizer.encode("x = 1\n")] * 2)
    assert model(ids).shape == (2, ids.shape[1], 4096)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample(logits, Sampling(1.0, None, 0.7, None), torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}


def test_card_says_what_the_embedded_model_is(model):
    assert "Held-out loss" in model.card and "standard-library" in model.card


def test_chat_template_may_live_in_its_own_file(model, tmp_path):
    import json
    import shutil

    from zoo.tasks import Tokenizer

    directory = tmp_path / "m"
    shutil.copytree(model.directory, directory)
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    messages = [{"role": "user", "content": "hi"}]
    assert Tokenizer(directory).apply_chat_template(messages) == model.tokenizer.apply_chat_template(messages)
