"""The pieces of loading: name | directory | hf://org/name@rev -> native directory -> module on meta -> mmap'd weights.

zoo.api.load puts them together (and hands tensor parallelism and device maps, which build on these
pieces, to zoo.tensor_parallel and zoo.device_map). Nothing here imports the distributed code.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn as nn

from zoo.architectures.quant import PACKED, float_key, pack_linears, packable_paths
from zoo.checks import find_nan
from zoo.family import Family
from zoo.registry import get_entry, get_family
from zoo.settings import zoo_home
from zoo.weights.format import CheckpointError, NativeConfig
from zoo.weights.reader import Checkpoint, VerifiedFiles


class DistributedConfigError(ValueError):
    """A tensor-parallel degree, device map or memory limit that cannot work; raised before loading."""


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The native directory behind a directory path, a registry name or an hf:// address."""
    text = str(name_or_path)
    if text.startswith("hf://"):
        from zoo.hub import pull

        return pull(text.removeprefix("hf://"), revision=revision)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path}: is a file, not a model directory; a published checkpoint file is "
                                f"converted first: `zoo convert {path} OUT`")
    if os.sep in text or text.startswith("."):
        raise FileNotFoundError(f"{path}: no such model directory")
    entry = get_entry(text)  # raises with close-name suggestions
    if entry.source.host == "package":
        return Path(str(files("zoo").joinpath("data", entry.source.repo)))
    local = zoo_home() / "models" / entry.name
    if local.is_dir():
        return local
    if entry.source.host == "manual":  # the publisher hands the weights out on request: zoo cannot fetch them
        how = entry.extra.get("download") or entry.source.repo
        args = entry.extra.get("convert_args", "")
        raise FileNotFoundError(
            f"{entry.name}: its publisher distributes the weights on request ({how}); download them, then run "
            f"`zoo convert DOWNLOADED_DIR {local} --name {entry.name}{' ' + args if args else ''}` "
            f"and load {entry.name!r} again")
    from zoo.hub import fetch_and_convert

    return fetch_and_convert(entry, local)


def check_keys(shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint, what: str,
               dtypes: dict[str, torch.dtype] | None = None) -> None:
    """The checkpoint holds exactly the tensors the model needs, in the shapes its config gives (and, given
    `dtypes`, floating where the model computes in floating point: integer weights would run as garbage)."""
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
    if dtypes:
        for k, want in dtypes.items():
            if ckpt.dtype(k).is_floating_point != want.is_floating_point:
                raise CheckpointError(f"{what}: tensor {k} is stored as {ckpt.dtype(k)}, the model needs a "
                                      f"{'floating' if want.is_floating_point else 'integer'} tensor ({want})")


def build_model(native: NativeConfig, quantize: str | None = None, where: str = "") -> tuple[Family, nn.Module]:
    """The family's module on the meta device, with packed linear layers where the checkpoint stores them
    (its quantization record) or where `quantize` asks for them (every nn.Linear, packed while loading)."""
    family = get_family(native.family)
    stored = native.quantization
    if quantize is not None and stored:
        raise ValueError(f"quantize={quantize!r}: this checkpoint is already stored quantized "
                         f"({stored.get('scheme')}); load it without quantize")
    where = f"{where}: " if where else ""
    if (nan := find_nan(native.config) or find_nan(native.extra, "extra")) is not None:
        raise CheckpointError(f"{where}config value {nan} is NaN")
    try:  # the config's numbers come from a file: whatever they make the family's code raise is bad input
        module = family.build_meta(family.config_from_dict(native.config))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError,
            RuntimeError) as e:
        raise CheckpointError(f"{where}the {family.name} config does not build a model: {_describe(e)}") from None
    try:
        if stored:
            pack_linears(module, stored["scheme"], list(stored["modules"]), family.tp_plan)
        elif quantize is not None:
            pack_linears(module, quantize, packable_paths(module, quantize), family.tp_plan)
    except (TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{where}quantization record {stored!r} does not fit the model: {_describe(e)}") from None
    return family, module


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, KeyError):
        return f"missing {e.args[0]!r}" if e.args else "a missing key"
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


def expected_shapes(module: nn.Module, native: NativeConfig) -> dict[str, tuple[int, ...]]:
    """What the checkpoint must hold: the module's tensors, except that a layer packed while loading (not
    stored packed) is read as its float weight [out, in]."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if native.quantization:
        return shapes
    for path, sub in module.named_modules():
        if isinstance(sub, PACKED):
            for name in sub.stored:
                del shapes[f"{path}.{name}"]
            shapes[float_key(path, sub)] = sub.weight_shape
    return shapes


def expected_dtypes(module: nn.Module, native: NativeConfig) -> dict[str, torch.dtype]:
    """What kind of tensor (floating or integer) each checkpoint key of expected_shapes must be: a weight packed
    while loading is read as a float weight."""
    shapes = expected_shapes(module, native)
    dtypes = {k: v.dtype for k, v in module.state_dict().items() if k in shapes}
    if not native.quantization:
        dtypes.update({float_key(path, sub): torch.float32 for path, sub in module.named_modules()
                       if isinstance(sub, PACKED)})
    return {k: dtypes.get(k, torch.float32) for k in shapes}


def materialize(module: nn.Module, ckpt: Checkpoint, dtype: torch.dtype | None, device: str | torch.device,
                what: str, keys: list[str] | None = None, native: NativeConfig | None = None) -> None:
    """Assign checkpoint tensors to a module built on the meta device (no init, no second copy).

    Tensors are memory-mapped from safetensors; with no dtype/device change they stay mapped.
    `keys` assigns only those (a device map places parts one device at a time; it checks the whole first).
    A packed module whose checkpoint holds a float weight (quantising while loading) is packed one weight at a
    time, so the float model never exists whole.
    """
    native = native or NativeConfig(family="", config={})
    shapes = expected_shapes(module, native)
    packing = {} if native.quantization else {  # float weight key -> (path, packed module)
        float_key(path, sub): (path, sub) for path, sub in module.named_modules() if isinstance(sub, PACKED)}
    if keys is None:
        check_keys(shapes, ckpt, what, expected_dtypes(module, native))
    wanted = list(shapes) if keys is None else keys

    def cast(t: torch.Tensor) -> torch.Tensor:
        target = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
        return t.to(device=device, dtype=target)

    state = {}
    for k in wanted:
        if k in packing:
            path, sub = packing[k]
            for name, t in sub.scheme.pack_rows(cast(ckpt.get(k))).items():
                state[f"{path}.{name}"] = cast(t)
        else:
            state[k] = cast(ckpt.get(k))
    module.load_state_dict(state, strict=keys is None, assign=True)


def open_checkpoint(directory: Path, verify: bool = True) -> Checkpoint:
    """A native checkpoint with its files checked: hashed once, then remembered in $ZOO_HOME/verified.json."""
    return Checkpoint(directory, verify=verify, verified=VerifiedFiles(zoo_home() / "verified.json"))


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in as parameter `name` ("layers.0.attn.q_proj.weight"), replacing what is there."""
    owner, _, attr = name.rpartition(".")
    param = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    (module.get_submodule(owner) if owner else module).register_parameter(attr, param)
