"""The uniform interface per task: what `zoo.load` returns wraps the module with what using it needs.

A family names its task; the task class is looked up here by that name (families plug in, the
core never asks which family it is).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from zoo.family import Family
from zoo.generation import Sampling, decode
from zoo.weights.format import CARD_FILE, NativeConfig

TASKS: dict[str, type[ZooModel]] = {}


def register_task(name: str):
    def deco(cls: type[ZooModel]) -> type[ZooModel]:
        TASKS[name] = cls
        cls.task = name
        return cls

    return deco


class ZooModel:
    """A loaded model: `module` is the nn.Module, `native` its config; calling it runs the module."""

    task = ""

    def __init__(self, module: nn.Module, native: NativeConfig, family: Family, directory: Path | None):
        self.module = module
        self.native = native
        self.family = family
        self.config = family.config_from_dict(native.config)
        self.directory = directory

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.native.name!r}, family={self.family.name}, dtype={self.dtype})"

    @property
    def name(self) -> str:
        return self.native.name

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, *args, **kwargs) -> ZooModel:
        self.module.to(*args, **kwargs)
        return self

    def parameters(self):
        return self.module.parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def card(self) -> str:
        path = self.directory / CARD_FILE if self.directory else None
        return path.read_text() if path and path.is_file() else ""

    def push_to_hub(self, repo_id: str, **kwargs) -> Any:
        """Upload this model's native directory to the Hub in one commit (see zoo.hub.push)."""
        from zoo.hub import push

        if self.directory is None:
            raise ValueError("this model has no native directory to push")
        return push(self.directory, repo_id, **kwargs)


class Tokenizer:
    """A Hugging Face `tokenizer.json` (via the tokenizers library) plus tokenizer_config.json facts."""

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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.directory is None:
                raise FileNotFoundError("no checkpoint directory, so no tokenizer")
            self._tokenizer = Tokenizer(self.directory)
        return self._tokenizer

    def _has_tokenizer(self) -> bool:
        return self.directory is not None and (self.directory / "tokenizer.json").is_file()

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
        if temperature is None:
            temperature = defaults.get("temperature", 1.0) if defaults.get("do_sample") else 0.0
            top_k = defaults.get("top_k") if top_k is None else top_k
            top_p = defaults.get("top_p") if top_p is None else top_p
        return Sampling(temperature, top_k or None, top_p, seed)

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
    ):
        """Continue a prompt.

        str -> new text; list of str -> list of new texts (batched, left padded);
        token ids (list, list of lists, tensor) -> new token ids of the same nesting.
        stream=True (one prompt) yields the new text piece by piece, or token ids one at a time.
        temperature None takes the checkpoint's generation_config defaults (greedy if none).
        """
        sampling = self._sampling(temperature, top_k, top_p, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            it = self._stream_text(self.tokenizer.encode(prompt), max_new_tokens, sampling, stops)
            return it if stream else "".join(it)
        if len(prompt) and all(isinstance(p, str) for p in prompt):
            if stream:
                raise ValueError("stream=True takes one prompt, not a batch")
            return self._batch_text(list(prompt), max_new_tokens, sampling, stops)
        single = len(prompt) > 0 and isinstance(prompt[0], int)
        rows = [list(prompt)] if single else [list(p) for p in prompt]
        if stream:
            if not single:
                raise ValueError("stream=True takes one prompt, not a batch")
            return (int(t[0]) for t in self._tokens(rows, max_new_tokens, sampling))
        out = self._collect(rows, max_new_tokens, sampling)
        return out[0] if single else out

    def chat(self, messages: list[dict[str, str]], **kwargs):
        """Answer a conversation [{"role": "user", "content": ...}, ...] using the checkpoint's chat template."""
        return self.generate(self.tokenizer.apply_chat_template(messages), **kwargs)

    # -- internals ---------------------------------------------------------------------------------

    def _tokens(self, rows, max_new_tokens, sampling):
        return decode(self.module, rows, max_new_tokens, sampling, self.stop_ids(), self._pad_id())

    def _collect(self, rows, max_new_tokens, sampling) -> list[list[int]]:
        stop_ids = self.stop_ids()
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for step in self._tokens(rows, max_new_tokens, sampling):
            for b, t in enumerate(step.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in stop_ids
        return out

    def _finish_text(self, ids: list[int], stops: list[str]) -> tuple[str, bool]:
        text = self.tokenizer.decode(ids)
        for s in stops:
            if s in text:
                return text[: text.index(s)], True
        return text, False

    def _batch_text(self, prompts, max_new_tokens, sampling, stops) -> list[str]:
        rows = [self.tokenizer.encode(p) for p in prompts]
        return [self._finish_text(ids, stops)[0] for ids in self._collect(rows, max_new_tokens, sampling)]

    def _stream_text(self, ids, max_new_tokens, sampling, stops) -> Iterator[str]:
        new: list[int] = []
        sent = ""
        stop_ids = self.stop_ids()
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        for step in self._tokens([ids], max_new_tokens, sampling):
            t = int(step[0])
            if t in stop_ids:
                break
            new.append(t)
            text, stopped = self._finish_text(new, stops)
            if stopped:
                yield text[len(sent):]
                return
            ready = text[: len(text) - hold] if hold else text
            if ready.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            if len(ready) > len(sent):
                yield ready[len(sent):]
                sent = ready
        text, _ = self._finish_text(new, stops)
        if len(text) > len(sent):
            yield text[len(sent):]

from zoo import vision  # noqa: E402,F401  registers the vision tasks
