"""The mLSTM cell (Beck et al., "xLSTM", arXiv 2405.04517; xLSTM 7B, arXiv 2503.13427): plain-PyTorch references
of its two forms and the dispatch between them and the Triton kernel.

Per head, with an exponential input gate i~ (given in log space) and a sigmoid forget gate (given as
log_f = logsigmoid(f~)), the cell keeps a matrix memory C [dqk, dv], a normaliser n [dqk] and a stabiliser m:

    m_t = max(log_f_t + m_{t-1}, i~_t)                        (m_0 = 0)
    C_t = exp(log_f_t + m_{t-1} - m_t) C_{t-1} + exp(i~_t - m_t) k_t v_t^T
    n_t = exp(log_f_t + m_{t-1} - m_t) n_{t-1} + exp(i~_t - m_t) k_t
    h_t = (q_t^T C_t / sqrt(dqk)) / (max(|q_t . n_t| / sqrt(dqk), exp(-m_t)) + eps)

`mlstm_step` is that recurrence for one token (decoding). `mlstm_chunkwise` computes the same outputs for a
whole prompt: the memory is carried from chunk to chunk (L tokens at a time) and inside a chunk the outputs
come from a masked, gate-weighted q k^T matrix, as in attention. Both read and update a state (C, n, m) in
place; they compute in the state's dtype: float32 (whatever the activations' dtype), or float64 in tests.

A token whose input gate is -inf and whose log forget gate is 0 leaves the state exactly as it was: that is
how ragged chunk tails and left-pad tokens are neutralised.

No triton import here (importing zoo stays fast); the kernel lives in mlstm_triton.py and runs where the dispatch
(dispatch.py) picks Triton: CUDA tensors at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from zoo.architectures.kernels.dispatch import use_triton

CellState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C [B, NH, dqk, dv], n [B, NH, dqk], m [B, NH]


def new_cell_state(batch: int, heads: int, dqk: int, dv: int, device: torch.device | str | None = None) -> CellState:
    """An empty memory: C = 0, n = 0 and the stabiliser m = 0 (the published models start from zeros, not -inf)."""
    f32 = dict(device=device, dtype=torch.float32)
    return (torch.zeros(batch, heads, dqk, dv, **f32), torch.zeros(batch, heads, dqk, **f32),
            torch.zeros(batch, heads, **f32))


def mlstm_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, log_f: torch.Tensor,
               state: CellState, eps: float = 1e-6) -> torch.Tensor:
    """One token: q, k [B, NH, dqk], v [B, NH, dv], i, log_f [B, NH]. Updates `state` in place; returns
    h [B, NH, dv]."""
    c, n, m = state
    dtype = q.dtype
    q, k, v, i, log_f = (x.to(c.dtype) for x in (q, k, v, i, log_f))
    m_new = torch.maximum(log_f + m, i)
    forget = torch.exp(log_f + m - m_new)  # the forget gate, stabilised
    inp = torch.exp(i - m_new)  # the exponential input gate, stabilised
    # Elementwise forms, not batched matmuls: one row per head is a few hundred flops, and a batched matmul would
    # start the thread pool for each (milliseconds on a busy machine); these only go parallel when large.
    c.mul_(forget[..., None, None]).addcmul_((inp[..., None] * k)[..., :, None], v[..., None, :])
    n.mul_(forget[..., None]).add_(inp[..., None] * k)
    m.copy_(m_new)
    q = q * q.shape[-1] ** -0.5
    numerator = (q[..., :, None] * c).sum(-2)
    denominator = torch.maximum((q * n).sum(-1).abs(), torch.exp(-m_new)) + eps
    return (numerator / denominator[..., None]).to(dtype)


def mlstm_chunkwise_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor,
                              log_f: torch.Tensor, state: CellState, chunk_size: int = 64,
                              eps: float = 1e-6) -> torch.Tensor:
    """The chunkwise-parallel form in plain PyTorch (float32): q, k [B, NH, S, dqk], v [B, NH, S, dv],
    i, log_f [B, NH, S]; any S >= 1. Updates `state` in place to the state after the last token; returns h
    [B, NH, S, dv] in the state's dtype."""
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    L = chunk_size
    NC = math.ceil(S / L)
    pad = NC * L - S
    # The ragged tail is filled with tokens that change nothing: k = v = 0, input gate exp(-inf) = 0,
    # forget gate exp(0) = 1.
    c, n, m = state
    q, k, v = (F.pad(x.to(c.dtype), (0, 0, 0, pad)).view(B, NH, NC, L, -1) for x in (q, k, v))
    i = F.pad(i.to(c.dtype), (0, pad), value=float("-inf")).view(B, NH, NC, L)
    log_f = F.pad(log_f.to(c.dtype), (0, pad), value=0.0).view(B, NH, NC, L)

    b = log_f.cumsum(-1)  # b_t: log of the forget gates' product from the chunk's start up to t
    g = b[..., -1]  # the whole chunk's forget product (log)
    a = g[..., None] - b + i  # log weight of token j's k_j v_j^T in the end-of-chunk memory

    # Between chunks: the memory at the start of every chunk, one chunk after the other.
    c_k, n_k, m_k = c.clone(), n.clone(), m.clone()  # the state itself is overwritten at the end
    starts_c, starts_n, starts_m = [], [], []
    for chunk in range(NC):
        starts_c.append(c_k)
        starts_n.append(n_k)
        starts_m.append(m_k)
        m_next = torch.maximum(g[:, :, chunk] + m_k, a[:, :, chunk].max(-1).values)
        decay = torch.exp(g[:, :, chunk] + m_k - m_next)
        weighted_k = k[:, :, chunk] * torch.exp(a[:, :, chunk] - m_next[..., None])[..., None]  # [B, NH, L, dqk]
        c_k = decay[..., None, None] * c_k + weighted_k.transpose(-1, -2) @ v[:, :, chunk]
        n_k = decay[..., None] * n_k + weighted_k.sum(-2)
        m_k = m_next
    c.copy_(c_k)
    n.copy_(n_k)
    m.copy_(m_k)
    c_start = torch.stack(starts_c, 2)  # [B, NH, NC, dqk, dv]
    n_start = torch.stack(starts_n, 2)  # [B, NH, NC, dqk]
    m_start = torch.stack(starts_m, 2)  # [B, NH, NC]

    # Inside each chunk (all chunks at once): the memory carried in, plus the chunk's own tokens j <= t.
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_d = (b[..., :, None] - b[..., None, :] + i[..., None, :]).masked_fill(~causal, float("-inf"))
    m_inter = b + m_start[..., None]  # the carried-in memory's log weight at t
    m_comb = torch.maximum(m_inter, log_d.max(-1).values)  # = the step form's m_t
    d = torch.exp(log_d - m_comb[..., None])
    q = q * dqk**-0.5
    scores = (q @ k.transpose(-1, -2)) * d  # [B, NH, NC, L, L]
    carried = torch.exp(m_inter - m_comb)
    numerator = carried[..., None] * (q @ c_start) + scores @ v
    denominator = carried * (q @ n_start[..., None]).squeeze(-1) + scores.sum(-1)
    h = numerator / (torch.maximum(denominator.abs(), torch.exp(-m_comb)) + eps)[..., None]
    return h.reshape(B, NH, NC * L, dv)[:, :, :S]


def mlstm_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, log_f: torch.Tensor,
                    state: CellState, chunk_size: int = 64, eps: float = 1e-6) -> torch.Tensor:
    """A prompt through the mLSTM cell, updating `state` in place: the fused Triton kernel where the dispatch
    picks it (CUDA tensors at inference), the plain PyTorch reference elsewhere. Returns h [B, NH, S, dv] in q's
    dtype."""
    if use_triton(q, k, v):
        from zoo.architectures.kernels.mlstm_triton import mlstm_chunkwise_triton

        return mlstm_chunkwise_triton(q, k, v, i, log_f, state, chunk_size, eps)
    return mlstm_chunkwise_reference(q, k, v, i, log_f, state, chunk_size, eps).to(q.dtype)
