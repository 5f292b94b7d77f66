"""RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), as the Llama-style decoders use it:

    y = w * cast(x / sqrt(mean_k x_k^2 + eps))          statistics in fp32, cast back to x's dtype,
                                                        then the weight multiplies in the promoted dtype

`rms_norm_reference` is the plain PyTorch definition (on CPU under torch.compile, Inductor fuses it into one
pass). `rms_norm` runs what the dispatch (dispatch.py) picks: the Triton kernel (rmsnorm_triton.py: one read of x
and w, one write of y) for CUDA tensors at inference, the reference otherwise. No triton import here, so
`import zoo` stays fast. The decoders' RMSNorm (architectures/layers.py) is this function.
"""

from __future__ import annotations

import torch
from zoo.architectures.kernels.dispatch import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x; output dtype = promote(x.dtype, weight.dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: the fused Triton kernel for CUDA tensors at inference, else the reference."""
    if use_triton(x, weight):
        from zoo.architectures.kernels.rmsnorm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
