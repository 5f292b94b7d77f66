"""zoo's fused C++ CPU decode ops (csrc/decode_ops.cpp): RMSNorm, rotary, silu * up equal their PyTorch references
bit for bit (fp32, bf16, fp16; odd sizes, batches, transposed q/k views, partial rotary, mixed-dtype norm weights);
one-query attention against the KV cache equals F.scaled_dot_product_attention (fp32 within 1e-5, bf16/fp16 within
one rounding of the output) with grouped-query heads, masks and the cache's slice views; the kernel modules route
CPU eager inference to them and everything else (autograd, torch.compile, unfitting shapes) to the references;
a decoder attention layer decodes the same with and without them, dynamic and static cache forms; the same
exactness in processes forced to the AVX2 and the scalar builds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from zoo.architectures.kernels import cpu_ext, matvec
from zoo.architectures.kernels.rmsnorm import rms_norm, rms_norm_reference
from zoo.architectures.kernels.rotary import apply_rotary, apply_rotary_pair, apply_rotary_reference
from zoo.architectures.kernels.swiglu import silu_mul, silu_mul_reference
from zoo.architectures.layers import Attention
from zoo.architectures.state import KVCache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def library():
    lib = cpu_ext.library()
    assert lib is not None, "the CPU kernels did not build here (is a C++ compiler installed?)"
    return lib


class Spy:
    """The library, recording which of its ops were called."""

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.lib, name)


@pytest.fixture
def spy(monkeypatch):
    s = Spy(library())
    monkeypatch.setattr(matvec, "_DECODE_LIB", [s])
    return s


@pytest.fixture
def without_ops(monkeypatch):
    """The decode ops off (the references everywhere), as without the library."""
    monkeypatch.setattr(matvec, "_DECODE_LIB", [None])


# --- RMSNorm ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 2, 896), (5, 64), (1, 1, 4864), (3, 100), (7,), (2, 1, 1000)])
def test_rms_norm_equals_the_reference_bit_for_bit(dtype, shape):
    x, w = rand(*shape, dtype=dtype, scale=3.0), rand(shape[-1], dtype=dtype, seed=1)
    assert torch.equal(library().rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.bfloat16)])
def test_rms_norm_with_a_weight_of_another_dtype_multiplies_in_the_promoted_dtype(x_dtype, w_dtype):
    x, w = rand(2, 3, 200, dtype=x_dtype), rand(200, dtype=w_dtype, seed=1)
    y = library().rms_norm(x, w, 1e-5)
    assert y.dtype == torch.promote_types(x_dtype, w_dtype)
    assert torch.equal(y, rms_norm_reference(x, w, 1e-5))


# --- rotary -----------------------------------------------------------------------------------------------------

def qk_view(B, T, H, hd, dtype, seed=0):
    """q or k as the attention makes them: the projection's [B, T, H * hd] viewed as [B, H, T, hd] (transposed)."""
    return rand(B, T, H * hd, dtype=dtype, seed=seed).view(B, T, H, hd).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,hd,d", [(1, 1, 14, 64, 64), (2, 3, 5, 64, 64), (2, 4, 3, 96, 64), (1, 2, 2, 10, 6)])
def test_rotary_equals_the_reference_bit_for_bit_full_and_partial(dtype, B, T, H, hd, d):
    x = qk_view(B, T, H, hd, dtype)
    cos, sin = rand(B, T, d, dtype=dtype, seed=2), rand(B, T, d, dtype=dtype, seed=3)
    assert torch.equal(library().rotary(x, cos, sin), apply_rotary_reference(x, cos, sin))
    assert torch.equal(library().rotary(x.contiguous(), cos, sin), apply_rotary_reference(x, cos, sin))


