"""Beam search in the one decoding engine (zoo/generation.py): token for token against transformers' own beam
search on tiny Qwen2, Phi-3 and xLSTM checkpoints made by transformers and converted by zoo (KV-cache and
recurrent states alike, a batch of two prompts included), against a literal reference of GLM-130B's
BeamSearchStrategy for GLM, and on every language-model family's state (MatMul-free included)."""

from __future__ import annotations

from collections import Counter
from functools import partial

import pytest
import torch

import zoo
from tests import glm_reference as R
from tests.helpers import tiny_phi3, tiny_qwen2
from zoo.generation import Beams, beam_search

# the transformers arguments each case passes to both sides
CASES = [
    dict(num_beams=4, length_penalty=0.3, num_return_sequences=3, early_stopping=True),
    dict(num_beams=3, no_repeat_ngram_size=2, num_return_sequences=2, early_stopping="never", length_penalty=2.0),
    dict(num_beams=2),
]
NEW = 20


def hf_beams(ref, prompts: list[list[int]], n: int, stops: list[int], pad: int, **kw) -> list[list[int]]:
    """transformers' generate(num_beams=...) on left-padded prompts: each returned sequence's new tokens, cut
    after its first stop token (transformers pads the rest)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad,
                           eos_token_id=stops, **kw)
    rows = out[:, width:].tolist()
    return [r[: min([r.index(s) + 1 for s in stops if s in r], default=len(r))] for r in rows]


def frequent_tokens(model, prompts, k: int = 2) -> list[int]:
    """Stop tokens this model really meets: the most frequent tokens of its greedy continuations, so beams finish
    at different lengths and the finished-beam bookkeeping is exercised."""
    greedy = model.generate(prompts, max_new_tokens=NEW)
    return [t for t, _ in Counter(t for row in greedy for t in row).most_common(k)]


def assert_matches_transformers(model, ref, prompts, kw, stops):
    ours = beam_search(model.module, prompts, NEW, Beams(**kw), set(stops), model._pad_id())
    flat = [beam for answers in ours for beam in answers]
    assert flat == hf_beams(ref, prompts, NEW, stops, model._pad_id(), **kw), kw
    return flat


def random_prompts(vocab: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    ref = tiny_qwen2(root / "hf")
    zoo.convert(root / "hf", root / "native", progress=False)
    return zoo.load(root / "native", dtype=torch.float32), ref


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_qwen2_beams_equal_transformers_for_one_prompt_and_a_padded_batch_of_two(qwen2, kw):
    model, ref = qwen2
    prompts = random_prompts(256, (7, 3), seed=5)
    stops = frequent_tokens(model, prompts)
    finished_early = False
    for batch in ([prompts[0]], prompts):
        flat = assert_matches_transformers(model, ref, batch, kw, stops)
        finished_early |= any(len(b) < NEW for b in flat)
    if kw is CASES[0]:
        assert finished_early  # a beam ending in a stop token was returned: that path was compared too


def test_qwen2_beams_through_the_compiled_step_equal_the_eager_ones(qwen2):
    model, _ = qwen2
    prompts = random_prompts(256, (7, 3), seed=5)
    stops = set(frequent_tokens(model, prompts))
    kw = dict(num_beams=4, length_penalty=0.3, num_return_sequences=3)
    eager = beam_search(model.module, prompts, NEW, Beams(**kw), stops, 2, compile=False)
    assert beam_search(model.module, prompts, NEW, Beams(**kw), stops, 2, compile=True) == eager


def test_qwen2_generate_takes_transformers_beam_arguments(qwen2):
    model, ref = qwen2
    prompt = random_prompts(256, (6,), seed=9)[0]
    kw = dict(num_beams=3, length_penalty=0.7, no_repeat_ngram_size=3, num_return_sequences=2)
    got = model.generate(prompt, max_new_tokens=NEW, **kw)
    assert got == hf_beams(ref, [prompt], NEW, sorted(model.stop_ids()), model._pad_id(), **kw)
    assert model.last_strategy == ("beam search (num_beams=3, length_penalty=0.7, no_repeat_ngram_size=3, "
                                   "num_return_sequences=2)")
    alone = [model.generate(p, max_new_tokens=4, num_beams=2) for p in (prompt, prompt[:3])]
    assert model.generate([prompt, prompt[:3]], max_new_tokens=4, num_beams=2) == alone


@pytest.mark.parametrize("longrope", [True, False])
def test_phi3_beams_equal_transformers(tmp_path, longrope):
    ref = tiny_phi3(tmp_path / "hf", longrope=longrope)
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native", dtype=torch.float32)
    prompts = random_prompts(128, (8, 5), seed=3)
    stops = frequent_tokens(model, prompts)
    for kw in CASES[:2]:
        assert_matches_transformers(model, ref, prompts, kw, stops)


def test_xlstm_beams_equal_transformers_recomputing_each_step(tmp_path):
    """transformers' xLSTM cache cannot be reordered, so its beam search runs without a cache (use_cache=False:
    the whole sequence each step); zoo reorders its recurrent memory per beam. transformers' xLSTM reads left pads
    into its memory (it takes no attention mask), so zoo's padded batch is compared with each prompt alone there."""
    from tests.xlstm_reference import tiny_hf_xlstm

    ref = tiny_hf_xlstm(tmp_path / "hf", seed=0)
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native", dtype=torch.float32)
    prompts = random_prompts(128, (9, 4), seed=4)
    stops = frequent_tokens(model, prompts)
    for kw in CASES[:2]:
        ours = beam_search(model.module, prompts, 12, Beams(**kw), set(stops), model._pad_id())
        theirs = [b for p in prompts for b in hf_beams(ref, [p], 12, stops, model._pad_id(), use_cache=False, **kw)]
        assert [b for answers in ours for b in answers] == theirs, kw


