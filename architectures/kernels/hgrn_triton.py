"""The HGRN recurrence h_t = f_t * h_{t-1} + i_t in Triton (the reference and its parallel scan: hgrn.py).

Each program owns BLOCK_D channels of one sequence and walks time with h in fp32 registers: every element of
i and f is read once and every output written once, which is all a memory-bound elementwise recurrence
can ask for. The initial state is read from h0 and the final state written back into it, in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hgrn_kernel(In, Forget, Out, H, T, D, stride_b, stride_t, stride_hb, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    h = tl.load(H + b * stride_hb + d, mask=ok, other=0.0).to(tl.float32)
    base = b * stride_b + d
    for t in range(T):
        i = tl.load(In + base + t * stride_t, mask=ok, other=0.0).to(tl.float32)
        f = tl.load(Forget + base + t * stride_t, mask=ok, other=0.0).to(tl.float32)
        h = f * h + i
        tl.store(Out + base + t * stride_t, h.to(Out.dtype.element_ty), mask=ok)
    tl.store(H + b * stride_hb + d, h, mask=ok)


def hgrn_triton(i: torch.Tensor, f: torch.Tensor, h0: torch.Tensor, block_d: int = 128) -> torch.Tensor:
    """Outputs [B, T, D] in i's dtype; h0 [B, D] fp32 holds the initial state and receives the final one."""
    if i.shape != f.shape or h0.shape != (i.shape[0], i.shape[2]) or h0.dtype != torch.float32:
        raise ValueError(f"hgrn: i {tuple(i.shape)}, f {tuple(f.shape)} and fp32 h0 [B, D] {tuple(h0.shape)} "
                         f"({h0.dtype}) do not fit")
    i, f = i.contiguous(), f.contiguous()
    if h0.stride(-1) != 1:
        raise ValueError("hgrn: h0 must be contiguous along channels (it is updated in place)")
    B, T, D = i.shape
    out = torch.empty_like(i)
    grid = (triton.cdiv(D, block_d), B)
    _hgrn_kernel[grid](i, f, out, h0, T, D, i.stride(0), i.stride(1), h0.stride(0), BLOCK_D=block_d)
    return out
