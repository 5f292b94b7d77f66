"""GLM's tokenizer (icetk's ice_text.model through sentencepiece, SAT's extra pieces and preprocessing), the GLM
prompt rules, and blank infilling end to end through model.generate and `zoo generate`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zoo.architectures.glm_tokenizer import GLMPrompt, GLMTokenizer

import zoo
from tests import glm_reference as R

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    "Tsinghua University is located in Beijing, the capital of China.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):<n>    return a + b",
    "GLM is a general language model pretrained with an autoregressive blank infilling objective.",
    "Peking University and Tsinghua University are in the north west of the city.",
]
OFFSET = 20000  # icetk's image tokens


@pytest.fixture(scope="module")
def ice_text(tmp_path_factory) -> Path:
    """A small SentencePiece model standing in for icetk's ice_text.model (<n> is one of its pieces)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 8), model_writer=buf, vocab_size=64,
                                   user_defined_symbols=["<n>"], minloglevel=2, character_coverage=1.0)
    directory = tmp_path_factory.mktemp("tok")
    (directory / "ice_text.model").write_bytes(buf.getvalue())
    return directory


@pytest.fixture(scope="module")
def tok(ice_text) -> GLMTokenizer:
    return GLMTokenizer(ice_text)


PIECES = 64  # of the trained model; SAT appends its tokens after them


