"""GLM-130B's tokenizer (icetk's `ice_text.model`, as SwissArmyTransformer 0.2.x configures it) and the GLM
prompt rules, for zoo's text task (Family.tokenizer / Family.prompt).

The SentencePiece model is loaded with `sentencepiece` and extended the way SAT's GLM130BTokenizer does it:
after the model's own pieces come the special tokens ([MASK], [gMASK], [sMASK], <eod>, <sop>, <eop>, <ENC>,
<dBLOCK>; control pieces), the tab and blank-run tokens (<|tab|>, <|blank_2|> ... <|blank_80|>; user-defined
pieces, so SentencePiece matches them inside text) and 256 byte-fallback pieces. Text ids are shifted by icetk's
20,000 image tokens, so with the published 130,000-piece model [MASK] is 150000, <sop> 150004, <eop> 150005, and
eos (</s>) 20002. Text is preprocessed as SAT does: newline -> <n>, tab -> <|tab|>, runs of 2..80 spaces ->
<|blank_k|> (decoding reverses it).

The pieces are appended by writing protobuf fields onto the serialized model (appended repeated fields extend
the list; a second trainer_spec message merges into the first), so no protobuf package is needed.

ChatGLM-6B's tokenizer is the same construction (its special token 3 is <unused_0>, and the final revision has
no image-token offset); the facts come from tokenizer_config.json or the native config.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

MODEL_FILE = "ice_text.model"
MAX_BLANK = 80
GLM_130B_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
CHATGLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
TAB = "<|tab|>"
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # SentencePiece piece types


def blank(n: int) -> str:
    return f"<|blank_{n}|>"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def _piece(text: str, kind: int) -> bytes:
    """ModelProto.pieces entry: SentencePiece{piece = 1, score = 2, type = 3}."""
    body = _field(1, 2, text.encode()) + _field(2, 5, struct.pack("<f", 0.0)) + _field(3, 0, _varint(kind))
    return _field(1, 2, body)


def extend_model(proto: bytes, specials: tuple[str, ...], max_blank: int = MAX_BLANK,
                 byte_fallback: bool = True) -> bytes:
    """The serialized SentencePiece model with SAT's extra pieces appended (see the module docstring)."""
    extra = b"".join(_piece(t, CONTROL) for t in specials)
    extra += b"".join(_piece(t, USER_DEFINED) for t in (TAB, *(blank(i) for i in range(2, max_blank + 1))))
    if byte_fallback:
        extra += b"".join(_piece(f"<0x{i:02X}>", BYTE) for i in range(256))
        extra += _field(2, 2, _field(35, 0, _varint(1)))  # trainer_spec.byte_fallback = true
    return proto + extra


