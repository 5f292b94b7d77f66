"""GLM: every blank of a prompt filled, one after another, by GLM-130B generate.py's loop (`fill_blanks`),
against its literal reference (tests/glm_reference.py), greedy and with beam search."""

from __future__ import annotations

import pytest
from zoo.architectures.glm_tokenizer import GLMPrompt

from tests import glm_reference as R
from tests.test_glm_tokenizer import HEADS, L, ice_text, infill_model, tok  # noqa: F401 (fixtures)

TEXTS = [
    "Tsinghua University is located in [MASK], the [MASK] of China.",
    "The quick [sMASK] jumps over the [sMASK] near the river bank.",
    "GLM is a [MASK] model and [gMASK]",  # [MASK] chosen: the [gMASK] stays as text, as generate.py leaves it
    "[gMASK] Peking University [gMASK]",
]


def reference(model_fixture, tokenizer, text: str, steps: int, strategy) -> list[str]:
    eos = tokenizer.token_id("</s>")
    command = lambda t: eos if t == "eos" else tokenizer.token_id(t)  # noqa: E731
    seq, kind, use_gmask = R.sat_generation_context(tokenizer.encode, command, text)
    outputs = R.glm130b_fill_blanks(model_fixture["shards"], L, HEADS, seq, tokenizer.token_id(kind), use_gmask,
                                    strategy, tokenizer.token_id("<sop>"), steps)
    return [tokenizer.decode(o[:-1] if o[-1] == eos else o, skip_special=False) for o in outputs]


def ends(tokenizer) -> list[int]:
    return [tokenizer.token_id("<eop>"), tokenizer.token_id("</s>")]


@pytest.mark.parametrize("text", TEXTS)
def test_every_blank_is_filled_in_generate_pys_order_greedy(infill_model, tok, text):  # noqa: F811
    expected = reference(infill_model, tok, text, 5, R.Glm130bGreedy(ends(tok)))[0]
    got = infill_model["model"].generate(text, max_new_tokens=5, temperature=0.0)
    assert got == expected
    if text.count("[MASK]") > 1 or "[sMASK]" in text:
        assert "[MASK]" not in got and "[sMASK]" not in got  # no blank of the filled kind is left as text
    assert "".join(infill_model["model"].generate(text, max_new_tokens=5, temperature=0.0, stream=True)) == got


@pytest.mark.parametrize("text", TEXTS[:2])
def test_every_blank_is_filled_with_glm130b_beam_search(infill_model, tok, text):  # noqa: F811
    strategy = R.Glm130bBeamSearchStrategy(1, 3, length_penalty=0.8, consider_end=True, end_tokens=ends(tok),
                                           no_repeat_ngram_size=2, deterministic=True)
    expected = reference(infill_model, tok, text, 5, strategy)
    got = infill_model["model"].generate(text, max_new_tokens=5, num_beams=3, length_penalty=0.8,
                                         no_repeat_ngram_size=2, num_return_sequences=3)
    assert got == expected[:3]


def test_a_batch_fills_each_prompt_as_alone(infill_model):  # noqa: F811
    model = infill_model["model"]
    alone = [model.generate(t, max_new_tokens=4, temperature=0.0) for t in TEXTS]
    assert model.generate(TEXTS, max_new_tokens=4, temperature=0.0) == alone


def test_refill_puts_the_blank_in_place_and_asks_for_the_next(tok):  # noqa: F811 (the fixture)
    rule = GLMPrompt()
    text = "a [MASK] b [MASK] c"
    first = rule.encode(tok, text)
    mask, sop = tok.token_id("[MASK]"), tok.token_id("<sop>")
    second = rule.refill(tok, text, first, [7, 8])
    assert second[-1] == sop and second.count(mask) == 1 and second[: first.index(mask) + 2][-2:] == [7, 8]
    assert rule.refill(tok, text, second, [9]) is None  # the last blank: nothing left to fill
    assert rule.refill(tok, "plain text", rule.encode(tok, "plain text"), [7]) is None
