"""The HGRN recurrence (Qin et al. 2023, "Hierarchically Gated Recurrent Neural Network"), as the MatMul-free LM
uses it: an elementwise (diagonal) linear recurrence over time, accumulated in fp32,

    h_t = f_t * h_{t-1} + i_t          f, i, h: [batch, time, channels];  h_0 given (zeros for a fresh prompt)

Three forms that compute the same thing:
  - `hgrn_recurrent`: the loop over time, the obviously-correct reference (and the decode step, T = 1);
  - `hgrn_scan`: a parallel prefix scan for prompts. (f, i) pairs compose associatively,
    (f1, i1) then (f2, i2) = (f1 f2, f2 i1 + i2), so log2(T) doubling steps of whole-tensor products give every
    h_t at once (Hillis & Steele); no division or log, so it is as stable as the loop (all f in [0, 1]);
  - the Triton kernel in hgrn_triton.py (CUDA): one program per channel block walks time with h in registers.
`hgrn` dispatches and writes the final state back into `h0` in place. No triton import here.
"""

from __future__ import annotations

import torch
from zoo.architectures.kernels.dispatch import use_triton
from zoo.architectures.kernels.precision import widen


def hgrn_recurrent(i: torch.Tensor, f: torch.Tensor,
                   h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [B, T, D] in i's dtype, final state [B, D] in fp32 or wider) by the loop over time."""
    B, T, D = i.shape
    dtype = i.dtype
    i, f = widen(i), widen(f)
    h = torch.zeros(B, D, dtype=i.dtype, device=i.device) if h0 is None else h0.to(i.dtype)
    out = torch.empty(B, T, D, dtype=i.dtype, device=i.device)
    for t in range(T):
        h = f[:, t] * h + i[:, t]
        out[:, t] = h
    return out.to(dtype), h


def hgrn_scan(i: torch.Tensor, f: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as hgrn_recurrent, by a parallel prefix scan over time (log2(T) vectorised steps)."""
    a, b = widen(f), widen(i)
    if h0 is not None:  # the initial state enters as the input before the first step
        b = torch.cat([h0.to(b.dtype)[:, None], b], dim=1)
        a = torch.cat([torch.ones_like(a[:, :1]), a], dim=1)
    T = b.shape[1]
    shift = 1
    while shift < T:
        # (a, b)[t] <- (a, b)[t - shift] then (a, b)[t]: b_t += a_t * b_{t-shift}, a_t *= a_{t-shift}
        b = torch.cat([b[:, :shift], torch.addcmul(b[:, shift:], a[:, shift:], b[:, :-shift])], dim=1)
        a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
        shift *= 2
    if h0 is not None:
        b = b[:, 1:]
    return b.to(i.dtype), b[:, -1]


def hgrn(i: torch.Tensor, f: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Outputs [B, T, D] (i's dtype) of the recurrence started from h0 [B, D] fp32, which is overwritten in
    place with the final state. Triton where the dispatch picks it (CUDA at inference); elsewhere one step
    (decoding) or the parallel scan (prompts)."""
    if use_triton(i, f):
        from zoo.architectures.kernels.hgrn_triton import hgrn_triton

        return hgrn_triton(i, f, h0)
    out, last = hgrn_recurrent(i, f, h0) if i.shape[1] == 1 else hgrn_scan(i, f, h0)
    h0.copy_(last)
    return out
