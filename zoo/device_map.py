"""Layer placement: a model bigger than one device, its blocks placed on devices by a device map.

    zoo.load(name, device_map="auto", max_memory={"cuda:0": "2GiB", "cpu": "8GiB"})

Whole blocks fill the listed devices in order, the rest go to "disk": those stay memory-mapped from the
safetensors files and are copied to the compute device just before they run, then dropped.

Packed weights (a checkpoint stored by `zoo convert --quantize`, or quantize=...) are placed and streamed packed:
the planner counts their packed bytes, and a block on "disk" streams its packed tensors. Quantising while loading,
a disk block's weights are packed once, a block at a time, into a spill file under $ZOO_HOME/spill that is
memory-mapped back (and unlinked at once: the mapping keeps it until the model goes), so they stay off memory
packed, as a stored-packed checkpoint's do. A streamed packed layer keeps its stored form (no kernel
rearrangement: it would be redone on every pass).
"""

from __future__ import annotations

import os
import re
import tempfile

import torch
import torch.nn as nn

from zoo.architectures.quant import PACKED, PackedLinear, float_key
from zoo.family import init_derived_buffers
from zoo.loading import (
    DistributedConfigError,
    build_model,
    check_keys,
    expected_dtypes,
    expected_shapes,
    materialize,
    open_checkpoint,
    resolve,
    set_param,
)
from zoo.settings import zoo_home
from zoo.tasks import get_task
from zoo.weights.format import parse_dtype, read_config

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(size: int | float | str) -> int:
    """Bytes from 123, "500MiB", "2GiB", "1.5GB" (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    if isinstance(size, bool):
        raise DistributedConfigError(f"memory size {size!r}: give bytes or a string like '2GiB'")
    if isinstance(size, int | float):
        if not size >= 0 or size == float("inf"):
            raise DistributedConfigError(f"memory size {size!r}: give a finite number of bytes >= 0")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(size).lower())
    if not m:
        raise DistributedConfigError(f"memory size {size!r}: give bytes or a string like '500MiB', '2GiB', '4GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def check_device(name: str) -> str:
    """A device map value that exists here: "cpu", "disk", "cuda:N" (N < visible GPUs), "mps"."""
    from zoo.checks import check_device as check

    if isinstance(name, str) and name.strip().lower() == "disk":
        return "disk"
    try:
        d = check(name, "device")
    except ValueError as e:
        why = str(e).split(": ", 1)[-1]
        raise DistributedConfigError(f"device {name!r} does not exist here: {why} (a device map also takes "
                                     "'disk')") from None
    return "cuda:0" if d.type == "cuda" and d.index is None else str(d)


def _free_memory(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0] * 0.9)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info["MemAvailable"] * 0.9)
    except (OSError, KeyError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.9)


def memory_limits(max_memory: dict | None) -> dict[str, int]:
    """Checked device -> bytes, accelerators first (in the order given), then cpu.

    Devices not given: every GPU when max_memory is None (90% of its free memory), and cpu (90% of available RAM).
    """
    if max_memory is None:
        limits = {f"cuda:{i}": _free_memory(f"cuda:{i}") for i in range(torch.cuda.device_count())}
    else:
        limits = {}
        for dev, size in max_memory.items():
            d = check_device(dev)
            if d == "disk":
                raise DistributedConfigError("max_memory limits devices that hold blocks; 'disk' is unlimited")
            limits[d] = parse_size(size)
    if "cpu" not in limits:
        limits["cpu"] = _free_memory("cpu")
    return {**{d: s for d, s in limits.items() if d != "cpu"}, "cpu": limits["cpu"]}


def plan_device_map(head: int, blocks: list[tuple[str, int]], limits: dict[str, int]) -> tuple[str, dict[str, str]]:
    """Place the model's parts on devices: a pure function of byte sizes and limits.

    head: bytes of everything outside the blocks (embedding, final norm, output head); it runs first and
        last, so it goes to the first device with room for it.
    blocks: (name, bytes) in execution order; they fill the devices in the order of `limits` and never
        go back to an earlier device (pipeline order: one activation hand-over per device boundary).
    Whatever fits nowhere goes to "disk" and is streamed through the first device, which therefore keeps
    room for one extra block. Returns (head device, {block: device}).
    """
    devices = list(limits)
    if not devices:
        raise DistributedConfigError("max_memory lists no device")
    main = devices[0]
    biggest = max((s for _, s in blocks), default=0)
    if limits[main] < biggest:
        name, size = max(blocks, key=lambda b: b[1])
        raise DistributedConfigError(
            f"max_memory for {main} ({_fmt(limits[main])}) is too small for even one block ({name}: {_fmt(size)}); "
            "blocks run on it one at a time, so it needs at least that much")

    def place(reserve: int) -> tuple[str, dict[str, str]]:
        room = dict(limits)
        room[main] -= reserve
        head_dev = next((d for d in devices if room[d] >= head), "disk")
        if head_dev != "disk":
            room[head_dev] -= head
        out, i = {}, 0
        for name, size in blocks:
            while i < len(devices) and room[devices[i]] < size:
                i += 1
            out[name] = devices[i] if i < len(devices) else "disk"
            if i < len(devices):
                room[devices[i]] -= size
        return head_dev, out

    head_dev, out = place(0)
    if head_dev == "disk" or "disk" in out.values():
        head_dev, out = place(biggest)  # streamed blocks pass through the main device: keep a slot for one
    return head_dev, out


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def model_parts(module: nn.Module) -> tuple[list[str], list[str]]:
    """(head modules, blocks): blocks are the elements of the model's top-level nn.ModuleLists, in order;
    the head is every other top-level child that has parameters."""
    head, blocks = [], []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            blocks += [f"{name}.{i}" for i in range(len(child))]
        elif _weights(child):
            head.append(name)
    if any(True for _ in module.parameters(recurse=False)):
        raise DistributedConfigError(f"{type(module).__name__} has parameters outside its submodules; "
                                     "device maps place whole submodules")
    return head, blocks


def _weights(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A part's weights by state-dict name: its parameters and the stored tensors of its packed modules."""
    out = {f"{prefix}{n}": p for n, p in module.named_parameters()}
    for path, sub in module.named_modules():
        if isinstance(sub, PACKED):
            out.update({f"{prefix}{path}.{n}" if path else f"{prefix}{n}": getattr(sub, n) for n in sub.stored})
    return out


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())
               for p in _weights(module).values())


