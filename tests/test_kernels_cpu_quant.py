"""zoo's C++ weight-only int8 / int4 CPU kernel (csrc/quant_linear.cpp, `zoo_cpu::quant_linear`) on the stored
codes of every int8 / int4 scheme: equal to the scheme's reference (dequantise, then multiply) for odd shapes, one
to nine rows (the matrix-vector kernel) and more (the dequantise-and-multiply blocks), grouped, per-row and affine
scales, with and without bias, fp32 / bf16 / fp16 activations; the same in a process forced to the AVX2 and the
scalar builds; an int4 layer keeps its stored form (no rearranged copy); the op is opaque in a compiled graph; a
tiny quantised Qwen2 gives the reference path's logits and greedy tokens, eagerly and compiled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from zoo.architectures.kernels import cpu_ext
from zoo.architectures.kernels.dequant_matmul import (
    act_quant_reference,
    act_quantize,
    cpu_quant_linear,
    fast_dequant_matmul,
)
from zoo.architectures.quant import PackedLinear, get_scheme

import zoo
from tests.helpers import converted_tiny_qwen2, max_abs_diff
from zoo.generation import Sampling, decode
from zoo.settings import SETTINGS, from_environ

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# scheme, out, in: per-row and grouped int8, GLM's signed-nibble int4 (per row, 2 groups), affine int4 groups;
# sizes that are not multiples of the vector width (tails inside each group) and outputs not multiples of anything
CASES = [
    ("int8-row", 37, 96),
    ("int8-row-g4", 19, 200),
    ("int4-row", 37, 96),
    ("int4-row-g2", 21, 68),
    ("int4-group32", 33, 160),
    ("int4-group128", 40, 256),
]


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def library():
    lib = cpu_ext.library()
    assert lib is not None, "the CPU kernels did not build here (is a C++ compiler installed?)"
    return lib


def packed(name, out_f, in_f, dtype=torch.float32):
    scheme = get_scheme(name)
    return scheme, scheme.pack(rand(out_f, in_f, seed=1, dtype=dtype) * 0.05)


def op(x, t, bits, bias=None, act=None):
    """The op as called directly; act=None leaves its act_quant argument to its default (off: weight-only)."""
    args = (x, t["weight"], t["weight_scale"], t.get("weight_zero"), bias, bits)
    return library().quant_linear(*args) if act is None else library().quant_linear(*args, act)


def bits_of(name):
    return 8 if name.startswith("int8") else 4


@pytest.mark.parametrize("name,out_f,in_f", CASES)
def test_quant_linear_equals_the_schemes_reference_fp32_for_one_to_nine_rows_and_prefill(name, out_f, in_f):
    scheme, t = packed(name, out_f, in_f)
    b = rand(out_f, seed=3)
    for rows in [*range(1, 10), 23]:  # 1..8: the matrix-vector kernel; 9 and 23: dequantised blocks + at::mm
        for bias in (None, b):
            x = rand(rows, in_f, seed=rows)
            y = op(x, t, bits_of(name), bias)
            assert y.shape == (rows, out_f) and y.dtype == torch.float32
            assert max_abs_diff(y, scheme.reference(x, t, bias)) < 1e-5, (rows, bias is None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,out_f,in_f", [CASES[0], CASES[3], CASES[5], ("int4-group64", 37, 192)])
def test_quant_linear_in_16_bits_is_the_exact_product_rounded_once(name, out_f, in_f, dtype):
    """16-bit activations and scales: the kernel multiplies the exact values in fp32 (bf16 int4 with groups of
    64 or more on AVX-512 BF16 CPUs: bf16 dot products, each product exact too; 37 outputs leave a remainder of the
    four rows it takes at once) and rounds the output once; the reference rounds the dequantised weight to 16 bits
    first, so the two differ by that rounding at most."""
    scheme, t = packed(name, out_f, in_f, dtype)
    for rows in (1, 3, 9, 17):
        x = rand(2, rows, in_f, seed=rows, dtype=dtype)
        y = op(x, t, bits_of(name))
        assert y.shape == (2, rows, out_f) and y.dtype == dtype
        exact = x.float() @ scheme.unpack(t, torch.float32).T
        step = 2**-7 if dtype == torch.bfloat16 else 2**-10
        bound = step * (x.float().abs() @ scheme.unpack(t, torch.float32).abs().T) + step * exact.abs() + 1e-6
        assert ((y.float() - exact).abs() <= bound).all(), rows
        assert max_abs_diff(y, scheme.reference(x, t, None)) < 0.05


# Qwen2-0.5B's rows, and weights large enough (> 128 KiB) to be split between threads, each thread's run read as
# several streams (leftover rows after them: output counts not multiples of 4)
BIG_CASES = [("int8-row", 301, 896), ("int4-group128", 603, 896)]
# ... and x's columns not a whole number of staging vectors (100: 8-column and 16-column steps, then 4 left; int4's
# per-group sums of x over 10 even and 10 odd columns: 8 in a vector, 2 left)
ACT_CASES = [*CASES, ("int4-group64", 37, 192), ("int8-row", 41, 896), ("int4-group128", 45, 896), *BIG_CASES,
             ("int8-row", 13, 100), ("int4-group20", 11, 100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,out_f,in_f", ACT_CASES)
def test_activation_quantised_rows_equal_their_reference(name, out_f, in_f, dtype):
    """act_quant=True, one to eight rows: x quantised per block exactly as act_quant_reference does, the integer
    dot products exact, so the two differ by fp32 rounding only (of sums as large as sum |x| |w|), plus the one
    rounding of a 16-bit output. Groups that are not whole blocks (int8-row-g4: 50 columns; int4-row-g2: 34;
    int4-group32: 32, half an int4 block) take the kernel's scalar blocks."""
    scheme, t = packed(name, out_f, in_f, dtype)
    b = rand(out_f, seed=3, dtype=dtype)
    w = scheme.unpack(t, torch.float32)
    step = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    for rows in range(1, 9):
        for bias in (None, b):
            x = rand(rows, in_f, seed=rows, dtype=dtype)
            y = op(x, t, bits_of(name), bias, act=True)
            assert y.shape == (rows, out_f) and y.dtype == dtype
            ref = act_quant_reference(x, t["weight"], t["weight_scale"], bits_of(name), bias, t.get("weight_zero"))
            exact = act_quant_reference(x.double(), t["weight"], t["weight_scale"], bits_of(name),
                                        None if bias is None else bias.double(), t.get("weight_zero"))
            mag = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
            assert ((y.double() - exact).abs() <= 1e-6 * mag + step * exact.abs()).all(), (rows, bias is None)
            # as close to the reference's rounding as the reference is to exact, but for fp32 sums on either side
            # of a 16-bit rounding boundary: one unit in the last place of the output (2 * step relative)
            assert ((y.double() - ref.double()).abs()
                    <= (ref.double() - exact).abs() + 1e-6 * mag + 2 * step * exact.abs()).all(), rows


