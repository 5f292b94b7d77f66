"""The uniform interface per task: what `zoo.load` returns wraps the module with what using it needs.

A family names its task ("text-generation", "image-classification", ...); the task class is looked up
here by that name. Task modules are the modules of this package, discovered on first use, so a new kind
of output (masks, meshes) is one new module with `@register_task(name)`, and the core never asks which
family it is. Task modules depend on the family and the native config only, never on loading or on the
distributed code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from zoo.family import Family
from zoo.plugins import declared
from zoo.weights.format import CARD_FILE, NativeConfig

TASKS: dict[str, type[ZooModel]] = {}
_discovered = False


def register_task(name: str):
    def deco(cls: type[ZooModel]) -> type[ZooModel]:
        TASKS[name] = cls
        cls.task = name
        return cls

    return deco


def get_task(name: str) -> type[ZooModel]:
    """The task class registered under `name` (task modules of zoo.tasks are imported once, on first use)."""
    global _discovered
    if name not in TASKS and not _discovered:
        _discovered = True
        declared(__name__)
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


@dataclass(frozen=True)
class Command:
    """What one `zoo` command needs of a task, declared on the task class (`commands`) so the CLI checks all of it
    before a model is loaded or downloaded: the options the task reads, the outputs it writes, what it imports.

    options: the command's options (argparse dests) this task reads; any other option given is refused by name.
    inputs: how the positional input is read: "text" (a prompt), "file" (must exist), "paths" (a file, a directory
      or a comma-separated list of files, each of which must exist).
    out: the suffixes --out may end with (("*",): any); () means the task writes no file.
    out_from_stdout: --out receives what the command prints (the generated text).
    default_out: where the output goes when --out is not given ("{stem}": the input's name without suffix).
    companions: files written beside --out ("{stem}_overlay.png"), checked like it.
    preview: the suffixes --preview may end with.
    needs: modules the command imports (e.g. "mcubes"), from the optional extra `extra` (pip install 'zoo[extra]').
    """

    options: frozenset[str] = frozenset()
    inputs: str = "file"
    out: tuple[str, ...] = ()
    out_from_stdout: bool = False
    default_out: str = ""
    companions: tuple[str, ...] = ()
    preview: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    extra: str = ""


def article(word: str) -> str:
    """'a' or 'an' for a task name: "an image-classification model", "a text-generation model"."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def is_main_process() -> bool:
    """False on every rank but 0 of a torch.distributed job (so only one process prints)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ZooModel:
    """A loaded model: `module` is the nn.Module, `native` its config; calling it runs the module."""

    task = ""
    commands: ClassVar[dict[str, Command]] = {}  # `zoo` command -> what it needs of this task (see Command)

    @classmethod
    def refuse(cls, command: str, config: dict[str, Any]) -> str | None:
        """Why this model cannot run `command` although its task can (from its config alone), or None."""
        return None

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
        """The compute dtype: that of the floating-point parameters (packed weights are integers)."""
        return next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)

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

    # -- the command line: `zoo generate` and `zoo predict` load a model and hand it their arguments --------------

    def cli_generate(self, args: Any) -> None:
        raise ValueError(unsupported(self.name or self.family.name, self.task, "generate"))

    def cli_predict(self, args: Any) -> None:
        raise ValueError(unsupported(self.name or self.family.name, self.task, "predict"))

    def cli_features(self, args: Any) -> None:
        raise ValueError(unsupported(self.name or self.family.name, self.task, "features"))


def tasks_for(command: str) -> list[str]:
    """The tasks whose models run `zoo COMMAND`."""
    try:
        get_task("")  # a name no task has: get_task imports every task module before it says so
    except ValueError:
        pass
    return sorted(name for name, cls in TASKS.items() if command in cls.commands)


def unsupported(model: str, task: str, command: str) -> str:
    """"X is an image-feature-extraction model; `zoo predict` runs ...; try `zoo features`", in the user's words."""
    cls = TASKS.get(task)
    others = [c for c in (cls.commands if cls else {}) if c != command]
    kinds = tasks_for(command)
    needs = (f"{article(kinds[0])} " + (", ".join(kinds[:-1]) + " or " if len(kinds) > 1 else "") + kinds[-1]
             if kinds else "another kind of")
    hint = f"; try `zoo {others[0]}`" if others else ""
    return f"{model} is {article(task)} {task} model; `zoo {command}` runs {needs} model{hint}"
