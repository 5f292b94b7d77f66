"""The greedy pick of a decoding step: the index of the largest logit over the vocabulary, as torch.argmax(x, -1)
(the first index of the maximum; the first NaN if there is one, torch ordering NaN above every number).

torch's argmax over a bf16 row of Qwen2's 151936 logits takes ~1 ms on an AVX2 CPU (a scalar reduction): as much as
a whole layer's small ops. zoo's C++ op (zoo_cpu::argmax_last, csrc/decode_ops.cpp: the maximum in one vectorised
pass, then the first index holding it) takes tens of microseconds and returns the same index (Inductor's fused
argmax in a compiled step ~0.5 ms). `argmax_last` runs it for CPU tensors at inference, eager or compiled (dispatch
as for the other decode ops, kernels/dispatch.py `cpu_decode_ops`), torch.argmax everywhere else.
zoo/generation.py's greedy sampling and compiled decoding step call it.
"""

from __future__ import annotations

import torch
from zoo.architectures.kernels import cpu_ext
from zoo.architectures.kernels.dispatch import DECODE_DTYPES, cpu_decode_ops


@cpu_ext.fake("zoo_cpu::argmax_last")
def _argmax_last_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.long)


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1): zoo's C++ op on CPU at inference (a compiled step's too), else torch's."""
    lib = cpu_decode_ops(x, in_graph=True)
    if lib is not None and x.dtype in DECODE_DTYPES and x.dim() > 0 and x.shape[-1] > 0:
        return lib.argmax_last(x)
    return x.argmax(-1)
