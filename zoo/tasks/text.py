"""Text generation: `model(ids)` -> logits, `generate` and `chat` over one decoding engine (zoo/generation.py).

Every argument is checked where it enters, for the Python API and the CLI alike: token ids against the
vocabulary, the prompt plus max_new_tokens against the model's context, sampling parameters, stop strings.
"""

from __future__ import annotations

import json
import numbers
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from zoo.checks import check_decoding_strategy
from zoo.generation import Beams, Sampling, beam_search, check_max_new_tokens, decode, describe_strategy
from zoo.tasks import Command, ZooModel, is_main_process, register_task


class Tokenizer:
    """A Hugging Face `tokenizer.json` (via the tokenizers library) plus tokenizer_config.json facts."""

    @staticmethod
    def available(directory: Path) -> bool:
        return (directory / "tokenizer.json").is_file()

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; this checkpoint has no tokenizer, pass token ids instead")
        self.tok = HFTokenizer.from_file(str(path))
        cfg_path = directory / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.template_file = directory / "chat_template.jinja"

    def special(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.config.get("chat_template")
        if not template and self.template_file.is_file():
            template = self.template_file.read_text()
        if not template:
            raise ValueError("this checkpoint's tokenizer_config.json has no chat_template; use generate()")
        if isinstance(template, list):  # named templates: take the default one
            template = next(t["template"] for t in template if t.get("name") == "default")

        def raise_exception(msg: str):
            raise ValueError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.special("bos_token") or "",
            eos_token=self.special("eos_token") or "",
        )


