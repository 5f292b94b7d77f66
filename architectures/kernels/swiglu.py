"""The gated activation of SwiGLU feed-forwards (Shazeer 2020, arXiv 2002.05202): silu(gate) * up, with
silu(g) = g * sigmoid(g). The two projections and the down projection around it are ordinary matmuls; this
elementwise step is where the unfused version writes and re-reads two hidden-size temporaries.

`silu_mul_reference` is the plain PyTorch definition (Inductor fuses it on CPU under torch.compile);
`silu_mul` runs what the dispatch (dispatch.py) picks: the Triton kernel (swiglu_triton.py) for CUDA tensors at
inference, the reference otherwise. The gated MLP (architectures/layers.py: GatedMLP) calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from zoo.architectures.kernels.dispatch import use_triton


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the fused Triton kernel for CUDA tensors at inference, else the reference."""
    if use_triton(gate, up):
        from zoo.architectures.kernels.swiglu_triton import silu_mul_triton

        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)