def test_rotary_pair_rotates_q_and_k_with_their_own_head_counts():
    q, k = qk_view(2, 1, 14, 64, torch.bfloat16), qk_view(2, 1, 2, 64, torch.bfloat16, seed=1)
    cos, sin = rand(2, 1, 64, dtype=torch.bfloat16, seed=2), rand(2, 1, 64, dtype=torch.bfloat16, seed=3)
    qr, kr = library().rotary_pair(q, k, cos, sin)
    assert torch.equal(qr, apply_rotary_reference(q, cos, sin))
    assert torch.equal(kr, apply_rotary_reference(k, cos, sin))


# --- silu * up --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4864), (3, 1, 4864), (17,), (33,), (2, 50), (1, 1, 8960)])
def test_silu_mul_equals_the_reference_bit_for_bit(dtype, shape):
    gate, up = rand(*shape, dtype=dtype, scale=4.0), rand(*shape, dtype=dtype, seed=1)
    assert torch.equal(library().silu_mul(gate, up), silu_mul_reference(gate, up))


# --- one-query attention ----------------------------------------------------------------------------------------

def cache_view(B, kv, L, d, dtype, seed, max_len=40):
    """k or v as the dynamic KV cache hands them: its first L of max_len slots (not contiguous)."""
    return rand(B, kv, max_len, d, dtype=dtype, seed=seed)[:, :, :L]


def sdpa_fp32(q, k, v, mask):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,kv,L,d", [(1, 14, 2, 1, 64), (1, 14, 2, 37, 64), (2, 4, 4, 9, 16), (3, 6, 2, 33, 20)])
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_equals_sdpa(dtype, B, H, kv, L, d, masked):
    q = rand(B, H, 1, d, dtype=dtype)
    k, v = cache_view(B, kv, L, d, dtype, 1), cache_view(B, kv, L, d, dtype, 2)
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, L, generator=torch.Generator().manual_seed(3)) > 0.4
        mask[..., -1] = True  # the new token always sees itself
    y = library().decode_attention(q, k, v, mask)
    ref = sdpa_fp32(q, k, v, mask)
    assert y.dtype == dtype and y.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    else:  # the fp32 result rounded once: at most one unit in the last place of the dtype apart
        ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=torch.finfo(dtype).tiny)
        assert ((y.float() - ref).abs() <= ulp + 1e-6).all()


def test_one_query_attention_takes_one_mask_row_for_the_whole_batch():
    q, k, v = rand(3, 4, 1, 8), rand(3, 2, 10, 8, seed=1), rand(3, 2, 10, 8, seed=2)
    mask = torch.arange(10)[None, None, None] < 6  # [1, 1, 1, L]: the static cache's unwritten slots masked
    torch.testing.assert_close(library().decode_attention(q, k, v, mask), sdpa_fp32(q, k, v, mask), atol=1e-5,
                               rtol=0)


# --- routing ----------------------------------------------------------------------------------------------------

def test_cpu_inference_calls_take_the_cpp_ops(spy):
    x, w = rand(1, 1, 64), rand(64, seed=1)
    q, k = qk_view(1, 1, 4, 16, torch.float32), qk_view(1, 1, 2, 16, torch.float32, seed=1)
    cos, sin = rand(1, 1, 16, seed=2), rand(1, 1, 16, seed=3)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert torch.equal(apply_rotary(q, cos, sin), apply_rotary_reference(q, cos, sin))
    qr, kr = apply_rotary_pair(q, k, cos, sin)
    assert torch.equal(kr, apply_rotary_reference(k, cos, sin))
    assert torch.equal(silu_mul(x, x), silu_mul_reference(x, x))
    assert spy.calls == ["rms_norm", "rotary", "rotary_pair", "silu_mul"]


