"""Fused Triton kernel for the chunkwise mLSTM (the plain-PyTorch reference and the math: mlstm.py).

Two launches, each fused over the whole chunk:

1. `_chunk_states`: one program per (batch x head, dqk tile, dv tile) walks the chunks in order and carries its
   tile of the memory C (and of n, and the stabiliser m) from chunk to chunk in registers, writing the memory
   each chunk starts from. Tiles are independent: C's update is elementwise decay plus (weighted K)^T V.
2. `_chunk_outputs`: one program per (chunk, dv tile, batch x head) computes that chunk's outputs from the
   memory it starts with and its own tokens (masked, gate-weighted Q K^T), all in registers.

The last chunk may be ragged: positions past the end load k = v = 0, an input gate of -inf and a log forget
gate of 0, which change nothing. The final state is copied into the state tensors (in place) after the launches:
programs of one head all read the initial state, so none may overwrite it.
Everything is float32 inside: q, k, v are widened on load, gates, stabilisers, C and n are float32, and every
matrix product accumulates in float32. For float32 inputs the products are exact IEEE float32 (not TF32), so a
float32 model matches the reference to float32 rounding. For bfloat16/float16 inputs they run on TF32 tensor
cores, which hold 16-bit values exactly (TF32 keeps 10 mantissa bits), so only the float32 intermediates (gate
weights times k, the masked scores) are rounded, to 10 bits where the published kernels round them to the input
dtype. (Triton's CPU interpreter cannot multiply bfloat16 blocks at all; with float32 operands it runs this
kernel unchanged.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_states(
    k_ptr, v_ptr, i_ptr, f_ptr,  # k [BH, S, DQK], v [BH, S, DV], i / log_f [BH, S]
    c_ptr, n_ptr, m_ptr,  # the initial state (read only: other programs of the same head read it too)
    cs_ptr, ns_ptr, ms_ptr,  # out: the state each chunk starts from and the final one, [BH, NC + 1, DQK, DV], ...
    S, NC,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    pk = tl.program_id(1)
    pv = tl.program_id(2)
    offs_k = pk * BK + tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, L)
    mask_k = offs_k < DQK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    tile_c = bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :]
    c = tl.load(c_ptr + tile_c, mask=mask_kv, other=0.0)
    n = tl.load(n_ptr + bh * DQK + offs_k, mask=mask_k, other=0.0)
    m = tl.load(m_ptr + bh)
    for chunk in range(NC):
        # the memory this chunk starts from (n once per dqk tile, m once per head)
        _store_state(cs_ptr, ns_ptr, ms_ptr, bh * (NC + 1) + chunk, c, n, m, offs_k, offs_v, mask_k, mask_kv, pk, pv,
                     DQK, DV)
        t = chunk * L + offs_t
        mask_t = t < S
        log_f = tl.load(f_ptr + bh * S + t, mask=mask_t, other=0.0).to(tl.float32)
        i = tl.load(i_ptr + bh * S + t, mask=mask_t, other=float("-inf")).to(tl.float32)
        b = tl.cumsum(log_f, axis=0)  # log forget product from the chunk start to t
        g = tl.sum(log_f, axis=0)  # ... over the whole chunk
        a = g - b + i  # log weight of token t in the end-of-chunk memory
        m_next = tl.maximum(g + m, tl.max(a, axis=0))
        decay = tl.exp(g + m - m_next)
        w = tl.exp(a - m_next)
        k = tl.load(k_ptr + (bh * S + t[:, None]) * DQK + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (bh * S + t[:, None]) * DV + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :],
                    other=0.0).to(tl.float32)
        k_weighted = k * w[:, None]
        c = decay * c + tl.dot(tl.trans(k_weighted), v, input_precision=PRECISION)
        n = decay * n + tl.sum(k_weighted, axis=0)
        m = m_next
    _store_state(cs_ptr, ns_ptr, ms_ptr, bh * (NC + 1) + NC, c, n, m, offs_k, offs_v, mask_k, mask_kv, pk, pv, DQK, DV)


@triton.jit
def _store_state(cs_ptr, ns_ptr, ms_ptr, slot, c, n, m, offs_k, offs_v, mask_k, mask_kv, pk, pv,
                 DQK: tl.constexpr, DV: tl.constexpr):
    """This program's tile of C; n once per dqk tile and m once per head (every program holds the same copies)."""
    tl.store(cs_ptr + slot * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], c, mask=mask_kv)
    if pv == 0:
        tl.store(ns_ptr + slot * DQK + offs_k, n, mask=mask_k)
        if pk == 0:
            tl.store(ms_ptr + slot, m)


