"""zoo.load: name | directory | hf://org/name@rev  ->  native directory  ->  module on meta  ->  mmap'd weights."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn as nn

from zoo.family import Family, get_family
from zoo.registry import get_entry
from zoo.tasks import TASKS, ZooModel
from zoo.weights.format import CheckpointError, parse_dtype, read_config
from zoo.weights.reader import Checkpoint, VerifiedFiles


def zoo_home() -> Path:
    """Where converted registry models live: $ZOO_HOME, else ~/.cache/zoo."""
    return Path(os.environ.get("ZOO_HOME") or Path.home() / ".cache" / "zoo")


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The native directory behind a directory path, a registry name or an hf:// address."""
    text = str(name_or_path)
    if text.startswith("hf://"):
        from zoo.hub import pull

        return pull(text.removeprefix("hf://"), revision=revision)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if os.sep in text or text.startswith("."):
        raise FileNotFoundError(f"{path}: no such model directory")
    entry = get_entry(text)  # raises with close-name suggestions
    if entry.source.host == "package":
        return Path(str(files("zoo").joinpath("data", entry.source.repo)))
    local = zoo_home() / "models" / entry.name
    if local.is_dir():
        return local
    from zoo.hub import fetch_and_convert

    return fetch_and_convert(entry, local)


def check_keys(shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint, what: str) -> None:
    """The checkpoint holds exactly the tensors the model needs, in the shapes its config gives."""
    missing = [k for k in shapes if k not in ckpt]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{what}: missing tensor {missing[0]}{more}")
    unexpected = [k for k in ckpt.keys() if k not in shapes]
    if unexpected:
        raise CheckpointError(f"{what}: unexpected tensor {unexpected[0]}; the model has no such parameter")
    for k, shape in shapes.items():
        if ckpt.shape(k) != shape:
            raise CheckpointError(f"{what}: tensor {k} has shape {ckpt.shape(k)}, the config needs {shape}")


def materialize(module: nn.Module, ckpt: Checkpoint, dtype: torch.dtype | None, device: str | torch.device,
                what: str, keys: list[str] | None = None) -> None:
    """Assign checkpoint tensors to a module built on the meta device (no init, no second copy).

    Tensors are memory-mapped from safetensors; with no dtype/device change they stay mapped.
    `keys` assigns only those (a device map places parts one device at a time; it checks the whole first).
    """
    if keys is None:
        check_keys({k: tuple(v.shape) for k, v in module.state_dict().items()}, ckpt, what)
    state = {}
    for k in module.state_dict() if keys is None else keys:
        t = ckpt.get(k)
        target = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
        state[k] = t.to(device=device, dtype=target)
    module.load_state_dict(state, strict=keys is None, assign=True)


def init_derived_buffers(module: nn.Module, device: str | torch.device) -> None:
    """Non-persistent buffers (position tables, masks) are computed, not loaded: ask their modules."""
    for name, sub in module.named_modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            init = getattr(sub, "init_buffers", None)
            if init is None:
                raise RuntimeError(f"{type(sub).__name__} at {name or '<root>'} has derived buffers but no "
                                   "init_buffers(device) to compute them")
            init(torch.device(device))


def open_checkpoint(directory: Path, verify: bool = True) -> Checkpoint:
    """A native checkpoint with its files checked: hashed once, then remembered in $ZOO_HOME/verified.json."""
    return Checkpoint(directory, verify=verify, verified=VerifiedFiles(zoo_home() / "verified.json"))


def build_on_meta(family: Family, config) -> nn.Module:
    return family.build_meta(config)


def load(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    verify: bool = True,
    tp: int | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> ZooModel:
    """Load a model by registry name, native directory or "hf://org/name@revision".

    dtype: None keeps the stored dtype. verify: check every file's sha256 against the index.
    tp: tensor-parallel degree inside a torchrun job. device_map/max_memory: place blocks on devices.
    """
    if tp is not None and tp > 1 and device_map is not None:
        raise ValueError("tp and device_map are two ways to split a model; pass one of them")
    if tp is not None and tp > 1:
        from zoo.distributed import load_tensor_parallel

        return load_tensor_parallel(name_or_path, tp=tp, dtype=dtype, revision=revision, verify=verify)
    if device_map is not None:
        from zoo.distributed import load_with_device_map

        return load_with_device_map(name_or_path, device_map=device_map, max_memory=max_memory, dtype=dtype,
                                    revision=revision, verify=verify)
    directory = resolve(name_or_path, revision)
    native = read_config(directory)
    family = get_family(native.family)
    config = family.config_from_dict(native.config)
    module = build_on_meta(family, config)
    materialize(module, open_checkpoint(directory, verify), parse_dtype(dtype), device, str(directory))
    init_derived_buffers(module, device)
    module.eval()
    return TASKS[family.task](module, native, family, directory)
