"""Which implementation of a kernel runs for a call: the one place that decides.

Every kernel module of this package has a plain PyTorch reference and may have a Triton kernel beside it
(`<op>_triton.py`); each asks `backend(...)` with the tensors of the call and gets one of

    TRITON    the Triton kernel: CUDA tensors of a dtype the kernels take (fp32, bf16, fp16), outside autograd
              (the kernels have no backward), with triton installed; inside torch.compile too (Dynamo traces
              user Triton kernels)
    COMPILED  inside a torch.compile graph on any other device: the form Inductor fuses best (on CPU the
              multiply-and-reduce matrix-vector forms of matvec.py and dequant_matmul.py)
    EAGER     the PyTorch reference, or a CPU library kernel (aten's int8 / int4, oneDNN) chosen by the op

`choose` is the decision itself, a pure function of those facts (the tests walk it); `backend` gathers them
from a call. The CPU's vector instruction set (`cpu_isa`, what ATen dispatches its own CPU kernels on; the
environment variable ATEN_CPU_CAPABILITY forces it) is read once (by cpu_ext.py, which builds zoo's C++ kernels for
it), so a per-ISA choice goes into `choose` too.

Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py sets it on a machine without a GPU) runs the Triton
kernels on CPU tensors when a test calls them directly; it never sends the product's CPU calls into Triton (that
would emulate every kernel in numpy). What the kernels themselves must do differently under it (`interpreted`)
is read here too, not in the kernels.

Dense linear layers on CPU (`dense_kernel`, `choose_dense`): at inference, a float weight of the input's dtype
takes zoo's C++ kernels (kernels/cpu_ext.py, built once per instruction set): `DENSE_ROWS` for a few rows
(decoding: one pass over the weight for all rows, near a plain read of it), eagerly and inside a compiled decoding
step alike, `DENSE_WIDENED` for many rows of a bf16/fp16 weight on a CPU without native bf16 arithmetic (the
weight widened to fp32 in cached blocks, fp32 GEMM), eagerly; None keeps torch's F.linear: on GPUs, under
autograd, for many rows inside torch.compile, for many rows of fp32, and for many rows of bf16 where oneDNN has
AVX-512 BF16 or AMX (faster than widening, measured).

The fused CPU decode ops (csrc/decode_ops.cpp: rms_norm, add_rms_norm, rotary, silu_mul, attention, argmax; called
by rmsnorm.py, rotary.py, swiglu.py, matvec.py, argmax.py): `cpu_decode_ops` is the library where a call takes
them (CPU, no gradient; eager, or inside a compiled graph for the ops a caller marks `in_graph`), else None; each
caller then checks the shapes and dtypes its op takes.

Inside a compiled decoding step on CPU zoo's ops stay in the graph as opaque calls where Inductor's own code is
slower: the matrix-vector products (dense rows and the quantised linears, each one pass over its weight), the
one-query attention over the cache (Inductor's fused loops over every cache slot: ~0.5 ms a layer against ~30 us)
and the argmax over the vocabulary; Inductor fuses the elementwise ops around them (norms, rotary, SwiGLU) into
its own loops. So the compiled step runs the eager step's kernels without its Python between them (measured on an
AVX2 EPYC, BENCHMARKS.md: 0.54-0.72x the eager step with Inductor's own matrix-vector code, above it with these).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from zoo.architectures.kernels import cpu_ext

TRITON, COMPILED, EAGER = "triton", "compiled", "eager"
DENSE_ROWS, DENSE_WIDENED = "dense_rows", "dense_widened"  # ops of zoo_cpu (csrc/dense.cpp)
DENSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DENSE_MAX_ROWS = 8  # rows up to which one pass over the weight beats a GEMM (measured up to 8, AVX-512 BF16 and AVX2)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the fused CPU decode ops take

HAS_TRITON = importlib.util.find_spec("triton") is not None  # without importing it: `import zoo` stays fast
CPU_ISA = cpu_ext.CPU_ISA  # "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY): read once, by cpu_ext


def choose(device: str, dtype: torch.dtype, needs_grad: bool, compiling: bool, has_kernel: bool = True,
           has_triton: bool = HAS_TRITON) -> str:
    """TRITON, COMPILED or EAGER for a call on `device` ("cuda", "cpu", ...) in `dtype`; `has_kernel`: whether the
    op has a Triton kernel at all."""
    if has_kernel and has_triton and device == "cuda" and dtype in TRITON_DTYPES and not needs_grad:
        return TRITON
    return COMPILED if compiling else EAGER


def backend(*tensors: torch.Tensor, has_kernel: bool = True) -> str:
    """The implementation for a call on `tensors` (the first one's device and dtype decide; any that needs a
    gradient keeps it in PyTorch)."""
    x = tensors[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return choose(x.device.type, x.dtype, needs_grad, torch.compiler.is_compiling(), has_kernel)


def use_triton(*tensors: torch.Tensor) -> bool:
    return backend(*tensors) == TRITON


def cpu_isa() -> str:
    """The CPU's vector instruction set as ATen sees it (torch.backends.cpu.get_cpu_capability), read at import
    (cpu_ext.CPU_ISA: the one the library is built for)."""
    return CPU_ISA


def interpreted() -> bool:
    """Whether Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1), which multiplies bf16/fp16
    dot operands wrongly (numpy has no bf16): kernels then take tl.dot in fp32."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def native_bf16(isa: str | None = None) -> bool:
    """Whether torch's own bf16 matmul runs on native bf16 instructions (AVX-512 BF16 or AMX, through oneDNN) at the
    instruction set ATen runs at; a forced ATEN_CPU_CAPABILITY=avx2 counts as an AVX2 machine (no)."""
    if (isa or CPU_ISA) not in ("AVX512", "AVX512_BF16", "AVX512_VNNI", "AVX512_AMX", "AVX512_FP16"):
        return False
    return _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def choose_dense(device: str, x_dtype: torch.dtype, w_dtype: torch.dtype, rows: int, needs_grad: bool,
                 compiling: bool, native: bool) -> str | None:
    """DENSE_ROWS, DENSE_WIDENED or None (torch's F.linear) for a linear layer's call: `rows` of x (all leading
    dims), `native`: native_bf16()."""
    if device != "cpu" or needs_grad or x_dtype != w_dtype or w_dtype not in DENSE_DTYPES:
        return None
    if rows <= DENSE_MAX_ROWS:  # (eager or compiled: an opaque op in the graph, see the module docstring)
        return DENSE_ROWS
    if compiling:
        return None
    if w_dtype != torch.float32 and not native:
        return DENSE_WIDENED
    return None


