"""Pipeline parallelism: consecutive blocks on pipeline stages, one torchrun process per stage, with PyTorch's
own torch.distributed.pipelining.

Inside `torchrun --nproc-per-node P` (or across nodes: `--nnodes N --rdzv-endpoint HOST:PORT`):
    zoo.load(name, pp=P)
    zoo.load(name, tp=T, pp=P)    # T x P processes: ranks [s*T, (s+1)*T) are stage s, split as zoo.tensor_parallel

The model's blocks (the elements of its top-level nn.ModuleList, as a device map sees them) are cut into P equal
runs of consecutive blocks; stage s keeps blocks [s*n/P, (s+1)*n/P) and reads only their tensors from the
safetensors files (and the parts around the blocks: embedding, final norm, head, which are small next to them).

Every rank runs the family's own forward and decoding loop, as under tensor parallelism. In place of the blocks
the module list holds slots: at the first slot of its stage a rank runs one step of a torch.distributed.pipelining
schedule (ScheduleGPipe, one microbatch) over a PipelineStage of its blocks, receiving the hidden state from the
stage before and sending its own to the stage after; the other slots pass the hidden state on. After the last
slot the last stage's hidden state is broadcast, so every rank computes the same final norm and logits and picks
the same tokens. The block's other arguments (positions, masks, the cache) are the ones of the current call on
that rank: each rank caches the keys and values of its own blocks only.

A PipelineStage fixes the shapes it sends; a decoding step sends [B, 1, dim] where the prompt sent [B, T, dim], so
each call builds its stage and schedule afresh with the call's shape given (static metadata: no shape exchange).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from zoo.device_map import model_parts
from zoo.family import init_derived_buffers
from zoo.loading import (
    DistributedConfigError,
    build_model,
    check_keys,
    expected_dtypes,
    expected_shapes,
    materialize,
    open_checkpoint,
)
from zoo.tasks import get_task
from zoo.weights.format import parse_dtype, read_config

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def stage_bounds(n_blocks: int, pp: int) -> list[tuple[int, int]]:
    """[start, stop) of each stage's blocks: equal runs of consecutive blocks."""
    per = n_blocks // pp
    return [(s * per, (s + 1) * per) for s in range(pp)]


def check_pipeline(blocks: list[str], pp: int, where: str) -> None:
    """Refuse a pp that cannot give every stage an equal, non-empty run of blocks (before any weight is read)."""
    n = len(blocks)
    if n % pp:
        ok = [d for d in range(1, n + 1) if n % d == 0]
        raise DistributedConfigError(f"pp={pp} does not divide the {n} blocks of {where} ({blocks[0]} .. "
                                     f"{blocks[-1]}); each stage needs an equal run of blocks. Degrees that work "
                                     f"for this model: {ok}")


def _torchrun_world(pp: int, tp: int = 1) -> int:
    """This process's rank, after checking it is one of exactly tp x pp torchrun processes."""
    n, what = pp * tp, f"pp={pp}" + (f" x tp={tp}" if tp > 1 else "")
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        missing = [v for v in TORCHRUN_ENV if v not in os.environ]
        if missing:
            raise DistributedConfigError(
                f"{what} runs one process per pipeline stage{' and shard' if tp > 1 else ''}; launch with "
                f"`torchrun --nproc-per-node {n} ...` (or --nnodes/--rdzv-endpoint across machines; no "
                f"{', '.join(missing)} in the environment)")
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != n:
        raise DistributedConfigError(f"{what} but this job has {world} processes (WORLD_SIZE={world}); start it "
                                     f"with {n} processes in all (`torchrun --nproc-per-node {n}`, or per node "
                                     f"times --nnodes)")
    return rank


