"""Reading the native format: integrity checks, then memory-mapped tensors (or slices of them)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from zoo.weights.format import CODE_DTYPES, INDEX_FILE, CheckpointError
from zoo.weights.locks import ProcessLock

_digests: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    """sha256 of a file, remembered for this process while its size and mtime stay the same
    (a pull verifies, then the load would hash the same gigabytes again)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte it promises."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    for key, info in header.items():
        if key != "__metadata__":
            _check_entry(path, key, info)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated: header promises {8 + n + end} bytes, file has {size}")
    return header


def _check_entry(path: Path, key: str, info: object) -> None:
    """One tensor's header entry: a known dtype, a shape of sizes >= 0, and offsets that hold exactly its bytes."""
    ok = isinstance(info, dict) and info.get("dtype") in CODE_DTYPES and isinstance(info.get("shape"), list) \
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]) \
        and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
        and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
    if not ok:
        raise CheckpointError(f"{path}: tensor {key}: malformed header entry {json.dumps(info)[:120]}")
    start, end = info["data_offsets"]
    size = math.prod(info["shape"]) * CODE_DTYPES[info["dtype"]].itemsize
    if not 0 <= start <= end or end - start != size:
        raise CheckpointError(f"{path}: tensor {key}: offsets {start}..{end} do not hold its {size} bytes "
                              f"({info['dtype']} {info['shape']})")


def safe_child(directory: Path, name: str) -> Path:
    """A file named by an index must stay inside the checkpoint directory."""
    if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise CheckpointError(f"{directory / INDEX_FILE}: file name {name!r} escapes the model directory")
    return directory / name


class VerifiedFiles:
    """Files already checked against their sha256, remembered by (size, mtime) in a small JSON file.

    Hashing a 15 GB model on every load costs more than loading it; like git's index, a file whose size
    and modification time have not changed since it matched its hash is taken as still matching.
    Anything that rewrites a file (a truncation, a flipped byte, a new download) changes its mtime.

    Several processes may load (and record) at once: a record is added under a lock (PATH.lock), merged
    into what is on disk at that moment, and written to a temporary file that replaces PATH in one rename,
    so the file is always whole, valid JSON, and no process loses another's records. A damaged record
    file is treated as empty (files are hashed again) and rewritten.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, list] = self._read()

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 3}

    @staticmethod
    def _stamp(file: Path, sha256: str) -> list:
        st = os.stat(file)
        return [st.st_size, st.st_mtime_ns, sha256]

    def known(self, file: Path, sha256: str) -> bool:
        return self.records.get(str(file.resolve())) == self._stamp(file, sha256)

    def add(self, file: Path, sha256: str) -> None:
        key, stamp = str(file.resolve()), self._stamp(file, sha256)
        self.records[key] = stamp
        try:  # best effort: a read-only cache only means hashing again next time
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with ProcessLock(self.path.with_name(self.path.name + ".lock")):
                records = {**self._read(), key: stamp}  # what other processes recorded meanwhile, plus ours
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                try:
                    tmp.write_text(json.dumps(records))  # (no fsync: a record lost in a crash costs a re-hash)
                    os.replace(tmp, self.path)
                finally:
                    tmp.unlink(missing_ok=True)
                self.records = records
        except OSError:
            pass


class Checkpoint:
    """The tensors of a native directory, memory-mapped; nothing is read until asked for."""

    def __init__(self, directory: str | Path, verify: bool = True, verified: VerifiedFiles | None = None):
        self.directory = Path(directory)
        self.verified = verified
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise CheckpointError(f"{index_path}: not found; the directory is not a complete zoo checkpoint")
        try:
            index = json.loads(index_path.read_text())
            self.weight_map: dict[str, str] = index["weight_map"]
            self.sha256: dict[str, str] = index["metadata"]["sha256"]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_path}: malformed index ({e})") from None
        except (KeyError, TypeError):
            raise CheckpointError(f"{index_path}: malformed index: it needs 'weight_map' {{tensor: file}} and "
                                  "'metadata': {'sha256': {file: hex digest}}") from None
        for what, table in (("weight_map", self.weight_map), ("metadata.sha256", self.sha256)):
            if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in table.items()):
                raise CheckpointError(f"{index_path}: malformed index: {what} must map names to file names/digests")
        self.headers: dict[str, dict] = {}
        for fname in sorted(set(self.weight_map.values()) | set(self.sha256)):
            path = safe_child(self.directory, fname)
            if not path.is_file():
                what = "is not a file" if path.exists() else "missing shard"
                raise CheckpointError(f"{path}: {what} listed in {INDEX_FILE}")
            self.headers[fname] = read_safetensors_header(path)
            if verify:
                self.verify_file(fname)
        for key, fname in self.weight_map.items():
            if key not in self.headers[fname]:
                raise CheckpointError(f"{self.directory / fname}: tensor {key} listed in the index is not in the file")
        self._handles: dict[str, object] = {}

    def verify_file(self, fname: str) -> None:
        expected = self.sha256.get(fname)
        if expected is None:
            raise CheckpointError(f"{self.directory / INDEX_FILE}: no sha256 recorded for {fname}")
        path = self.directory / fname
        if self.verified is not None and self.verified.known(path, expected):
            return
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(
                f"{self.directory / fname}: sha256 mismatch (index says {expected[:12]}…, file is {actual[:12]}…)"
            )
        if self.verified is not None:
            self.verified.add(path, expected)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _meta(self, key: str) -> dict:
        return self.headers[self.weight_map[key]][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return CODE_DTYPES[self._meta(key)["dtype"]]

    def _handle(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.directory / fname), framework="pt", device="cpu")
        return self._handles[fname]

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, memory-mapped from its file."""
        if key not in self.weight_map:
            raise CheckpointError(f"{self.directory}: no tensor named {key}")
        return self._handle(self.weight_map[key]).get_tensor(key)

    def close(self) -> None:
        """Drop the file handles; a mapping lives on only while tensors still view it."""
        self._handles.clear()

    def get_slice(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows/columns [start, stop) along `dim`, reading only those bytes (tensor parallelism).

        The result views the memory map: copy it to keep the slice after close()."""
        sl = self._handle(self.weight_map[key]).get_slice(key)
        index = tuple(slice(None) for _ in range(dim)) + (slice(start, stop),)
        return sl[index]
