"""zoo's fused C++ CPU decode ops (csrc/decode_ops.cpp): RMSNorm, rotary, silu * up equal their PyTorch references
bit for bit (fp32, bf16, fp16; odd sizes, batches, transposed q/k views, partial rotary, mixed-dtype norm weights);
one-query attention against the KV cache equals F.scaled_dot_product_attention (fp32 within 1e-5, bf16/fp16 within
one rounding of the output) with grouped-query heads, masks and the cache's slice views; the kernel modules route
CPU eager inference to them and everything else (autograd, torch.compile, unfitting shapes) to the references;
a decoding token's attention step (rotary, cache write, attention in one call), the residual add with its norm and
the greedy argmax equal the ops they replace bit for bit; a decoder attention layer decodes the same with and without
them, dynamic and static cache forms; the same exactness in processes forced to the AVX2 and the scalar builds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from zoo.architectures.kernels import cpu_ext, dispatch, matvec
from zoo.architectures.kernels.argmax import argmax_last
from zoo.architectures.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference
from zoo.architectures.kernels.rotary import apply_rotary, apply_rotary_pair, apply_rotary_reference
from zoo.architectures.kernels.swiglu import silu_mul, silu_mul_reference
from zoo.architectures.layers import Attention
from zoo.architectures.state import KVCache

from tests.helpers import Spy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def library():
    lib = cpu_ext.library()
    assert lib is not None, "the CPU kernels did not build here (is a C++ compiler installed?)"
    return lib


@pytest.fixture
def spy(monkeypatch):
    s = Spy(library())
    monkeypatch.setattr(dispatch, "_DECODE_LIB", [s])
    return s


@pytest.fixture
def without_ops(monkeypatch):
    """The decode ops off (the references everywhere), as without the library."""
    monkeypatch.setattr(dispatch, "_DECODE_LIB", [None])


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


# --- a decoding token's attention in one call, the residual add with its norm, the greedy pick --------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,kv,d,r,pos,masked", [(1, 14, 2, 64, 64, 0, False), (1, 14, 2, 64, 64, 37, False),
                                                   (3, 6, 2, 20, 12, 9, True), (2, 4, 4, 16, 16, 5, True)])
def test_attention_step_equals_rotary_cache_write_and_attention(dtype, B, H, kv, d, r, pos, masked):
    q, k, v = (rand(B, 1, n * d, dtype=dtype, seed=s) for n, s in ((H, 0), (kv, 1), (kv, 2)))
    cos, sin = rand(B, 1, r, dtype=dtype, seed=3), rand(B, 1, r, dtype=dtype, seed=4)
    k_cache, v_cache = rand(B, kv, pos + 3, d, dtype=dtype, seed=5), rand(B, kv, pos + 3, d, dtype=dtype, seed=6)
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, pos + 1, generator=torch.Generator().manual_seed(7)) > 0.4
        mask[..., -1] = True
    # the steps one by one, as layers.Attention takes them without the fused op
    qh = apply_rotary_reference(q.view(B, 1, H, d).transpose(1, 2), cos, sin)
    kh = apply_rotary_reference(k.view(B, 1, kv, d).transpose(1, 2), cos, sin)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[:, :, pos:pos + 1], v_ref[:, :, pos:pos + 1] = kh, v.view(B, 1, kv, d).transpose(1, 2)
    ref = library().decode_attention(qh, k_ref[:, :, :pos + 1], v_ref[:, :, :pos + 1], mask)
    y = library().attention_step(q, k, v, cos, sin, k_cache, v_cache, pos, mask)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert y.shape == (B, 1, H * d) and torch.equal(y, ref.transpose(1, 2).reshape(B, 1, H * d))


def test_attention_step_refuses_what_does_not_fit():
    q, k = rand(1, 1, 64), rand(1, 1, 32)
    cos = rand(1, 1, 16)
    cache = torch.zeros(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        library().attention_step(q, k, k, cos, cos, cache, cache.clone(), 4, None)
    with pytest.raises(RuntimeError, match="do not fit"):
        library().attention_step(rand(1, 1, 60), k, k, cos, cos, cache, cache.clone(), 0, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 2, 896), (5, 64), (7,), (2, 1, 1000)])
def test_add_rms_norm_equals_the_add_and_the_reference_bit_for_bit(dtype, shape):
    x, r = rand(*shape, dtype=dtype, scale=3.0), rand(*shape, dtype=dtype, seed=2, scale=3.0)
    w = rand(shape[-1], dtype=dtype, seed=1)
    h, y = library().add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(h, x + r) and torch.equal(y, rms_norm_reference(x + r, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 151936), (3, 1000), (2, 1, 37), (5,), (1, 1)])
def test_argmax_last_equals_torch_argmax(dtype, shape):
    x = rand(*shape, dtype=dtype, scale=4.0)
    assert torch.equal(library().argmax_last(x), x.argmax(-1))
    ties = torch.zeros(shape, dtype=dtype)
    ties[..., shape[-1] // 2:] = 1.0  # the first of equal maxima
    assert torch.equal(library().argmax_last(ties), ties.argmax(-1))
    assert torch.equal(library().argmax_last(torch.full(shape, float("-inf"), dtype=dtype)),
                       torch.full(shape, float("-inf"), dtype=dtype).argmax(-1))
    if shape[-1] > 2:  # torch orders NaN above every number: the first NaN
        x[..., 1], x[..., -1] = float("nan"), float("nan")
        assert torch.equal(library().argmax_last(x), x.argmax(-1))


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
    h, y = add_rms_norm(x, x, w, 1e-6)
    assert torch.equal(h, x + x) and torch.equal(y, rms_norm_reference(x + x, w, 1e-6))
    assert torch.equal(argmax_last(x), x.argmax(-1))
    assert spy.calls == ["rms_norm", "rotary", "rotary_pair", "silu_mul", "add_rms_norm", "argmax_last"]


def test_autograd_compiled_elementwise_and_unfitting_calls_keep_the_references(spy, monkeypatch):
    w = rand(64, seed=1).requires_grad_()
    y = rms_norm(rand(2, 64), w, 1e-6)
    assert y.grad_fn is not None  # the reference, differentiable
    rms_norm(rand(64, 2).t(), rand(64), 1e-6)  # not contiguous: another summation order in torch
    silu_mul(rand(3, 40000), rand(3, 40000))  # beyond one range of torch's loop
    apply_rotary(rand(2, 3, 1, 8), rand(1, 1, 8), rand(1, 1, 8))  # cos broadcast over the batch
    assert matvec.cpu_one_query_attention(rand(1, 4, 1, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8),
                                          torch.zeros(1, 1, 1, 5)) is None  # a float mask: SDPA's
    assert add_rms_norm(rand(2, 64), rand(2, 64), w, 1e-6)[1].grad_fn is not None
    assert matvec.cpu_attention_step(rand(1, 1, 32), rand(1, 1, 16), rand(1, 1, 16), rand(1, 1, 8), rand(1, 1, 8),
                                     torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 1,
                                     torch.ones(1, 1, 1, 3, dtype=torch.bool)) is None  # a mask of another length
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    silu_mul(rand(4), rand(4))  # elementwise: Inductor's to fuse in a compiled graph
    assert spy.calls == []
    argmax_last(rand(3, 5))  # the ops worth an opaque call in a compiled graph take the C++ op there too
    matvec.cpu_one_query_attention(rand(1, 4, 1, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8), None)
    assert spy.calls == ["argmax_last", "decode_attention"]


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
    monkeypatch.setattr(dispatch, "_DECODE_LIB", [spy])
    fast = run()
    assert ("decode_attention" if static else "attention_step") in spy.calls  # (the dynamic form: the fused step)
    monkeypatch.setattr(dispatch, "_DECODE_LIB", [None])
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
    a, b, w = (torch.randn(3, 100, generator=g) * 3).to(dt), torch.randn(3, 100, generator=g).to(dt), w[:100]
    h, y = lib.add_rms_norm(a, b, w, 1e-6)
    exact &= torch.equal(h, a + b) and torch.equal(y, rms_norm_reference(a + b, w, 1e-6))
    logits = (torch.randn(2, 151936, generator=g) * 4).to(dt)
    exact &= torch.equal(lib.argmax_last(logits), logits.argmax(-1))
    q, kn, vn = (torch.randn(2, 1, n * 24, generator=g).to(dt) for n in (6, 2, 2))
    kc, vc = torch.randn(2, 2, 9, 24, generator=g).to(dt), torch.randn(2, 2, 9, 24, generator=g).to(dt)
    y = lib.attention_step(q, kn, vn, c[:, :1], s[:, :1], kc, vc, 4, None)
    qh = apply_rotary_reference(q.view(2, 1, 6, 24).transpose(1, 2), c[:, :1], s[:, :1])
    kh = apply_rotary_reference(kn.view(2, 1, 2, 24).transpose(1, 2), c[:, :1], s[:, :1])
    exact &= torch.equal(kc[:, :, 4:5], kh) and torch.equal(vc[:, :, 4:5], vn.view(2, 1, 2, 24).transpose(1, 2))
    ref = lib.decode_attention(qh, kc[:, :, :5], vc[:, :, :5])
    exact &= torch.equal(y, ref.transpose(1, 2).reshape(2, 1, -1))
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
