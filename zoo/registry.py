"""The model registry: published entries, declared by each family next to its architecture.

The core only looks entries up; families add them with `register`. Nothing here knows any family.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Source:
    """Where the published weights live and in which layout they are published."""

    repo: str  # "Qwen/Qwen2-7B" on the Hub, or a path inside the zoo package for embedded models
    layout: str  # conversion format name, e.g. "hf-qwen2"
    revision: str = "main"
    host: str = "hf"  # "hf" (Hugging Face Hub) or "package" (ships inside zoo)
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


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def register(*entries: Entry) -> None:
    for entry in entries:
        if entry.name in _ENTRIES and _ENTRIES[entry.name] != entry:
            raise ValueError(f"model name {entry.name!r} is registered twice")
        _ENTRIES[entry.name] = entry


def _ensure_loaded() -> None:
    from zoo.family import load_families

    load_families()


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
