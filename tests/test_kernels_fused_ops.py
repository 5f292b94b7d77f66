"""RMSNorm, rotary embedding and the SwiGLU activation: each Triton kernel (run on CPU under TRITON_INTERPRET=1)
against its plain PyTorch reference, on several shapes including ragged ones (sizes that are not powers of two,
partial rotary, strided inputs), and each reference against the layer the decoders run.

bf16 tolerances: the interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest), so each cast in
a kernel may land one bf16 step (2^-7 relative) away from the reference's rounding; the bounds below count
those casts and are relative to each element, not to the largest one.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the launchers import triton (conftest may set it too)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from zoo.architectures.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from zoo.architectures.kernels.rmsnorm_triton import rms_norm_triton  # noqa: E402
from zoo.architectures.kernels.rotary import apply_rotary, apply_rotary_reference  # noqa: E402
from zoo.architectures.kernels.rotary_triton import apply_rotary_triton  # noqa: E402
from zoo.architectures.kernels.swiglu import silu_mul, silu_mul_reference  # noqa: E402
from zoo.architectures.kernels.swiglu_triton import silu_mul_triton  # noqa: E402

from tests.helpers import max_abs_diff  # noqa: E402

BF16_STEP = 2**-7  # relative spacing of bf16 values (8 significant bits)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_within_steps(y: torch.Tensor, expected: torch.Tensor, steps: float, floor: float = 1e-6) -> None:
    """Elementwise |y - expected| <= steps bf16 steps of |expected| (+ floor for values near zero)."""
    y, expected = y.float(), expected.float()
    excess = (y - expected).abs() - (steps * BF16_STEP * expected.abs() + floor)
    assert excess.max().item() <= 0, f"off by more than {steps} bf16 steps: worst excess {excess.max().item():.3g}"


# -- RMSNorm -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 64), (5, 100), (1, 1, 257), (3, 1)])
def test_rmsnorm_kernel_matches_reference_fp32(shape):
    x, w = rand(*shape) * 3, rand(shape[-1], seed=1)
    y = rms_norm_triton(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert max_abs_diff(y, rms_norm_reference(x, w, 1e-6)) < 1e-5


def test_rmsnorm_kernel_reads_strided_rows_and_rounds_like_reference_in_bf16():
    x = rand(6, 4, 96, dtype=torch.bfloat16).transpose(0, 1)  # non-contiguous rows
    w = rand(96, dtype=torch.bfloat16, seed=1)
    y, expected = rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 6, 96)
    assert_within_steps(y, expected, 3)  # two casts in the kernel, two roundings in the reference
    # bf16 activations with an fp32 weight give fp32, as the reference's type promotion does
    w32 = rand(96, seed=2)
    assert rms_norm_triton(x, w32, 1e-5).dtype == torch.float32
    assert_within_steps(rms_norm_triton(x, w32, 1e-5), rms_norm_reference(x, w32, 1e-5), 2)  # one cast each


def test_rmsnorm_reference_is_the_decoder_layer_and_cpu_dispatch_uses_it():
    from zoo.architectures.layers import RMSNorm

    layer = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        layer.weight.copy_(rand(48, seed=3))
    x = rand(2, 7, 48)
    with torch.no_grad():
        assert torch.equal(rms_norm_reference(x, layer.weight, 1e-6), layer(x))
        assert torch.equal(rms_norm(x, layer.weight, 1e-6), layer(x))


# -- rotary --------------------------------------------------------------------------------------------------


def cos_sin(B, T, d, seed=0, offset=None):
    """Per-row positions (a left-padded batch shifts each row), half-split frequencies as the decoders build."""
    pos = torch.arange(T)[None].expand(B, T) + (offset if offset is not None else torch.zeros(B, 1, dtype=torch.long))
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[..., None] * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("B,H,T,hd,d", [(2, 3, 5, 16, 16), (1, 2, 7, 24, 16), (3, 1, 2, 20, 12), (1, 4, 1, 64, 64)])
def test_rotary_kernel_matches_reference_full_and_partial(B, H, T, hd, d):
    x = rand(B, H, T, hd)
    cos, sin = cos_sin(B, T, d, offset=torch.arange(B)[:, None] * 3)
    y = apply_rotary_triton(x, cos, sin)
    expected = apply_rotary_reference(x, cos, sin)
    assert y.shape == expected.shape
    assert max_abs_diff(y, expected) < 1e-6
    assert torch.equal(y[..., d:], x[..., d:])  # the pass-through part is copied bit for bit


def test_rotary_kernel_reads_the_transposed_projection_view_in_bf16():
    B, T, H, hd = 2, 6, 3, 32
    x = rand(B, T, H, hd, dtype=torch.bfloat16).transpose(1, 2)  # [B, H, T, hd] as the attention builds it
    assert not x.is_contiguous()
    cos, sin = (t.to(torch.bfloat16) for t in cos_sin(B, T, hd))
    y = apply_rotary_triton(x, cos, sin)
    assert y.dtype == torch.bfloat16
    # the kernel rotates in fp32 and casts once: compare with the fp32 rotation of the same bf16 inputs
    assert_within_steps(y, apply_rotary_reference(x.float(), cos.float(), sin.float()), 1, floor=1e-5)
    assert max_abs_diff(y, apply_rotary_reference(x, cos, sin)) < 0.05  # the bf16 reference rounds three times


def test_rotary_reference_is_the_decoder_layer_and_cpu_dispatch_uses_it():
    from zoo.architectures.layers import apply_rotary as layer_apply_rotary

    x = rand(2, 3, 5, 24)
    cos, sin = cos_sin(2, 5, 16)
    assert torch.equal(apply_rotary_reference(x, cos, sin), layer_apply_rotary(x, cos, sin))
    assert torch.equal(apply_rotary(x, cos, sin), layer_apply_rotary(x, cos, sin))


def test_rotary_kernel_refuses_mismatched_tables():
    x = rand(1, 2, 3, 8)
    cos, sin = cos_sin(1, 4, 8)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rotary_triton(x, cos, sin)


# -- SwiGLU activation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5, 37), (2500,), (1, 1024), (1,)])
def test_silu_mul_kernel_matches_reference(shape):
    g, u = rand(*shape) * 4, rand(*shape, seed=1)
    assert max_abs_diff(silu_mul_triton(g, u), silu_mul_reference(g, u)) < 1e-6


def test_silu_mul_kernel_bf16_and_cpu_dispatch():
    g, u = rand(4, 300, dtype=torch.bfloat16) * 4, rand(4, 300, dtype=torch.bfloat16, seed=1)
    y, expected = silu_mul_triton(g, u), silu_mul_reference(g, u)
    assert y.dtype == torch.bfloat16
    assert_within_steps(y, expected, 3)
    assert torch.equal(silu_mul(g, u), F.silu(g) * u)
