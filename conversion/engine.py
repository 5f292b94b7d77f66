"""The one streaming engine behind every converter.

plan:  source keys --(key map)--> jobs: [source keys] -> transform -> [native keys]
check: planned native shapes against the model built on the meta device (names the tensor on error)
write: one job at a time into a temporary directory, renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from zoo.conversion.rules import KeyMap, Rule, pattern_regex
from zoo.conversion.sources import TensorSource
from zoo.weights.format import CheckpointError
from zoo.weights.writer import TensorSpec, write_tensors


@dataclass
class Job:
    src: tuple[str, ...]
    dst: tuple[str, ...]
    rule: Rule


def plan_jobs(keys: list[str], keymap: KeyMap, where: Callable[[str], str] = str) -> list[Job]:
    """Match every source key to exactly one rule (or a drop); anything else is an error."""
    keyset = set(keys)
    consumed: set[str] = set()
    jobs: list[Job] = []
    drops = [pattern_regex(d.pattern) for d in keymap.drops]
    for rule in keymap.rules:
        head = pattern_regex(rule.src[0])
        for key in keys:
            m = head.match(key)
            if not m:
                continue
            binding = m.groupdict()
            src = tuple(p.format(**binding) for p in rule.src)
            dst = tuple(p.format(**binding) for p in rule.dst)
            missing = [s for s in src if s not in keyset]
            if missing:
                raise CheckpointError(f"{where(key)}: missing tensor {missing[0]} (needed with {key})")
            consumed.update(src)
            jobs.append(Job(src, dst, rule))
    for key in keys:
        if key not in consumed and not any(d.match(key) for d in drops):
            raise CheckpointError(f"{where(key)}: unexpected tensor {key}; no rule of this format maps it")
    # keep the source order, so reads walk each file front to back
    order = {k: n for n, k in enumerate(keys)}
    jobs.sort(key=lambda j: order[j.src[0]])
    return jobs


def check_against_model(
    planned: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    what: str,
    published: Callable[[str], str] = str,
) -> None:
    """Native tensors planned vs. the model's state dict (both meta): names every difference."""
    missing = [k for k in expected if k not in planned]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{what}: missing tensor {published(missing[0])}{more}")
    unexpected = [k for k in planned if k not in expected]
    if unexpected:
        raise CheckpointError(f"{what}: unexpected tensor {unexpected[0]}; the model has no such parameter")
    for k, t in planned.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            name = k if published(k) == k else f"{published(k)} (as {k})"
            raise CheckpointError(
                f"{what}: tensor {name} has shape {tuple(t.shape)}, the config needs {tuple(expected[k].shape)}"
            )


def run_jobs_meta(jobs: list[Job], source: TensorSource) -> dict[str, torch.Tensor]:
    """Push meta tensors through each transform to learn every output's shape and dtype."""
    out: dict[str, torch.Tensor] = {}
    for job in jobs:
        try:
            results = job.rule.forward([source.meta(k) for k in job.src])
        except (ValueError, RuntimeError) as e:  # a transform that does not fit the stored shape
            msg = str(e)
            m = pattern_regex(job.rule.src[0]).match(job.src[0])
            for name, value in (m.groupdict() if m else {}).items():  # name the layer, not "{i}"
                msg = msg.replace(f"{{{name}}}", value)
            raise CheckpointError(f"{source.file_of(job.src[0])}: tensor {job.src[0]}: {msg}") from None
        out.update(zip(job.dst, results))
    return out


def stream_write(
    directory: Path,
    jobs: list[Job],
    source: TensorSource,
    planned: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    max_shard_bytes: int,
    progress: bool,
    keep_dtype: Callable[[str], bool] = lambda k: False,
) -> dict:
    """Write every job's outputs; a job's sources are read once, its outputs kept until written."""
    def target(key: str, t: torch.Tensor) -> torch.dtype:
        return t.dtype if dtype is None or not t.dtype.is_floating_point or keep_dtype(key) else dtype

    specs = [TensorSpec(k, tuple(planned[k].shape), target(k, planned[k])) for job in jobs for k in job.dst]
    owner = {k: job for job in jobs for k in job.dst}
    pending: dict[str, torch.Tensor] = {}

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name not in pending:
            job = owner[spec.name]
            results = job.rule.forward([source.get(k) for k in job.src])
            pending.update(zip(job.dst, results))
        return pending.pop(spec.name).to(spec.dtype)

    return write_tensors(directory, specs, produce, max_shard_bytes=max_shard_bytes, progress=progress)


def pack_jobs(jobs: list[Job], paths: list[str], scheme) -> list[Job]:
    """The same jobs, except that the weight of each linear layer at `paths` comes out packed by `scheme`
    (zoo.architectures.quant), as the tensors the scheme stores: quantising while converting, tensor by tensor."""
    names = {f"{p}.weight": p for p in paths}
    stored = list(scheme.tensors(2, 2))  # the names of what the scheme stores per weight
    out = []
    for job in jobs:
        if not any(d in names for d in job.dst):
            out.append(job)
            continue

        def forward(ts, rule=job.rule, dsts=job.dst):
            results = []
            for d, t in zip(dsts, rule.forward(ts)):
                packed = scheme.pack(t) if d in names else None
                results += [packed[n] for n in stored] if packed is not None else [t]
            return results

        dst = tuple(x for d in job.dst for x in ([f"{names[d]}.{n}" for n in stored] if d in names else [d]))
        out.append(Job(job.src, dst, Rule(job.rule.src, dst, forward, doc=f"{job.rule.doc} packed {scheme.name}")))
    return out


class AtomicDirectory:
    """Write into a temporary sibling directory; rename into place only when the block completes."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out}: already exists; pass --overwrite (overwrite=True) to replace it")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
            os.rename(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
