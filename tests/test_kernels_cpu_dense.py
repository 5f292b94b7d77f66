"""zoo's C++ CPU kernel library (architectures/kernels/cpu_ext.py, csrc/): built once per instruction set into the
session's kernel cache (tests/conftest.py), loaded for the ISA ATen runs at, off with ZOO_CPU_KERNELS=0, a failed
build falls back (None) with one warning; its dense kernels equal F.linear in fp64 within fp32 rounding for odd
shapes, 1-9 rows and more, with and without bias, and trace with fake tensors. (Which build a forced
ATEN_CPU_CAPABILITY loads, and the routing: tests/test_kernels_dispatch.py.)"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from zoo.architectures.kernels import cpu_ext, dispatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library():
    lib = cpu_ext.library()
    assert lib is not None, "the CPU kernels did not build here (is a C++ compiler installed?)"
    return lib


def test_the_library_is_built_for_the_isa_aten_runs_at_and_cached_by_it():
    lib = library()
    isa = cpu_ext.build_isa(dispatch.cpu_isa())
    assert lib.build_isa() == isa
    path = cpu_ext.loaded_path()
    assert path.is_file() and path.parent.parent == cpu_ext.cache_root()
    assert f"-{isa}-" in path.parent.name


def test_zoo_cpu_kernels_0_turns_the_library_off(monkeypatch):
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    assert cpu_ext.library() is None


def test_a_failed_build_warns_once_and_gives_none(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_ext, "CSRC", tmp_path)
    monkeypatch.setattr(cpu_ext, "_loaded", {})
    monkeypatch.setattr(cpu_ext, "_warned", False)
    monkeypatch.setenv("ZOO_KERNELS_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="CPU kernels unavailable"):
        assert cpu_ext.library() is None
    assert cpu_ext.library() is None  # remembered: no second build, no second warning
    assert not list((tmp_path / "cache").glob("*/" + cpu_ext.LIBRARY_NAME))  # nothing half-built left as cached


# --- the dense kernels (csrc/dense.cpp) against F.linear in fp64 on the widened weights ---------------------------

# N odd, K not a multiple of any vector width; 517x300 is over the size split between threads, each thread's rows as
# long streams side by side with rows left over
SHAPES = [(37, 45), (129, 100), (64, 1000), (3, 7), (517, 300)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def reference(x, w, bias):
    """F.linear in fp64 on the widened tensors, and the bound its fp32-accumulated result may be off by: a
    multiple of fp32 rounding of the sum of |products| (plus the output's own rounding in x's dtype)."""
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    scale = F.linear(x.double().abs(), w.double().abs()) + (0 if bias is None else bias.double().abs())
    out_eps = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps
    return ref, 1e-6 * scale + out_eps * ref.abs() + 1e-12


def assert_close(y, x, w, bias):
    ref, bound = reference(x, w, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    excess = ((y.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"off by more than fp32 rounding: {excess}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_rows_equals_the_reference_for_1_to_9_rows(dtype, with_bias):
    lib = library()
    torch.manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k).to(dtype)
        bias = torch.randn(n).to(dtype) if with_bias else None
        for m in range(1, 10):
            x = torch.randn(m, k).to(dtype)
            assert_close(lib.dense_rows(x, w, bias), x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_widened_equals_the_reference_in_blocks_of_any_size(dtype):
    lib = library()
    torch.manual_seed(1)
    for n, k in SHAPES:
        w, bias = torch.randn(n, k).to(dtype), torch.randn(n)
        for m, block in ((17, 0), (64, 7), (5, 1000)):
            x = torch.randn(m, k).to(dtype)
            assert_close(lib.dense_widened(x, w, bias.to(dtype), block), x, w, bias.to(dtype))


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_dense_rows_takes_an_input_of_any_float_dtype_against_a_weight_of_any(x_dtype, w_dtype):
    """x is widened per call into the weight's line order (vectorised for bf16 on bf16 and the natural orders)."""
    lib = library()
    torch.manual_seed(2)
    w = torch.randn(33, 70).to(w_dtype)
    for m in (1, 3):
        x = torch.randn(m, 70).to(x_dtype)
        assert_close(lib.dense_rows(x, w, None), x, w, None)


def test_bad_shapes_and_dtypes_are_refused_by_name():
    lib = library()
    with pytest.raises(RuntimeError, match="dense_rows: x must be"):
        lib.dense_rows(torch.randn(2, 5), torch.randn(3, 6), None)
    with pytest.raises(RuntimeError, match="dense_widened: weight dtype"):
        lib.dense_widened(torch.randn(2, 5), torch.ones(3, 5, dtype=torch.int8), None)


def test_the_ops_trace_with_fake_tensors_into_compiled_graphs():
    lib = library()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = lib.dense_rows(torch.empty(3, 40, dtype=torch.bfloat16), torch.empty(11, 40, dtype=torch.bfloat16))
    assert y.shape == (3, 11) and y.dtype == torch.bfloat16

    def f(x, w):
        return lib.dense_rows(x, w, None).relu() + lib.dense_widened(x, w, None, 0)

    x, w = torch.randn(2, 40), torch.randn(11, 40)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), f(x, w))


FORCED = """
import torch
import torch.nn.functional as F
from zoo.architectures.kernels import cpu_ext
lib = cpu_ext.library()
worst = 0.0
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for n, k in ((37, 45), (129, 100), (64, 1000), (3, 7), (203, 1000), (517, 300)):
        w, bias = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
        for m in range(1, 10):
            x = torch.randn(m, k).to(dtype)
            ref = F.linear(x.double(), w.double(), bias.double())
            bound = 1e-6 * (F.linear(x.double().abs(), w.double().abs()) + bias.double().abs())
            bound += (0.0 if dtype == torch.float32 else torch.finfo(dtype).eps) * ref.abs() + 1e-12
            worst = max(worst, ((lib.dense_rows(x, w, bias).double() - ref).abs() - bound).max().item())
print(lib.build_isa(), torch.backends.cpu.get_cpu_capability(), worst)
"""


@pytest.mark.parametrize("capability,isa", [("avx2", "AVX2"), ("default", "DEFAULT")])
def test_the_forced_avx2_and_scalar_builds_of_dense_rows_equal_the_reference(capability, isa):
    """Each build has its own row kernel (AVX2: lines of W widened in registers; DEFAULT: at::vec's generic
    types); 203x1000 and 517x300 are over the size that runs on the calling thread alone, so threads split them, each
    thread's rows read as streams side by side (rows left over after whole steps included)."""
    library()  # the session's cache (tests/conftest.py) holds the native build; the forced one is built once
    result = subprocess.run([sys.executable, "-c", FORCED], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, timeout=600)
    assert result.returncode == 0, result.stderr
    built, aten, worst = result.stdout.split()
    assert built == isa and aten.upper() == isa
    assert float(worst) <= 0, f"off by more than fp32 rounding: {worst}"
