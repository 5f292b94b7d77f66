"""The one streaming engine behind every converter.

plan:  source keys --(key map)--> jobs: [source keys] -> transform -> [native keys]
check: planned native shapes against the model built on the meta device (names the tensor on error)
write: one job at a time into a temporary directory, renamed into place when complete.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from zoo.conversion.rules import KeyMap, Rule, pattern_regex
from zoo.conversion.sources import TensorSource
from zoo.weights.format import CheckpointError
from zoo.weights.locks import ProcessLock
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
        if t.dtype.is_floating_point != expected[k].dtype.is_floating_point:  # integer weights would run as garbage
            name = k if published(k) == k else f"{published(k)} (as {k})"
            kind = "a floating" if expected[k].dtype.is_floating_point else "an integer"
            raise CheckpointError(f"{what}: tensor {name} is stored as {t.dtype}; the model needs {kind} tensor")


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
    (zoo.architectures.quant; or a {path: scheme} mapping), as the tensors the scheme stores: quantising while
    converting, tensor by tensor."""
    names = {f"{p}.weight": p for p in paths}
    schemes = scheme if isinstance(scheme, dict) else {p: scheme for p in paths}
    # the names of what each scheme stores per weight (a shape every scheme's groups divide)
    stored = {p: list(schemes[p].tensors(2, 2 * getattr(schemes[p], "groups", 1))) for p in paths}
    out = []
    for job in jobs:
        if not any(d in names for d in job.dst):
            out.append(job)
            continue

        def forward(ts, rule=job.rule, dsts=job.dst):
            results = []
            for d, t in zip(dsts, rule.forward(ts)):
                packed = schemes[names[d]].pack_rows(t) if d in names else None
                results += [packed[n] for n in stored[names[d]]] if packed is not None else [t]
            return results

        dst = tuple(x for d in job.dst for x in ([f"{names[d]}.{n}" for n in stored[names[d]]] if d in names else [d]))
        how = ", ".join(sorted({schemes[names[d]].name for d in job.dst if d in names}))
        out.append(Job(job.src, dst, Rule(job.rule.src, dst, forward, doc=f"{job.rule.doc} packed {how}")))
    return out


# What a format's parsing code raises when a published file is not what it expects: a missing config key, a value
# of the wrong type, a zero where a size goes, a short read, a directory where a file should be. At the boundary
# of zoo.convert / zoo.export these are bad input, reported as such (CheckpointError naming the source), for
# every format, including ones that land later.
INPUT_ERRORS = (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError, OverflowError, RuntimeError,
                struct.error, UnicodeDecodeError, NotADirectoryError, IsADirectoryError, ValueError)


