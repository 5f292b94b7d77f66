"""Layer placement: a model bigger than one device, its blocks placed on devices by a device map.

    zoo.load(name, device_map="auto", max_memory={"cuda:0": "2GiB", "cpu": "8GiB"})

Whole blocks fill the listed devices in order, the rest go to "disk": those stay memory-mapped from the
safetensors files and are copied to the compute device just before they run, then dropped.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from zoo.family import init_derived_buffers
from zoo.loading import (
    DistributedConfigError,
    build_model,
    check_keys,
    materialize,
    open_checkpoint,
    resolve,
    set_param,
)
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
        elif any(True for _ in child.parameters()):
            head.append(name)
    if any(True for _ in module.parameters(recurse=False)):
        raise DistributedConfigError(f"{type(module).__name__} has parameters outside its submodules; "
                                     "device maps place whole submodules")
    return head, blocks


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size()) for p in module.parameters())


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
        self.mapped = {n: self.module.get_parameter(n) for n in self.names}
        for n, p in self.mapped.items():
            dtype = self.dtype if self.dtype is not None and p.dtype.is_floating_point else p.dtype
            set_param(self.module, n, p.detach().to(self.device, dtype))
        return _move(args, self.device), _move(kwargs, self.device)

    def after(self, mod, args, output):
        for n, p in self.mapped.items():
            set_param(self.module, n, p)
        self.mapped = {}


def load_with_device_map(
    name_or_path: str | os.PathLike,
    device_map: str | dict[str, str] = "auto",
    max_memory: dict[str, int | str] | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    verify: bool = True,
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
    family, module = build_model(native, where=str(directory / "config.json"))
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
    state = module.state_dict()
    check_keys({k: tuple(v.shape) for k, v in state.items()}, ckpt, str(directory),
               {k: v.dtype for k, v in state.items()})
    placement = {**{h: head_dev for h in head}, **block_devs}
    keys_on: dict[str, list[str]] = {}
    for part, dev in placement.items():
        keys_on.setdefault(dev, []).extend(f"{part}.{k}" for k in module.get_submodule(part).state_dict())
    # Streamed parts keep the mapped file views (no copy, no memory beyond the page cache) until they run.
    for dev, keys in keys_on.items():
        materialize(module, ckpt, None if dev == "disk" else target, "cpu" if dev == "disk" else dev,
                    str(directory), keys=keys, native=native)

    caller = _ReturnToCaller()  # registered first: sees the caller's input before any hook moves it
    module.register_forward_pre_hook(caller.before, with_kwargs=True)
    module.register_forward_hook(caller.after)
    if head_dev == "disk":  # the head's weights are used around the blocks (a tied output head): whole pass
        s = _Streamed(module, [k for k in keys_on["disk"] if k.split(".")[0] in head], main, target)
        module.register_forward_pre_hook(s.before, with_kwargs=True)
        module.register_forward_hook(s.after)
    for part, dev in placement.items():
        sub = module.get_submodule(part)
        if dev == "disk" and part in block_devs:
            s = _Streamed(module, [f"{part}.{n}" for n, _ in sub.named_parameters()], main, target)
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


class _ReturnToCaller:
    """The output comes back on the device of the first input tensor (the generation loop expects that)."""
    def before(self, mod, args, kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self.device = first.device if first is not None else None

    def after(self, mod, args, output):
        return _move(output, self.device) if self.device is not None else output
