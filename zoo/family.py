"""The plug-in contract between the core and an architecture family.

Each module in zoo.architectures exports `FAMILY = Family(...)`. The core finds families by name
(the "family" field of a native config.json) and never branches on which one it is.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
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