def _set_tensor(module: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put `t` in as parameter or (a packed module's stored tensor) buffer `name`."""
    owner, _, attr = name.rpartition(".")
    parent = module.get_submodule(owner) if owner else module
    if attr in parent._parameters:
        set_param(module, name, t)
    else:
        parent.register_buffer(attr, t)


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _spill(module: nn.Module, names: list[str]) -> None:
    """Move the tensors `names` (packed here while loading) to a file and map them back from it (see the module
    docstring): a disk block stays off memory packed."""
    folder = zoo_home() / "spill"
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".pt", dir=folder)
    os.close(fd)
    try:
        torch.save({n: module.get_buffer(n) for n in names}, path)
        mapped = torch.load(path, mmap=True, weights_only=True)
    finally:
        os.unlink(path)  # the mapping holds the data until the tensors go
    for n, t in mapped.items():
        _set_tensor(module, n, t)


def _explicit_map(device_map: dict[str, str], head: list[str], blocks: list[str]) -> tuple[str, dict[str, str]]:
    checked = {k.strip("."): check_device(v) for k, v in device_map.items()}

    def lookup(part: str) -> str:
        keys = [k for k in checked if k == "" or part == k or part.startswith(k + ".")]
        if not keys:
            raise DistributedConfigError(f"device_map does not place {part}; "
                                         "give it (or a prefix of it, or '') a device")
        return checked[max(keys, key=len)]

    unknown = [k for k in checked if k and not any(p == k or p.startswith(k + ".") for p in head + blocks)]
    if unknown:
        raise DistributedConfigError(f"device_map names {unknown[0]!r}, which is not a part of this model; "
                                     f"parts: {head + blocks[:2]} ... {blocks[-1:]}")
    head_devs = {lookup(h) for h in head}
    if len(head_devs) > 1:
        raise DistributedConfigError(f"device_map puts {head} on different devices {sorted(head_devs)}; they run "
                                     "together (the output head may reuse the embedding), so give them one device")
    return (head_devs.pop() if head_devs else "cpu"), {b: lookup(b) for b in blocks}


def _move(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple | list):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def _inputs_to(device: str):
    def hook(mod, args, kwargs):
        return _move(args, device), _move(kwargs, device)

    return hook


class _Streamed:
    """Forward hooks that bring a part's weights from the memory-mapped file to `device` just before it runs
    and put the mapped views back after, so only one streamed part at a time occupies memory."""
    def __init__(self, module: nn.Module, names: list[str], device: str, dtype: torch.dtype | None):
        self.module, self.names, self.device, self.dtype = module, names, device, dtype

    def before(self, mod, args, kwargs):
        self.mapped = {n: _get_tensor(self.module, n) for n in self.names}
        for n, p in self.mapped.items():
            dtype = self.dtype if self.dtype is not None and p.dtype.is_floating_point else p.dtype
            _set_tensor(self.module, n, p.detach().to(self.device, dtype))
        return _move(args, self.device), _move(kwargs, self.device)

    def after(self, mod, args, output):
        for n, p in self.mapped.items():
            _set_tensor(self.module, n, p)
        self.mapped = {}


def load_with_device_map(
    name_or_path: str | os.PathLike,
    device_map: str | dict[str, str] = "auto",
    max_memory: dict[str, int | str] | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    verify: bool = True,
    quantize: str | None = None,
):
    """Load with blocks placed on devices: "auto" plans from max_memory, a dict {part or prefix: device} is
    taken as given ("disk" streams a part from the file). Each part runs on its device; its inputs are moved
    there by a hook; the output comes back on the device of the input ids. The chosen map is `model.device_map`.
    """
    if isinstance(device_map, str) and device_map != "auto":
        raise DistributedConfigError(f"device_map must be 'auto' or a dict {{part: device}}, got {device_map!r}")
    if isinstance(device_map, dict):
        for v in device_map.values():
            check_device(v)
    limits = memory_limits(max_memory) if device_map == "auto" else None
    target = parse_dtype(dtype)
    directory = resolve(name_or_path, revision)
    native = read_config(directory)
    family, module = build_model(native, quantize, where=str(directory / "config.json"))
    head, blocks = model_parts(module)
    compute = target or parse_dtype(native.dtype) or torch.float32  # what a placed part will weigh

    if device_map == "auto":
        head_bytes = sum(_bytes(module.get_submodule(h), compute) for h in head)
        sizes = [(b, _bytes(module.get_submodule(b), compute)) for b in blocks]
        head_dev, block_devs = plan_device_map(head_bytes, sizes, limits)
        main = next(iter(limits))
    else:
        head_dev, block_devs = _explicit_map(device_map, head, blocks)
        used = [d for d in (head_dev, *block_devs.values()) if d != "disk"]
        main = next((d for d in used if d != "cpu"), "cpu")

    ckpt = open_checkpoint(directory, verify)
    shapes = expected_shapes(module, native)  # float weights where packing happens here
    check_keys(shapes, ckpt, str(directory), expected_dtypes(module, native))
    placement = {**{h: head_dev for h in head}, **block_devs}
    packing = {} if native.quantization else {  # float weight key -> packed module path, packed while loading
        float_key(path, sub): path for path, sub in module.named_modules() if isinstance(sub, PACKED)}
    keys_of = {part: [k for k in shapes if k.startswith(part + ".")] for part in placement}
    # Streamed parts keep the mapped file views (no copy, no memory beyond the page cache) until they run.
    for part, dev in placement.items():
        if dev != "disk":
            materialize(module, ckpt, target, dev, str(directory), keys=keys_of[part], native=native)
            continue
        floating = [k for k in keys_of[part] if k not in packing]
        materialize(module, ckpt, None, "cpu", str(directory), keys=floating, native=native)
        packed = [k for k in keys_of[part] if k in packing]
        if packed:  # packed here (in the compute dtype, as on a device), then off to a mapped spill file
            materialize(module, ckpt, target, "cpu", str(directory), keys=packed, native=native)
            _spill(module, [f"{packing[k]}.{n}" for k in packed for n in module.get_submodule(packing[k]).stored])
    for path, sub in module.named_modules():  # a streamed packed layer runs its stored form (module docstring)
        if isinstance(sub, PackedLinear) and placement[_part_of(path, placement)] == "disk":
            sub.kernel = ()

    caller = _ReturnToCaller()  # registered first: sees the caller's input before any hook moves it
    module.register_forward_pre_hook(caller.before, with_kwargs=True)
    module.register_forward_hook(caller.after)
    if head_dev == "disk":  # the head's weights are used around the blocks (a tied output head): whole pass
        names = [n for h in head for n in _weights(module.get_submodule(h), f"{h}.")]
        s = _Streamed(module, names, main, target)
        module.register_forward_pre_hook(s.before, with_kwargs=True)
        module.register_forward_hook(s.after)
    for part, dev in placement.items():
        sub = module.get_submodule(part)
        if dev == "disk" and part in block_devs:
            s = _Streamed(module, list(_weights(sub, f"{part}.")), main, target)
            sub.register_forward_pre_hook(s.before, with_kwargs=True)
            sub.register_forward_hook(s.after)
        else:
            sub.register_forward_pre_hook(_inputs_to(main if dev == "disk" else dev), with_kwargs=True)
    init_derived_buffers(module, main)
    module.eval()
    if "disk" in placement.values():  # torch.compile cannot trace a hook that swaps weights in (generation.py)
        module.zoo_eager_only = "parts of it are streamed from disk by a device map"
    model = get_task(family.task)(module, native, family, directory)
    model.device_map = placement
    return model


def _part_of(path: str, placement: dict[str, str]) -> str:
    return next(p for p in placement if path == p or path.startswith(p + "."))


class _ReturnToCaller:
    """The output comes back on the device of the first input tensor (the generation loop expects that)."""
    def before(self, mod, args, kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self.device = first.device if first is not None else None

    def after(self, mod, args, output):
        return _move(output, self.device) if self.device is not None else output
