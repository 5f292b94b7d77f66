"""Readers for published checkpoint files: tensors by name, metadata first, bytes only when asked.

Safetensors are read tensor by tensor with plain file reads (not a memory map), so a converter's
resident memory is the tensors in flight, not every page it has touched. Pickled files are opened
only with torch.load(weights_only=True, mmap=True) (`load_pickle`): a checkpoint never runs code; the
map only tells where each tensor's bytes are, and `PickleSource` reads them with plain file reads too.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from zoo.weights.format import CODE_DTYPES, CheckpointError
from zoo.weights.reader import read_safetensors_header, safe_child

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


class TensorSource:
    """A name -> tensor view over one or more files. `meta(key)` costs no tensor reads."""

    def __init__(self) -> None:
        self._where: dict[str, tuple[Path, object]] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        return self._where[key][0]

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype."""
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    def __init__(self, files: Iterable[Path]):
        super().__init__()
        for path in files:
            header = read_safetensors_header(path)
            n = struct.unpack("<Q", path.open("rb").read(8))[0]
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if key in self._where:
                    raise CheckpointError(f"{path}: tensor {key} also appears in {self._where[key][0]}")
                self._where[key] = (path, (info, 8 + n))

    def meta(self, key: str) -> torch.Tensor:
        info, _ = self._where[key][1]
        return torch.empty(info["shape"], dtype=CODE_DTYPES[info["dtype"]], device="meta")

    def get(self, key: str) -> torch.Tensor:
        path, (info, base) = self._where[key]
        start, end = info["data_offsets"]
        dtype = CODE_DTYPES[info["dtype"]]
        out = torch.empty(info["shape"], dtype=dtype)
        if math.prod(info["shape"]) * dtype.itemsize != end - start:
            raise CheckpointError(f"{path}: tensor {key} has {end - start} bytes for shape {info['shape']}")
        with open(path, "rb") as f:
            f.seek(base + start)
            if end > start and f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != end - start:
                raise CheckpointError(f"{path}: truncated while reading tensor {key}")
        return out


def load_pickle(path: Path, allow: Sequence[Any] = ()) -> Any:
    """Open a pickled checkpoint without running any code it may carry.

    torch.load(weights_only=True) rebuilds only tensors and plain containers; `allow` names the few extra
    plain-data types a published format needs (numpy scalars, say), and nothing else is let in. Files are
    memory-mapped (the zip format); a legacy-format file is read without the map.
    """
    def load(mmap: bool) -> Any:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return load(mmap=False)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", str(e), re.S)
        if not found and detail and "global" not in detail.group(1).lower():  # junk, not a pickle asking for code
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({' '.join(detail.group(1).split())})"
                                  ) from None
        what = f"it names {found.group(1)}, which is not plain data" if found else str(e).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused: this pickle needs more than plain tensors to load ({what}). "
            "zoo never runs code from a checkpoint; re-save it as tensors only (or as safetensors)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        why = (str(e).splitlines() or [""])[0] or ("the file is empty" if Path(path).stat().st_size == 0
                                                   else type(e).__name__)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({why})") from None


def _file_mapping(path: Path, address: int) -> tuple[int, int, int] | None:
    """(start, end, file offset) of this process's memory mapping of `path` that contains `address`."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or int(parts[4]) != inode:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= address < hi and os.path.samefile(parts[5].strip(), path):
                    return lo, hi, int(parts[2], 16)
    except (OSError, ValueError):
        pass
    return None


class PickleTensors:
    """The tensors of one pickled checkpoint file (torch.load with weights_only=True and mmap=True, through
    load_pickle), read with plain file reads.

    Touching a tensor of a memory-mapped pickle pages it into this process, and those pages stay counted
    against it while the file is mapped. So each tensor's place in the file is found from the mapping, and its
    bytes are read into a buffer the caller owns (falling back to a copy from the mapping where that is not
    possible, e.g. a non-contiguous view or no /proc)."""

    def __init__(self, path: Path, unwrap: tuple[str, ...] = ("module",), allow: tuple = ()):
        self.path = Path(path)
        obj = load_pickle(self.path, allow=allow)
        for k in unwrap:
            if isinstance(obj, dict) and isinstance(obj.get(k), dict):
                obj = obj[k]
                break
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: not a state dict (a {type(obj).__name__})")
        self.tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        first = next((t for t in self.tensors.values() if t.numel()), None)
        self.mapping = _file_mapping(self.path, first.data_ptr()) if first is not None else None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def read_into(self, key: str, out: torch.Tensor, index: tuple = ()) -> None:
        """Copy tensor[index] (a basic slice) into `out` (through a buffer when `out` is a strided view)."""
        t = self.tensors[key][index] if index else self.tensors[key]
        nbytes = t.numel() * t.element_size()
        if self.mapping and t.is_contiguous() and nbytes:
            lo, hi, offset = self.mapping
            address = t.data_ptr()
            if lo <= address and address + nbytes <= hi:
                direct = out.is_contiguous() and out.dtype == t.dtype
                buffer = out if direct else torch.empty(t.shape, dtype=t.dtype)
                with open(self.path, "rb") as f:
                    f.seek(address - lo + offset)
                    if f.readinto(memoryview(buffer.reshape(-1).view(torch.uint8).numpy())) != nbytes:
                        raise CheckpointError(f"{self.path}: truncated while reading tensor {key}")
                if not direct:
                    out.copy_(buffer.reshape(out.shape))
                return
        out.copy_(t.reshape(out.shape))

    def read(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        out = torch.empty(t.shape, dtype=t.dtype)
        self.read_into(key, out)
        return out


class PickleSource(TensorSource):
    """Tensors of pickled state-dict files (transformers' pytorch_model-*.bin, published .pth / .pt files), each
    read with file reads when asked for. `unwrap`: the keys under which published files often nest the weights
    one level down (the first that holds a dict is taken)."""

    def __init__(self, files: Iterable[Path], unwrap: tuple[str, ...] = ("model", "state_dict", "module")):
        super().__init__()
        self.readers: dict[str, PickleTensors] = {}
        for path in files:
            reader = PickleTensors(path, unwrap=unwrap)
            for key in reader.keys():
                if key in self._where:
                    raise CheckpointError(f"{path}: tensor {key} also appears in {self._where[key][0]}")
                self._where[key] = (path, None)
                self.readers[key] = reader

    def meta(self, key: str) -> torch.Tensor:
        return self.readers[key].meta(key)

    def get(self, key: str) -> torch.Tensor:
        return self.readers[key].read(key)


def open_source(src: Path) -> TensorSource:
    """Tensors of a published checkpoint directory or file (safetensors preferred over pickles)."""
    src = Path(src)
    if src.is_file():
        return SafetensorsSource([src]) if src.suffix == ".safetensors" else PickleSource([src])
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = src / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: malformed index ({e})") from None
            files = sorted({safe_child(src, f) for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: missing shard listed in {index_path.name}")
            source = SafetensorsSource(files) if index_name.startswith("model.") else PickleSource(files)
            missing = set(weight_map) - set(source.keys())
            if missing:
                raise CheckpointError(f"{index_path}: tensor {sorted(missing)[0]} is listed but in no shard")
            return source
    st = sorted(src.glob("*.safetensors"))
    if st:
        return SafetensorsSource(st)
    pk = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pk:
        return PickleSource(pk)
    raise CheckpointError(f"{src}: no weight files (*.safetensors, *.bin, *.pth, *.pt, *.ckpt) found")