class GLMTokenizer:
    """ice_text.model through sentencepiece, with GLM's special tokens, id offset and text preprocessing."""

    @staticmethod
    def available(directory: Path) -> bool:
        return (Path(directory) / MODEL_FILE).is_file()

    def __init__(self, directory: Path):
        try:
            import sentencepiece as spm
        except ImportError:
            raise ImportError("GLM's tokenizer needs sentencepiece: pip install 'zoo[glm]' (or pass token ids)") \
                from None

        directory = Path(directory)
        path = directory / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; GLM's tokenizer is icetk's ice_text.model (put it beside the "
                                    "checkpoint before converting, or pass token ids)")
        facts = self._facts(directory)
        self.offset: int = facts["image_tokens"]
        self.specials: tuple[str, ...] = tuple(facts["specials"])
        self.max_blank: int = facts.get("max_blank", MAX_BLANK)
        self.roles: dict[str, str | None] = facts["roles"]
        self.config = {k: v for k, v in self.roles.items() if v is not None}
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(extend_model(path.read_bytes(), self.specials, self.max_blank))
        self.n_pieces = self.sp.GetPieceSize()
        first_special = self.sp.PieceToId(self.specials[0])
        self.special_ids = {self.offset + first_special + i: t for i, t in enumerate(self.specials)}
        self.style = facts["style"]

    @staticmethod
    def _facts(directory: Path) -> dict[str, Any]:
        """Offset, special tokens and role names: tokenizer_config.json (ChatGLM-6B ships one) over the native
        config's family config (position_2d marks ChatGLM-6B) over GLM-130B's published values."""
        native = {}
        if (directory / "config.json").is_file():
            native = json.loads((directory / "config.json").read_text())
        model = native.get("config", {})
        chat = bool(model.get("position_2d"))
        tok = json.loads((directory / "tokenizer_config.json").read_text()) \
            if (directory / "tokenizer_config.json").is_file() else {}
        vocab = model.get("vocab_size", 150528)
        facts = {
            "image_tokens": tok.get("num_image_tokens", 0 if chat and vocab < 150000 else 20000),
            "specials": CHATGLM_SPECIALS if chat else GLM_130B_SPECIALS,
            "style": "chatglm" if chat else "glm-130b",
            "roles": {"eos_token": tok.get("eos_token", "<eop>" if chat else "</s>"),
                      "bos_token": tok.get("bos_token", "<sop>"),
                      "pad_token": tok.get("pad_token", "<pad>" if chat else None),
                      "mask_token": tok.get("mask_token", "[MASK]"),
                      "gmask_token": tok.get("gmask_token", "[gMASK]")},
        }
        return {**facts, **native.get("extra", {}).get("tokenizer", {})}

    # -- the Tokenizer protocol of zoo.tasks.text -----------------------------------------------------------

    def special(self, key: str) -> str | None:
        return self.roles.get(key)

    def token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        for i, t in self.special_ids.items():
            if t == token:
                return i
        piece = self.sp.PieceToId(token)
        return piece + self.offset if self.sp.IdToPiece(piece) == token else None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """ChatGLM-6B's conversation format (its chat()): the last user message alone, or, with history,
        "[Round i]\n问：{question}\n答：{answer}\n" per finished round and "[Round n]\n问：{question}\n答：" last."""
        if self.style != "chatglm":
            raise ValueError("GLM-130B is not a chat model: use generate() (blank infilling or [gMASK] continuation)")
        turns = [m for m in messages if m["role"] in ("user", "assistant")]
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("messages: the conversation must end with a user message")
        history = list(zip(turns[0:-1:2], turns[1:-1:2]))
        if any(q["role"] != "user" or a["role"] != "assistant" for q, a in history):
            raise ValueError("messages: user and assistant messages must alternate, starting with the user")
        if not history:
            return turns[-1]["content"]
        prompt = "".join(f"[Round {i}]\n问：{q['content']}\n答：{a['content']}\n" for i, (q, a) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{turns[-1]['content']}\n答："

    def preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", TAB)
        for n in range(self.max_blank, 1, -1):  # longest runs first
            text = text.replace(" " * n, blank(n))
        return text

    def postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace(TAB, "\t")
        for n in range(2, self.max_blank + 1):
            text = text.replace(blank(n), " " * n)
        return text

    def encode(self, text: str) -> list[int]:
        """Text ids (no special tokens), as SAT's GLM130BTokenizer.encode with its defaults."""
        return [i + self.offset for i in self.sp.EncodeAsIds(self.preprocess(text))]

    def decode(self, ids, skip_special: bool = True) -> str:
        out, run = [], []
        for i in (int(t) for t in ids):
            if i in self.special_ids or not self.offset <= i < self.offset + self.n_pieces:
                if run:
                    out.append(self.postprocess(self.sp.DecodeIds(run)))
                    run = []
                if not skip_special and i in self.special_ids:
                    out.append(self.special_ids[i])
                continue
            run.append(i - self.offset)
        if run:
            out.append(self.postprocess(self.sp.DecodeIds(run)))
        return "".join(out)


MASKS = re.compile(r"\[[sg]?MASK\]")


class GLMPrompt:
    """GLM's prompt rules (GLM-130B generate.py; ChatGLM-6B's tokenizer).

    GLM-130B: the text is tokenized around its mask tokens; without one, [gMASK] is appended (long
    generation); eos follows unless the text ends with a mask; then <sop>. The model fills the blank of the
    first [MASK] (else [sMASK], else [gMASK]) and stops at <eop> or eos, then the next blank of that kind, one
    after another until none is left (`refill`, generate.py's loop); for blanks inside the text the result is
    the text with every blank filled, for one [gMASK] the continuation. ChatGLM-6B: text + [gMASK] + <sop>, the
    continuation.
    """

    def _which(self, text: str) -> str:
        return "[MASK]" if "[MASK]" in text else "[sMASK]" if "[sMASK]" in text else "[gMASK]"

    def _parts(self, tokenizer: GLMTokenizer, text: str) -> tuple[list[int], int, list[int]]:
        """(ids up to the filled mask, its id, ids after it up to <sop>) of the context for `text`."""
        if tokenizer.style == "chatglm":
            return tokenizer.encode(text), tokenizer.token_id("[gMASK]"), []
        which = self._which(text)
        pieces = MASKS.split(text)
        masks = MASKS.findall(text)
        ids: list[int] = []
        mask_at = None
        for i, m in enumerate(masks):
            ids += tokenizer.encode(pieces[i])
            if m == which and mask_at is None:
                mask_at = len(ids)
            ids.append(tokenizer.token_id(m))
        ids += tokenizer.encode(pieces[-1])
        if not masks:
            mask_at = len(ids)
            ids.append(tokenizer.token_id("[gMASK]"))
        if masks and not text.endswith("MASK]"):
            ids.append(tokenizer.token_id(tokenizer.special("eos_token")))
        return ids[:mask_at], ids[mask_at], ids[mask_at + 1:]

    def encode(self, tokenizer: GLMTokenizer, text: str) -> list[int]:
        before, mask, after = self._parts(tokenizer, text)
        return [*before, mask, *after, tokenizer.token_id("<sop>")]

    def infills(self, text: str) -> bool:
        """Whether the output is the prompt with its blanks filled (not a continuation): a [MASK] or [sMASK], or
        several [gMASK]s (filled one after another, like the others)."""
        return bool(re.search(r"\[s?MASK\]", text)) or text.count("[gMASK]") > 1

    def echoes_prompt(self, tokenizer: GLMTokenizer, text: str) -> bool:
        return tokenizer.style != "chatglm" and self.infills(text)

    def _around(self, tokenizer: GLMTokenizer, prompt: str,
                prompt_ids: list[int] | None) -> tuple[list[int], int, list[int]]:
        """(ids before the blank being filled, its mask id, ids after it up to <sop>) of a round's prompt ids
        (the first round's from the text when not given)."""
        if prompt_ids is None:
            return self._parts(tokenizer, prompt)
        mask = tokenizer.token_id(self._which(prompt))
        context = prompt_ids[:-1]  # (the round's prompt ends with <sop>)
        at = context.index(mask)
        return context[:at], mask, context[at + 1:]

    def refill(self, tokenizer: GLMTokenizer, prompt: str, prompt_ids: list[int],
               new_ids: list[int]) -> list[int] | None:
        """generate.py's loop over blanks: this round's blank put in place of its mask; while a blank of the
        kind being filled ([MASK], else [sMASK], else [gMASK], chosen from the text) is left, the next round's
        prompt (the filled context + <sop>, the next blank the first of its kind), else None. ChatGLM-6B's
        prompts have one blank."""
        if tokenizer.style == "chatglm":
            return None
        before, mask, after = self._around(tokenizer, prompt, prompt_ids)
        filled = [*before, *new_ids, *after]
        return [*filled, tokenizer.token_id("<sop>")] if mask in filled else None

    def decode(self, tokenizer: GLMTokenizer, prompt: str, new_ids: list[int],
               prompt_ids: list[int] | None = None) -> str:
        """The text so far: the prompt up to the blank and the blank (infilling), or the continuation."""
        if not self.echoes_prompt(tokenizer, prompt):
            return tokenizer.decode(new_ids)
        before, _, _ = self._around(tokenizer, prompt, prompt_ids)
        return tokenizer.decode([*before, *new_ids])

    def complete(self, tokenizer: GLMTokenizer, prompt: str, new_ids: list[int],
                 prompt_ids: list[int] | None = None) -> str:
        """The final text: as generate.py's answers, the context with the last blank's tokens put in place of its
        mask (earlier blanks are already in the round's prompt ids; the trailing eos dropped), detokenized."""
        if not self.echoes_prompt(tokenizer, prompt):
            return tokenizer.decode(new_ids)
        before, _, after = self._around(tokenizer, prompt, prompt_ids)
        eos = tokenizer.token_id(tokenizer.special("eos_token"))
        if after and after[-1] == eos:
            after = after[:-1]
        return tokenizer.decode([*before, *new_ids, *after], skip_special=False)
