"""What `zoo generate`, `zoo predict` and `zoo features` check before a model is loaded or downloaded.

The model's task is known before loading: from its registry entry (the snapshot, zoo/registry.py) or its native
config.json. Its task class declares, per command, what it reads and writes (zoo.tasks.Command); from that this
module refuses, in this order and before any weight moves: a command the task does not run, an option it does not
take, an input that does not exist, an output of an unknown format, in a place that cannot be written, or that is
one of the inputs (same resolved path or same inode), and a missing optional package. (How much a registry model
about to be downloaded weighs is said by zoo.hub before the first byte moves.) An hf:// address is checked the
same way once loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.registry import Entry, find_entry

COMMON = frozenset({"device", "dtype"})  # options every task of a command takes


@dataclass
class Target:
    """The model a command names, as far as it is known without loading it."""

    ref: str
    task: str | None = None  # None: not known before loading (an hf:// address, a directory without config.json)
    config: dict[str, Any] = field(default_factory=dict)
    entry: Entry | None = None
    directory: Path | None = None  # its native directory when it is on this machine
    fetch: bool = False  # a registry model that this use downloads and converts

    @property
    def name(self) -> str:
        return self.entry.name if self.entry else self.ref


def zoo_home() -> Path:
    """$ZOO_HOME, else ~/.cache/zoo (as zoo.loading.zoo_home, without importing torch; a test holds them equal)."""
    return Path(os.environ.get("ZOO_HOME") or Path.home() / ".cache" / "zoo")


def local_directory(entry: Entry) -> Path | None:
    """Where a registry model's native copy is on this machine (inside the package, or converted), if it is."""
    if entry.source.host == "package":
        from importlib.resources import files

        return Path(str(files("zoo").joinpath("data", entry.source.repo)))
    local = zoo_home() / "models" / entry.name
    return local if (local / "config.json").is_file() else None


def find_model(ref: str) -> Target:
    """The task and config of a registry name or native directory, read without loading (nor importing torch)."""
    text = str(ref)
    if text.startswith("hf://"):
        return Target(text)
    path = Path(text).expanduser()
    if path.is_dir():
        try:
            native = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return Target(text, directory=path)  # loading names what is wrong with it
        task = native.get("task") if isinstance(native, dict) else None
        config = native.get("config") if isinstance(native, dict) else None
        return Target(text, task if isinstance(task, str) else None, config if isinstance(config, dict) else {},
                      directory=path)
    if path.exists() or os.sep in text or text.startswith("."):
        return Target(text)  # a file, or a missing directory: loading says which
    entry = find_entry(text)  # an unknown name is refused here, with close names
    local = local_directory(entry)
    return Target(text, entry.task, dict(entry.config), entry, local, fetch=local is None and entry.source.host == "hf")


def check_command(command: str, target: Target, given: dict[str, str], args: Any) -> Any:
    """Refuse now what would fail after loading; returns the task's Command, or None when the task is not known
    yet (call again after loading with the model's own task). `given`: argparse dest -> the flag as typed, for
    every option the user passed; `args` gets its --out default filled in."""
    if target.task is None:
        return None
    from zoo.checks import check_outputs
    from zoo.tasks import article, get_task, unsupported

    cls = get_task(target.task)
    spec = cls.commands.get(command)
    if spec is None:
        raise ValueError(unsupported(target.name, target.task, command))
    reason = cls.refuse(command, target.config)
    if reason:
        raise ValueError(f"{target.name} {reason}")
    for dest, flag in given.items():
        if dest not in spec.options and dest not in COMMON:
            takes = sorted(f"--{o.replace('_', '-')}" for o in spec.options)
            raise ValueError(f"{flag}: {target.name} is {article(target.task)} {target.task} model, which takes no "
                             f"{flag}" + (f" (it takes {', '.join(takes)})" if takes else ""))
    inputs = _inputs(spec.inputs, args)
    outputs = _outputs(spec, args, inputs)
    check_outputs(outputs, inputs + ([target.directory] if target.directory else []))
    missing = [m for m in spec.needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"zoo {command} with {article(target.task)} {target.task} model needs {', '.join(missing)}; "
                          f"install the extra: pip install 'zoo[{spec.extra}]'" if spec.extra else
                          f"zoo {command} needs {', '.join(missing)}; pip install {' '.join(missing)}")
    return spec


def _inputs(kind: str, args: Any) -> list[Path]:
    """The files the positional argument names; each must exist."""
    if kind == "text":
        return []
    value = str(getattr(args, "file", None) or getattr(args, "prompt", ""))
    parts = [value]
    if kind == "paths" and not Path(value).exists() and "," in value:
        parts = [p.strip() for p in value.split(",") if p.strip()]
    for p in parts:
        if not Path(p).exists():
            what = "file" if kind == "file" else "file or directory"
            raise FileNotFoundError(f"{p}: no such {what}")
    return [Path(p) for p in parts]


def _stem(inputs: list[Path], args: Any) -> str:
    return inputs[0].stem if inputs else "output"


def _suffix(path: Path, known: tuple[str, ...]) -> str:
    """The file's format suffix: the longest of `known` its name ends with (".nii.gz"), else its last suffix."""
    name = path.name.lower()
    return max((s for s in known if name.endswith(s)), key=len, default=path.suffix.lower())


def _outputs(spec: Any, args: Any, inputs: list[Path]) -> dict[str, Path]:
    """--out (its default filled in), the files written beside it and --preview, by the argument naming each."""
    if getattr(args, "out_dir", None) or getattr(args, "inputs", None):  # several inputs, or one output per
        # input in a directory: named by the task, which checks them itself
        return {}
    out = getattr(args, "out", None)
    if out is None and spec.default_out:
        out = spec.default_out.format(stem=_stem(inputs, args))
        args.out = out
    outputs: dict[str, Path] = {}
    if out is not None:
        path = Path(out)
        if path.is_dir():
            raise ValueError(f"--out {out}: is a directory; give a file name")
        suffix = _suffix(path, spec.out)
        if spec.out != ("*",) and suffix not in spec.out:
            raise ValueError(f"--out {out}: unknown output format {suffix or '(no suffix)'!r}; use "
                             f"{' or '.join(spec.out)}")
        outputs[f"--out {out}"] = path
        for template in spec.companions:
            companion = path.with_name(template.format(stem=path.name[:len(path.name) - len(suffix)]))
            outputs[f"{companion} (written beside --out)"] = companion
    preview = getattr(args, "preview", None)
    if preview is not None:
        if Path(preview).suffix.lower() not in spec.preview:
            raise ValueError(f"--preview {preview}: unknown picture format {Path(preview).suffix or '(no suffix)'!r}; "
                             f"use {' or '.join(spec.preview)}")
        outputs[f"--preview {preview}"] = Path(preview)
    return outputs
