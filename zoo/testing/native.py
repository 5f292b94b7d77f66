"""Native checkpoints of random weights at any size, for the tests and the benchmarks (no conversion needed)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_native(directory: Path, family: str, config: dict, seed: int = 0) -> int:
    """A native checkpoint of random weights (std 0.02, norms 1), written tensor by tensor; returns its bytes."""
    from zoo.family import get_family
    from zoo.weights.format import NativeConfig, write_config
    from zoo.weights.writer import TensorSpec, write_tensors

    fam = get_family(family)
    module = fam.build_meta(fam.config_from_dict(config))
    specs = [TensorSpec(k, tuple(v.shape), torch.float32) for k, v in module.state_dict().items()]
    gen = torch.Generator().manual_seed(seed)

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name.endswith("norm.weight"):
            return torch.ones(spec.shape)
        return torch.randn(spec.shape, generator=gen) * 0.02

    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory, specs, produce, progress=False)
    write_config(directory, NativeConfig(family=family, config=config, name=directory.name, task=fam.task))
    return sum(s.nbytes for s in specs)
