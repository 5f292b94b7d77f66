"""Tensor parallelism: one model split over N torchrun processes with PyTorch's DTensor.

Inside `torchrun --nproc-per-node N`:  zoo.load(name, tp=N)
    The family's `tp_plan` (module-path glob -> style) is applied with torch.distributed.tensor.parallel on
    the model while it is still on the meta device; every rank then reads only its own slice of each
    sharded tensor from the safetensors files and wraps it with DTensor.from_local. Megatron-style:
    q/k/v and gate/up are split by output columns (whole heads), o_proj and down_proj by input rows, so
    each block needs one all-reduce after attention and one after the MLP. gloo on CPU, nccl on GPU.

torch.distributed.tensor costs about half a second to import: it is imported here, when tp is asked for.
"""

from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from zoo.family import get_family, init_derived_buffers
from zoo.loading import DistributedConfigError, build_model, check_keys, open_checkpoint, resolve, set_param
from zoo.tasks import get_task
from zoo.weights.format import CheckpointError, parse_dtype, read_config

PLAN_STYLES = ("colwise", "rowwise", "vocab", "colwise_rep")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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

    local = Path(str(name_or_path)).expanduser()
    if plan is None and local.is_dir():  # a family that cannot be split is refused before any process is asked
        native = read_config(local)
        if not get_family(native.family).tp_plan:
            raise DistributedConfigError(f"{local}: the {native.family} family declares no tensor-parallel plan, so "
                                         "it cannot be split with tp; load it whole, or place blocks with device_map")
    rank, _ = _torchrun_world(tp)
    directory = _resolve_in_turn(name_or_path, revision)
    native = read_config(directory)
    if native.quantization:
        raise DistributedConfigError(f"{directory} is stored quantized ({native.quantization.get('scheme')}); "
                                     "tensor parallelism splits float weights: convert it without --quantize")
    family, module = build_model(native, where=str(directory / "config.json"))
    plan = family.tp_plan if plan is None else plan
    check_tensor_parallel(module, plan, tp)
    ckpt = open_checkpoint(directory, verify=False)  # the ranks share the hashing below
    state = module.state_dict()
    check_keys({k: tuple(v.shape) for k, v in state.items()}, ckpt, str(directory),
               {k: v.dtype for k, v in state.items()})

    device = _init_process_group()
    if verify:  # the ranks share the hashing: file i is checked by rank i % tp, and all hear of any failure
        _verify_shared(ckpt, rank, tp)
    mesh = init_device_mesh(device.type, (tp,))
    shard_and_load(module, plan, mesh, ckpt, rank, device, parse_dtype(dtype))
    ckpt.close()
    init_derived_buffers(module, device)
    module.eval()
    _share_random_stream()
    model = get_task(family.task)(module, native, family, directory)
    model.mesh = mesh
    return model


def shard_and_load(module: nn.Module, plan: dict[str, str], mesh, ckpt, rank: int, device: torch.device,
                   target: torch.dtype | None) -> None:
    """Apply `plan` on the meta-device `module` over the 1-D `mesh` and read this tp `rank`'s slice of every
    parameter it holds (whole tensors for the replicated ones and for persistent buffers)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    # On meta, src_data_rank=None makes each rank cut its own (empty) shard: no communication, no data.
    styles = {path: _style(style) for path, style in resolve_plan(module, plan).items()}
    parallelize_module(module, mesh, styles, src_data_rank=None)
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
        set_param(module, name, t)
    params = dict(module.named_parameters())
    for name in module.state_dict():
        if name not in params:  # persistent buffers (if a family has any) are small: every rank holds them whole
            owner, _, attr = name.rpartition(".")
            (module.get_submodule(owner) if owner else module).register_buffer(attr, ckpt.get(name).to(device,
                                                                                                        copy=True))


def _share_random_stream() -> None:
    """Sampling must pick the same token on every rank (each runs the decoding loop): one seed for all."""
    seed = [torch.randint(0, 2**62, ()).item() if dist.get_rank() == 0 else 0]
    dist.broadcast_object_list(seed, src=0)
    torch.manual_seed(seed[0])
