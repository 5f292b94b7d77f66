"""The plug-in contract between the core and an architecture family.

Each module in zoo.architectures exports `FAMILY = Family(...)`. The core finds families by name
(the "family" field of a native config.json) and never branches on which one it is.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch.nn as nn

from zoo.registry import Entry, register


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type  # a dataclass holding the published numbers
    build: Callable[[Any], nn.Module]  # config -> module; called under a meta device context
    task: str  # key into zoo.tasks.TASKS: "text-generation", "image-classification", ...
    entries: tuple[Entry, ...] = ()
    # Tensor-parallel plan: module-path pattern -> "colwise" | "rowwise" | "vocab" | "colwise_rep" (zoo.distributed).
    tp_plan: dict[str, str] = field(default_factory=dict)
    card_template: str = ""  # file name in model_cards/
    # Text families: extra stop token strings besides the tokenizer's eos (e.g. a chat end marker).
    stop_tokens: tuple[str, ...] = ()
    # Key patterns (native names) that may be absent in a checkpoint because they are tied to another.
    tied: dict[str, str] = field(default_factory=dict)

    def config_from_dict(self, d: dict[str, Any]) -> Any:
        known = {f.name for f in fields(self.config_cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{self.name} config has unknown fields: {sorted(unknown)}")
        return self.config_cls(**d)


_FAMILIES: dict[str, Family] = {}
_loaded = False


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    register(*family.entries)
    return family


def load_families() -> None:
    """Import every module of zoo.architectures that declares a FAMILY."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import zoo.architectures as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, Family):
            register_family(family)


def get_family(name: str) -> Family:
    load_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown architecture family {name!r}; known: {sorted(_FAMILIES)}") from None


def families() -> dict[str, Family]:
    load_families()
    return dict(_FAMILIES)
