"""Tensor parallelism: one model split over N torchrun processes with PyTorch's DTensor.

Inside `torchrun --nproc-per-node N`:  zoo.load(name, tp=N)
    The family's `tp_plan` (module-path glob -> style) is applied with torch.distributed.tensor.parallel on
    the model while it is still on the meta device; every rank then reads only its own slice of each
    sharded tensor from the safetensors files and wraps it with DTensor.from_local. Megatron-style:
    q/k/v and gate/up are split by output columns (whole heads), o_proj and down_proj by input rows, so
    each block needs one all-reduce after attention and one after the MLP. gloo on CPU, nccl on GPU.

Packed weights (a checkpoint stored by `zoo convert --quantize`, or zoo.load(..., tp=N, quantize=...)) are not
nn.Linear, so DTensor's styles do not apply to them: each planned packed module is replaced by its rank's own
packed module (quant.split_packed says which slice of every stored tensor, scales included, is the rank's), with
the communication the style implies done by hand, as the styles do it: colwise keeps its output columns local,
rowwise all-reduces partial sums (then adds the bias once), vocab masks the ids it does not own and all-reduces,
colwise_rep (and a packed tied head) all-gathers the logit slices. Quantising while loading gives the codes and
scales of the whole model, so TP=N computes what TP=1 computes: a rank packs its own rows (column-parallel), or
its own columns where the scheme's scales are per group of columns (int4-group*, GLM's per-rank "-gN"); a
row-parallel layer with one scale per whole row (int8) needs the whole row's absmax, so there the rank reads every
row, a block at a time, packs it and keeps its columns. A tp that would cut a scale group or a nibble pair is
refused, naming the layer, before any weight is read (check_packed_split).

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

from zoo.architectures.quant import (
    PACKED,
    PackedEmbedding,
    PackedLinear,
    PackedStack,
    Slice,
    float_key,
    split_packed,
)
from zoo.family import get_family, init_derived_buffers
from zoo.loading import (
    DistributedConfigError,
    build_model,
    check_keys,
    expected_dtypes,
    expected_shapes,
    open_checkpoint,
    resolve,
    set_param,
)
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
        if not isinstance(sub, nn.Embedding | PackedEmbedding):
            raise DistributedConfigError(f"tp plan: {path} is {type(sub).__name__}; 'vocab' applies to nn.Embedding")
        return sub.num_embeddings
    if not isinstance(sub, nn.Linear | PackedLinear):
        raise DistributedConfigError(f"tp plan: {path} is {type(sub).__name__}; {style!r} applies to nn.Linear")
    return sub.in_features if style == "rowwise" else sub.out_features


def _split_by(style: str) -> str:
    return "columns" if style == "rowwise" else "rows"


def check_packed_split(module: nn.Module, plan: dict[str, str], tp: int) -> None:
    """Refuse a tp that would cut a packed weight's stored elements (a nibble pair, a scale group: GLM-130B's
    published per-rank scales split only into whole ranks), naming the layer, before any weight is read."""
    planned = resolve_plan(module, plan)
    for path, sub in module.named_modules():
        if isinstance(sub, PackedStack) and path in planned:
            raise DistributedConfigError(f"tp plan: {path} is a stacked weight (PackedStack); tensor parallelism "
                                         "splits linear layers and embeddings, so a plan must leave stacks whole")
        if path not in planned or not isinstance(sub, PackedLinear | PackedEmbedding):
            continue
        out_f, in_f = sub.weight_shape
        try:
            split_packed(sub.scheme, out_f, in_f, _split_by(planned[path]), tp, 0)
        except ValueError as e:
            raise DistributedConfigError(f"tp={tp} cannot split the packed weight of {path} "
                                         f"({planned[path]}): {e}") from None


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
    check_packed_split(module, plan, tp)


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
    quantize: str | None = None,
):
    """Load this rank's shard of a model split over `tp` torchrun processes (see the module docstring).

    Every rank reads only its slices: peak memory per rank is about model size / tp plus the replicated
    norms. `plan` overrides the family's tp_plan (benchmarks compare plans with it). `quantize` packs the
    weights while loading (each rank its own slices); a checkpoint stored packed loads packed by itself.
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
    family, module = build_model(native, quantize, where=str(directory / "config.json"))
    plan = family.tp_plan if plan is None else plan
    check_tensor_parallel(module, plan, tp)
    ckpt = open_checkpoint(directory, verify=False)  # the ranks share the hashing below
    check_keys(expected_shapes(module, native), ckpt, str(directory), expected_dtypes(module, native))

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
    parameter it holds (whole tensors for the replicated ones and for persistent buffers). Packed modules are
    replaced by this rank's packed slice (see the module docstring)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    planned = resolve_plan(module, plan)
    packed = {path: sub for path, sub in module.named_modules() if isinstance(sub, PACKED)}
    # On meta, src_data_rank=None makes each rank cut its own (empty) shard: no communication, no data.
    styles = {path: _style(style) for path, style in planned.items() if path not in packed}
    if styles:
        parallelize_module(module, mesh, styles, src_data_rank=None)
    for path, sub in packed.items():
        _load_packed(module, path, sub, planned.get(path), ckpt, rank, mesh, device, target)
    inside = tuple(f"{path}." for path in packed)
    for name, p in list(module.named_parameters()):
        if name.startswith(inside):
            continue
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
        if name not in params and not name.startswith(inside):  # persistent buffers (if a family has any) are
            owner, _, attr = name.rpartition(".")                  # small: every rank holds them whole
            (module.get_submodule(owner) if owner else module).register_buffer(attr, ckpt.get(name).to(device,
                                                                                                        copy=True))


