"""The plug-in contract between the core and an architecture family.

Each module in zoo.architectures exports `FAMILY = Family(...)`. The core finds families by name
(the "family" field of a native config.json; zoo.registry discovers them) and never branches on which one it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from zoo.registry import Entry, families, get_family, register_family


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type  # a dataclass holding the published numbers
    build: Callable[[Any], nn.Module]  # config -> module; called under a meta device context
    task: str  # a task registered in zoo.tasks: "text-generation", "image-classification", ...
    entries: tuple[Entry, ...] = ()
    # Tensor-parallel plan (zoo.tensor_parallel): module-path glob -> "colwise" | "rowwise" | "vocab" | "colwise_rep"
    tp_plan: dict[str, str] = field(default_factory=dict)
    card_template: str = ""  # file name in model_cards/
    # Text families: extra stop token strings besides the tokenizer's eos (e.g. a chat end marker).
    stop_tokens: tuple[str, ...] = ()
    # Key patterns (native names) that may be absent in a checkpoint because they are tied to another.
    tied: dict[str, str] = field(default_factory=dict)
    # Text families: the tokenizer class (default: tokenizer.json through the tokenizers library; the class has
    # available(directory) -> bool and encode/decode/special/token_id), and prompt rules: an object with
    # encode(tokenizer, text) -> ids and decode(tokenizer, prompt, new_ids) -> text (default: plain text), and
    # optionally complete(tokenizer, prompt, new_ids) -> the final text of a finished generation and
    # echoes_prompt(tokenizer, prompt) -> bool (the output holds the prompt, e.g. a blank filled inside it).
    tokenizer: Any = None
    prompt: Any = None
    # Past its trained context (config.max_seq_len) the model still runs (rotary positions): warn, not refuse.
    extrapolates: bool = False

    def build_meta(self, config: Any) -> nn.Module:
        """The module with shapes only (meta device), its weights to come from a checkpoint."""
        with torch.device("meta"), _skip_init():
            return self.build(config)

    def config_from_dict(self, d: dict[str, Any]) -> Any:
        known = {f.name for f in fields(self.config_cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{self.name} config has unknown fields: {sorted(unknown)}")
        return self.config_cls(**d)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextmanager
def _skip_init() -> Iterator[None]:
    """Random initialisation of weights that a checkpoint replaces is wasted work; on the meta device it is
    worse than useless: normal_ on meta goes through torch._refs and imports torch._dynamo (~2 s, 150 MB)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def init_derived_buffers(module: nn.Module, device: str | torch.device) -> None:
    """Non-persistent buffers (position tables, masks) are computed, not loaded: ask their modules."""
    for name, sub in module.named_modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            init = getattr(sub, "init_buffers", None)
            if init is None:
                raise RuntimeError(f"{type(sub).__name__} at {name or '<root>'} has derived buffers but no "
                                   "init_buffers(device) to compute them")
            init(torch.device(device))


__all__ = ["Family", "families", "get_family", "init_derived_buffers", "register_family"]
