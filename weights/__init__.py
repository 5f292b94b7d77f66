"""The native checkpoint format: a directory with config.json, safetensors shards, an index with sha256s."""

from zoo.weights.format import (
    CONFIG_FILE,
    INDEX_FILE,
    SCHEMA_VERSION,
    CheckpointError,
    NativeConfig,
    read_config,
    write_config,
)
from zoo.weights.reader import Checkpoint
from zoo.weights.writer import TensorSpec, write_tensors

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SCHEMA_VERSION",
    "Checkpoint",
    "CheckpointError",
    "NativeConfig",
    "TensorSpec",
    "read_config",
    "write_config",
    "write_tensors",
]