def test_special_tokens_follow_the_pieces_with_icetks_offset(tok):
    n = PIECES
    assert [tok.token_id(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>")] == \
        [OFFSET + n + i for i in range(6)]
    assert tok.token_id("</s>") == OFFSET + 2 == tok.token_id(tok.special("eos_token"))  # GLM-130B's eos: 20002
    assert tok.token_id("<|tab|>") == OFFSET + n + 8 and tok.token_id("<|blank_80|>") == OFFSET + n + 8 + 79
    assert tok.token_id("<0x00>") == OFFSET + n + 8 + 80 and tok.token_id("no such piece") is None


def test_newlines_tabs_and_blank_runs_are_single_tokens_and_round_trip(tok):
    text = "def add(a, b):\n\treturn a +   b" + " " * 100 + "!"
    assert tok.preprocess(text) == R.sat_preprocess(text)  # SAT's order: longest runs first
    ids = tok.encode(text)
    for piece in ("<n>", "<|tab|>", "<|blank_3|>", "<|blank_80|>", "<|blank_20|>"):
        assert tok.token_id(piece) in ids, piece
    assert tok.decode(ids) == text
    assert tok.postprocess(R.sat_preprocess(text)) == R.sat_postprocess(R.sat_preprocess(text)) == text


def test_characters_outside_the_model_fall_back_to_bytes(tok):
    ids = tok.encode("snow \u2603 man")
    byte_ids = [i for i in ids if tok.token_id("<0x00>") <= i < tok.token_id("<0x00>") + 256]
    assert len(byte_ids) == 3  # U+2603 is three UTF-8 bytes, no <unk>
    assert tok.decode(ids) == "snow \u2603 man"


def test_special_tokens_are_not_text_and_decode_skips_them(tok):
    ids = tok.encode("located in [MASK] now")
    assert tok.token_id("[MASK]") not in ids  # text never produces a control token
    mask = tok.token_id("[MASK]")
    assert tok.decode([*tok.encode("Beijing"), mask]) == "Beijing"
    assert tok.decode([mask], skip_special=False) == "[MASK]"


def test_prompt_rules_are_generate_pys(tok):
    rule = GLMPrompt()
    sop, eos = tok.token_id("<sop>"), tok.token_id("</s>")
    for text in ("Tsinghua University is located in [MASK].", "The quick brown fox", "a [sMASK] b [MASK]",
                 "GLM is a general [gMASK]"):
        seq, _, _ = R.sat_generation_context(tok.encode, lambda t: eos if t == "eos" else tok.token_id(t), text)
        assert rule.encode(tok, text) == [*seq, sop], text
    assert rule.echoes_prompt(tok, "in [MASK].") and not rule.echoes_prompt(tok, "plain text")


# -- end to end: a tiny GLM with this tokenizer -----------------------------------------------------------------

L, H, INNER, HEADS = 2, 32, 48, 2


@pytest.fixture(scope="module")
def infill_model(ice_text, tok, tmp_path_factory):
    """A tiny GLM-130B-layout checkpoint whose vocabulary is icetk's: image tokens, the text pieces, SAT's
    extras (padded like the release), converted with ice_text.model beside it."""
    base = tmp_path_factory.mktemp("infill")
    vocab = OFFSET + tok.n_pieces + 64
    vocab += vocab % 2
    shards = R.random_sat_shards(L, H, INNER, HEADS, vocab, 2, std=0.3, seed=3)
    per = vocab // 2
    for r, sd in enumerate(shards):  # unused image tokens: zero rows (the tied head then never prefers them)
        sd["transformer.word_embeddings.weight"][: max(0, OFFSET - r * per)] = 0
    ids = {k: tok.token_id(t) for k, t in (("mask_token_id", "[MASK]"), ("gmask_token_id", "[gMASK]"),
                                           ("smask_token_id", "[sMASK]"), ("sop_token_id", "<sop>"))}
    args = {"num_layers": L, "hidden_size": H, "inner_hidden_size": INNER, "num_attention_heads": HEADS,
            "vocab_size": vocab, "max_sequence_length": 512, **ids}
    R.write_sat_checkpoint(base / "sat", shards)
    (base / "sat" / "ice_text.model").write_bytes((ice_text / "ice_text.model").read_bytes())
    (base / "args.json").write_text(json.dumps(args))
    native = zoo.convert(base / "sat", base / "native", config=base / "args.json", progress=False)
    return {"native": native, "shards": shards, "model": zoo.load(native, dtype=torch.float32)}


def _expected(model, shards, tok, text: str, steps: int) -> tuple[list[int], list[int]]:
    rule = GLMPrompt()
    before, mask, after = rule._parts(tok, text)
    seq = [*before, mask, *after]
    ends = (tok.token_id("<eop>"), tok.token_id("</s>"))
    blank = R.sat_greedy(shards, L, HEADS, [*seq, tok.token_id("<sop>")], len(before), mask == tok.token_id("[gMASK]"),
                         steps, ends)
    blank = [t for t in blank if t not in ends]
    return seq, blank


def test_generate_fills_the_blank_and_returns_the_text(infill_model, tok):
    text = "Tsinghua University is located in [MASK]."
    seq, blank = _expected(infill_model["model"], infill_model["shards"], tok, text, 6)
    assert tok.decode(blank).strip()  # the model wrote something
    out = infill_model["model"].generate(text, max_new_tokens=6, temperature=0.0)
    # generate.py's answer: the context with the blank's tokens in place of [MASK], trailing eos dropped
    mask_at = seq.index(tok.token_id("[MASK]"))
    assert out == tok.decode(seq[:mask_at] + blank + seq[mask_at + 1:-1], skip_special=False)
    assert out.startswith("Tsinghua University is located in") and out.endswith(".")
    assert "".join(infill_model["model"].generate(text, max_new_tokens=6, temperature=0.0, stream=True)) == out


def test_generate_without_a_mask_continues_after_gmask(infill_model, tok):
    text = "The quick brown fox"
    _, blank = _expected(infill_model["model"], infill_model["shards"], tok, text, 8)
    assert infill_model["model"].generate(text, max_new_tokens=8, temperature=0.0) == tok.decode(blank)


def test_zoo_generate_prints_the_filled_text(infill_model):
    text = "Tsinghua University is located in [MASK]."
    expected = infill_model["model"].generate(text, max_new_tokens=6, temperature=0.0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "zoo", "generate", str(infill_model["native"]), text,
                           "--max-new-tokens", "6", "--temperature", "0"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == expected + "\n"


def test_chatglm_prompts_end_with_gmask_and_sop(ice_text, tmp_path):
    (tmp_path / "ice_text.model").write_bytes((ice_text / "ice_text.model").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"config": {"position_2d": True, "vocab_size": 130528}}))
    chat = GLMTokenizer(tmp_path)
    # no image tokens before the text in the final revision
    assert chat.token_id("[MASK]") == PIECES and chat.token_id("<sop>") == PIECES + 4
    assert GLMPrompt().encode(chat, "hello") == [*chat.encode("hello"), chat.token_id("[gMASK]"), PIECES + 4]
    assert chat.special("eos_token") == "<eop>"


def test_chatglm_conversations_use_its_round_format(ice_text, tok, tmp_path):
    (tmp_path / "ice_text.model").write_bytes((ice_text / "ice_text.model").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"config": {"position_2d": True, "vocab_size": 130528}}))
    chat = GLMTokenizer(tmp_path)
    assert chat.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    assert chat.apply_chat_template(conversation) == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：c\n答："
    with pytest.raises(ValueError, match="GLM-130B is not a chat model"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
