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

    from zoo.tasks.text import Tokenizer

    directory = tmp_path / "m"
    shutil.copytree(model.directory, directory)
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    messages = [{"role": "user", "content": "hi"}]
    assert Tokenizer(directory).apply_chat_template(messages) == model.tokenizer.apply_chat_template(messages)


# -- every argument is checked where it enters, and the error names it ------------------------------------------


@pytest.mark.parametrize("prompt,words", [
    ([999999], ["999999", "0..4095"]),
    ([-5], ["-5"]),
    ([[1, 2], []], ["empty"]),
    ([], ["prompt"]),
    ([1.5, 2], ["integers", "1.5"]),
    (torch.randn(1, 3), ["prompt", "float32"]),
])
def test_bad_prompts_are_refused_by_name(model, prompt, words):
    with pytest.raises(ValueError) as e:
        model.generate(prompt, max_new_tokens=2)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("kwargs,words", [
    (dict(top_k=-3), ["top_k=-3", ">= 1"]),
    (dict(top_k=0), ["top_k=0"]),
    (dict(temperature=float("nan")), ["temperature=nan", "finite"]),
    (dict(temperature=-1), ["temperature=-1", ">= 0"]),
    (dict(temperature=float("inf")), ["temperature=inf"]),
    (dict(temperature=1.0, top_p=0.0), ["top_p=0.0", "0 < top_p <= 1"]),
    (dict(temperature=1.0, top_p=1.5), ["top_p=1.5"]),
    (dict(max_new_tokens=-3), ["max_new_tokens=-3", ">= 0"]),
    (dict(max_new_tokens=2.5), ["max_new_tokens=2.5"]),
    (dict(seed=-1), ["seed=-1"]),
    (dict(stop=""), ["stop"]),
])
def test_bad_sampling_arguments_are_refused_by_name(model, kwargs, words):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError) as e:
        model.generate("x = 1", **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_zero_new_tokens_is_an_empty_answer(model):
    assert model.generate("x = 1", max_new_tokens=0) == ""
    assert model.generate([1, 2, 3], max_new_tokens=0) == []


def test_prompt_past_the_context_warns_for_a_rotary_model(model):
    with pytest.warns(UserWarning, match="exceeds this model's context of 1024 tokens"):
        model.generate([5] * 1020, max_new_tokens=6)


@pytest.mark.parametrize("ids,words", [
    (torch.randn(1, 3), ["input_ids", "float32"]),
    (torch.tensor([1, 2, 3]), ["input_ids", "[batch, time]", "(3,)"]),
    (torch.tensor([[1, 5000]]), ["5000", "0..4095"]),
    ([[1, 2]], ["input_ids", "list"]),
])
def test_model_call_checks_its_input(model, ids, words):
    with pytest.raises(ValueError) as e:
        model(ids)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_bad_argument_is_one_line_without_traceback(capsys):
    from zoo.cli import main

    assert main(["generate", "qwen2-tiny-stdlib", "x", "--max-new-tokens", "-3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--max-new-tokens -3" in err and "Traceback" not in err


# -- the state protocol: positions, pads and masks, computed in one place for every family ------------------------


def test_state_masks_left_pads_and_a_bidirectional_prefix():
    from zoo.architectures.state import State

    s = State(2, 8, pad=torch.tensor([2, 0]))
    s.prefix = torch.tensor([2, 3])
    m = s.attention_mask(5, torch.device("cpu"))[:, 0].int()
    # row 0: pads at 0-1 see only themselves; the prefix 2-3 sees itself both ways; 4 is causal
    assert m[0].tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert m[1].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert s.positions(5, torch.device("cpu")).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert s.valid(5, torch.device("cpu")).tolist() == [[False, False, True, True, True], [True] * 5]
    s.advance(5)
    assert s.valid(1, torch.device("cpu")) is None  # past the pads nothing is masked
    assert s.positions(1, torch.device("cpu")).tolist() == [[3], [5]]


def test_kv_cache_is_allocated_once_and_does_not_grow(model):
    state = model.module.new_state(1, 40)
    model.module(torch.tensor([[1, 2, 3, 4]]), state, last_only=True)
    size = state.nbytes()
    for t in range(20):
        model.module(torch.tensor([[t + 5]]), state, last_only=True)
    assert state.nbytes() == size and state.length == 24
    with pytest.raises(ValueError, match="holds 40 positions"):
        model.module(torch.ones(1, 17, dtype=torch.long), state)


def test_last_only_scores_only_the_last_position(model):
    ids = torch.tensor([model.tokenizer.encode("import os\nimport sys\n")])
    assert torch.allclose(model.module(ids, last_only=True), model.module(ids)[:, -1:], atol=1e-5, rtol=0)


# -- the decoding protocol (architectures/state.py): one written contract for every language model ---------------


def _tiny_language_models():
    from tests.test_fast_decode import FAMILIES, tiny

    return {family: tiny(family) for family in FAMILIES}


def test_every_language_model_meets_the_written_decoding_protocol():
    from zoo.architectures.state import DecodingModel, State

    for family, module in _tiny_language_models().items():
        assert isinstance(module, DecodingModel), family
        state = module.new_state(2, 12, torch.tensor([1, 0]))
        assert isinstance(state, State), family
        tail = [251, 254] if family == "glm" else [20, 21]  # (GLM: [gMASK] <sop>)
        with torch.inference_mode():  # the state by keyword, for every family (GLM included: no argument swap)
            logits = module(torch.tensor([[0, *tail], [7, *tail]]), state=state, last_only=True)
        assert logits.shape[:2] == (2, 1) and state.length == 3, family


def test_the_state_switches_its_own_form_and_keeps_its_tensors():
    from zoo.architectures.state import KVCache

    state = KVCache(1, 8)
    state.length = 3
    state.make_static("cpu")
    position, slots = state.position, state.slots
    assert state.static and int(position) == 3
    state.make_dynamic()
    state.advance(2)  # an eager step moves both counts
    state.make_static("cpu")
    assert state.static and state.position is position and state.slots is slots and int(position) == 5
    state.counted_in_graph(1)  # a compiled step moved only the device count
    assert state.length == 6


def test_reorder_moves_every_batch_row_of_every_family_state():
    for family, module in _tiny_language_models().items():
        state = module.new_state(3, 10, torch.tensor([2, 0, 1]))
        tail = [251, 254] if family == "glm" else [20, 21]
        with torch.inference_mode():
            module(torch.tensor([[0, 0, 5, *tail], [5, 6, 7, *tail], [0, 8, 9, *tail]]), state=state)
            before = [(t.clone(), d) for t, d in state.batch_dims()]
            assert len(before) >= 2, family  # the family's own memory is named, not only the pads
            rows = torch.tensor([2, 2, 0])
            state.reorder(rows)
        for (old, dim), (new, _) in zip(before, state.batch_dims()):
            assert torch.equal(new, old.index_select(dim, rows)), family


def test_a_state_that_hides_a_batch_tensor_is_refused_by_name():
    from zoo.architectures.state import State

    class Forgetful(State):
        def __init__(self):
            super().__init__(2, 4)
            self.memory = torch.zeros(2, 3)

        def tensors(self):
            return super().tensors() + [self.memory]

    with pytest.raises(TypeError, match="Forgetful.batch_dims"):
        Forgetful().reorder(torch.tensor([1, 0]))


# -- which strategy ran, and the combinations refused by name ------------------------------------------------------


def test_generate_says_which_strategy_ran_with_its_numbers(model):
    model.generate("x = 1", max_new_tokens=2, temperature=0)
    assert model.last_strategy == "greedy"
    model.generate("x = 1", max_new_tokens=2, temperature=0.8, top_k=40, seed=3)
    assert model.last_strategy == "sampling (temperature=0.8, top_k=40, seed=3)"
    model.generate("x = 1", max_new_tokens=2, num_beams=3, early_stopping=True)
    assert model.last_strategy == "beam search (num_beams=3, length_penalty=1, early_stopping=True)"


def test_cli_prints_the_strategy_on_one_line_beside_the_beams(capsys):
    from zoo.cli import main

    assert main(["generate", "qwen2-tiny-stdlib", "def f(x):", "--max-new-tokens", "4", "--num-beams", "3",
                 "--num-return-sequences", "2", "--length-penalty", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert out.count("def f(x):") == 2 and "--- 2 of 2 ---" in out
    assert err.strip() == "[beam search (num_beams=3, length_penalty=0.5, num_return_sequences=2)]"


@pytest.mark.parametrize("kwargs,words", [
    (dict(num_beams=2, temperature=0.7), ["num_beams=2", "temperature=0.7", "does not sample"]),
    (dict(num_beams=2, top_p=0.9), ["top_p=0.9"]),
    (dict(num_beams=2, top_k=5), ["top_k=5"]),
    (dict(num_beams=2, num_return_sequences=3), ["num_return_sequences=3 > num_beams=2"]),
    (dict(num_beams=0), ["num_beams=0", ">= 1"]),
    (dict(num_beams=2, stream=True), ["stream=True"]),
    (dict(no_repeat_ngram_size=2), ["no_repeat_ngram_size=2", "num_beams > 1"]),
])
def test_nonsense_strategy_combinations_are_refused_by_name(model, kwargs, words):
    with pytest.raises(ValueError) as e:
        model.generate("x = 1", **{"max_new_tokens": 2, **kwargs})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_min_gen_length_keeps_stop_tokens_out_of_the_first_tokens(model):
    stop = min(model.stop_ids())
    prompt = model.tokenizer.encode("x = 1\n")
    free = model.generate(prompt, max_new_tokens=6, temperature=0, min_gen_length=6)
    assert len(free) == 6 and stop not in free
    assert model.last_strategy == "greedy (min_gen_length=6)"


# -- reproducible sampling: the same seed draws the same numbers, compiled or not ----------------------------------


def test_a_draw_takes_one_uniform_number_per_row_whatever_the_settings():
    logits = torch.randn(3, 50)
    for s in (Sampling(1.0, None, None, 0), Sampling(0.7, 5, None, 0), Sampling(1.3, None, 0.5, 0)):
        g = torch.Generator().manual_seed(11)
        sample(logits, s, g)
        after = torch.rand(1, generator=g)
        expected = torch.Generator().manual_seed(11)
        torch.rand(3, 1, generator=expected)
        assert torch.equal(after, torch.rand(1, generator=expected)), s


def test_the_same_seed_samples_the_same_text_with_and_without_compile():
    """fp32: the compiled step's logits differ from the eager ones by ~1e-6, the draws are the same numbers, so the
    text is the same. (bf16 logits differ by up to one unit in the last place: README "Reproducible sampling".)"""
    fp32 = zoo.load("qwen2-tiny-stdlib", dtype=torch.float32)
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=50)
    for seed in (0, 1):
        fp32.compile = False
        eager = fp32.generate("import os\n", seed=seed, **kw)
        fp32.compile = True
        assert fp32.generate("import os\n", seed=seed, **kw) == eager