@triton.jit
def _chunk_outputs(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr,  # q, k [BH, S, DQK], v [BH, S, DV], i / log_f [BH, S]
    cs_ptr, ns_ptr, ms_ptr,  # the state each chunk starts from (written by _chunk_states), NC + 1 slots per head
    h_ptr,  # out: h [BH, S, DV]
    S, NC, scale, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2)
    offs_t = tl.arange(0, L)
    offs_v = pv * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    t = chunk * L + offs_t
    mask_t = t < S
    log_f = tl.load(f_ptr + bh * S + t, mask=mask_t, other=0.0).to(tl.float32)
    i = tl.load(i_ptr + bh * S + t, mask=mask_t, other=float("-inf")).to(tl.float32)
    b = tl.cumsum(log_f, axis=0)
    m_start = tl.load(ms_ptr + bh * (NC + 1) + chunk)

    # log weight of token j's contribution to output t inside the chunk (j <= t), and the stabilisers
    causal = offs_t[None, :] <= offs_t[:, None]
    log_d = tl.where(causal, b[:, None] - b[None, :] + i[None, :], float("-inf"))
    m_inter = b + m_start  # log weight of the memory carried into the chunk
    m_comb = tl.maximum(m_inter, tl.max(log_d, axis=1))
    d = tl.exp(log_d - m_comb[:, None])

    qk = tl.zeros((L, L), dtype=tl.float32)
    q_c = tl.zeros((L, BV), dtype=tl.float32)
    q_n = tl.zeros((L,), dtype=tl.float32)
    for k0 in tl.static_range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < DQK
        mask_tk = mask_t[:, None] & mask_k[None, :]
        q = tl.load(q_ptr + (bh * S + t[:, None]) * DQK + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + (bh * S + t[:, None]) * DQK + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
        c = tl.load(cs_ptr + (bh * (NC + 1) + chunk) * DQK * DV + offs_k[:, None] * DV + offs_v[None, :],
                    mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        n = tl.load(ns_ptr + (bh * (NC + 1) + chunk) * DQK + offs_k, mask=mask_k, other=0.0)
        qk += tl.dot(q, tl.trans(k), input_precision=PRECISION)
        q_c += tl.dot(q, c, input_precision=PRECISION)
        q_n += tl.sum(q * n[None, :], axis=1)

    v = tl.load(v_ptr + (bh * S + t[:, None]) * DV + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :],
                other=0.0).to(tl.float32)
    scores = qk * scale * d
    carried = tl.exp(m_inter - m_comb) * scale
    numerator = carried[:, None] * q_c + tl.dot(scores, v, input_precision=PRECISION)
    denominator = carried * q_n + tl.sum(scores, axis=1)
    h = numerator / (tl.maximum(tl.abs(denominator), tl.exp(-m_comb)) + eps)[:, None]
    tl.store(h_ptr + (bh * S + t[:, None]) * DV + offs_v[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_v[None, :])


def _tile(size: int, most: int = 64) -> int:
    return max(16, min(most, triton.next_power_of_2(size)))


def mlstm_chunkwise_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, log_f: torch.Tensor,
                           state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], chunk_size: int = 64,
                           eps: float = 1e-6) -> torch.Tensor:
    """Same contract as mlstm.mlstm_chunkwise_reference: q, k [B, NH, S, dqk], v [B, NH, S, dv], i, log_f
    [B, NH, S]; `state` (C, n, m) float32, updated in place. Returns h [B, NH, S, dv] in q's dtype."""
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Triton kernel, got {chunk_size}")
    c, n, m = state
    for name, x in (("C", c), ("n", n), ("m", m)):
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"mLSTM state {name} must be a contiguous float32 tensor, got {x.dtype}")
    BH, NC = B * NH, math.ceil(S / chunk_size)
    q, k, v = (x.reshape(BH, S, -1).contiguous() for x in (q, k, v))
    i, log_f = (x.float().reshape(BH, S).contiguous() for x in (i, log_f))
    c_starts = torch.empty(BH, NC + 1, DQK, DV, device=q.device, dtype=torch.float32)
    n_starts = torch.empty(BH, NC + 1, DQK, device=q.device, dtype=torch.float32)
    m_starts = torch.empty(BH, NC + 1, device=q.device, dtype=torch.float32)
    h = torch.empty(BH, S, DV, device=q.device, dtype=q.dtype)
    BK, BV = _tile(DQK), _tile(DV)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _chunk_states[(BH, triton.cdiv(DQK, BK), triton.cdiv(DV, BV))](
        k, v, i, log_f, c, n, m, c_starts, n_starts, m_starts, S, NC,
        DQK=DQK, DV=DV, L=chunk_size, BK=BK, BV=BV, PRECISION=precision,
    )
    _chunk_outputs[(NC, triton.cdiv(DV, BV), BH)](
        q, k, v, i, log_f, c_starts, n_starts, m_starts, h, S, NC, DQK**-0.5, eps,
        DQK=DQK, DV=DV, L=chunk_size, BK=BK, BV=BV, PRECISION=precision,
    )
    c.copy_(c_starts[:, NC].view_as(c))  # the memory after the last token
    n.copy_(n_starts[:, NC].view_as(n))
    m.copy_(m_starts[:, NC].view_as(m))
    return h.view(B, NH, S, DV)