def dense_kernel(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The dense kernel for F.linear(x, weight) at this call (choose_dense from the tensors), None: F.linear."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return choose_dense(x.device.type, x.dtype, weight.dtype, rows, needs_grad, torch.compiler.is_compiling(),
                        _NATIVE_BF16)


_NATIVE_BF16 = native_bf16()


_DECODE_LIB: list = []  # [torch.ops.zoo_cpu or None]: looked up on the first call, not at every one


def cpu_decode_ops(*tensors: torch.Tensor, in_graph: bool = False):
    """torch.ops.zoo_cpu where a call on `tensors` takes zoo's fused C++ decode ops (csrc/decode_ops.cpp), else None:
    CPU tensors, no gradient needed (the ops have no backward), outside torch.compile unless the caller's op is
    worth keeping in a compiled graph (`in_graph`: attention, argmax; Inductor fuses the elementwise references
    better than an opaque op between them), the library available. Runs ~150 times per token: no environment read
    after the first call (ZOO_CPU_KERNELS is honoured as it was then; the ops equal the references, so a later
    change is moot)."""
    x = tensors[0]
    if x.device.type != "cpu" or (torch.compiler.is_compiling() and not in_graph):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if not _DECODE_LIB:
        _DECODE_LIB.append(cpu_ext.library())
    return _DECODE_LIB[0]
