"""Tensor parallelism (DTensor) and layer placement; see issue 6. Until then, only the rank helpers."""

from __future__ import annotations

import torch.distributed as dist


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
