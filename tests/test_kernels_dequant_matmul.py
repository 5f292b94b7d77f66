"""Weight-only int8 / int4 matmul: the packing (nibble order, sign extension), quantisation error bounds, the
CPU matrix-vector form and the Triton kernels (run on CPU under TRITON_INTERPRET=1) against the reference, on
several shapes including ragged ones (outputs and inputs that are not multiples of the blocks, per-row and
grouped scales, with and without bias, one to nine rows of activations)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the launcher imports triton (conftest may set it too)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from zoo.architectures.kernels.dequant_matmul import (  # noqa: E402
    codes_of,
    dequant_matmul,
    dequant_matmul_reference,
    dequant_matvec,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from zoo.architectures.kernels.dequant_matmul_triton import dequant_matmul_triton  # noqa: E402

from tests.helpers import max_abs_diff  # noqa: E402


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_int4_packing_puts_even_columns_in_the_high_nibble_and_sign_extends():
    codes = torch.tensor([[1, -2, 7, -8], [-1, 0, 3, -7]], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed[0].tolist() == [0x1E, 0x78] and packed[1].tolist() == [0xF0, 0x39]
    assert torch.equal(unpack_int4(packed), codes)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # all 16 values in both nibbles
    assert torch.equal(unpack_int4(pack_int4(every)), every)
    assert torch.equal(unpack_int4(pack_int4(every).view(torch.int8)), every)  # the same bits stored as int8


def test_signed_byte_storage_gives_the_same_products():
    """quant.py's int4-row scheme stores the packed bytes as int8 with a 1-D per-row scale: same bits, same results."""
    q, scale = quantize(rand(37, 96, seed=1) * 0.05, 4)
    x = rand(2, 96, seed=2)
    expected = dequant_matmul_reference(x, q, scale, 4)
    q_signed, scale_1d = q.view(torch.int8), scale.reshape(-1)
    assert torch.equal(dequant_matmul_reference(x, q_signed, scale_1d, 4), expected)
    assert max_abs_diff(dequant_matvec(x[:1], q_signed, scale_1d, 4), expected[:1]) < 1e-5
    assert max_abs_diff(dequant_matmul_triton(x, q_signed, scale_1d, 4), expected) < 1e-5


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, None), (4, 32)])
def test_quantisation_error_is_at_most_half_a_step(bits, group):
    w = rand(24, 64) * 0.1
    q, scale = quantize(w, bits, group)
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert q.shape == (24, 64 // (2 if bits == 4 else 1)) and scale.shape == (24, 64 // (group or 64))
    codes = codes_of(q, bits)
    assert codes.abs().max().item() <= (7 if bits == 4 else 127)
    step = scale.float().repeat_interleave(group or 64, dim=1)
    assert ((dequantize(q, scale, bits) - w).abs() <= step / 2 + 1e-7).all()


def test_quantize_refuses_groups_that_do_not_divide_the_row():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize(rand(4, 48), 8, 32)
    with pytest.raises(ValueError, match="even"):
        quantize(rand(4, 30), 4, 15)


CASES = [  # bits, out, in, group, rows of x, bias
    (8, 37, 96, None, 1, False),
    (8, 64, 160, 32, 3, True),
    (4, 37, 96, 32, 1, True),
    (4, 50, 256, None, 2, False),
    (8, 45, 96, 48, 9, True),  # more rows than the matrix-vector kernel takes: the tiled kernel
    (4, 70, 64, 16, 9, False),
]


@pytest.mark.parametrize("bits,out_f,in_f,group,rows,bias", CASES)
def test_triton_kernel_matches_reference_fp32(bits, out_f, in_f, group, rows, bias):
    q, scale = quantize(rand(out_f, in_f, seed=1) * 0.05, bits, group)
    x = rand(rows, in_f, seed=2)
    b = rand(out_f, seed=3) if bias else None
    y = dequant_matmul_triton(x, q, scale, bits, b)
    expected = dequant_matmul_reference(x, q, scale, bits, b)
    assert y.shape == (rows, out_f) and y.dtype == torch.float32
    assert max_abs_diff(y, expected) < 1e-4


@pytest.mark.parametrize("rows", [1, 9])
def test_triton_kernel_bf16_within_weight_rounding(rows):
    """The kernel casts each dequantised weight to bf16 (the interpreter truncates: up to one bf16 step of the
    weight) and accumulates in fp32; the bound is that step summed over the row, plus the output's rounding."""
    q, scale = quantize(rand(40, 128, seed=1) * 0.05, 4, 32)
    x = rand(2, rows, 128, seed=2, dtype=torch.bfloat16)
    y = dequant_matmul_triton(x, q, scale, 4)
    assert y.shape == (2, rows, 40) and y.dtype == torch.bfloat16
    w = dequantize(q, scale, 4)
    exact = x.float() @ w.T
    bound = 2**-7 * (x.float().abs() @ w.abs().T) + 2**-7 * exact.abs() + 1e-6
    assert ((y.float() - exact).abs() <= bound).all()
    assert max_abs_diff(y, dequant_matmul_reference(x, q, scale, 4)) < 0.05


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, None), (4, 32)])
def test_cpu_matrix_vector_form_matches_reference(bits, group):
    q, scale = quantize(rand(33, 128, seed=1) * 0.05, bits, group)
    x, b = rand(1, 1, 128, seed=2), rand(33, seed=3)
    expected = dequant_matmul_reference(x, q, scale, bits, b)
    assert max_abs_diff(dequant_matvec(x, q, scale, bits, b), expected) < 1e-5
    assert max_abs_diff(dequant_matmul(x, q, scale, bits, b), expected) < 1e-5  # CPU dispatch, one row
    x3 = rand(3, 128, seed=4)
    assert torch.equal(dequant_matmul(x3, q, scale, bits), dequant_matmul_reference(x3, q, scale, bits))


def test_reference_is_an_ordinary_linear_on_the_dequantised_weight():
    q, scale = quantize(rand(16, 64, seed=1), 8)
    x = rand(5, 64, seed=2, dtype=torch.bfloat16)
    w = (q.float() * scale.float()).to(torch.bfloat16)
    assert torch.equal(dequant_matmul_reference(x, q, scale, 8), F.linear(x, w))
