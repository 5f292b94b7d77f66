"""Fused BitLinear in Triton: RMSNorm, per-token int8 quantisation, ternary matmul on 2-bit packed weights and
the rescale, in one kernel (the reference and the math are in bitlinear.py).

One program computes a [BLOCK_M tokens x BLOCK_N outputs] tile. It walks its tokens' rows three times: the
sum of squares (RMSNorm), the absmax of the normalised row (the int8 scale), then the product: int8 codes
against ternary codes unpacked from the bytes in registers, accumulated exactly in int32. The weights, the
only large operand, are read once per tile as packed bytes (4 codes each); the activations are small for
decoding and prompts alike, so re-reading them per output tile costs less than a second launch would.

Rounding is the published kernel's (halves away from zero). The product differs from the published one only in
where it rounds: here sum(x_q * t) is exact in int32 and scaled once; the published model rounds x_q / s_x and
t / s_w to the activation dtype and multiplies in it (bitlinear_reference does exactly that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_away(v):
    """The published kernel's tl.math.round (CUDA roundf: halves away from zero), written with operations the
    interpreter has too (libdevice is not available under TRITON_INTERPRET). The cast truncates toward zero;
    v - trunc(v) is exact, so the comparison with 0.5 is. |v| <= 127.5 here."""
    t = v.to(tl.int32).to(tl.float32)
    return tl.where(tl.abs(v - t) >= 0.5, t + tl.where(v >= 0, 1.0, -1.0), t)


@triton.jit
def _bitlinear_kernel(
    X, G, W, Y, scale_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)

    # pass 1: rms of each row
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(X + rows[:, None] * stride_xm + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)

    # pass 2: absmax of each normalised row -> the int8 scale 127 / absmax
    absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(X + rows[:, None] * stride_xm + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        g = tl.load(G + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x * rstd[:, None] * g[None, :]), axis=1))
    x_scale = 127.0 / tl.maximum(absmax, 1e-5)

    # pass 3: int8 codes x ternary codes, accumulated in int32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        x = tl.load(X + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        g = tl.load(G + k, mask=k_ok, other=0.0).to(tl.float32)
        v = x * rstd[:, None] * g[None, :] * x_scale[:, None]
        v = _round_half_away(v)
        x_codes = tl.minimum(tl.maximum(v, -128.0), 127.0).to(tl.int8)
        # byte k // 4 of output row n holds column k at bits 2 * (k % 4), stored as code + 1
        packed = tl.load(W + cols[None, :] * stride_wn + (k // 4)[:, None], mask=k_ok[:, None] & col_ok[None, :],
                         other=0x55)  # 0x55 = four codes of 0
        w_codes = (((packed >> ((k % 4) * 2)[:, None].to(tl.uint8)) & 3).to(tl.int8) - 1).to(tl.int8)
        acc = tl.dot(x_codes, w_codes, acc=acc, out_dtype=tl.int32)

    w_scale = tl.load(scale_ptr).to(tl.float32)
    y = acc.to(tl.float32) / x_scale[:, None] * w_scale
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def bitlinear_triton(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, packed: torch.Tensor,
                     scale: torch.Tensor, block_m: int | None = None, block_n: int = 64,
                     block_k: int = 64) -> torch.Tensor:
    """y [..., out] = BitLinear(x [..., in]) on packed ternary weights [out, ceil(in / 4)] uint8 + scale [1]."""
    K = x.shape[-1]
    N = packed.shape[0]
    if packed.shape[1] * 4 < K:
        raise ValueError(f"packed weights hold {packed.shape[1] * 4} columns, the input has {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    packed = packed.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # tl.dot needs tiles of at least 16; a decode step has M = batch, usually far below that
    block_m = block_m or max(16, min(64, triton.next_power_of_2(M)))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _bitlinear_kernel[grid](x2, norm_weight.contiguous(), packed, y, scale, M, N, K,
                            x2.stride(0), packed.stride(0), y.stride(0), eps,
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], N)