# -- packed modules under a plan ----------------------------------------------------------------------------------


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the ranks by functional collectives (traceable by torch.compile, like DTensor's own)."""
    from torch.distributed import _functional_collectives as funcol

    y = funcol.all_reduce(t, "sum", group)
    return y.wait() if isinstance(y, funcol.AsyncCollectiveTensor) else y


def _all_gather_last(t: torch.Tensor, group) -> torch.Tensor:
    """The ranks' slices side by side along the last axis (rank order)."""
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # (renamed in torch 2.10)
    y = gather(t.contiguous(), t.dim() - 1, group)
    return y.wait() if isinstance(y, funcol.AsyncCollectiveTensor) else y


class RowwisePackedLinear(PackedLinear):
    """A row-parallel layer's slice of input columns: partial sums, all-reduced, then the bias (held whole) once
    (RowwiseParallel's arithmetic: input local, output replicated)."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None and not torch.compiler.is_compiling():
            self.prepare()
        y = self.scheme.linear(x, {name: getattr(self, name) for name in self.kernel or self.stored}, None)
        y = _all_reduce(y, self.group)
        return y if self.bias is None else y + self.bias


class GatheredPackedLinear(PackedLinear):
    """An output head's slice of the vocabulary; the logit slices are all-gathered (colwise_rep)."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_gather_last(super().forward(x), self.group)


class VocabPackedEmbedding(PackedEmbedding):
    """A packed table's slice of the vocabulary (rows [start, start + num_embeddings)): a lookup embeds the ids
    this rank owns, zeros the others and all-reduces (vocab); as the tied head, the logit slices are gathered."""

    group, start = None, 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = super().forward(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0)
        return _all_reduce(rows, self.group)

    def as_head(self, h: torch.Tensor) -> torch.Tensor:
        return _all_gather_last(super().as_head(h), self.group)


_PACKED_STYLES = {None: None, "colwise": PackedLinear, "rowwise": RowwisePackedLinear,
                  "colwise_rep": GatheredPackedLinear, "vocab": VocabPackedEmbedding}


def _load_packed(module: nn.Module, path: str, sub: nn.Module, style: str | None, ckpt, rank: int, mesh,
                 device: torch.device, target: torch.dtype | None) -> None:
    """Replace the packed module at `path` by this rank's: its slice of every stored tensor (style None: the
    whole, replicated), read from the packed checkpoint, or packed here from the float weight's rows."""
    parts = mesh.size() if style is not None else 1
    share = rank if style is not None else 0
    stack = sub.n if isinstance(sub, PackedStack) else None  # replicated only (check_packed_split)
    out_f, in_f = sub.weight_shape[-2:]
    scheme, slices = split_packed(sub.scheme, out_f, in_f, _split_by(style or "colwise"), parts, share)
    if all(f"{path}.{name}" in ckpt for name in sub.stored):  # stored packed: read the slices
        tensors = {}
        for name, sl in slices.items():
            if stack is not None:
                tensors[name] = read_slice(ckpt, f"{path}.{name}", None, 0, 0, device, target)
            else:
                t = read_slice(ckpt, f"{path}.{name}", sl.axis, sl.start, sl.stop, device, target)
                tensors[name] = t.reshape(sl.shape)
    else:
        columns = (share * in_f // parts, (share + 1) * in_f // parts) if style == "rowwise" else None
        tensors = _pack_rows_sliced(ckpt, float_key(path, sub), sub.scheme, scheme, slices, stack, columns, device,
                                    target)
    kind = type(sub) if style is None else _PACKED_STYLES[style]
    local_out, local_in = _local_dims(out_f, in_f, style, parts)
    with torch.device("meta"):
        if isinstance(sub, PackedStack):
            new = PackedStack(stack, local_out, local_in, scheme)
        elif isinstance(sub, PackedEmbedding):
            new = kind(local_out, local_in, scheme, sub.dtype)
        else:
            new = kind(local_in, local_out, sub.bias is not None, scheme)
    for name, t in tensors.items():
        new.register_buffer(name, t)
    if isinstance(new, PackedLinear) and sub.bias is not None:
        rows = style in ("colwise", "colwise_rep")
        bias = read_slice(ckpt, f"{path}.bias", 0 if rows else None, share * local_out, (share + 1) * local_out,
                          device, target)
        new.bias = nn.Parameter(bias, requires_grad=False)
    if isinstance(new, PackedEmbedding):
        new.dtype = tensors["weight_scale"].dtype
    if style is not None and kind is not PackedLinear:  # the styles that communicate
        new.group = mesh.get_group()
    if isinstance(new, VocabPackedEmbedding):
        new.start = share * local_out  # the first vocabulary row this rank owns
    owner, _, attr = path.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, new)


def _local_dims(out_f: int, in_f: int, style: str | None, parts: int) -> tuple[int, int]:
    if style is None:
        return out_f, in_f
    return (out_f, in_f // parts) if style == "rowwise" else (out_f // parts, in_f)


def _pack_rows_sliced(ckpt, key: str, scheme, local_scheme, slices: dict[str, Slice], stack: int | None,
                      columns: tuple[int, int] | None, device: torch.device, target: torch.dtype | None,
                      chunk_bytes: int = 32 * 2**20) -> dict[str, torch.Tensor]:
    """This rank's slices of the weight `key` packed as the whole model packs it.

    Under a column split (`columns`: this rank's input columns) where every stored tensor lies along the columns
    (scale groups: int4-group*, GLM's per-rank "-gN"), groups are packed independently: only this rank's columns
    are read, and packed by the slice's scheme. Otherwise the float rows are read a block at a time (this rank's
    rows under a row split; every row under a column split with one scale per whole row, which needs the whole
    row's absmax), each block packed whole, and only this rank's columns of it kept."""
    if stack is not None or not scheme.rows_independent:  # a stack (replicated) or one scale per matrix: whole
        packed = scheme.pack_rows(read_slice(ckpt, key, None, 0, 0, device, target))
        return {name: packed[name] if stack is not None else _narrow(packed[name], sl).reshape(sl.shape)
                for name, sl in slices.items()}
    if columns is not None and scheme.columns_independent and all(sl.axis not in (None, 0) for sl in slices.values()):
        packed = local_scheme.pack_rows(read_slice(ckpt, key, 1, *columns, device, target))
        return {name: packed[name].reshape(sl.shape).contiguous() for name, sl in slices.items()}
    rows = next((sl for sl in slices.values() if sl.axis == 0), None)
    first, last = (rows.start, rows.stop) if rows else (0, ckpt.shape(key)[0])
    step = max(1, chunk_bytes // max(1, ckpt.shape(key)[1] * 4))
    blocks: dict[str, list[torch.Tensor]] = {name: [] for name in slices}
    for a in range(first, last, step):
        packed = scheme.pack_rows(read_slice(ckpt, key, 0, a, min(a + step, last), device, target))
        for name, sl in slices.items():
            t = packed[name]
            blocks[name].append(t if sl.axis in (None, 0) else t.narrow(sl.axis, sl.start, sl.stop - sl.start))
    return {name: torch.cat(blocks[name]).reshape(sl.shape).contiguous() for name, sl in slices.items()}


def _narrow(t: torch.Tensor, sl: Slice) -> torch.Tensor:
    return t if sl.axis is None else t.narrow(sl.axis, sl.start, sl.stop - sl.start)


def _share_random_stream() -> None:
    """Sampling must pick the same token on every rank (each runs the decoding loop): one seed for all."""
    seed = [torch.randint(0, 2**62, ()).item() if dist.get_rank() == 0 else 0]
    dist.broadcast_object_list(seed, src=0)
    torch.manual_seed(seed[0])
