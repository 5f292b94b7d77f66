"""Weight-only int8 / int4 matmul on the tensors the product's own schemes pack (architectures/quant.py): the
quantisation error bounds, the CPU matrix-vector form, the CPU dispatch and the Triton kernels (run on CPU under
TRITON_INTERPRET=1) against each scheme's reference, on several shapes including ragged ones (outputs and inputs
that are not multiples of the blocks, per-row, grouped and affine scales, with and without bias, one to nine rows
of activations)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the launcher imports triton (conftest may set it too)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from zoo.architectures.kernels.dequant_matmul import dequant_matvec, fast_dequant_matmul  # noqa: E402
from zoo.architectures.kernels.dequant_matmul_triton import dequant_matmul_triton  # noqa: E402
from zoo.architectures.quant import get_scheme, unnibble  # noqa: E402

from tests.helpers import max_abs_diff  # noqa: E402


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def scheme_name(bits: int, in_f: int, group: int | None, affine: bool = False) -> str:
    if affine:
        return f"int4-group{group}"
    return f"int{bits}-row" + (f"-g{in_f // group}" if group else "")


def packed(bits, out_f, in_f, group=None, affine=False, seed=1):
    scheme = get_scheme(scheme_name(bits, in_f, group, affine))
    return scheme, scheme.pack(rand(out_f, in_f, seed=seed) * 0.05)


def triton(x, t, bits, bias=None):
    return dequant_matmul_triton(x, t["weight"], t["weight_scale"], bits, bias, t.get("weight_zero"))


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, None), (4, 32)])
def test_quantisation_error_is_at_most_half_a_step(bits, group):
    w = rand(24, 64) * 0.1
    scheme = get_scheme(scheme_name(bits, 64, group))
    t = scheme.pack(w)
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (24, 64 // (2 if bits == 4 else 1))
    codes = unnibble(t["weight"]) if bits == 4 else t["weight"]
    assert codes.abs().max().item() <= (7 if bits == 4 else 127)
    step = t["weight_scale"].float().reshape(24, -1).repeat_interleave(group or 64, dim=1)
    assert ((scheme.unpack(t, torch.float32) - w).abs() <= step / 2 + 1e-7).all()


def test_schemes_refuse_groups_that_do_not_divide_the_row():
    with pytest.raises(ValueError, match="not a multiple of 5 groups"):
        get_scheme("int8-row-g5").pack(rand(4, 48))
    with pytest.raises(ValueError, match="2 columns per byte"):
        get_scheme("int4-row").tensors(4, 31)


CASES = [  # bits, out, in, group, affine, rows of x, bias
    (8, 37, 96, None, False, 1, False),
    (8, 64, 160, 32, False, 3, True),
    (4, 37, 96, 32, False, 1, True),
    (4, 50, 256, None, False, 2, False),
    (8, 45, 96, 48, False, 9, True),  # more rows than the matrix-vector kernel takes: the tiled kernel
    (4, 70, 64, 16, False, 9, False),
    (4, 33, 64, 16, True, 1, True),  # affine int4 (a zero point per group), both kernels
    (4, 33, 64, 32, True, 9, False),
]


@pytest.mark.parametrize("bits,out_f,in_f,group,affine,rows,bias", CASES)
def test_triton_kernel_matches_the_schemes_reference_fp32(bits, out_f, in_f, group, affine, rows, bias):
    scheme, t = packed(bits, out_f, in_f, group, affine)
    x = rand(rows, in_f, seed=2)
    b = rand(out_f, seed=3) if bias else None
    y = triton(x, t, bits, b)
    expected = scheme.reference(x, t, b)
    assert y.shape == (rows, out_f) and y.dtype == torch.float32
    assert max_abs_diff(y, expected) < 1e-4


@pytest.mark.parametrize("rows", [1, 9])
def test_triton_kernel_bf16_within_weight_rounding(rows):
    """The kernel casts each dequantised weight to bf16 (the interpreter truncates: up to one bf16 step of the
    weight) and accumulates in fp32; the bound is that step summed over the row, plus the output's rounding."""
    scheme, t = packed(4, 40, 128, 32)
    x = rand(2, rows, 128, seed=2, dtype=torch.bfloat16)
    y = triton(x, t, 4)
    assert y.shape == (2, rows, 40) and y.dtype == torch.bfloat16
    w = scheme.unpack(t, torch.float32)
    exact = x.float() @ w.T
    bound = 2**-7 * (x.float().abs() @ w.abs().T) + 2**-7 * exact.abs() + 1e-6
    assert ((y.float() - exact).abs() <= bound).all()
    assert max_abs_diff(y, scheme.reference(x, t, None)) < 0.05


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, None), (4, 32)])
def test_cpu_matrix_vector_form_matches_the_reference(bits, group, monkeypatch):
    """Without zoo's C++ kernels (ZOO_CPU_KERNELS=0; tests/test_kernels_cpu_quant.py covers them)."""
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    scheme, t = packed(bits, 33, 128, group)
    q, scale = t["weight"], t["weight_scale"]
    x, b = rand(1, 1, 128, seed=2), rand(33, seed=3)
    expected = scheme.reference(x, t, b)
    assert max_abs_diff(dequant_matvec(x, q, scale, bits, b), expected) < 1e-5
    assert max_abs_diff(scheme.linear(x, t, b), expected) < 1e-5  # through the CPU dispatch, one row
    x3 = rand(3, 128, seed=4)
    assert fast_dequant_matmul(x3, q, scale, bits) is None  # several rows on CPU: the reference is the kernel
    assert torch.equal(scheme.linear(x3, t, None), scheme.reference(x3, t, None))


def test_one_bf16_row_on_cpu_runs_atens_int8_kernel_equal_to_the_reference(monkeypatch):
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")  # aten's kernel is the fallback of zoo's own
    scheme, t = packed(8, 48, 64)
    t = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.items()}
    x = rand(1, 64, seed=2, dtype=torch.bfloat16)
    y = fast_dequant_matmul(x, t["weight"], t["weight_scale"], 8)
    assert y is not None and y.dtype == torch.bfloat16
    assert max_abs_diff(y, scheme.reference(x, t, None)) < 1e-2


def test_reference_is_an_ordinary_linear_on_the_dequantised_weight():
    scheme = get_scheme("int8-row")
    t = scheme.pack(rand(16, 64, seed=1))
    x = rand(5, 64, seed=2, dtype=torch.bfloat16)
    w = (t["weight"].float() * t["weight_scale"].float()[:, None]).to(torch.bfloat16)
    assert torch.equal(scheme.reference(x, t, None), F.linear(x, w))
