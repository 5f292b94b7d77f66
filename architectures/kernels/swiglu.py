"""The gated activation of SwiGLU feed-forwards (Shazeer 2020, arXiv 2002.05202): silu(gate) * up, with
silu(g) = g * sigmoid(g). The two projections and the down projection around it are ordinary matmuls; this
elementwise step is where the unfused version writes and re-reads two hidden-size temporaries.

`silu_mul_reference` is the plain PyTorch definition (Inductor fuses it on CPU under torch.compile);
`silu_mul` runs what the dispatch (dispatch.py) picks: the Triton kernel (swiglu_triton.py) for CUDA tensors at
inference, zoo's C++ op (zoo_cpu::silu_mul, csrc/decode_ops.cpp) for CPU tensors at eager inference, the
reference otherwise. The C++ op rounds where the reference does and even computes exp as torch's silu kernel
does (vectorised, the tail one by one, over the same flat range), so it equals it bit for bit; it takes only what
torch runs as one range: contiguous tensors up to ONE_RANGE elements (decoding; a prompt's are larger). The gated
MLP (architectures/layers.py: GatedMLP) calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from zoo.architectures.kernels.dispatch import DECODE_DTYPES, cpu_decode_ops, use_triton

ONE_RANGE = 32768  # torch's GRAIN_SIZE: above it its elementwise loops split between threads (other vector tails)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the fused Triton kernel for CUDA tensors at inference, zoo's C++ op on CPU at eager
    inference, else the reference."""
    lib = cpu_decode_ops(gate, up)  # (None off CPU: the Triton kernel is for CUDA tensors)
    if (lib is not None and gate.dtype in DECODE_DTYPES and up.dtype == gate.dtype and gate.shape == up.shape
            and gate.numel() <= ONE_RANGE and gate.is_contiguous() and up.is_contiguous()):
        return lib.silu_mul(gate, up)
    if use_triton(gate, up):
        from zoo.architectures.kernels.swiglu_triton import silu_mul_triton

        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)
