"""Layers shared by the decoder-only language models (the KV cache behind their generation is in state.py).

RMSNorm, the rotary embedding and the gated MLP's activation run through the kernels of architectures/kernels/
(rmsnorm.py, rotary.py, swiglu.py): their Triton kernels where the dispatch picks Triton (CUDA at inference), their
PyTorch references, this module's former arithmetic exactly, everywhere else. The decoders' projections go through
kernels/linear.py's `dense` (zoo's C++ CPU kernels where the dispatch picks them, else the layer itself), those that
read the same x (q, k and v; gate and up) through `dense_many` (one C++ call for them all where each takes one)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels.dispatch import COMPILED, backend
from zoo.architectures.kernels.linear import dense, dense_many
from zoo.architectures.kernels.matvec import cpu_attention_step, cpu_one_query_attention, one_query_attention
from zoo.architectures.kernels.rmsnorm import rms_norm
from zoo.architectures.kernels.rotary import apply_rotary, apply_rotary_pair, rotate_half  # noqa: F401  (glm, dinov3, tests)
from zoo.architectures.kernels.swiglu import silu_mul
from zoo.architectures.state import KVCache


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back, then scaled: the weight multiplies in the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), half-split pairs (j, j + d/2) over the first `rot_dim` dims.

    Frequencies are computed from positions on the fly (in fp32), so there is no buffer to load or
    keep in sync. Subclasses change `inv_freq` / `attention_factor` for scaled variants (LongRoPE).
    """

    def __init__(self, rot_dim: int, theta: float):
        super().__init__()
        self.rot_dim = rot_dim
        self.theta = theta

    def inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.rot_dim, 2, dtype=torch.int64, device=device).float() / self.rot_dim
        return 1.0 / (self.theta**exponent)

    def attention_factor(self, seq_len: int) -> float:
        return 1.0

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, seq_len: int) -> tuple[torch.Tensor, ...]:
        """cos, sin of shape [B, T, rot_dim] for integer positions [B, T]."""
        freqs = positions.float()[..., None] * self._frequencies(seq_len, positions.device)
        angles = torch.cat([freqs, freqs], dim=-1)
        scale = self.attention_factor(seq_len)
        if isinstance(scale, float) and scale == 1.0:  # (x * 1.0 is x: two ops less per token)
            return angles.cos().to(dtype), angles.sin().to(dtype)
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)

    def _frequencies(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """inv_freq(seq_len, device); this class's own (independent of seq_len) computed once per device and kept
        outside any graph or inference mode (five ops less per token when decoding eagerly)."""
        if type(self).inv_freq is not Rotary.inv_freq or torch.compiler.is_compiling():
            return self.inv_freq(seq_len, device)
        key = (device, self.rot_dim, self.theta)
        kept = self.__dict__.get("_kept_inv_freq")
        if kept is None or kept[0] != key:
            with torch.inference_mode(False):
                kept = (key, self.inv_freq(seq_len, device))
            self.__dict__["_kept_inv_freq"] = kept
        return kept[1]


class Attention(nn.Module):
    """Causal multi-head attention with grouped key/value heads (GQA).

    Local head counts come from the projections' output sizes (view(..., -1, head_dim)), so a
    tensor-parallel rank holding a slice of the heads runs unchanged.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool, layer: int):
        super().__init__()
        self.head_dim = head_dim
        self.layer = layer
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = dense_many((self.q_proj, self.k_proj, self.v_proj), x)
        if T == 1 and cache is not None and cache.writes_one_step_at_length():
            y = self._cpu_step(q, k, v, cos, sin, cache, mask)
            if y is not None:
                return dense(self.o_proj, y)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pair(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = cpu_one_query_attention(q, k, v, mask) if T == 1 else None  # zoo's C++ op on CPU, eager or compiled
        if y is None and T == 1 and mask is not None and backend(q, has_kernel=False) == COMPILED:
            y = one_query_attention(q, k, v, mask)  # a compiled decoding step elsewhere
        if y is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=k.shape[1] != q.shape[1]
            )
        return dense(self.o_proj, y.transpose(1, 2).reshape(B, T, -1))

    def _cpu_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: KVCache, mask: torch.Tensor | None) -> torch.Tensor | None:
        """A decoding token's rotary, cache write and attention in one C++ call at CPU eager inference (the cache
        written at slot `length`, as `update` writes it); None where that op does not apply."""
        if q.device.type != "cpu" or k.shape[-1] % self.head_dim:
            return None
        cache.check_room(1)
        k_cache, v_cache = cache.buffers(self.layer, k.shape[0], k.shape[-1] // self.head_dim, self.head_dim,
                                         k.dtype, k.device)
        return cpu_attention_step(q, k, v, cos, sin, k_cache, v_cache, cache.length, mask)


class Mlp(nn.Module):
    """The transformer feed-forward of ViT-style models: fc2(gelu(fc1(x))), exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class GatedMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = dense_many((self.gate_proj, self.up_proj), x)
        return dense(self.down_proj, silu_mul(gate, up))
