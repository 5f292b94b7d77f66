"""Weight-only int8 / int4 matmul in Triton (formats, math and the reference are in dequant_matmul.py).

The codes are loaded as bytes, unpacked (int4: the nibble of column k is the high one for even k), scaled by
their row's group scale (plus the group's zero point, for affine int4) and cast to x's dtype in registers; the
full-precision weight never exists in memory, so the kernel reads half (int8) or a quarter (int4) of the bytes a
bf16 matmul reads.

Two kernels: for a few rows of x (decoding: one token per sequence) a matrix-vector kernel, one program per
(row, block of outputs), reducing over the input in fp32 without tensor cores; for more rows a tiled kernel,
a [BLOCK_M x BLOCK_N] output tile per program accumulated with tl.dot in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from zoo.architectures.kernels.dispatch import interpreted

GEMV_MAX_ROWS = 4  # up to this many rows of x, reading the weights once per row beats padding to a dot tile


@triton.jit
def _load_codes(Q, cols, ks, stride_qn, ok, BITS: tl.constexpr):
    """[len(cols), len(ks)] codes as fp32."""
    if BITS == 8:
        return tl.load(Q + cols[:, None] * stride_qn + ks[None, :], mask=ok, other=0).to(tl.float32)
    byte = tl.load(Q + cols[:, None] * stride_qn + (ks // 2)[None, :], mask=ok, other=0).to(tl.int32)
    nibble = (byte >> (4 - 4 * (ks % 2))[None, :]) & 15  # even column: high nibble
    return ((nibble ^ 8) - 8).to(tl.float32)


@triton.jit
def _gemv_kernel(X, Q, S, Z, BIAS, Y, N, K, G, n_groups, stride_xm, stride_qn, stride_ym,
                 BITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ok = col_ok[:, None] & k_ok[None, :]
        x = tl.load(X + m * stride_xm + ks, mask=k_ok, other=0.0).to(tl.float32)
        s = tl.load(S + cols[:, None] * n_groups + (ks // G)[None, :], mask=ok, other=0.0).to(tl.float32)
        w = _load_codes(Q, cols, ks, stride_qn, ok, BITS) * s
        if HAS_ZERO:
            w += tl.load(Z + cols[:, None] * n_groups + (ks // G)[None, :], mask=ok, other=0.0).to(tl.float32)
        w = w.to(X.dtype.element_ty).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + cols, acc.to(Y.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemm_kernel(X, Q, S, Z, BIAS, Y, M, N, K, G, n_groups, stride_xm, stride_qn, stride_ym,
                 BITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ZERO: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ok = col_ok[:, None] & k_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.load(S + cols[:, None] * n_groups + (ks // G)[None, :], mask=ok, other=0.0).to(tl.float32)
        w = _load_codes(Q, cols, ks, stride_qn, ok, BITS) * s
        if HAS_ZERO:
            w += tl.load(Z + cols[:, None] * n_groups + (ks // G)[None, :], mask=ok, other=0.0).to(tl.float32)
        w = w.to(X.dtype.element_ty)  # [BLOCK_N, BLOCK_K]
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def dequant_matmul_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                          bias: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequant(q, scale, zero)^T (+ bias) -> [..., out] in x's dtype. Under Triton's CPU interpreter
    (dispatch.interpreted: it multiplies bf16/fp16 dot operands wrongly) the tiles go to tl.dot in fp32; on a GPU
    they stay in x's dtype for the tensor cores."""
    if bits not in (4, 8):
        raise ValueError(f"dequant_matmul supports 8 or 4 bits, not {bits}")
    N = q.shape[0]
    K = q.shape[1] * (2 if bits == 4 else 1)
    if x.shape[-1] != K:
        raise ValueError(f"dequant_matmul: x has {x.shape[-1]} input features, the int{bits} weight {K}")
    s = scale.reshape(N, -1)
    n_groups = s.shape[1]
    if K % n_groups:
        raise ValueError(f"dequant_matmul: scale {tuple(scale.shape)} does not split {K} inputs into equal groups")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, s = q.contiguous(), s.contiguous()
    z = zero.reshape(N, -1).contiguous() if zero is not None else s
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        common = dict(BITS=bits, HAS_BIAS=bias is not None, HAS_ZERO=zero is not None)
        args = (x2, q, s, z, bias if bias is not None else s, y)
        if M <= GEMV_MAX_ROWS:
            _gemv_kernel[(M, triton.cdiv(N, 32))](*args, N, K, K // n_groups, n_groups, x2.stride(0), q.stride(0),
                                                  y.stride(0), BLOCK_N=32, BLOCK_K=128, **common)
        else:
            _gemm_kernel[(triton.cdiv(M, 32), triton.cdiv(N, 64))](
                *args, M, N, K, K // n_groups, n_groups, x2.stride(0), q.stride(0), y.stride(0),
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST=interpreted(),
                BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, **common)
    return y.view(*x.shape[:-1], N)
