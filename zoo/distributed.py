"""Running one model over several devices: tensor parallelism (DTensor) and layer placement (device maps).

Tensor parallel, inside `torchrun --nproc-per-node N`:  zoo.load(name, tp=N)
    The family's `tp_plan` (module-path glob -> style) is applied with torch.distributed.tensor.parallel on
    the model while it is still on the meta device; every rank then reads only its own slice of each
    sharded tensor from the safetensors files and wraps it with DTensor.from_local. Megatron-style:
    q/k/v and gate/up are split by output columns (whole heads), o_proj and down_proj by input rows, so
    each block needs one all-reduce after attention and one after the MLP. gloo on CPU, nccl on GPU.

Layer placement:  zoo.load(name, device_map="auto", max_memory={"cuda:0": "2GiB", "cpu": "8GiB"})
    Whole blocks fill the listed devices in order, the rest go to "disk": those stay memory-mapped from
    the safetensors files and are copied to the compute device just before they run, then dropped.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

PLAN_STYLES = ("colwise", "rowwise", "vocab", "colwise_rep")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedConfigError(ValueError):
    """A tensor-parallel degree, device map or memory limit that cannot work; raised before loading."""


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# -- tensor parallelism --------------------------------------------------------------------------------------


def _style(name: str):
    """A plan word -> torch's ParallelStyle.

    colwise      nn.Linear split by output features; the output stays split (whole heads per rank)
    rowwise      nn.Linear split by input features; partial outputs are all-reduced
    vocab        nn.Embedding split by vocabulary rows; each rank embeds the ids it owns, then all-reduce
    colwise_rep  nn.Linear output head split by vocabulary; the logit slices are all-gathered
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "vocab": lambda: RowwiseParallel(input_layouts=Replicate()),
        "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    return styles[name]()


def _matches(pattern: str, path: str) -> bool:
    """Token-wise glob, as parallelize_module matches plan keys: "layers.*.attn.q_proj"."""
    a, b = pattern.split("."), path.split(".")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(y, x) for x, y in zip(a, b, strict=True))


