"""Streaming safetensors writer.

The header of a safetensors file needs every tensor's shape and dtype before any byte is written, so
the writer takes a list of specs up front and then asks for one tensor at a time: peak memory is the
largest tensor, not the model. Files are cut into shards at a size limit and hashed while written.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from zoo.weights.format import DTYPE_CODES, INDEX_FILE, SCHEMA_VERSION, CheckpointError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shard(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does


def _as_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class _Output:
    """A file being written whose write errors name it: a full disk, a quota or a file size limit otherwise
    surfaces as a bare "No space left on device"."""

    def __init__(self, f, path: Path, need: int):
        self.f, self.path, self.need = f, path, need

    def _failed(self, e: OSError) -> OSError:
        return OSError(e.errno, f"{e.strerror or e} (a file of {self.need} bytes)", str(self.path))

    def write(self, data) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise self._failed(e) from None

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            raise self._failed(e) from None


def _write_shards(directory: Path, shards: list[list[TensorSpec]], produce: Callable[[TensorSpec], torch.Tensor],
                  meta: dict[str, str], bar, weight_map: dict[str, str], sha256: dict[str, str]) -> None:
    n = len(shards)
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        hasher = hashlib.sha256()
        header = _header(shard, meta)
        path = directory / fname
        need = sum(s.nbytes for s in shard) + len(header) + 8
        with open(path, "wb") as f:
            out = _Output(f, path, need)
            for chunk in (struct.pack("<Q", len(header)), header):
                out.write(chunk)
                hasher.update(chunk)
            for spec in shard:
                t = produce(spec)
                if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                    raise CheckpointError(
                        f"tensor {spec.name}: produced {tuple(t.shape)} {t.dtype}, planned {spec.shape} {spec.dtype}"
                    )
                data = _as_bytes(t.cpu())
                out.write(data)
                hasher.update(data)
                bar.update(spec.nbytes)
                weight_map[spec.name] = fname
                del t, data
            out.flush()
        sha256[fname] = hasher.hexdigest()


def write_tensors(
    directory: str | Path,
    specs: Iterable[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> dict:
    """Write tensors as safetensors shards plus the index; `produce(spec)` returns one tensor at a time."""
    directory = Path(directory)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: must be a whole number of bytes > 0")
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise CheckpointError(f"duplicate tensor names in plan: {sorted({n for n in names if names.count(n) > 1})}")
    shards = _shard(specs, max_shard_bytes)
    meta = {"format": "pt", "zoo_schema": str(SCHEMA_VERSION), **(metadata or {})}
    weight_map: dict[str, str] = {}
    sha256: dict[str, str] = {}
    total = sum(s.nbytes for s in specs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress)
    try:
        _write_shards(directory, shards, produce, meta, bar, weight_map, sha256)
    finally:
        bar.close()
    index = {
        "metadata": {"total_size": total, "zoo_schema": SCHEMA_VERSION, "sha256": sha256},
        "weight_map": weight_map,
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_state_dict(directory: str | Path, state: dict[str, torch.Tensor], **kw) -> dict:
    """Convenience for tensors already in memory (tests, tiny models)."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    return write_tensors(directory, specs, lambda s: state[s.name], **kw)
