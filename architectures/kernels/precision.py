"""The working precision of the recurrent and BitLinear kernels' references."""

from __future__ import annotations

import torch


def widen(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or wider if it already is (fp64 runs everything in fp64: the tests' exact comparison)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
