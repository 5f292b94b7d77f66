"""The model registry: published entries and the families that declare them.

Families live in zoo.architectures (one module each, exporting FAMILY); they are discovered here on
first use, so the core only looks things up. This module imports nothing else of zoo's: everything
else may depend on it.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from zoo.plugins import declared


@dataclass(frozen=True)
class Source:
    """Where the published weights live and in which layout they are published."""

    repo: str  # "Qwen/Qwen2-7B" on the Hub, or a path inside the zoo package for embedded models
    layout: str  # conversion format name, e.g. "hf-qwen2"
    revision: str = "main"
    host: str = "hf"  # "hf" (Hugging Face Hub), "package" (ships inside zoo) or "manual" (given out on request)
    file_format: str = "safetensors"
    files: tuple[str, ...] = ()  # the weight files to fetch, when the repo holds more than this model


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    config: dict[str, Any]  # the exact published numbers, in the family's config schema
    source: Source
    license: str
    paper: str
    task: str
    params: int
    description: str = ""
    tags: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # preprocessing, label set, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ENTRIES: dict[str, Entry] = {}
_FAMILIES: dict[str, Any] = {}  # name -> zoo.family.Family
_discovered = False


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def register(*entries: Entry) -> None:
    for entry in entries:
        if entry.name in _ENTRIES and _ENTRIES[entry.name] != entry:
            raise ValueError(f"model name {entry.name!r} is registered twice")
        _ENTRIES[entry.name] = entry


def register_family(family: Any) -> Any:
    """Add a family (zoo.family.Family) and the entries it declares."""
    _FAMILIES[family.name] = family
    register(*family.entries)
    return family


def _ensure_loaded() -> None:
    """Import every module of zoo.architectures that declares a FAMILY (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for family in declared("zoo.architectures", "FAMILY"):
        if family is not None:
            register_family(family)


def families() -> dict[str, Any]:
    """Every architecture family by name."""
    _ensure_loaded()
    return dict(_FAMILIES)


def get_family(name: str) -> Any:
    _ensure_loaded()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown architecture family {name!r}; known: {sorted(_FAMILIES)}") from None


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a shell-style pattern ("qwen2-*")."""
    _ensure_loaded()
    names = sorted(_ENTRIES)
    if pattern:
        pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, pat.lower())]
    return names


def get_entry(name: str) -> Entry:
    _ensure_loaded()
    key = name.lower()
    if key in _ENTRIES:
        return _ENTRIES[key]
    close = difflib.get_close_matches(key, list(_ENTRIES), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `zoo list` to see the registry."
    raise UnknownModelError(f"unknown model name {name!r}.{hint}")


def is_registered(name: str) -> bool:
    _ensure_loaded()
    return name.lower() in _ENTRIES


def model_info(name: str) -> dict[str, Any]:
    """Everything the registry knows about a model: published config, source, license, paper, size."""
    return get_entry(name).to_dict()