@register_task("text-generation")
class TextModel(ZooModel):
    """`model(ids)` -> logits [B, T, V]; `generate` and `chat` for text or token ids."""

    commands = {"generate": Command(  # what `zoo generate` may pass (checked before loading); --out: the text
        options=frozenset({"max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "chat", "compile", "tp",
                           "quantize", "out", "num_beams", "length_penalty", "no_repeat_ngram_size", "early_stopping",
                           "num_return_sequences", "min_gen_length"}), inputs="text", out=("*",), out_from_stdout=True)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokenizer: Any = None
        self.compile: bool | None = None  # decode through a torch.compile'd step; None: where it pays (generation.py)
        self.last_strategy: str | None = None  # what the last generate() ran: greedy, sampling or beam search

    def __call__(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T] (an integer tensor)."""
        self.check_ids(input_ids)
        return self.module(input_ids, *args, **kwargs)

    # -- argument checks ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.config, "vocab_size", None)

    def check_ids(self, input_ids: Any) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids: expected an integer tensor [batch, time] of token ids, got "
                             f"{type(input_ids).__name__}; use generate() for text or lists of ids")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids: expected an integer tensor of token ids, got dtype {input_ids.dtype} "
                             f"(shape {tuple(input_ids.shape)})")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected shape [batch, time] with time >= 1, got {tuple(input_ids.shape)}")
        self._check_range(int(input_ids.min()), int(input_ids.max()))

    def _check_range(self, low: int, high: int) -> None:
        v = self.vocab_size
        if low < 0 or (v is not None and high >= v):
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range: this model's vocabulary has ids 0..{v - 1}"
                             if v else f"token id {bad} is out of range: token ids are >= 0")

    def _check_rows(self, rows: list[list[Any]]) -> None:
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("prompt: empty; give at least one token (in every row of a batch)")
        for r in rows:
            for t in r:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                    raise ValueError(f"prompt: token ids must be integers, got {t!r} ({type(t).__name__})")
        self._check_range(min(min(r) for r in rows), max(max(r) for r in rows))

    def _check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = getattr(self.config, "max_seq_len", None)
        if not limit or prompt_len + max_new_tokens <= limit:
            return
        msg = (f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {prompt_len + max_new_tokens} "
               f"exceeds this model's context of {limit} tokens")
        if not self.family.extrapolates:
            raise ValueError(msg + "; shorten the prompt or lower max_new_tokens")
        warnings.warn(msg + "; it will run, but quality past the trained context is not what was published",
                      stacklevel=3)

    # -- tokenizer --------------------------------------------------------------------------------------------------

    @property
    def _tokenizer_cls(self):
        return self.family.tokenizer or Tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.directory is None:
                raise FileNotFoundError("no checkpoint directory, so no tokenizer")
            self._tokenizer = self._tokenizer_cls(self.directory)
        return self._tokenizer

    def _has_tokenizer(self) -> bool:
        return self.directory is not None and self._tokenizer_cls.available(self.directory)

    def stop_ids(self) -> set[int]:
        ids = {int(i) for i in (self.native.extra.get("eos_token_id") or [])}
        if self._has_tokenizer():
            for token in (*self.family.stop_tokens, self.tokenizer.special("eos_token")):
                tid = self.tokenizer.token_id(token)
                if tid is not None:
                    ids.add(tid)
        return ids

    def _pad_id(self) -> int:
        if self._has_tokenizer():
            for key in ("pad_token", "eos_token"):
                tid = self.tokenizer.token_id(self.tokenizer.special(key))
                if tid is not None:
                    return tid
        return min(self.stop_ids(), default=0)

    def _sampling(self, temperature, top_k, top_p, seed) -> Sampling:
        defaults = self.native.extra.get("generation", {})
        if temperature is None:  # the checkpoint's defaults (transformers' top_k=0 means no cut)
            temperature = defaults.get("temperature", 1.0) if defaults.get("do_sample") else 0.0
            top_k = (defaults.get("top_k") or None) if top_k is None else top_k
            top_p = defaults.get("top_p") if top_p is None else top_p
        return Sampling(temperature, top_k, top_p, seed)

    # -- generation -------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        min_gen_length: int = 0,
    ):
        """Continue a prompt.

        str -> new text; list of str -> list of new texts (batched, left padded);
        token ids (list, list of lists, tensor) -> new token ids of the same nesting.
        stream=True (one prompt) yields the new text piece by piece, or token ids one at a time.
        temperature None takes the checkpoint's generation_config defaults (greedy if none).
        num_beams > 1: beam search (transformers' arguments: length_penalty, no_repeat_ngram_size,
        early_stopping, num_return_sequences; a family may bring its own rule, e.g. GLM-130B's); with
        num_return_sequences > 1 each prompt's answer becomes a list of that many, best first.
        min_gen_length: no stop token among the first that many new tokens (GLM-130B's name).
        `self.last_strategy` says afterwards which strategy ran, with its numbers.
        """
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        beams = Beams(num_beams, length_penalty, no_repeat_ngram_size, early_stopping, num_return_sequences,
                      min_gen_length)
        check_decoding_strategy(num_beams, temperature, top_k, top_p, stream, seed)
        sampling = Sampling() if beams.on else self._sampling(temperature, top_k, top_p, seed)
        self.last_strategy = describe_strategy(sampling, beams)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop={stop!r}: give a non-empty string or a list of them")
        if isinstance(prompt, torch.Tensor):
            if prompt.dtype.is_floating_point or prompt.dtype == torch.bool or prompt.ndim not in (1, 2):
                raise ValueError(f"prompt: a tensor prompt holds integer token ids [time] or [batch, time], got "
                                 f"{prompt.dtype} of shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        many = beams.num_return_sequences > 1
        if isinstance(prompt, str):
            if beams.on:
                texts = self._batch_text([prompt], max_new_tokens, sampling, stops, beams)[0]
                return texts if many else texts[0]
            ids = self.encode_prompt(prompt)
            self._check_rows([ids])
            self._check_context(len(ids), max_new_tokens)
            it = self._stream_text(prompt, ids, max_new_tokens, sampling, stops, beams)
            return it if stream else "".join(it)  # (one prompt streams: a stop string ends it early)
        if not isinstance(prompt, Sequence) or len(prompt) == 0:
            raise ValueError(f"prompt: expected text, a list of texts, or token ids; got {prompt!r:.80}")
        if all(isinstance(p, str) for p in prompt):
            if stream:
                raise ValueError("stream=True takes one prompt, not a batch")
            texts = self._batch_text(list(prompt), max_new_tokens, sampling, stops, beams)
            return texts if many else [t[0] for t in texts]
        single = not isinstance(prompt[0], Sequence)
        if not single and not all(isinstance(p, Sequence) and not isinstance(p, str) for p in prompt):
            raise ValueError("prompt: a batch of token ids is a list of lists of integers")
        rows = [list(prompt)] if single else [list(p) for p in prompt]
        self._check_rows(rows)
        self._check_context(max(len(r) for r in rows), max_new_tokens)
        if stream:
            if not single:
                raise ValueError("stream=True takes one prompt, not a batch")
            return (int(t[0]) for t in self._tokens(rows, max_new_tokens, sampling, beams))
        out = self._collect(rows, max_new_tokens, sampling, beams)
        if not many:
            out = [o[0] for o in out]
        return out[0] if single else out

    def chat(self, messages: list[dict[str, str]], **kwargs):
        """Answer a conversation [{"role": "user", "content": ...}, ...] using the checkpoint's chat template."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise ValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
        return self.generate(self.tokenizer.apply_chat_template(messages), **kwargs)

    def cli_generate(self, args: Any) -> None:
        early = getattr(args, "early_stopping", "false")
        beam_kw = dict(num_beams=getattr(args, "num_beams", 1), length_penalty=getattr(args, "length_penalty", 1.0),
                       no_repeat_ngram_size=getattr(args, "no_repeat_ngram_size", 0),
                       early_stopping={"true": True, "false": False}.get(early, early),
                       num_return_sequences=getattr(args, "num_return_sequences", 1),
                       min_gen_length=getattr(args, "min_gen_length", 0))
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop, stream=beam_kw["num_beams"] == 1, **beam_kw)
        if args.chat:
            out = self.chat([{"role": "user", "content": args.prompt}], **kw)
        else:
            out = self.generate(args.prompt, **kw)
        answers = [out] if kw["stream"] or isinstance(out, str) else out  # (beam search: one text per beam)
        main = is_main_process()
        echo = main and not args.chat and not self.echoes_prompt(args.prompt)
        for n, pieces in enumerate(answers):
            if main and len(answers) > 1:
                print(f"--- {n + 1} of {len(answers)} ---", flush=True)
            if echo:
                print(args.prompt, end="", flush=True)
            for piece in ([pieces] if isinstance(pieces, str) else pieces):
                if main:
                    print(piece, end="", flush=True)
            if main:
                print()
        if main:
            print(f"[{self.last_strategy}]", file=sys.stderr)
            sys.stdout.flush()

    # -- prompt and output text: a family may change both through Family.prompt ---------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        rule = self.family.prompt
        return rule.encode(self.tokenizer, text) if rule is not None else self.tokenizer.encode(text)

    def echoes_prompt(self, prompt: str) -> bool:
        """Whether generated text already holds the prompt (a prompt rule that fills a blank inside it)."""
        rule = self.family.prompt
        return bool(getattr(rule, "echoes_prompt", lambda tokenizer, text: False)(self.tokenizer, prompt))

    def _finish_text(self, prompt: str, ids: list[int], stops: list[str], final: bool = False,
                     prompt_ids: list[int] | None = None) -> tuple[str, bool]:
        """The text for the new ids so far; `final`: of a finished generation (a prompt rule's `complete`, if it
        has one, may then add what follows, e.g. the rest of a prompt whose blank was filled). A rule that fills
        blanks in rounds (`refill`) also gets the round's prompt ids."""
        rule = self.family.prompt
        more = {"prompt_ids": prompt_ids} if hasattr(rule, "refill") else {}
        if rule is None:
            text = self.tokenizer.decode(ids)
        elif final and hasattr(rule, "complete"):
            text = rule.complete(self.tokenizer, prompt, ids, **more)
        else:
            text = rule.decode(self.tokenizer, prompt, ids, **more)
        for s in stops:
            if s in text:
                return text[: text.index(s)], True
        return text, False

    def _refill(self, prompt: str, prompt_ids: list[int], new_ids: list[int], max_new_tokens: int) -> list[int] | None:
        """The next round's prompt ids when the family's prompt rule fills blanks one after another (GLM), else
        None."""
        refill = getattr(self.family.prompt, "refill", None)
        nxt = refill(self.tokenizer, prompt, prompt_ids, new_ids) if refill is not None else None
        if nxt is not None:
            self._check_context(len(nxt), max_new_tokens)
        return nxt

    # -- internals ----------------------------------------------------------------------------------------------

    def _tokens(self, rows, max_new_tokens, sampling, beams: Beams | None = None):
        return decode(self.module, rows, max_new_tokens, sampling, self.stop_ids(), self._pad_id(),
                      compile=self.compile, min_gen_length=beams.min_gen_length if beams else 0)

    def _collect(self, rows, max_new_tokens, sampling, beams: Beams) -> list[list[list[int]]]:
        """Per row, its answers (one, or num_return_sequences beams): new token ids, a stop token ending each."""
        if beams.on:
            return beam_search(self.module, rows, max_new_tokens, beams, self.stop_ids(), self._pad_id(),
                               compile=self.compile)
        stop_ids = self.stop_ids()
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for step in self._tokens(rows, max_new_tokens, sampling, beams):
            for b, t in enumerate(step.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in stop_ids
        return [[o] for o in out]

    def _batch_text(self, prompts, max_new_tokens, sampling, stops, beams: Beams) -> list[list[str]]:
        """Per prompt, its answers as text. A prompt rule that fills blanks in rounds (`refill`) gets every round
        it asks for: the prompts still filling run together, each from the best answer of its last round."""
        ids = [self.encode_prompt(p) for p in prompts]
        self._check_rows(ids)
        self._check_context(max(len(r) for r in ids), max_new_tokens)
        stop_ids = self.stop_ids()
        texts: list[list[str]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        while active:
            answers = self._collect([ids[i] for i in active], max_new_tokens, sampling, beams)
            going = []
            for i, beams_i in zip(active, answers):
                beams_i = [b[:-1] if b and b[-1] in stop_ids else b for b in beams_i]  # (the stop ending it)
                nxt = self._refill(prompts[i], ids[i], beams_i[0], max_new_tokens)
                if nxt is None:
                    texts[i] = [self._finish_text(prompts[i], b, stops, final=True, prompt_ids=ids[i])[0]
                                for b in beams_i]
                else:
                    ids[i] = nxt
                    going.append(i)
            active = going
        return texts

    def _stream_text(self, prompt, ids, max_new_tokens, sampling, stops, beams: Beams) -> Iterator[str]:
        sent = ""
        stop_ids = self.stop_ids()
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        while True:
            new: list[int] = []
            for step in self._tokens([ids], max_new_tokens, sampling, beams):
                t = int(step[0])
                if t in stop_ids:
                    break
                new.append(t)
                text, stopped = self._finish_text(prompt, new, stops, prompt_ids=ids)
                if stopped:
                    yield text[len(sent):]
                    return
                ready = text[: len(text) - hold] if hold else text
                if ready.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                if len(ready) > len(sent):
                    yield ready[len(sent):]
                    sent = ready
            nxt = self._refill(prompt, ids, new, max_new_tokens)
            if nxt is None:
                break
            ids = nxt
        text, _ = self._finish_text(prompt, new, stops, final=True, prompt_ids=ids)
        if len(text) > len(sent):
            yield text[len(sent):]
