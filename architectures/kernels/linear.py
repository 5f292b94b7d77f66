"""Linear layers at inference on CPU: the decoders' projections through zoo's C++ kernels (`dense`), the vision
models' through oneDNN with the activation fused (`linear`).

    y = x W^T + b               dense(layer, x), dense_weight(x, weight, bias)

`dense` is what the decoder-only language models call for every projection and output head instead of
nn.Linear.__call__: where the dispatch picks one (dispatch.dense_kernel: CPU, inference, eager, float weight of
x's dtype) it runs zoo_cpu.dense_rows (few rows: decoding) or zoo_cpu.dense_widened (prefill of bf16 without
native bf16 instructions) from kernels/cpu_ext.py, else F.linear. A layer that is not a plain nn.Linear (a packed
quantised one), carries hooks (tensor parallelism's) or holds a tensor subclass is called as a module. Without
the library (ZOO_CPU_KERNELS=0, no compiler) everything is F.linear.

The vision models' oneDNN path:

    y = act(x W^T + b)          act: None or "gelu" (exact, erf)

oneDNN's matmul (torch.ops.mkldnn._linear_pointwise) applies GELU in the matmul's epilogue instead of a
second pass over the output, and runs faster than F.linear on the vision models' shapes: measured 1.2-3x
per matmul with the plain row-major weight the model already holds (fp32, 2 cores), so by default no copy
of any weight is made. The mode "pack" also packs each weight once into oneDNN's blocked layout
(torch.ops.mkldnn._reorder_linear_weight, the packing Inductor's freezing pass applies) for another 5-15%
at small batches, at the cost of a second copy of every weight: kept on the layer (not in its state dict),
keyed by the weight's storage and version counter, so a reloaded or modified weight is packed again.
The mode "off" turns the path off. The mode is a model's (zoo.load(onednn=...): `set_onednn`), else the
process's (ZOO_ONEDNN, read once by zoo.settings). It applies only to fp32 CPU tensors outside autograd and
outside torch.compile (the dispatch's EAGER; Inductor has its own); everywhere else it is F.linear (+ F.gelu).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module
from zoo.architectures.kernels import cpu_ext
from zoo.architectures.kernels.dispatch import DENSE_ROWS, EAGER, backend, dense_kernel

from zoo.settings import ONEDNN_MODES, SETTINGS

ACTIVATIONS = (None, "gelu")
_PACKED = "_zoo_onednn_weight"  # attribute of the nn.Linear holding (key, packed weight)
_MODE = "_zoo_onednn_mode"  # attribute of the nn.Linear holding its model's mode (set_onednn)


def onednn_mode(layer: nn.Module | None = None) -> str:
    """"off", "dense" (the default: the model's own weights) or "pack" (a packed second copy): the layer's model's
    (set_onednn), else the process's (zoo.settings: ZOO_ONEDNN)."""
    mode = (layer.__dict__.get(_MODE) if layer is not None else None) or SETTINGS.onednn
    return mode if onednn_available() else "off"


def set_onednn(module: nn.Module, mode: str) -> None:
    """Set the oneDNN mode of every linear layer of `module` (zoo.load(onednn=...)), over the process's."""
    if mode not in ONEDNN_MODES:
        raise ValueError(f"onednn={mode!r}: must be one of {', '.join(ONEDNN_MODES)}")
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.__dict__[_MODE] = mode
            if mode != "pack":
                sub.__dict__.pop(_PACKED, None)  # a packed copy no longer used


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _key(w: torch.Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        version = -1
    return (w.data_ptr(), version, w.dtype, w.shape)


def packed_weight(layer: nn.Linear) -> torch.Tensor:  # only in the "pack" mode
    """The layer's weight in oneDNN's blocked layout, packed on first use and again if the weight changed."""
    key = _key(layer.weight)
    cached = layer.__dict__.get(_PACKED)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach()))
        layer.__dict__[_PACKED] = cached
    return cached[1]


def _fast(layer: nn.Linear, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and layer.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
            and backend(x, has_kernel=False) == EAGER)


def _pointwise(*args) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(*args)


def linear(layer: nn.Linear, x: torch.Tensor, activation: str | None = None,
           bias: torch.Tensor | None | str = "layer") -> torch.Tensor:
    """act(x W^T + b) with the layer's weight; `bias` replaces the layer's bias when given (None: no bias)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    b = layer.bias if isinstance(bias, str) else bias
    mode = onednn_mode(layer)
    if mode != "off" and _fast(layer, x):
        weight = packed_weight(layer) if mode == "pack" else layer.weight
        return _pointwise(x, weight, b, activation or "none", [], "none" if activation == "gelu" else "")
    y = F.linear(x, layer.weight, b)
    return F.gelu(y) if activation == "gelu" else y


def gelu_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fc2(gelu(fc1(x))), the ViT feed-forward (zoo.architectures.layers.Mlp), through `linear`."""
    return linear(mlp.fc2, linear(mlp.fc1, x, "gelu"))


def _plain(layer: nn.Module) -> bool:
    """Whether calling `layer` is exactly F.linear(x, layer.weight, layer.bias): a plain nn.Linear, no hooks of its
    own or global ones (tensor parallelism redistributes through hooks), plain tensors (no DTensor)."""
    return (type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks
            and not _module._global_forward_hooks and not _module._global_forward_pre_hooks
            and type(layer.weight) in (nn.Parameter, torch.Tensor))


def dense(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a linear projection, through zoo's CPU kernels where the dispatch picks them."""
    if _plain(layer):
        return dense_weight(x, layer.weight, layer.bias)
    return layer(x)


def dense_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through zoo's CPU kernels where the dispatch picks them."""
    kernel = dense_kernel(x, weight) if weight.dim() == 2 and weight.is_contiguous() else None
    lib = cpu_ext.library() if kernel is not None else None
    if lib is None:
        return F.linear(x, weight, bias)
    n, k = weight.shape
    rows = x.reshape(-1, k)
    y = lib.dense_rows(rows, weight, bias) if kernel == DENSE_ROWS else lib.dense_widened(rows, weight, bias)
    return y.view(*x.shape[:-1], n)


@cpu_ext.fake("zoo_cpu::dense_rows")
def _dense_rows_fake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@cpu_ext.fake("zoo_cpu::dense_widened")
def _dense_widened_fake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                        block_rows: int = 0) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])
