"""The published MatMul-free LM code (tests/vendor/matmulfreellm, ridgerchu/matmulfreellm @ a016f72) run on CPU as
the tests' oracle: its Triton kernels under Triton's interpreter, its PyTorch functions as they are.

The published files are unmodified; what they assume of a CUDA machine is supplied here, only while `cpu()` is
active, and each stand-in does what the CUDA original does:
  - `torch.empty(..., device="cuda")` (the norm kernels' mean / rstd buffers) allocates on the CPU;
    `torch.cuda.device(i)` is a no-op;
  - `tl.math.round` (libdevice roundf in the Triton the code was written for; neither in Triton 3 nor under its
    interpreter) is round-half-away-from-zero written with interpreter operations (roundf's definition);
  - `swiglu_fwd`, a CUDA jiterator kernel, evaluates its own code string `float(x) * float(y) / (1.0f +
    ::exp(-float(x)))` in float32 and casts back;
  - autotuning skips its timing runs (all configs compute the same values; the first one runs);
  - and one fix to the interpreter itself: it converts fp32 to bf16 by truncating the mantissa, where GPUs round
    to nearest even (cvt.rn.bf16.f32, as torch does); the conversion is torch's here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from unittest import mock

import torch

if not torch.cuda.is_available():  # the published kernels run under Triton's interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

VENDOR = Path(__file__).resolve().parent / "vendor" / "matmulfreellm"
if str(VENDOR) not in sys.path:
    sys.path.insert(0, str(VENDOR))

import mmfreelm.modules.activations as activations  # noqa: E402
from mmfreelm.models import HGRNBitConfig, HGRNBitForCausalLM  # noqa: E402
from mmfreelm.ops import fusedbitnet  # noqa: E402
from mmfreelm.ops.hgrn.naive import naive_recurrent_hgrn  # noqa: E402
from mmfreelm.ops.hgrn.recurrent_fuse import fused_recurrent_hgrn  # noqa: E402

__all__ = ["HGRNBitConfig", "HGRNBitForCausalLM", "cpu", "fusedbitnet", "fused_recurrent_hgrn", "greedy",
           "naive_recurrent_hgrn", "published_model"]


@triton.jit
def _roundf(x):
    t = tl.where(x >= 0, tl.floor(x), tl.ceil(x))
    return tl.where(tl.abs(x - t) >= 0.5, t + tl.where(x >= 0, 1.0, -1.0), t)


_empty = torch.empty


def _empty_here(*args, device=None, **kwargs):
    return _empty(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _swiglu_fwd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() * y.float() / (1.0 + torch.exp(-x.float()))).to(x.dtype)


_convert_float = interpreter._convert_float


def _convert_float_rtne(values, input_dtype, output_dtype, rounding_mode):
    if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
        rounded = torch.from_numpy(np.ascontiguousarray(values).view(np.float32)).to(torch.bfloat16)
        return rounded.view(torch.int16).numpy().view(np.uint16).reshape(values.shape)
    return _convert_float(values, input_dtype, output_dtype, rounding_mode)


@contextlib.contextmanager
def cpu():
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch, "empty", _empty_here))
        stack.enter_context(mock.patch.object(torch.cuda, "device", lambda index: contextlib.nullcontext()))
        stack.enter_context(mock.patch.object(tl.math, "round", _roundf, create=True))
        stack.enter_context(mock.patch.object(activations, "swiglu_fwd", _swiglu_fwd))
        stack.enter_context(mock.patch.object(interpreter, "_convert_float", _convert_float_rtne))
        stack.enter_context(mock.patch.object(
            Autotuner, "do_bench", property(lambda self: lambda fn, quantiles: [1.0] * len(quantiles))))
        yield


def published_model(state: dict[str, torch.Tensor], config: dict, dtype: torch.dtype) -> HGRNBitForCausalLM:
    """HGRNBitForCausalLM from the published config fields and state dict, in `dtype` (generate.py: .half())."""
    with cpu():
        model = HGRNBitForCausalLM(HGRNBitConfig(**config)).eval()
    model.load_state_dict(state)
    return model.to(dtype)


@torch.no_grad()
def greedy(model: HGRNBitForCausalLM, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens the way generate() feeds the published model: the prompt once, then one token a step with
    the recurrent cache it returns (the state handed back in the activation dtype). Also the logits of every
    step, [n, vocab] float32."""
    with cpu():
        out = model(torch.tensor([prompt]), use_cache=True)
        steps, tokens = [out.logits[0, -1].float()], []
        for _ in range(n):
            tokens.append(int(steps[-1].argmax()))
            if len(tokens) == n:
                break
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1].float())
    return tokens, torch.stack(steps)
