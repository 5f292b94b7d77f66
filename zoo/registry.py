"""The model registry: published entries and the families that declare them.

Families live in zoo.architectures (one module each, exporting FAMILY); they are discovered here on
first use, so the core only looks things up. This module imports nothing else of zoo's: everything
else may depend on it.

Reading the registry without torch: the architecture modules import torch (3-5 s), so what `zoo list`,
`zoo info` and `zoo.model_info` show comes from a snapshot of the live registry shipped in
zoo/data/registry.json (`python scripts/write_registry_snapshot.py` regenerates it; tests/test_cli_startup.py proves it
equals the live registry). The snapshot records a fingerprint of the architecture modules' sources; when they
have changed since it was written (an edited entry, a new family) it is not used and the live registry is
imported instead: slower, never wrong. `get_entry` and `families` (what loading uses) are always live.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    names = sorted(_light_entries())
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
    return find_entry(name).to_dict()


# -- sizes and licences: what a user needs to know before the bytes move -------------------------------------------

_BYTES = {"float32": 4.0, "fp32": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0, "int8": 1.0,
          "int4": 0.5}


def published_bytes_per_param(entry: Entry) -> float:
    """Bytes per parameter of the published weights: extra["published_dtype"] when an entry states it, a packed
    release by its scheme (extra["quantize"]: int8..., int4...), else the convention of the kind of model:
    language models publish 16-bit weights, vision and 3-D models fp32. An estimate, shown as one."""
    if entry.extra.get("published_dtype") in _BYTES:
        return _BYTES[entry.extra["published_dtype"]]
    scheme = str(entry.extra.get("quantize") or "")
    if scheme.startswith(("int8", "int4")):
        return _BYTES[scheme[:4]]
    return 2.0 if entry.task == "text-generation" else 4.0


def download_bytes(entry: Entry) -> int | None:
    """About how many bytes a first use fetches (None: nothing to fetch, the weights ship inside zoo)."""
    return None if entry.source.host == "package" else int(entry.params * published_bytes_per_param(entry))


def disk_bytes(entry: Entry) -> int:
    """About how many bytes the converted copy takes (converted in the published dtype, or packed as published)."""
    return int(entry.params * published_bytes_per_param(entry))


def memory_bytes(entry: Entry) -> dict[str, int]:
    """The weights' memory when loaded in bf16, and weight-only int8 / int4 (activations and caches come on top)."""
    return {k: int(entry.params * b) for k, b in (("bf16", 2.0), ("int8", 1.0), ("int4", 0.5))}


def human_bytes(n: int | None) -> str:
    """Decimal units, as the Hub shows file sizes: 145.4 GB, 86 MB."""
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} B"


# Where the licences the Hub has an id for can be read; others are linked by the entry (extra["license_url"]) or
# the publisher's repository page, which shows its licence.
LICENSE_URLS = {
    "apache-2.0": "https://www.apache.org/licenses/LICENSE-2.0",
    "mit": "https://opensource.org/license/mit",
    "cc-by-nc-4.0": "https://creativecommons.org/licenses/by-nc/4.0/",
    "cc-by-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "bsd-3-clause": "https://opensource.org/license/bsd-3-clause",
}


def license_link(entry: Entry) -> str:
    """Where this entry's licence text is: the entry's own link, the licence's, or the publisher's repo page."""
    if entry.extra.get("license_url"):
        return str(entry.extra["license_url"])
    if entry.license in LICENSE_URLS:
        return LICENSE_URLS[entry.license]
    if entry.source.host == "hf" and entry.source.repo:
        return f"https://huggingface.co/{entry.source.repo}"
    return ""


# -- the snapshot: the registry without importing the architectures (and torch) -----------------------------------

SNAPSHOT = Path(__file__).with_name("data") / "registry.json"
_snapshot: dict[str, Any] | None = None  # the file's contents once read and found current; {} when not usable


def _architecture_sources() -> list[Path]:
    """The architecture modules' files (what the registry is built from), found without importing them."""
    spec = importlib.util.find_spec("zoo.architectures")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.py"))


def fingerprint() -> str:
    """sha256 over the architecture modules' names and sources: a snapshot is current while this is unchanged."""
    h = hashlib.sha256()
    for path in _architecture_sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def unused_config_fields(entry: Entry) -> list[str]:
    """Config fields this entry's model does not read (a family's config may say so with `unused_fields()`, e.g.
    a shape model conditioned on images has no use for its point-cloud encoder's numbers). Live: imports the family."""
    config = get_family(entry.family).config_from_dict(entry.config)
    return sorted(getattr(config, "unused_fields", lambda: set())())


def build_snapshot() -> dict[str, Any]:
    """The live registry as JSON data (imports every family)."""
    _ensure_loaded()
    entries = [json.loads(json.dumps(_ENTRIES[n].to_dict())) for n in sorted(_ENTRIES)]
    return {"fingerprint": fingerprint(), "entries": entries,
            "unused_fields": {n: f for n in sorted(_ENTRIES) if (f := unused_config_fields(_ENTRIES[n]))}}


def write_snapshot(path: Path = SNAPSHOT, sections: dict[str, Any] | None = None) -> Path:
    """Write the snapshot, with `sections` beside the registry's own (the script adds zoo.memory_plan's "setups":
    what each declared setup needs per GPU, so `zoo info` shows it without torch)."""
    path.write_text(json.dumps({**build_snapshot(), **(sections or {})}, indent=1) + "\n")
    return path


def _read_snapshot() -> dict[str, Any]:
    global _snapshot
    if _snapshot is None:
        try:
            data = json.loads(SNAPSHOT.read_text())
            _snapshot = data if data.get("fingerprint") == fingerprint() else {}
        except (OSError, ValueError):
            _snapshot = {}
    return _snapshot


def snapshot_section(key: str) -> dict[str, Any]:
    """A section of the registry snapshot ("setups": zoo.memory_plan's numbers per entry) while the snapshot is
    current, else {} (the caller computes live)."""
    data = {} if _discovered else _read_snapshot()
    return dict(data.get(key, {}))


def _entry_from_dict(d: dict[str, Any]) -> Entry:
    src = dict(d["source"])
    src["files"] = tuple(src.get("files", ()))
    return Entry(**{**d, "source": Source(**src), "tags": tuple(d.get("tags", ()))})


def _light_entries() -> dict[str, Entry | dict[str, Any]]:
    """name -> entry, from the snapshot while it is current and the families are not imported anyway (entries
    registered at run time included); else the live registry."""
    data = {} if _discovered else _read_snapshot()
    if not data:
        _ensure_loaded()
        return dict(_ENTRIES)
    return {**{d["name"]: d for d in data["entries"]}, **_ENTRIES}


def find_entry(name: str) -> Entry:
    """An entry by name, as get_entry, without importing the architectures while the snapshot is current (its
    config holds JSON values: lists where the family's dataclass may have tuples)."""
    entries = _light_entries()
    key = str(name).lower()
    if key in entries:
        e = entries[key]
        return e if isinstance(e, Entry) else _entry_from_dict(e)
    close = difflib.get_close_matches(key, list(entries), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `zoo list` to see the registry."
    raise UnknownModelError(f"unknown model name {name!r}.{hint}")


def hidden_config_fields(entry: Entry) -> list[str]:
    """unused_config_fields, from the snapshot when it is current."""
    data = {} if _discovered else _read_snapshot()
    if data and entry.name in {d["name"] for d in data["entries"]}:
        return list(data.get("unused_fields", {}).get(entry.name, []))
    return unused_config_fields(entry)