def integer_prefill(t, isa):
    """Whether act_quant reaches many rows (9 and more) too: the integer GEMM of the SIMD builds, for groups of
    whole 32-byte blocks of codes; otherwise many rows keep the exact dequantise + at::mm path."""
    n, code_bytes = t["weight"].shape
    return isa in ("AVX2", "AVX512") and (code_bytes // t["weight_scale"].reshape(n, -1).shape[1]) % 32 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,out_f,in_f", ACT_CASES)
def test_activation_quantised_prefill_equals_its_reference(name, out_f, in_f, dtype):
    """act_quant=True, 9 to 64 rows (prefill): on the SIMD builds, groups of whole blocks, the integer GEMM,
    held to act_quant_reference row by row as the few-rows kernel is (the same integers; fp32 rounding, and the
    one rounding of a 16-bit output); otherwise the exact weight-only path, bit for bit."""
    scheme, t = packed(name, out_f, in_f, dtype)
    b = rand(out_f, seed=3, dtype=dtype)
    w = scheme.unpack(t, torch.float32)
    step = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    integer = integer_prefill(t, library().build_isa())
    for rows in (9, 23, 64):
        for bias in (None, b):
            x = rand(2, rows, in_f, seed=rows, dtype=dtype)
            y = op(x, t, bits_of(name), bias, act=True)
            assert y.shape == (2, rows, out_f) and y.dtype == dtype
            if not integer:
                assert torch.equal(y, op(x, t, bits_of(name), bias, act=False))
                continue
            exact = act_quant_reference(x.double(), t["weight"], t["weight_scale"], bits_of(name),
                                        None if bias is None else bias.double(), t.get("weight_zero"))
            mag = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
            assert ((y.double() - exact).abs() <= 1e-6 * mag + step * exact.abs()).all(), (rows, bias is None)


@pytest.mark.parametrize("name", ["int8-row", "int4-group128"])
def test_a_long_activation_quantised_prompt_takes_several_passes_and_equals_its_reference(name):
    """200 rows of 4864 columns: more quantised rows than one pass over the weight keeps in L2 (~384 KiB), so the
    integer GEMM runs them in passes; each row still equals act_quant_reference (fp32 rounding). A build without
    the integer GEMM (scalar) runs the exact path instead, bit for bit."""
    scheme, t = packed(name, 19, 4864)
    x = rand(200, 4864, seed=7)
    y = op(x, t, bits_of(name), act=True)
    if not integer_prefill(t, library().build_isa()):
        assert torch.equal(y, op(x, t, bits_of(name), act=False))
        return
    exact = act_quant_reference(x.double(), t["weight"], t["weight_scale"], bits_of(name), None, t.get("weight_zero"))
    mag = x.double().abs() @ scheme.unpack(t, torch.float32).double().abs().T
    assert ((y.double() - exact).abs() <= 1e-6 * mag).all()


@pytest.mark.parametrize("name,out_f,in_f", ACT_CASES)
def test_activation_quantised_rows_are_within_q8_0s_bound_of_the_weight_only_product(name, out_f, in_f):
    """Each activation moves by at most half its block's step, d / 2 = max|x over the block| / 254, so
    |y_act - y| <= sum_k |w[n, k]| max|x over k's block| / 254 (+ fp32 rounding); on Gaussian activations the
    error is about 0.5% of the output's size (0.3-0.6% measured; asserted: under 1.5% in RMS)."""
    scheme, t = packed(name, out_f, in_f)
    w = scheme.unpack(t, torch.float32).double()
    bits = bits_of(name)
    gs = in_f // t["weight_scale"].reshape(out_f, -1).shape[1]
    block = 32 * (2 if bits == 4 else 1)
    x = rand(8, in_f, seed=11)
    y_act, y = op(x, t, bits, act=True).double(), op(x, t, bits, act=False).double()
    _, d = act_quantize(x, in_f // gs, block)  # d per block: max|x| / 127
    step = torch.repeat_interleave(d.double(), block, dim=-1)[..., :gs].reshape(8, in_f)  # each column's d
    bound = (step / 2) @ w.abs().T
    assert ((y_act - y).abs() <= bound + 1e-5 * (x.double().abs() @ w.abs().T)).all()
    assert ((y_act - y).pow(2).mean() / y.pow(2).mean()).sqrt() < 0.015


def test_the_switch_off_is_the_weight_only_op_bit_for_bit(monkeypatch):
    """ZOO_QUANT_ACTIVATIONS=0 (SETTINGS.quant_activations False): cpu_quant_linear calls the op with act_quant
    off, which is the op's default and the weight-only kernel the reference tests above hold; on: the integers."""
    for name, out_f, in_f in CASES:
        scheme, t = packed(name, out_f, in_f, torch.bfloat16)
        x = rand(3, in_f, seed=4, dtype=torch.bfloat16)
        call = (x, t["weight"], t["weight_scale"], bits_of(name), None, t.get("weight_zero"))
        monkeypatch.setattr(SETTINGS, "quant_activations", False)
        assert torch.equal(cpu_quant_linear(*call), op(x, t, bits_of(name)))
        assert torch.equal(cpu_quant_linear(*call), op(x, t, bits_of(name), act=False))
        monkeypatch.setattr(SETTINGS, "quant_activations", True)
        assert torch.equal(cpu_quant_linear(*call), op(x, t, bits_of(name), act=True))
    assert from_environ({"ZOO_QUANT_ACTIVATIONS": "0"}).quant_activations is False
    assert from_environ({}).quant_activations is True


def test_cpu_dispatch_takes_the_kernel_for_any_rows_and_falls_back_without_it(monkeypatch):
    scheme, t = packed("int4-group32", 33, 160)
    x = rand(3, 160, seed=2)
    y = fast_dequant_matmul(x, t["weight"], t["weight_scale"], 4, None, t["weight_zero"])
    assert y is not None and torch.equal(y, op(x, t, 4, act=SETTINGS.quant_activations))
    assert cpu_quant_linear(x.requires_grad_(), t["weight"], t["weight_scale"], 4) is None  # no backward: PyTorch
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    assert cpu_quant_linear(x, t["weight"], t["weight_scale"], 4) is None
    assert torch.equal(scheme.linear(x.detach(), t, None), scheme.reference(x.detach(), t, None))


def test_an_int4_layer_keeps_its_stored_form_with_the_kernel():
    w, b, x = rand(64, 256, seed=1) * 0.05, rand(64, seed=2), rand(3, 256, seed=3)
    layer = PackedLinear(256, 64, True, "int4-group32", torch.bfloat16)
    for name, t in layer.scheme.pack(w.bfloat16()).items():
        setattr(layer, name, t)
    layer.bias = torch.nn.Parameter(b.bfloat16())
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x.bfloat16())
    assert layer.kernel == ()  # nothing rearranged: the kernel reads the stored nibbles
    assert all(torch.equal(stored[k], v) for k, v in layer.state_dict().items())
    assert max_abs_diff(y, layer.scheme.reference(x.bfloat16(), layer.packed(), layer.bias)) < 0.05


def test_the_op_is_one_opaque_node_of_a_compiled_graph():
    library()  # loaded (and its fake registered) before tracing, as a model's first eager call does
    scheme, t = packed("int8-row", 48, 64)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    f = torch.compile(lambda x: scheme.linear(x, t, None) * 2, backend=backend, fullgraph=True)
    x = rand(1, 64, seed=2)
    assert torch.equal(f(x), scheme.linear(x, t, None) * 2)  # the eager op, whichever arithmetic SETTINGS picks
    assert torch.ops.zoo_cpu.quant_linear in seen  # the op itself, not a decomposition of it


FORCED = """
import torch
from zoo.architectures.kernels import cpu_ext
from zoo.architectures.kernels.dequant_matmul import act_quant_reference
from zoo.architectures.quant import get_scheme
lib = cpu_ext.library()
worst = worst_act = 0.0
for name, out_f, in_f in {cases}:
    scheme = get_scheme(name)
    t = scheme.pack(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) * 0.05)
    b = torch.randn(out_f)
    bits = 8 if "int8" in name else 4
    code_bytes = in_f // (2 if bits == 4 else 1)
    whole = (code_bytes // t["weight_scale"].reshape(out_f, -1).shape[1]) % 32 == 0
    for rows in (1, 2, 3, 4, 5, 9, 23):
        x = torch.randn(rows, in_f)
        y = lib.quant_linear(x, t["weight"], t["weight_scale"], t.get("weight_zero"), b, bits)
        worst = max(worst, (y - scheme.reference(x, t, b)).abs().max().item())
        y = lib.quant_linear(x, t["weight"], t["weight_scale"], t.get("weight_zero"), b, bits, True)
        if rows <= 8 or (whole and lib.build_isa() != "DEFAULT"):  # the integer kernels (few rows; GEMM)
            ref = act_quant_reference(x, t["weight"], t["weight_scale"], bits, b, t.get("weight_zero"))
        else:  # many rows, scalar build or blocks that do not tile the groups: the exact path
            ref = scheme.reference(x, t, b)
        worst_act = max(worst_act, (y - ref).abs().max().item())
print(lib.build_isa(), torch.backends.cpu.get_cpu_capability(), worst, worst_act)
"""


@pytest.mark.parametrize("capability,isa", [("avx2", "AVX2"), ("default", "DEFAULT")])
def test_the_forced_avx2_and_scalar_builds_equal_the_reference(capability, isa):
    """Weight-only against the scheme's reference, activation-quantised against act_quant_reference (one to
    five rows: the integer kernels; 9 and 23: the AVX2 build's integer GEMM where groups are whole blocks, else
    the dequantised blocks, the same either way)."""
    library()  # the session's cache (tests/conftest.py) holds the native build; the forced one is built once
    result = subprocess.run([sys.executable, "-c", FORCED.format(cases=CASES + BIG_CASES)], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, timeout=300)
    assert result.returncode == 0, result.stderr
    built, aten, worst, worst_act = result.stdout.split()
    assert built == isa and aten.upper() == isa
    assert float(worst) < 1e-5 and float(worst_act) < 1e-5


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return converted_tiny_qwen2(tmp_path_factory.mktemp("qwen2"), tie=True)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantised_tiny_qwen2_gives_the_reference_paths_logits_and_tokens(qwen2, scheme, monkeypatch):
    """fp32: without the library every layer (and the int8 tied head) takes the scheme's reference. Weight-only
    (ZOO_QUANT_ACTIVATIONS=0): the reference's arithmetic, so the same tokens (activation-quantised decoding is
    held to its own reference and bound above, and to the compiled step's tokens below)."""
    library()
    monkeypatch.setattr(SETTINGS, "quant_activations", False)
    model = zoo.load(qwen2 / "native", dtype=torch.float32, quantize=scheme)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    rows = [[5, 17, 42, 7]]
    logits = model(ids)
    tokens = [int(t) for t in decode(model.module, rows, 12, Sampling(), set(), compile=False)]
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    assert max_abs_diff(logits, model(ids)) < 1e-4
    assert tokens == [int(t) for t in decode(model.module, rows, 12, Sampling(), set(), compile=False)]


@pytest.mark.parametrize("act", [True, False], ids=["act-quant", "weight-only"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_quantised_decoding_gives_the_eager_tokens(qwen2, scheme, act, monkeypatch):
    """With the switch on and off: the compiled step computes what the eager one does (the switch reaches the op
    as an argument read at each call; Dynamo guards on it, and each setting here starts from a clean cache)."""
    library()
    torch._dynamo.reset()
    monkeypatch.setattr(SETTINGS, "quant_activations", act)
    model = zoo.load(qwen2 / "native", dtype=torch.bfloat16, quantize=scheme)
    rows = [[5, 17, 42, 7]]
    eager = [int(t) for t in decode(model.module, rows, 10, Sampling(), set(), compile=False)]
    compiled = [int(t) for t in decode(model.module, rows, 10, Sampling(), set(), compile=True)]
    assert compiled == eager


def test_a_compiled_call_follows_the_switch_when_it_flips(monkeypatch):
    """No Dynamo reset between the settings: the compiled function's guard on SETTINGS.quant_activations sends
    each call to a graph traced with the current value, bit-for-bit the eager op with that argument."""
    library()
    scheme, t = packed("int8-row", 48, 256)
    x = rand(1, 256, seed=5)
    f = torch.compile(lambda x: scheme.linear(x, t, None) * 2, backend="eager", fullgraph=True)
    on, off = (op(x, t, 8, act=True) * 2, op(x, t, 8, act=False) * 2)
    assert not torch.equal(on, off)
    for act in (True, False, True):
        monkeypatch.setattr(SETTINGS, "quant_activations", act)
        assert torch.equal(f(x), on if act else off), act
        assert torch.equal(scheme.linear(x, t, None) * 2, on if act else off), act