def resolve_plan(module: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """Module path -> style for every module the plan names (entries matching nothing are dropped:
    a tied model has no lm_head module)."""
    out: dict[str, str] = {}
    for pattern, style in plan.items():
        if style not in PLAN_STYLES:
            raise DistributedConfigError(f"tp plan entry {pattern!r}: unknown style {style!r}; "
                                         f"use one of {PLAN_STYLES}")
        for path, _ in module.named_modules():
            if path and _matches(pattern, path):
                out[path] = style
    return out


def _sharded_size(sub: nn.Module, style: str, path: str) -> int:
    if style == "vocab":
        if not isinstance(sub, nn.Embedding):
            raise DistributedConfigError(f"tp plan: {path} is {type(sub).__name__}; 'vocab' applies to nn.Embedding")
        return sub.num_embeddings
    if not isinstance(sub, nn.Linear):
        raise DistributedConfigError(f"tp plan: {path} is {type(sub).__name__}; {style!r} applies to nn.Linear")
    return sub.in_features if style == "rowwise" else sub.out_features


def check_tensor_parallel(module: nn.Module, plan: dict[str, str], tp: int) -> None:
    """Refuse a tp that cannot split every planned dimension evenly, heads whole (before any weight is read).

    A module with a `head_dim` attribute (attention) must give each rank whole heads of every projection
    it owns. With grouped-query attention the key/value heads are the binding limit: tp must divide them.
    Replicating key/value heads over ranks (as some engines do when tp > n_kv_heads) is not implemented:
    it is refused with the list of degrees that work.
    """
    counts: list[tuple[str, int, int]] = []  # path, size, unit (head_dim or 1)
    for path, style in resolve_plan(module, plan).items():
        size = _sharded_size(module.get_submodule(path), style, path)
        parent = module.get_submodule(path.rpartition(".")[0]) if "." in path else module
        unit = getattr(parent, "head_dim", 0) if style in ("colwise", "rowwise") else 0
        counts.append((path, size, unit or 1))
    if not counts:
        raise DistributedConfigError("this family declares no tensor-parallel plan (Family.tp_plan is empty)")
    g = math.gcd(*(size // unit for _, size, unit in counts))
    ok = [d for d in range(1, g + 1) if g % d == 0]
    for path, size, unit in sorted(counts, key=lambda c: c[2] == 1):  # heads first: the likeliest limit
        n = size // unit
        if size % unit == 0 and n % tp == 0:
            continue
        if unit > 1:
            heads = [s // u for p, s, u in counts if p.rpartition(".")[0] == path.rpartition(".")[0] and u > 1]
            what = (f"{n} key/value heads of {path} (grouped-query attention: {max(heads)} query heads share {n} "
                    "key/value heads; replicating key/value heads over ranks is not supported)"
                    if n < max(heads) else f"{n} heads of {path}")
        else:
            what = f"dimension {size} of {path}"
        raise DistributedConfigError(f"tp={tp} does not divide the {what}; each rank needs an equal whole share. "
                                     f"Degrees that work for this model: {ok}")


def _torchrun_world(tp: int) -> tuple[int, int]:
    """(rank, local_rank) of this process, after checking it is one of exactly tp torchrun processes."""
    if not isinstance(tp, int) or tp < 1:
        raise DistributedConfigError(f"tp must be a positive integer, got {tp!r}")
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        missing = [v for v in TORCHRUN_ENV if v not in os.environ]
        if missing:
            raise DistributedConfigError(
                f"tp={tp} runs one process per shard; launch with `torchrun --nproc-per-node {tp} ...` "
                f"(no {', '.join(missing)} in the environment)")
        world, rank, local = (int(os.environ[v]) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if world != tp:
        raise DistributedConfigError(f"tp={tp} but this job has {world} processes (WORLD_SIZE={world}); "
                                     f"start it with `torchrun --nproc-per-node {tp}` or pass tp={world}")
    return rank, local


def _resolve_in_turn(name_or_path, revision) -> Path:
    """A local directory resolves on every rank at once; a download/conversion happens on rank 0 first."""
    from zoo.loading import resolve

    if Path(str(name_or_path)).expanduser().is_dir():
        return resolve(name_or_path, revision)
    _init_process_group()
    if dist.get_rank() == 0:
        directory = resolve(name_or_path, revision)
    dist.barrier()
    if dist.get_rank() != 0:
        directory = resolve(name_or_path, revision)
    return directory


def _init_process_group() -> torch.device:
    """One GPU per rank (nccl) when this node has a GPU for every local rank, else CPU (gloo)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= per_node
    device = torch.device("cuda", local) if gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def read_slice(ckpt, key: str, dim: int | None, start: int, stop: int, device: torch.device,
               dtype: torch.dtype | None, chunk_bytes: int = 32 * 2**20) -> torch.Tensor:
    """Copy [start, stop) along `dim` (None: the whole tensor) of a checkpoint tensor to `device`.

    safetensors' slice read is a view into the file's memory map, and every page it touches counts towards
    this process until the map is closed. So the copy goes a few MiB of rows at a time, closing the map in
    between: a rank never holds more of the file than one chunk, whatever the tensor's size.
    """
    shape = list(ckpt.shape(key))
    stored = ckpt.dtype(key)
    if dim is not None:
        shape[dim] = stop - start
    out = torch.empty(shape, dtype=dtype if dtype is not None and stored.is_floating_point else stored, device=device)
    if not shape:
        out.copy_(ckpt.get(key))
        ckpt.close()
        return out
    row_bytes = math.prod(ckpt.shape(key)[1:]) * stored.itemsize  # pages touched per row: the whole file row
    step = max(1, chunk_bytes // max(row_bytes, 1))
    for r in range(0, shape[0], step):
        view = ckpt.get_slice(key, dim, start, stop) if dim is not None else ckpt.get(key)
        out[r : r + step].copy_(view[r : r + step])
        del view
        ckpt.close()
    return out


def _verify_shared(ckpt, rank: int, tp: int) -> None:
    from zoo.weights.format import CheckpointError

    errors = []
    for fname in sorted(set(ckpt.weight_map.values()) | set(ckpt.sha256))[rank::tp]:
        try:
            ckpt.verify_file(fname)
        except CheckpointError as e:
            errors.append(str(e))
    gathered: list = [None] * tp
    dist.all_gather_object(gathered, errors)
    failures = [e for errs in gathered for e in errs]
    if failures:
        raise CheckpointError(failures[0] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    param = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    (module.get_submodule(owner) if owner else module).register_parameter(attr, param)


def load_tensor_parallel(
    name_or_path: str | os.PathLike,
    tp: int,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    verify: bool = True,
    plan: dict[str, str] | None = None,
):
    """Load this rank's shard of a model split over `tp` torchrun processes (see the module docstring).

    Every rank reads only its slices: peak memory per rank is about model size / tp plus the replicated
    norms. `plan` overrides the family's tp_plan (benchmarks compare plans with it).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from zoo.family import get_family
    from zoo.loading import build_on_meta, check_keys, init_derived_buffers, open_checkpoint
    from zoo.tasks import TASKS
    from zoo.weights.format import parse_dtype, read_config

    rank, _ = _torchrun_world(tp)
    directory = _resolve_in_turn(name_or_path, revision)
    native = read_config(directory)
    family = get_family(native.family)
    module = build_on_meta(family, family.config_from_dict(native.config))
    plan = family.tp_plan if plan is None else plan
    check_tensor_parallel(module, plan, tp)
    ckpt = open_checkpoint(directory, verify=False)  # the ranks share the hashing below
    check_keys({k: tuple(v.shape) for k, v in module.state_dict().items()}, ckpt, str(directory))

    device = _init_process_group()
    if verify:  # the ranks share the hashing: file i is checked by rank i % tp, and all hear of any failure
        _verify_shared(ckpt, rank, tp)
    mesh = init_device_mesh(device.type, (tp,))
    # On meta, src_data_rank=None makes each rank cut its own (empty) shard: no communication, no data.
    styles = {path: _style(style) for path, style in resolve_plan(module, plan).items()}
    parallelize_module(module, mesh, styles, src_data_rank=None)

    target = parse_dtype(dtype)
    for name, p in list(module.named_parameters()):
        placement = p.placements[0] if isinstance(p, DTensor) else None
        if isinstance(placement, Shard):
            local = p.to_local().shape
            dim = placement.dim % p.ndim
            t = read_slice(ckpt, name, dim, rank * local[dim], (rank + 1) * local[dim], device, target)
        else:
            t = read_slice(ckpt, name, None, 0, 0, device, target)
        if isinstance(p, DTensor):
            t = DTensor.from_local(t, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        _set_param(module, name, t)
    params = dict(module.named_parameters())
    for name in module.state_dict():
        if name not in params:  # persistent buffers (if a family has any) are small: every rank holds them whole
            owner, _, attr = name.rpartition(".")
            (module.get_submodule(owner) if owner else module).register_buffer(attr, ckpt.get(name).to(device,
                                                                                                        copy=True))
    ckpt.close()
    init_derived_buffers(module, device)
    module.eval()
    _share_random_stream()
    model = TASKS[family.task](module, native, family, directory)
    model.mesh = mesh
    return model


def _share_random_stream() -> None:
    """Sampling must pick the same token on every rank (each runs the decoding loop): one seed for all."""
    seed = [torch.randint(0, 2**62, ()).item() if dist.get_rank() == 0 else 0]
    dist.broadcast_object_list(seed, src=0)
    torch.manual_seed(seed[0])


# -- layer placement -----------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(size: int | float | str) -> int:
    """Bytes from 123, "500MiB", "2GiB", "1.5GB" (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    if isinstance(size, bool):
        raise DistributedConfigError(f"memory size {size!r}: give bytes or a string like '2GiB'")
    if isinstance(size, int | float):
        if size < 0:
            raise DistributedConfigError(f"memory size {size!r} is negative")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(size).lower())
    if not m:
        raise DistributedConfigError(f"memory size {size!r}: give bytes or a string like '500MiB', '2GiB', '4GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def check_device(name: str) -> str:
    """A device map value that exists here: "cpu", "disk", "cuda:N" (N < visible GPUs), "mps"."""
    text = str(name).strip().lower()
    if text in ("cpu", "disk"):
        return text
    if text == "cuda":
        text = "cuda:0"
    n_cuda = torch.cuda.device_count()
    m = re.fullmatch(r"cuda:(\d+)", text)
    if m:
        if int(m.group(1)) < n_cuda:
            return text
        raise DistributedConfigError(f"device {name!r} does not exist: this machine has {n_cuda} CUDA device(s)"
                                     + (f" (cuda:0..cuda:{n_cuda - 1})" if n_cuda else ""))
    if text == "mps" and torch.backends.mps.is_available():
        return text
    raise DistributedConfigError(f"unknown device {name!r}; a device map uses 'cpu', 'disk' or 'cuda:N' "
                                 f"(this machine has {n_cuda} CUDA device(s))")


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
            _set_param(self.module, n, p.detach().to(self.device, dtype))
        return _move(args, self.device), _move(kwargs, self.device)

    def after(self, mod, args, output):
        for n, p in self.mapped.items():
            _set_param(self.module, n, p)
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
    from zoo.family import get_family
    from zoo.loading import build_on_meta, check_keys, init_derived_buffers, materialize, open_checkpoint, resolve
    from zoo.tasks import TASKS
    from zoo.weights.format import parse_dtype, read_config

    if isinstance(device_map, str) and device_map != "auto":
        raise DistributedConfigError(f"device_map must be 'auto' or a dict {{part: device}}, got {device_map!r}")
    if isinstance(device_map, dict):
        for v in device_map.values():
            check_device(v)
    limits = memory_limits(max_memory) if device_map == "auto" else None
    target = parse_dtype(dtype)
    directory = resolve(name_or_path, revision)
    native = read_config(directory)
    family = get_family(native.family)
    module = build_on_meta(family, family.config_from_dict(native.config))
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
    check_keys({k: tuple(v.shape) for k, v in module.state_dict().items()}, ckpt, str(directory))
    placement = {**{h: head_dev for h in head}, **block_devs}
    keys_on: dict[str, list[str]] = {}
    for part, dev in placement.items():
        keys_on.setdefault(dev, []).extend(f"{part}.{k}" for k in module.get_submodule(part).state_dict())
    # Streamed parts keep the mapped file views (no copy, no memory beyond the page cache) until they run.
    for dev, keys in keys_on.items():
        materialize(module, ckpt, None if dev == "disk" else target, "cpu" if dev == "disk" else dev,
                    str(directory), keys=keys)

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
    model = TASKS[family.task](module, native, family, directory)
    model.device_map = placement
    return model


class _ReturnToCaller:
    """The output comes back on the device of the first input tensor (the generation loop expects that)."""

    def before(self, mod, args, kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self.device = first.device if first is not None else None

    def after(self, mod, args, output):
        return _move(output, self.device) if self.device is not None else output