def describe(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"missing {e.args[0]!r}" if e.args else "a missing key"
    if isinstance(e, struct.error):
        return f"unreadable binary data ({e})"
    text = " ".join(str(e).split())
    if isinstance(e, ValueError) and not isinstance(e, UnicodeDecodeError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextmanager
def reading(source: str | Path, how: str = ""):
    """Turn what parsing a damaged or foreign source raises into a CheckpointError that names the source."""
    try:
        yield
    except CheckpointError:
        raise
    except INPUT_ERRORS as e:
        if isinstance(e, NotADirectoryError):
            raise CheckpointError(f"{source}: a file where a directory is expected{f' ({how})' if how else ''}: "
                                  f"{e.filename}") from None
        if isinstance(e, OSError) and e.filename:  # it names its file already
            raise CheckpointError(f"{e.filename}: {e.strerror}{f' ({how})' if how else ''}") from None
        raise CheckpointError(f"{source}: {f'{how}: ' if how else ''}{describe(e)}") from None


def check_paths(src: str | Path, out: str | Path, what: str = "src") -> tuple[Path, Path]:
    """Source and output paths that cannot hurt each other: neither empty, OUT not the source itself, and the
    source not inside OUT (replacing OUT would delete it)."""
    for name, value in ((what, src), ("out", out)):
        if not isinstance(value, str | os.PathLike) or not str(os.fspath(value)).strip():
            raise ValueError(f"{name}={value!r}: expected a path")
    src, out = Path(src), Path(out)
    a, b = src.expanduser().resolve(), out.expanduser().resolve()
    if a == b or b in a.parents:
        raise ValueError(f"out={str(out)!r}: the output would replace the source {src}; write it somewhere else")
    return src, out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without it: rename in two steps
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root to disk, so a crash after the rename cannot leave a complete
    looking directory with empty files (the rename reaches the disk no earlier than its contents)."""
    for path in [*sorted(root.rglob("*")), root]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicDirectory:
    """Write into a temporary sibling directory; put it in place only when the block completes.

    OUT is never half-written: it is either absent, the previous complete directory, or the new complete one.
    - The swap of a new directory for an existing OUT is one renameat2(RENAME_EXCHANGE) step on Linux (elsewhere
      two renames, with a moment in which OUT is absent), after every file has been fsync'ed.
    - A lock file beside OUT (.NAME.lock) makes two processes writing the same OUT take turns; the second then
      finds OUT present and refuses it (or, with overwrite, replaces it in turn).
    - The temporary directory is named .NAME.partial-HOST-PID-XXXX; one left by a killed process on this host
      (its PID gone) is removed by the next writer of OUT, under the lock.
    - A write that fails (a full disk, a file size limit) raises OSError naming OUT and the file, after the
      temporary directory is removed.
    """

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out}: already exists; pass --overwrite (overwrite=True) to replace it")
        self._lock = None

    @property
    def _host(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"

    def _clean_stale(self) -> None:
        prefix = f".{self.out.name}."
        for path in self.out.parent.iterdir():
            m = re.fullmatch(r"(?:partial|old)-(.+)-(\d+)-[A-Za-z0-9_]+", path.name[len(prefix):]) \
                if path.name.startswith(prefix) else None
            if m and m.group(1) == self._host and not _alive(int(m.group(2))):
                _remove(path)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = ProcessLock(self.out.parent / f".{self.out.name}.lock")
        if not self._lock.acquire(blocking=False):
            print(f"{self.out}: another process is writing it; waiting for it to finish", file=sys.stderr,
                  flush=True)
            self._lock.acquire()
        try:
            if self.out.exists() and not self.overwrite:  # written by the process we waited for
                raise FileExistsError(f"{self.out}: already exists; pass --overwrite (overwrite=True) to replace it")
            self._clean_stale()
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{self._host}-{os.getpid()}-",
                                             dir=self.out.parent))
            umask = os.umask(0)
            os.umask(umask)
            self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        except BaseException:
            self._lock.release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
                    raise self._write_error(exc) from None
                return
            try:
                _fsync_tree(self.tmp)
                if self.out.exists() or self.out.is_symlink():
                    if _exchange(self.tmp, self.out):  # OUT is the new directory; tmp holds the old one
                        _remove(self.tmp)
                    else:
                        old = self.tmp.with_name(self.tmp.name.replace(".partial-", ".old-", 1))
                        os.rename(self.out, old)
                        os.rename(self.tmp, self.out)
                        _remove(old)
                else:
                    os.rename(self.tmp, self.out)
                _fsync_tree_dir(self.out.parent)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise self._write_error(e) from None
        finally:
            self._lock.release()

    def _write_error(self, e: OSError) -> OSError:
        where = e.filename if e.filename else ""
        try:
            where = Path(where).relative_to(self.tmp).as_posix() if where else ""
        except ValueError:
            pass
        what = f" writing {where}" if where else ""
        return WriteError(e.errno, f"{self.out}: failed{what} ({e.strerror or e}); nothing was written: "
                       f"{self.out} is {'as it was' if self.out.exists() else 'absent'}", str(self.out))


class WriteError(OSError):
    """Writing a checkpoint failed (a full disk, a quota, a file size limit); the message names where."""

    def __str__(self) -> str:
        return str(self.strerror)


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def _fsync_tree_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