def test_autograd_compile_and_unfitting_calls_keep_the_references(spy, monkeypatch):
    w = rand(64, seed=1).requires_grad_()
    y = rms_norm(rand(2, 64), w, 1e-6)
    assert y.grad_fn is not None  # the reference, differentiable
    rms_norm(rand(64, 2).t(), rand(64), 1e-6)  # not contiguous: another summation order in torch
    silu_mul(rand(3, 40000), rand(3, 40000))  # beyond one range of torch's loop
    apply_rotary(rand(2, 3, 1, 8), rand(1, 1, 8), rand(1, 1, 8))  # cos broadcast over the batch
    assert matvec.cpu_one_query_attention(rand(1, 4, 1, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8),
                                          torch.zeros(1, 1, 1, 5)) is None  # a float mask: SDPA's
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    silu_mul(rand(4), rand(4))
    assert spy.calls == []


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_attention_layer_decodes_the_same_with_and_without_the_cpp_ops(static, dtype, monkeypatch):
    torch.manual_seed(0)
    layer = Attention(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, qkv_bias=True, layer=0).to(dtype)
    xs = rand(2, 8, 64, dtype=dtype, seed=5)

    def run():
        cache = KVCache(batch=2, max_len=12, pad=torch.tensor([0, 2]))
        if static:
            cache.make_static("cpu")
        outs = []
        with torch.inference_mode():
            for start, steps in ((0, 5), (5, 1), (6, 1), (7, 1)):
                positions = cache.positions(steps, torch.device("cpu"))
                angles = positions.float()[..., None] * (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))
                angles = torch.cat([angles, angles], -1)
                mask = cache.attention_mask(steps, torch.device("cpu"))
                outs.append(layer(xs[:, start:start + steps], angles.cos().to(dtype), angles.sin().to(dtype),
                                  cache, mask))
                cache.advance(steps)
        return outs

    spy = Spy(library())
    monkeypatch.setattr(matvec, "_DECODE_LIB", [spy])
    fast = run()
    assert "decode_attention" in spy.calls
    monkeypatch.setattr(matvec, "_DECODE_LIB", [None])
    slow = run()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)


# --- the forced builds ------------------------------------------------------------------------------------------

FORCED = """
import torch, torch.nn.functional as F
from zoo.architectures.kernels import cpu_ext
from zoo.architectures.kernels.rmsnorm import rms_norm_reference
from zoo.architectures.kernels.rotary import apply_rotary_reference
lib = cpu_ext.library()
g = torch.Generator().manual_seed(0)
exact, worst = True, 0.0
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for n in (7, 64, 100, 896, 4864):
        x, w = (torch.randn(3, n, generator=g) * 3).to(dt), torch.randn(n, generator=g).to(dt)
        exact &= torch.equal(lib.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
        gate, up = (torch.randn(n, generator=g) * 4).to(dt), torch.randn(n, generator=g).to(dt)
        exact &= torch.equal(lib.silu_mul(gate, up), F.silu(gate) * up)
    x = torch.randn(2, 3, 5, 24, generator=g).to(dt).transpose(1, 2)
    c, s = torch.randn(2, 3, 16, generator=g).to(dt), torch.randn(2, 3, 16, generator=g).to(dt)
    exact &= torch.equal(lib.rotary(x, c, s), apply_rotary_reference(x, c, s))
q, k, v = torch.randn(2, 6, 1, 20), torch.randn(2, 2, 30, 20), torch.randn(2, 2, 30, 20)
mask = torch.rand(2, 1, 1, 30) > 0.3
mask[..., 0] = True
ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
worst = (lib.decode_attention(q, k, v, mask) - ref).abs().max().item()
print(lib.build_isa(), torch.backends.cpu.get_cpu_capability(), exact, worst)
"""


@pytest.mark.parametrize("capability,isa", [("avx2", "AVX2"), ("default", "DEFAULT")])
def test_the_forced_avx2_and_scalar_builds_equal_the_references(capability, isa):
    library()  # the session's cache (tests/conftest.py) holds the native build; the forced one is built once
    result = subprocess.run([sys.executable, "-c", FORCED], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, timeout=600)
    assert result.returncode == 0, result.stderr
    built, aten, exact, worst = result.stdout.split()
    assert built == isa and aten.upper() == isa
    assert exact == "True"
    assert float(worst) < 1e-5
