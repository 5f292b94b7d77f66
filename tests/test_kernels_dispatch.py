"""The one kernel dispatch (architectures/kernels/dispatch.py): which implementation runs for a device, dtype,
autograd, torch.compile, Triton's interpreter and the CPU's instruction set, and that the decoder layers reach
the Triton kernels through it (run on CPU under TRITON_INTERPRET=1 by forcing the choice)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the launchers import triton (conftest may set it too)

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from zoo.architectures.kernels import dispatch, rmsnorm, rotary, swiglu  # noqa: E402
from zoo.architectures.kernels.dispatch import COMPILED, EAGER, TRITON, backend, choose  # noqa: E402

from tests.helpers import max_abs_diff  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_tensors_at_inference_take_triton_in_its_dtypes(dtype):
    assert choose("cuda", dtype, needs_grad=False, compiling=False, has_triton=True) == TRITON
    assert choose("cuda", dtype, needs_grad=False, compiling=True, has_triton=True) == TRITON  # Dynamo traces it


def test_what_the_triton_kernels_cannot_serve_takes_pytorch():
    f32 = torch.float32
    assert choose("cuda", torch.float64, False, False, has_triton=True) == EAGER  # fp64: the tests' exact checks
    assert choose("cuda", f32, needs_grad=True, compiling=False, has_triton=True) == EAGER  # no backward
    assert choose("cuda", f32, False, False, has_triton=False) == EAGER  # triton not installed
    assert choose("cuda", f32, False, True, has_kernel=False, has_triton=True) == COMPILED  # an op without one
    assert choose("cpu", f32, False, False, has_triton=True) == EAGER
    assert choose("cpu", f32, False, True, has_triton=True) == COMPILED
    assert choose("mps", torch.float16, False, False, has_triton=True) == EAGER


def test_the_interpreter_never_sends_cpu_calls_into_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.interpreted()
    x = torch.randn(2, 8)
    assert backend(x, torch.ones(8)) == EAGER
    assert not dispatch.use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.interpreted()


def test_backend_sees_autograd_and_torch_compile():
    w = torch.ones(4, requires_grad=True)
    assert backend(torch.randn(4), w) == EAGER
    seen = []

    def f(x):
        seen.append(backend(x))
        return x + 1

    torch.compile(f, backend="eager", fullgraph=True)(torch.randn(3))
    assert seen == [COMPILED]


def test_the_cpu_instruction_set_is_atens_and_can_be_forced():
    assert dispatch.cpu_isa() == torch.backends.cpu.get_cpu_capability()
    code = ("from zoo.architectures.kernels import dispatch; import torch; "
            "print(dispatch.cpu_isa(), dispatch.backend(torch.ones(2)))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["DEFAULT", EAGER]


def force_triton(monkeypatch):
    for module in (rmsnorm, rotary, swiglu):
        monkeypatch.setattr(module, "use_triton", lambda *tensors: True)


def test_decoder_layers_run_the_triton_kernels_where_the_dispatch_picks_them(monkeypatch):
    """RMSNorm, the attention's rotary embedding and the gated MLP call the Triton kernels through the dispatch
    (forced here on CPU, under the interpreter), and give the reference's numbers."""
    from zoo.architectures.kernels import rmsnorm_triton, rotary_triton, swiglu_triton
    from zoo.architectures.layers import Attention, GatedMLP, RMSNorm, Rotary

    torch.manual_seed(0)
    norm, mlp = RMSNorm(32), GatedMLP(32, 48)
    attn = Attention(32, n_heads=4, n_kv_heads=2, head_dim=8, qkv_bias=True, layer=0)
    x = torch.randn(2, 5, 32)
    cos, sin = Rotary(8, 10000.0)(torch.arange(5)[None].expand(2, 5), torch.float32, 5)
    with torch.no_grad():
        norm.weight.normal_()
        reference = norm(x), mlp(x), attn(x, cos, sin, None, None)
        calls = []  # each Triton launcher, wrapped to record that it ran
        for module, name in ((rmsnorm_triton, "rms_norm_triton"), (rotary_triton, "apply_rotary_triton"),
                             (swiglu_triton, "silu_mul_triton")):
            kernel = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
        force_triton(monkeypatch)
        through_triton = norm(x), mlp(x), attn(x, cos, sin, None, None)
    assert sorted(set(calls)) == ["apply_rotary_triton", "rms_norm_triton", "silu_mul_triton"]
    assert calls.count("apply_rotary_triton") == 2  # queries and keys
    assert torch.equal(through_triton[0], rmsnorm_triton.rms_norm_triton(x, norm.weight, norm.eps))
    for a, b in zip(through_triton, reference):
        assert max_abs_diff(a, b) < 1e-5
