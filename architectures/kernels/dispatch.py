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
environment variable ATEN_CPU_CAPABILITY forces it) is read once here, so a per-ISA choice goes into `choose` too.

Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py sets it on a machine without a GPU) runs the Triton
kernels on CPU tensors when a test calls them directly; it never sends the product's CPU calls into Triton (that
would emulate every kernel in numpy). What the kernels themselves must do differently under it (`interpreted`)
is read here too, not in the kernels.
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON, COMPILED, EAGER = "triton", "compiled", "eager"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

HAS_TRITON = importlib.util.find_spec("triton") is not None  # without importing it: `import zoo` stays fast
CPU_ISA = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY)


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
    """The CPU's vector instruction set as ATen sees it (torch.backends.cpu.get_cpu_capability), read at import."""
    return CPU_ISA


def interpreted() -> bool:
    """Whether Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1), which multiplies bf16/fp16
    dot operands wrongly (numpy has no bf16): kernels then take tl.dot in fp32."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
