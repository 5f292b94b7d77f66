"""Fused RMSNorm in Triton (the definition and the reference are in rmsnorm.py).

One program normalises one row: it reads the row once into registers (the width is a power-of-two block
covering the whole row, 8192 columns at most for the published decoders), takes the mean square in fp32,
rounds the normalised row to x's dtype exactly as the reference does, multiplies by the weight and writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, Y, D, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    h = (h * rstd).to(X.dtype.element_ty).to(tl.float32)  # the reference's cast back to x's dtype
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * h).to(Y.dtype.element_ty), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape); output dtype = promote(x, weight)."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}; the input's last dimension is {D}")
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), y, D, rows.stride(0), y.stride(0), eps,
                                           BLOCK=triton.next_power_of_2(D))
    return y.view(*x.shape[:-1], D)