def test_every_family_state_runs_beam_search_and_a_batch_equals_each_prompt_alone():
    """KV caches, GLM's, Phi's token cache and the recurrent memories of xLSTM and MatMul-free: the engine only
    asks the state to reorder its rows."""
    from tests.test_fast_decode import FAMILIES, tiny

    beams = Beams(num_beams=3, num_return_sequences=2)
    for family in FAMILIES:
        module = tiny(family)
        tail = [251, 254] if family == "glm" else []
        a, b = [5, 6, 7, 8, *tail], [9, 10, *tail]
        together = beam_search(module, [a, b], 4, beams, {3})
        assert together == [beam_search(module, [a], 4, beams, {3})[0], beam_search(module, [b], 4, beams, {3})[0]]
        assert all(len(answers) == 2 for answers in together), family


# -- GLM: GLM-130B's own beam search (generation/strategies.py), against its literal reference ----------------------

L, H, INNER, HEADS, VOCAB, TP = 2, 64, 96, 4, 256, 2
MASK, GMASK, SMASK, EOS, SOP, EOP = 250, 251, 252, 253, 254, 255
GLM_CASES = [
    dict(num_beams=4, length_penalty=0.5, num_return_sequences=4),
    dict(num_beams=3, no_repeat_ngram_size=2, min_gen_length=4, num_return_sequences=2),
    dict(num_beams=3, length_penalty=2.0),
]


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    base = tmp_path_factory.mktemp("glm")
    shards = R.random_sat_shards(L, H, INNER, HEADS, VOCAB, TP, std=0.25)
    R.write_sat_checkpoint(base / "sat", shards, model_config={
        "num_layers": L, "hidden_size": H, "inner_hidden_size": INNER, "num_attention_heads": HEADS,
        "vocab_size": VOCAB, "max_sequence_length": 1024, "mask_token_id": MASK, "gmask_token_id": GMASK,
        "smask_token_id": SMASK, "sop_token_id": SOP})
    zoo.convert(base / "sat", base / "native", progress=False)
    return zoo.load(base / "native", dtype=torch.float32), shards


def glm_prompt(n: int, mask: int, at: int | None = None, seed: int = 0) -> list[int]:
    ids = torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids + [mask, SOP] if at is None else ids[:at] + [mask] + ids[at:] + [EOS, SOP]


def reference_beams(shards, seq: list[int], n: int, stops: list[int], kw: dict) -> list[list[int]]:
    """generate.py's BeamSearchStrategy (consider_end=True; deterministic=True) through batch_filling_sequence."""
    strategy = R.Glm130bBeamSearchStrategy(
        1, kw["num_beams"], length_penalty=kw.get("length_penalty", 1.0), consider_end=True, end_tokens=stops,
        no_repeat_ngram_size=kw.get("no_repeat_ngram_size", 0), min_gen_length=kw.get("min_gen_length", 0),
        deterministic=True)
    gmask = GMASK in seq
    position = seq.index(GMASK if gmask else MASK)
    out, _ = R.glm130b_batch_filling_sequence(
        shards, L, HEADS, torch.tensor([seq]), torch.tensor([len(seq)]), strategy,
        partial(R.glm130b_get_masks_and_position_ids, mask_position=position, max_gen_length=n, gmask=gmask))
    return [beam.tolist()[len(seq):] for beam in out[0]][: kw.get("num_return_sequences", 1)]


@pytest.mark.parametrize("kw", GLM_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_glm_beams_equal_the_glm130b_beam_search_strategy(glm, kw):
    model, shards = glm
    for seq in (glm_prompt(20, GMASK, seed=1), glm_prompt(16, MASK, at=7, seed=2)):
        stops = sorted(frequent_tokens(model, [seq]))  # (the tiny checkpoint has no tokenizer: stand-in end tokens)
        got = beam_search(model.module, [seq], 12, Beams(**kw), set(stops))[0]
        assert got == reference_beams(shards, seq, 12, stops, kw)
    if kw is GLM_CASES[0]:  # through model.generate too (no stop tokens: the tiny checkpoint has no tokenizer)
        assert model.generate(seq, max_new_tokens=12, **kw) == reference_beams(shards, seq, 12, [], kw)


def test_chatglm_keeps_transformers_beam_rule_and_glm130b_its_own():
    from zoo.architectures.glm import CHATGLM_6B, GLM, GLM_130B, GLMBeamSearch, GLMConfig

    small = dict(vocab_size=64, dim=16, n_layers=1, n_heads=2, inner_size=8)
    assert GLM(GLMConfig(**small)).beam_rule is GLMBeamSearch
    assert GLM(GLMConfig(**small, position_2d=True, mlp="gelu_tanh", tie_embeddings=False)).beam_rule is None
    assert not GLM_130B.position_2d and CHATGLM_6B.position_2d


def test_glm130b_beam_search_refuses_transformers_early_stopping_by_name():
    from tests.test_fast_decode import tiny

    with pytest.raises(ValueError, match="early_stopping=True: GLM-130B's beam search stops by its own rule"):
        beam_search(tiny("glm"), [[5, 6, 251, 254]], 3, Beams(num_beams=2, early_stopping=True), set())
