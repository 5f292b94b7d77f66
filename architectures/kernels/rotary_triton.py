"""Fused rotary embedding in Triton (the definition and the reference are in rotary.py).

One program handles one (batch, head, position) row of x: it loads the two halves of the rotated part and
the row's cos / sin, rotates in fp32, writes the result in x's dtype and copies the pass-through dimensions.
x may be a strided view (the usual [B, T, heads, hd] projection transposed to [B, heads, T, hd]): its
strides are passed in, so no copy is made before the kernel; the output is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    X, COS, SIN, Y,
    H, T, HALF, REST,
    sxb, sxh, sxt, scb, sct, ssb, sst,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    row = tl.program_id(0)  # over B * H * T, in that order
    t = row % T
    h = (row // T) % H
    b = row // (T * H)
    x_row = X + b * sxb + h * sxh + t * sxt
    y_row = Y + row * (2 * HALF + REST)
    j = tl.arange(0, BLOCK_HALF)
    ok = j < HALF
    x1 = tl.load(x_row + j, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + j, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(COS + b * scb + t * sct + j, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + b * scb + t * sct + HALF + j, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + b * ssb + t * sst + j, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + b * ssb + t * sst + HALF + j, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_row + j, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=ok)
    tl.store(y_row + HALF + j, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=ok)
    if BLOCK_REST > 0:  # partial rotary: the dimensions after the rotated ones are copied
        r = tl.arange(0, BLOCK_REST)
        r_ok = r < REST
        tl.store(y_row + 2 * HALF + r, tl.load(x_row + 2 * HALF + r, mask=r_ok, other=0.0), mask=r_ok)


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim] (any strides with a unit last stride); cos, sin: [B, T, d], d even."""
    B, H, T, hd = x.shape
    d = cos.shape[-1]
    if d % 2 or d > hd or cos.shape != (B, T, d) or sin.shape != cos.shape:
        raise ValueError(f"rotary: x {tuple(x.shape)} needs cos/sin of shape [B, T, d] with d even and <= head_dim; "
                         f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    y = torch.empty((B, H, T, hd), dtype=x.dtype, device=x.device)
    if y.numel():
        rest = hd - d
        _rotary_kernel[(B * H * T,)](
            x, cos, sin, y, H, T, d // 2, rest,
            x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            BLOCK_HALF=triton.next_power_of_2(max(d // 2, 1)), BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        )
    return y
