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
    """The dispatch picking Triton for CPU tensors (as it does for CUDA ones, where zoo's CPU ops never apply)."""
    for module in (rmsnorm, rotary, swiglu):
        monkeypatch.setattr(module, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(dispatch, "_DECODE_LIB", [None])  # (the kernels ask for the CPU ops first)


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


# --- dense linear layers on CPU: zoo's C++ kernels (kernels/cpu_ext.py) or F.linear ------------------------------

from zoo.architectures.kernels import cpu_ext, linear  # noqa: E402
from zoo.architectures.kernels.dispatch import DENSE_ROWS, DENSE_WIDENED, choose_dense  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dense_layers_take_the_row_kernel_for_few_rows_and_widening_for_bf16_prefill_without_native_bf16():
    for dtype in (F32, BF16, torch.float16):
        for rows in (1, 8, dispatch.DENSE_MAX_ROWS):
            assert choose_dense("cpu", dtype, dtype, rows, False, False, native=False) == DENSE_ROWS
            assert choose_dense("cpu", dtype, dtype, rows, False, False, native=True) == DENSE_ROWS
    assert choose_dense("cpu", BF16, BF16, 64, False, False, native=False) == DENSE_WIDENED  # AVX2: fp32 GEMM
    assert choose_dense("cpu", BF16, BF16, 64, False, False, native=True) is None  # oneDNN's bf16 is faster
    assert choose_dense("cpu", F32, F32, 64, False, False, native=False) is None  # fp32 GEMM is F.linear's own
    assert choose_dense("cuda", BF16, BF16, 1, False, False, native=False) is None
    assert choose_dense("cpu", BF16, BF16, 1, needs_grad=True, compiling=False, native=False) is None
    assert choose_dense("cpu", BF16, BF16, 1, False, compiling=True, native=False) == DENSE_ROWS  # opaque in a graph
    assert choose_dense("cpu", BF16, BF16, 64, False, compiling=True, native=False) is None  # Inductor's GEMM
    assert choose_dense("cpu", F32, BF16, 1, False, False, native=False) is None  # F.linear's dtype error stays
    assert choose_dense("cpu", torch.float64, torch.float64, 1, False, False, native=False) is None


PROBE = """
import json, torch, torch.nn.functional as F
from zoo.architectures.kernels import cpu_ext, dispatch, linear
torch.manual_seed(0)
errors = {}
with torch.inference_mode():
    for dtype in (torch.bfloat16, torch.float32):
        w, b = torch.randn(77, 130).to(dtype), torch.randn(77).to(dtype)
        for rows in (1, 3, 64):
            x = torch.randn(rows, 130).to(dtype)
            ref = F.linear(x.double(), w.double(), b.double())
            scale = 1e-6 * F.linear(x.double().abs(), w.double().abs()) + b.double().abs() + 1e-12
            tol = scale + (torch.finfo(dtype).eps if dtype != torch.float32 else 0) * ref.abs()
            excess = ((linear.dense_weight(x, w, b).double() - ref).abs() - tol).max().item()
            errors[f"{dtype}-{rows}"] = [dispatch.dense_kernel(x, w), excess]
lib = cpu_ext.library()
print(json.dumps(dict(isa=lib.build_isa(), path=str(cpu_ext.loaded_path()), native=dispatch.native_bf16(),
                      errors=errors)))
"""


def probe(**env) -> dict:
    import json

    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_process_forced_to_avx2_loads_the_avx2_build_routes_prefill_to_widening_and_matches():
    native = cpu_ext.library()
    assert native is not None, "the CPU kernels did not build here (is a C++ compiler installed?)"
    forced = probe(ATEN_CPU_CAPABILITY="avx2")
    assert forced["isa"] == "AVX2" and "-AVX2-" in os.path.basename(os.path.dirname(forced["path"]))
    assert forced["native"] is False
    assert forced["errors"]["torch.bfloat16-1"][0] == DENSE_ROWS
    assert forced["errors"]["torch.bfloat16-64"][0] == DENSE_WIDENED
    assert forced["errors"]["torch.float32-64"][0] is None
    here = probe()  # this process's own ISA: the build the session already made, from the same cache
    assert here["isa"] == native.build_isa() and here["path"] == str(cpu_ext.loaded_path())
    for run in (forced, here):
        assert all(excess <= 0 for _, excess in run["errors"].values()), run["errors"]


class Counting:
    """Stands for torch.ops.zoo_cpu: counts each dense op called, then runs it."""

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def __getattr__(self, name):
        op = getattr(self.lib, name)
        return lambda *a: self.calls.append(name) or op(*a)


def tiny_decoder(dtype: torch.dtype):
    from zoo.family import get_family

    torch.manual_seed(0)
    fam = get_family("qwen2")
    config = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                  rope_theta=10000.0, tie_embeddings=True, max_seq_len=256)
    model = fam.build(fam.config_from_dict(config)).eval()
    with torch.no_grad():  # large random weights: decisive greedy tokens
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1 if "embed" in name else 0.25)
    return model.to(dtype)


def greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens with the KV cache (a prefill of the prompt, then one-row steps), and the logits of each."""
    with torch.inference_mode():
        state = model.new_state(1, len(prompt) + steps)
        logits = [model(torch.tensor([prompt]), state=state, last_only=True)[:, -1]]
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[-1].argmax()))
            logits.append(model(torch.tensor([[tokens[-1]]]), state=state, last_only=True)[:, -1])
    return tokens, torch.cat(logits).float()


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_a_decoder_through_the_cpu_kernels_gives_the_fallbacks_tokens_and_logits(dtype, monkeypatch):
    """Every projection and the tied head of a decoder run zoo_cpu's kernels (counted), and give the greedy tokens
    and logits of the same model with the library off (ZOO_CPU_KERNELS=0: F.linear everywhere)."""
    model = tiny_decoder(dtype)
    prompt = list(range(3, 23))  # 20 tokens: a prefill above the row kernel's rows
    real = cpu_ext.library
    lib = real()
    assert lib is not None
    counting = Counting(lib)
    monkeypatch.setattr(cpu_ext, "library", lambda: counting)
    tokens, logits = greedy(model, prompt, 12)
    steps_calls = 12 * (2 * 4 + 1)  # each one-row step: q, k, v in one call, gate and up in one, o, down, the head
    assert counting.calls.count("dense_rows") + counting.calls.count("dense_rows_many") >= steps_calls
    assert counting.calls.count("dense_rows_many") >= 12 * 2 * 2
    if dtype == BF16 and not dispatch.native_bf16():
        assert "dense_widened" in counting.calls  # the prefill
    monkeypatch.setattr(cpu_ext, "library", real)
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    assert cpu_ext.library() is None
    ref_tokens, ref_logits = greedy(model, prompt, 12)
    assert tokens == ref_tokens
    tol = 1e-4 if dtype == F32 else 0.05 * ref_logits.abs().max().item()  # bf16: its own rounding of each layer
    assert max_abs_diff(logits, ref_logits) < tol


def test_layers_with_hooks_or_packed_weights_are_called_as_modules(monkeypatch):
    """A linear layer carrying a hook (tensor parallelism redistributes through them) or that is not a plain
    nn.Linear is called, never bypassed."""
    layer = torch.nn.Linear(8, 4)
    seen = []
    layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.inference_mode():
        linear.dense(layer, torch.randn(1, 8))
    assert seen == [(1, 4)]

    class Custom(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0

    with torch.inference_mode():
        assert torch.equal(linear.dense(Custom(8, 4), torch.randn(2, 8)), torch.zeros(2, 4))
