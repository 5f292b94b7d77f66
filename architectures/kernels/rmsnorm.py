"""RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), as the Llama-style decoders use it:

    y = w * cast(x / sqrt(mean_k x_k^2 + eps))          statistics in fp32, cast back to x's dtype,
                                                        then the weight multiplies in the promoted dtype

`rms_norm_reference` is the plain PyTorch definition (on CPU under torch.compile, Inductor fuses it into one
pass). `rms_norm` runs what the dispatch (dispatch.py) picks: the Triton kernel (rmsnorm_triton.py: one read of x
and w, one write of y) for CUDA tensors at inference, zoo's C++ op (zoo_cpu::rms_norm, csrc/decode_ops.cpp: one
call instead of ~8 aten ops) for CPU tensors at eager inference, the reference otherwise. The C++ op sums the
squares in the order of torch's own sum over a contiguous row, so it equals the reference bit for bit; it takes
only what keeps that order (contiguous x, rows up to SUM_ONE_RANGE long: a longer single row torch splits
between threads). No triton import here, so
`import zoo` stays fast. The decoders' RMSNorm (architectures/layers.py) is this function.
"""

from __future__ import annotations

import torch
from zoo.architectures.kernels.dispatch import DECODE_DTYPES, cpu_decode_ops, use_triton

SUM_ONE_RANGE = 32768  # torch's GRAIN_SIZE: up to it a row's sum runs in one thread, in the order the C++ op copies


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x; output dtype = promote(x.dtype, weight.dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _cpu_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ op sums x's rows in torch's order (module docstring) for this weight."""
    return (x.dtype in DECODE_DTYPES and weight.dtype in DECODE_DTYPES and weight.dim() == 1 and x.dim() > 0
            and x.shape[-1] == weight.shape[0] and x.shape[-1] <= SUM_ONE_RANGE and x.is_contiguous())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: the fused Triton kernel for CUDA tensors at inference, zoo's C++ op on CPU at eager inference, else
    the reference."""
    lib = cpu_decode_ops(x, weight)  # (None off CPU: the Triton kernel is for CUDA tensors)
    if lib is not None and _cpu_fits(x, weight):
        return lib.rms_norm(x, weight, eps)
    if use_triton(x, weight):
        from zoo.architectures.kernels.rmsnorm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) for h = x + residual, the pre-norm decoder's residual add and the norm after it: one C++ call
    (zoo_cpu::add_rms_norm, the add rounded as torch's) on CPU at eager inference, else the two steps."""
    lib = cpu_decode_ops(x, residual, weight)
    if (lib is not None and residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
            and _cpu_fits(x, weight)):
        return lib.add_rms_norm(x, residual, weight, eps)
    h = x + residual
    return h, rms_norm(h, weight, eps)
