"""MatMul-free LM pieces: the reference against hand-computed cases, the 2-bit packing, the parallel scan against
the loop, and the Triton kernels (run on CPU under TRITON_INTERPRET=1) against their PyTorch references.

Tolerance for activation rounding: the int8 quantiser rounds x * 127 / max|x|. The Triton kernel computes
1 / sqrt where the reference calls rsqrt, and sums in another order, so an element that sits within an ulp of
a .5 can round one step apart. Such a flip moves that row's outputs by at most |t| * a / s_x = a / s_x per
flipped element (t ternary, a the weight scale, s_x the row's int8 scale), far above float noise but
small and bounded; `assert_close_up_to_flips` allows it on at most 2% of the rows and nowhere else.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the launchers import triton (conftest may set it too)

import pytest  # noqa: E402
import torch  # noqa: E402
from zoo.architectures.kernels.bitlinear import (  # noqa: E402
    bitlinear_reference,
    quantize_activations,
    rms_norm,
)
from zoo.architectures.kernels.hgrn import hgrn, hgrn_recurrent, hgrn_scan  # noqa: E402
from zoo.architectures.quant import get_scheme, pack_ternary, ternarize, unpack_ternary  # noqa: E402

from tests import mmfree_reference as ref  # noqa: E402


def assert_close_up_to_flips(y, expected, step, tol=1e-5, max_flipped_rows=0.02):
    """y, expected [M, N]; step [M, 1]: what one flipped activation code can move a row by."""
    diff = (y.float() - expected.float()).abs()
    bad = diff > tol * (1 + expected.float().abs())
    rows = bad.any(-1)
    assert int(rows.sum()) <= max(1, int(max_flipped_rows * len(rows))), f"{int(rows.sum())} rows differ"
    assert bool((diff[rows] <= 2 * step.expand_as(diff)[rows] + tol).all()), "more than a rounding flip apart"


# -- the reference against hand-computed cases --------------------------------------------------------------

def test_activation_quant_hand_computed():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # row 0: s = 127 / 1; codes 127, -63.5 -> -64 (half to even), 31.75 -> 32, 0; the zero row stays zeros
    expected = torch.tensor([[127.0, -64.0, 32.0, 0.0], [0.0, 0.0, 0.0, 0.0]]) / 127.0
    expected[1] = 0.0
    assert torch.equal(ref.activation_quant(x), expected)
    codes, scale = quantize_activations(x)
    assert torch.equal(codes[0], torch.tensor([127.0, -64.0, 32.0, 0.0])) and codes[1].abs().sum() == 0
    assert torch.allclose(scale[:, 0], torch.tensor([127.0, 127.0 / 1e-5]))


def test_weight_quant_hand_computed():
    w = torch.tensor([[0.2, -0.4], [0.0, 0.05]])
    # mean |W| = 0.65 / 4 = 0.1625; W / 0.1625 = 1.23, -2.46, 0, 0.31 -> 1, -1 (clamped), 0, 0
    a = 0.1625
    assert torch.allclose(ref.weight_quant(w), torch.tensor([[a, -a], [0.0, 0.0]]))
    codes, scale = ternarize(w)
    assert codes.dtype == torch.int8 and torch.equal(codes, torch.tensor([[1, -1], [0, 0]], dtype=torch.int8))
    assert torch.allclose(scale, torch.tensor([a]))
    assert torch.equal(ternarize(torch.zeros(2, 2))[0], torch.zeros(2, 2, dtype=torch.int8))  # no 0 / 0


def test_recurrence_and_lower_bounds_hand_computed():
    i = torch.tensor([[[1.0], [2.0], [3.0]]])
    f = torch.tensor([[[0.5], [0.5], [1.0]]])
    out, last = ref.hgrn_loop(i, f, torch.zeros(1, 1))
    assert torch.equal(out.flatten(), torch.tensor([1.0, 2.5, 5.5])) and last.item() == 5.5
    out, last = hgrn_recurrent(i, f, torch.tensor([[2.0]]))  # h0 = 2: 2*0.5+1 = 2, 2*0.5+2 = 3, 3+3 = 6
    assert torch.equal(out.flatten(), torch.tensor([2.0, 3.0, 6.0]))

    from zoo.architectures.mmfree import MMfreeConfig, MMfreeLM

    model = MMfreeLM(MMfreeConfig(vocab_size=8, dim=2, n_layers=4, intermediate_size=4))
    with torch.no_grad():
        model.lower_bounds.zero_()  # softmax over 4 layers = 1/4 each: bounds 0, 1/4, 1/2, 3/4
    bounds = model.forget_lower_bounds(torch.float32)
    assert bounds[0] is None
    assert torch.allclose(torch.stack(bounds[1:])[:, 0], torch.tensor([0.25, 0.5, 0.75]))


# -- packing ---------------------------------------------------------------------------------------------

def test_ternary_packing_is_four_codes_per_byte_and_round_trips():
    # -1, 0, +1, +1 -> fields 0, 1, 2, 2 at bits 0, 2, 4, 6: 0 + 4 + 32 + 128
    assert pack_ternary(torch.tensor([[-1, 0, 1, 1]], dtype=torch.int8)).tolist() == [[164]]
    for in_f in (1, 4, 7, 130):
        codes = torch.randint(-1, 2, (5, in_f), dtype=torch.int8)
        packed = pack_ternary(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (5, -(-in_f // 4))
        assert torch.equal(unpack_ternary(packed, in_f), codes)


# -- the scan against the loop ---------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,D", [(1, 1, 3), (2, 7, 5), (3, 33, 16), (1, 64, 8)])
def test_parallel_scan_equals_the_loop(B, T, D):
    g = torch.Generator().manual_seed(T)
    i, f, h0 = torch.randn(B, T, D, generator=g), torch.rand(B, T, D, generator=g), torch.randn(B, D, generator=g)
    for start in (None, h0):
        expected, last = hgrn_recurrent(i, f, start)
        got, got_last = hgrn_scan(i, f, start)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5) and torch.allclose(got_last, last, atol=1e-5)
    state = h0.clone()
    assert torch.allclose(hgrn(i, f, state), hgrn_recurrent(i, f, h0)[0], atol=1e-5)
    assert torch.allclose(state, hgrn_recurrent(i, f, h0)[1], atol=1e-5)  # final state written in place


# -- Triton kernels under the interpreter ----------------------------------------------------------------

@pytest.mark.parametrize("B,T,D,block", [(1, 1, 8, 16), (2, 7, 130, 64), (3, 20, 257, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hgrn_triton_matches_the_loop(B, T, D, block, dtype):
    from zoo.architectures.kernels.hgrn_triton import hgrn_triton

    g = torch.Generator().manual_seed(D)
    i = torch.randn(B, T, D, generator=g).to(dtype)
    f = torch.rand(B, T, D, generator=g).to(dtype)
    h0 = torch.randn(B, D, generator=g)
    expected, last = hgrn_recurrent(i, f, h0)
    state = h0.clone()
    out = hgrn_triton(i, f, state, block_d=block)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), expected.float(), atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=1e-3)
    assert torch.allclose(state, last, atol=1e-6)


@pytest.mark.parametrize("M,K,N", [(1, 64, 64), (3, 37, 29), (20, 130, 70), (70, 96, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitlinear_triton_matches_the_reference_on_packed_weights(M, K, N, dtype):
    from zoo.architectures.kernels.bitlinear_triton import bitlinear_triton

    g = torch.Generator().manual_seed(M * K + N)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    norm_weight = torch.rand(K, generator=g) + 0.5
    codes, scale = ternarize(torch.randn(N, K, generator=g))
    y = bitlinear_triton(x, norm_weight, 1e-6, pack_ternary(codes), scale)
    assert y.dtype == dtype and y.shape == (M, N)
    expected = bitlinear_reference(x.float(), norm_weight, 1e-6, codes, scale)
    step = scale / quantize_activations(rms_norm(x, norm_weight, 1e-6))[1]
    assert_close_up_to_flips(y.float(), expected, step, tol=1e-5 if dtype == torch.float32 else 2e-3)


def test_bitlinear_triton_keeps_leading_dims_and_the_dispatch_uses_the_reference_on_cpu():
    from zoo.architectures.kernels.bitlinear_triton import bitlinear_triton

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, generator=g)
    norm_weight = torch.ones(40)
    codes, scale = ternarize(torch.randn(24, 40, generator=g))
    packed = pack_ternary(codes)
    y = bitlinear_triton(x, norm_weight, 1e-6, packed, scale)
    on_cpu = get_scheme("ternary").bitlinear(x, {"weight": packed, "weight_scale": scale}, norm_weight, 1e-6,
                                           40)  # CPU tensors: the dispatch picks the reference path
    assert y.shape == on_cpu.shape == (2, 3, 24)
    step = scale / quantize_activations(rms_norm(x, norm_weight, 1e-6))[1]
    assert_close_up_to_flips(y.reshape(6, 24), on_cpu.reshape(6, 24), step.reshape(6, 1))


def test_reference_bitlinear_is_the_published_formula():
    """zoo's BitLinear steps (codes, scales, integer-valued product) against the published one-liners."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 48, generator=g, dtype=torch.float64)
    w = torch.randn(12, 48, generator=g, dtype=torch.float64)
    nw = torch.rand(48, generator=g, dtype=torch.float64) + 0.5
    sd = {"p.weight": w, "p.norm.weight": nw}
    codes, scale = ternarize(w)
    assert torch.allclose(bitlinear_reference(x, nw, 1e-6, codes, scale), ref.bit_linear(x, sd, "p"), atol=1e-12)
