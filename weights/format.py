"""Schema of the native directory.

    OUT/
      config.json                    {"zoo_schema": 1, "family": ..., "config": {...}, ...}
      model.safetensors              or model-00001-of-0000N.safetensors ...
      model.safetensors.index.json   weight_map + sha256 of every weight file
      tokenizer.json ...             (language models) tokenizer files as published
      README.md                      the model card
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
CARD_FILE = "README.md"

# safetensors dtype codes <-> torch dtypes
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, damaged or does not fit the model; the message names what."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None, or a floating dtype by name ("bfloat16", "bf16", ...) or as a torch.dtype; anything else is refused."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype}: weights are stored and computed in a floating dtype; "
                             f"use one of {sorted(DTYPE_NAMES)}")
        return dtype
    if not isinstance(dtype, str) or dtype.strip().lower().removeprefix("torch.") not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r}: unknown dtype; use one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype.strip().lower().removeprefix("torch.")]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class NativeConfig:
    family: str
    config: dict[str, Any]
    name: str = ""
    task: str = ""
    dtype: str = "float32"
    source: dict[str, Any] = field(default_factory=dict)  # repo, revision, layout, license
    extra: dict[str, Any] = field(default_factory=dict)  # preprocessing, labels, generation defaults
    # packed weights (zoo.architectures.quant): {"scheme": "int8-row", "modules": ["layers.0.attn.q_proj", ...]}
    quantization: dict[str, Any] = field(default_factory=dict)
    zoo_schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def read_config(directory: str | Path) -> NativeConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a zoo checkpoint directory needs {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object (a zoo config), got a {type(data).__name__}")
    if "zoo_schema" not in data or "family" not in data:
        raise CheckpointError(
            f"{path}: not a zoo config (no 'zoo_schema'/'family'); to use a published checkpoint, "
            f"run `zoo convert {path.parent} OUT` first"
        )
    kinds = {"zoo_schema": int, "family": str, "config": dict, "name": str, "task": str, "dtype": str, "source": dict,
             "extra": dict, "quantization": dict}
    for key, kind in kinds.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise CheckpointError(f"{path}: {key!r} must be a {kind.__name__}, got {data[key]!r:.60}")
    if data["zoo_schema"] > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema version {data['zoo_schema']} is newer than this zoo ({SCHEMA_VERSION}); upgrade zoo"
        )
    known = {k: data[k] for k in NativeConfig.__dataclass_fields__ if k in data}
    q = known.get("quantization")
    if q and not (isinstance(q.get("scheme"), str) and isinstance(q.get("modules"), list)
                  and all(isinstance(m, str) for m in q["modules"])):
        raise CheckpointError(f"{path}: 'quantization' must be {{'scheme': name, 'modules': [module paths]}}")
    return NativeConfig(**known)


def write_config(directory: str | Path, config: NativeConfig) -> None:
    (Path(directory) / CONFIG_FILE).write_text(config.to_json())