class _Stage(nn.Module):
    """This rank's consecutive blocks as the PipelineStage's module: hidden state in, hidden state out. The
    blocks' other arguments are those of the current call (set by _Pipeline before each schedule step)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.call: tuple[tuple, dict] = ((), {})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.call
        for block in self.blocks:
            h = block(h, *args, **kwargs)
        return h


class _Pipeline:
    """What the slots of one rank share: its stage, the stage bounds and the process group."""

    def __init__(self, stage: _Stage, index: int, bounds: list[tuple[int, int]], device: torch.device,
                 group: dist.ProcessGroup | None = None):
        self.stage, self.index, self.bounds, self.device, self.group = stage, index, bounds, device, group
        self.n_blocks = bounds[-1][1]
        self.last = len(bounds) - 1

    def slot(self, i: int, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if i == self.bounds[self.index][0]:
            h = self._step(h, args, kwargs)
        if i == self.n_blocks - 1:
            h = h.contiguous()
            # the last stage's hidden state to the other stages: the same logits on every rank
            dist.broadcast(h, group=self.group, group_src=self.last)
        return h

    def _step(self, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        self.stage.call = (args, kwargs)
        meta = torch.empty(h.shape, dtype=h.dtype, device="meta")
        stage = PipelineStage(self.stage, self.index, len(self.bounds), self.device, input_args=meta,
                              output_args=meta, group=self.group)
        schedule = ScheduleGPipe(stage, n_microbatches=1)
        try:
            out = schedule.step(h) if self.index == 0 else schedule.step()
        finally:
            self.stage.call = ((), {})
        return out if self.index == self.last else h  # other stages' h is replaced by the broadcast


class _Slot(nn.Module):
    """Block i's place in the family's module list."""

    def __init__(self, pipeline: _Pipeline, i: int, stage: _Stage | None = None):
        super().__init__()
        self.pipeline, self.i = pipeline, i
        self.stage = stage  # the slot that runs the stage holds its blocks (so .to(), buffers and hooks reach them)

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.pipeline.slot(self.i, h, args, kwargs)


def load_pipeline(
    name_or_path: str | os.PathLike,
    pp: int,
    tp: int = 1,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    verify: bool = True,
    quantize: str | None = None,
):
    """Load this rank's pipeline stage of a model split over `pp` stages (see the module docstring), each stage
    split over `tp` tensor-parallel ranks (zoo.tensor_parallel): world size tp x pp, ranks [s*tp, (s+1)*tp)
    form stage s (with `torchrun --nnodes pp --nproc-per-node tp`: one stage per node)."""
    from zoo.tensor_parallel import (
        _init_process_group,
        _resolve_in_turn,
        _share_random_stream,
        _verify_shared,
        check_tensor_parallel,
        shard_and_load,
    )

    local = Path(str(name_or_path)).expanduser()
    if local.is_dir():  # a pp (or tp) the model cannot take is refused before any process is asked
        native = read_config(local)
        family, meta = build_model(native, quantize, where=str(local / "config.json"))
        check_pipeline(_blocks(meta, str(local)), pp, str(local))
        if tp > 1:
            if not family.tp_plan:
                raise DistributedConfigError(f"{local}: the {native.family} family declares no tensor-parallel "
                                             "plan, so it cannot be split with tp; pass pp alone")
            check_tensor_parallel(meta, family.tp_plan, tp)
    rank = _torchrun_world(pp, tp)
    directory = _resolve_in_turn(name_or_path, revision)
    native = read_config(directory)
    family, module = build_model(native, quantize, where=str(directory / "config.json"))
    blocks = _blocks(module, str(directory))
    check_pipeline(blocks, pp, str(directory))
    if tp > 1:
        check_tensor_parallel(module, family.tp_plan, tp)
    device = _init_process_group()

    ckpt = open_checkpoint(directory, verify=False)
    if verify:  # the ranks share the hashing: file i is checked by rank i % world, and all hear of any failure
        _verify_shared(ckpt, rank, pp * tp)
    check_keys(expected_shapes(module, native), ckpt, str(directory), expected_dtypes(module, native))
    index, tp_rank = divmod(rank, tp)
    group, mesh = None, None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (pp, tp), mesh_dim_names=("pp", "tp"))
        group = mesh.get_group("pp")
    layers = module.get_submodule(blocks[0].rpartition(".")[0])
    bounds = stage_bounds(len(blocks), pp)
    start, stop = bounds[index]
    stage = _Stage([layers[i] for i in range(start, stop)])
    pipeline = _Pipeline(stage, index, bounds, device, group)
    for i in range(len(layers)):
        if not start <= i < stop:
            layers[i] = _Slot(pipeline, i)  # another stage's block: never built, never read
    if tp > 1:  # this stage's blocks and the parts around them, sharded; only this rank's slices are read
        shard_and_load(module, family.tp_plan, mesh["tp"], ckpt, tp_rank, device, parse_dtype(dtype))
    else:
        keys = list(expected_shapes(module, native))  # the parts around the blocks, and this stage's blocks
        materialize(module, ckpt, parse_dtype(dtype), device, str(directory), keys=keys, native=native)
    for i in range(start, stop):
        layers[i] = _Slot(pipeline, i, stage if i == start else None)
    ckpt.close()
    init_derived_buffers(module, device)
    module.eval()
    module.zoo_eager_only = "pipeline stages exchange activations between processes"
    _share_random_stream()
    model = get_task(family.task)(module, native, family, directory)
    model.pipeline_stage = (index, (start, stop))
    if mesh is not None:
        model.mesh = mesh["tp"]
    return model


def _blocks(module: nn.Module, where: str) -> list[str]:
    _, blocks = model_parts(module)
    owners = {b.rpartition(".")[0] for b in blocks}
    if len(owners) != 1:
        raise DistributedConfigError(f"{where}: pipeline stages cut one list of blocks; this model has "
                                     f"{len(owners)} ({', '.join(sorted(owners)) or 'none'})")
    return blocks
