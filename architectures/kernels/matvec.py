"""A linear layer applied to one token, written as multiply-and-reduce, for compiled decoding on CPU.

    y[n] = sum_k w[n, k] x[k] + b[n]          x: one row [1, K];  w: [N, K], row-major (k contiguous)

Decoding one token at a time is a chain of matrix-vector products, bound by how fast the weights stream from
memory. torch's own linear (oneDNN / BLAS) reaches about 17 GB/s of bf16 weights on this machine's 2 cores;
the same product written as an elementwise multiply and a sum along the contiguous K, compiled by Inductor, is
one vectorised pass over the weight that reaches about 28 GB/s, and 30 for fp32, near a plain read (phase-1
measurements, `benchmarks/bench_decode.py --kernels`). Eager PyTorch would materialise the product: this form
is for compiled graphs only.

`matvec_linear` is that form (fp32 accumulation, whatever the weight dtype). `rewrite_single_row_linears` is the
graph pass that puts it in place of every F.linear of a Dynamo graph whose input is a single row, so a compiled
decoding step gets it for every family without any layer knowing (zoo.generation applies it).

Both are what a compiled step falls back on where zoo's C++ kernels are unavailable (ZOO_CPU_KERNELS=0, no
compiler): with them, the compiled step's single-row linears are zoo_cpu's ops (dispatch.py), never an F.linear.

`one_query_attention` is the same idea for attending from one new token over the cache: the scores and the
weighted sum of values as multiply-and-reduce, which Inductor fuses into a few loops; the compiled SDPA kernel
spends 6x (64 cached positions) to 9x (2048) longer on a single query (measured, 2 threads).

On CPU, eager and compiled, the same step runs zoo's C++ op instead (`cpu_one_query_attention`:
zoo_cpu::decode_attention, csrc/decode_ops.cpp): one call per layer where F.scaled_dot_product_attention spent
~160 us on one query and Inductor's fused loops ~500 us over every cache slot (masked slots cost the C++ op
nothing) (dispatch.py's `cpu_decode_ops` decides, as for the other fused CPU decode ops).
"""

from __future__ import annotations

import hashlib
import inspect

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from zoo.architectures.kernels import cpu_ext
from zoo.architectures.kernels.dispatch import COMPILED, DECODE_DTYPES, backend, cpu_decode_ops

GROUP = 64  # columns summed first, then the groups: a two-level reduction vectorises best (measured)


def computed_once(v: torch.Tensor) -> torch.Tensor:
    """v, computed into memory before the reduction that reads it, in a compiled graph. Otherwise Inductor
    recomputes whatever produced it (a norm, an activation) inside the loop over the weight's rows, once per row
    (measured: the output head 1.4x slower). Eagerly, v itself."""
    if backend(v, has_kernel=False) == COMPILED and not torch.is_grad_enabled():
        return torch.ops.prims.inductor_force_stride_order(v, v.stride())
    return v


