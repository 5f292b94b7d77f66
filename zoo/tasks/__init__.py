"""The uniform interface per task: what `zoo.load` returns wraps the module with what using it needs.

A family names its task ("text-generation", "image-classification", ...); the task class is looked up
here by that name. Task modules are the modules of this package, discovered on first use, so a new kind
of output (masks, meshes) is one new module with `@register_task(name)`, and the core never asks which
family it is. Task modules depend on the family and the native config only, never on loading or on the
distributed code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def is_main_process() -> bool:
    """False on every rank but 0 of a torch.distributed job (so only one process prints)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
        raise ValueError(f"{self.name or self.family.name} is a {self.task} model; `zoo generate` needs a model "
                         "that generates (text or shapes); try `zoo predict`")

    def cli_predict(self, args: Any) -> None:
        raise ValueError(f"{self.name or self.family.name} is a {self.task} model; `zoo predict` needs a "
                         "classification or segmentation model; try `zoo generate`")