def matvec_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] holding one row, as multiply-and-reduce in fp32."""
    n, k = weight.shape
    w, v = weight.float(), computed_once(x.reshape(1, k).float())
    if GROUP and k % GROUP == 0:
        y = (w.view(n, k // GROUP, GROUP) * v.view(1, k // GROUP, GROUP)).sum(-1).sum(-1)
    else:
        y = (w * v).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.promote_types(x.dtype, weight.dtype)).reshape(*x.shape[:-1], n)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v for q [B, H, 1, d] against k, v [B, H_kv, L, d] (grouped-query: H a
    multiple of H_kv), allowed [B, 1, 1, L] bool; in fp32, returned in q's dtype. For compiled graphs."""
    B, H, T, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(B, kv, H // kv, T, d).float() * d**-0.5
    scores = (qg[:, :, :, :, None, :] * k.float()[:, :, None, None, :, :]).sum(-1)  # [B, kv, group, T, L]
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    weights = scores.softmax(-1)
    out = (weights[..., None] * v.float()[:, :, None, None, :, :]).sum(-2)  # [B, kv, group, T, d]
    return out.reshape(B, H, T, d).to(q.dtype)


def cpu_one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(d), masked) v by zoo_cpu::decode_attention for one query per head at CPU inference
    (q [B, H, 1, d], k, v [B, H_kv, L, d], mask None or bool [B or 1, 1, 1, L]); None where it does not apply (the
    caller then runs F.scaled_dot_product_attention)."""
    lib = cpu_decode_ops(q, k, v, in_graph=True)
    if (lib is None or q.dim() != 4 or q.shape[2] != 1 or q.dtype not in DECODE_DTYPES or k.dtype != q.dtype
            or v.dtype != q.dtype or k.dim() != 4 or k.shape[1] == 0 or q.shape[1] % k.shape[1]):
        return None
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1)
                             or mask.shape[0] not in (1, q.shape[0]) or mask.shape[3] != k.shape[2]):
        return None
    return lib.decode_attention(q, k, v, mask)


@cpu_ext.fake("zoo_cpu::decode_attention")
def _decode_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def cpu_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                       mask: torch.Tensor | None) -> torch.Tensor | None:
    """One decoding token's attention by zoo_cpu::attention_step at CPU eager inference: the projections' outputs
    q [B, 1, H * d], k, v [B, 1, Hkv * d] rotated (cos, sin [B, 1, r]), k and v written into slot `pos` of the
    caches [B, Hkv, max_len, d], one-query attention over slots 0..pos (mask None or bool [B or 1, 1, 1, pos + 1]);
    [B, 1, H * d]. One call for what rotary_pair, KVCache.update and decode_attention do with ~20 aten ops around
    them; the same numbers. None where it does not apply (the caller then takes those steps one by one)."""
    lib = cpu_decode_ops(q, k, v, cos, sin)
    dtype = q.dtype
    if (lib is None or dtype not in DECODE_DTYPES or k.dtype != dtype or v.dtype != dtype or cos.dtype != dtype
            or sin.dtype != dtype or k_cache.dtype != dtype or v_cache.dtype != dtype or cos.dim() != 3
            or cos.shape != sin.shape or cos.shape[:2] != (q.shape[0], 1) or cos.shape[2] > k_cache.shape[3]
            or cos.shape[2] % 2 or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        return None
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:] != (1, 1, pos + 1)
                             or mask.shape[0] not in (1, q.shape[0])):
        return None
    return lib.attention_step(q, k, v, cos, sin, k_cache, v_cache, pos, mask)


def cache_keys() -> dict[str, str]:
    """{qualified name: hash of the source} of the functions the graph pass puts in, for Inductor's caches."""
    source = inspect.getsource(matvec_linear).encode()
    return {f"{matvec_linear.__module__}.{matvec_linear.__name__}": hashlib.sha256(source).hexdigest()[:16]}


def _rows(node) -> int | None:
    """Rows of the input of a linear node in a Dynamo graph (from its example value), None if unknown."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dim() < 1:
        return None
    rows = 1
    for size in value.shape[:-1]:
        if not isinstance(size, int):
            return None  # a symbolic size: no decision that a guard would have to protect
        rows *= size
    return rows


def rewrite_single_row_linears(gm: torch.fx.GraphModule) -> int:
    """Replace every F.linear whose input is one row of a float dtype by matvec_linear; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.linear or not node.args:
            continue
        x = node.args[0]
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        value = x.meta.get("example_value") if hasattr(x, "meta") else None
        w_value = weight.meta.get("example_value") if hasattr(weight, "meta") else None
        if (_rows(x) != 1 or not isinstance(w_value, torch.Tensor) or w_value.dim() != 2
                or not value.dtype.is_floating_point or not w_value.dtype.is_floating_point
                or value.device.type != "cpu" or is_traceable_wrapper_subclass(w_value)):
            continue  # (a DTensor weight under tensor parallelism: its linear has a sharding rule, ours has not)
        node.target = matvec_linear
        count += 1
    if count:
        gm.recompile()
    return count
