"""Linear layers at inference on CPU: the decoders' projections through zoo's C++ kernels (`dense`), the vision
models' through oneDNN with the activation fused (`linear`).

    y = x W^T + b               dense(layer, x), dense_weight(x, weight, bias)
    [x W_i^T + b_i]             dense_many(layers, x)     (q, k and v; gate and up: one C++ call for all)

`dense` is what the decoder-only language models call for every projection and output head instead of
nn.Linear.__call__: where the dispatch picks one (dispatch.dense_kernel: CPU, inference, float weight of x's dtype)
it runs zoo_cpu.dense_rows (few rows: decoding, eager or in a compiled step) or zoo_cpu.dense_widened (eager
prefill of bf16 without native bf16 instructions) from kernels/cpu_ext.py, else F.linear. A layer that is not a
plain nn.Linear (a packed quantised one) runs its own forward, directly where no hook applies; one that carries
hooks (tensor parallelism's) is called as a module, and an nn.Linear holding a tensor subclass (a DTensor) runs
F.linear. Without the library (ZOO_CPU_KERNELS=0, no compiler) everything is F.linear.

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

from collections.abc import Sequence

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


def _calls_forward(layer: nn.Module) -> bool:
    """Whether `layer(x)` is exactly `layer.forward(x)`: Module.__call__'s own shortcut (no hook of the layer's or a
    global one: tensor parallelism redistributes through hooks; not compiled as a module, not traced by JIT)."""
    return not (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                or layer._backward_pre_hooks or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks
                or layer._compiled_call_impl is not None or torch._C._get_tracing_state())


def dense(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a linear projection, through zoo's CPU kernels where the dispatch picks them. A plain nn.Linear
    holding plain tensors (no DTensor) is F.linear with its weight (`dense_weight`); any other layer without hooks
    runs its forward directly (a packed one: its scheme's kernel), skipping Module.__call__ (~2 us a call)."""
    if not _calls_forward(layer):
        return layer(x)
    if type(layer) is nn.Linear:
        params = layer._parameters  # (no Module.__getattr__ per lookup: this runs ~170 times a token)
        weight = params["weight"]
        if type(weight) in (nn.Parameter, torch.Tensor):
            return dense_weight(x, weight, params["bias"])
    return layer.forward(x)


def dense_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through zoo's CPU kernels where the dispatch picks them."""
    kernel = dense_kernel(x, weight) if weight.dim() == 2 and weight.is_contiguous() else None
    lib = cpu_ext.library() if kernel is not None else None
    if lib is None:
        return F.linear(x, weight, bias)
    op = lib.dense_rows if kernel == DENSE_ROWS else lib.dense_widened
    if x.dim() == 2:  # (the ops take rows: no reshape and view around them)
        return op(x, weight, bias)
    n, k = weight.shape
    return op(x.reshape(-1, k), weight, bias).view(*x.shape[:-1], n)


def dense_many(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """[dense(layer, x) for layer in layers] for projections that read the same x (q, k and v; gate and up), in one
    C++ call where that is what each would run: plain nn.Linears whose kernel is zoo_cpu::dense_rows (one
    zoo_cpu::dense_rows_many call), layers of one class that runs several at once (`forward_many`: a packed layer,
    quant.PackedLinear), none with hooks; else one by one. The same numbers either way (the same kernel for each)."""
    kind = type(layers[0])
    if all(type(layer) is kind and _calls_forward(layer) for layer in layers):
        if kind is nn.Linear:
            ys = _dense_rows_many(layers, x)
            if ys is not None:
                return ys
        elif hasattr(kind, "forward_many"):
            return kind.forward_many(layers, x)
    return [dense(layer, x) for layer in layers]


def _dense_rows_many(layers: Sequence[nn.Linear], x: torch.Tensor) -> list[torch.Tensor] | None:
    """The plain nn.Linears' outputs for x by zoo_cpu::dense_rows_many, or None where one of them would not run
    zoo_cpu::dense_rows (dense_weight's decision, weight by weight)."""
    weights, biases = [], []
    for layer in layers:
        params = layer._parameters
        weight = params["weight"]
        if (type(weight) not in (nn.Parameter, torch.Tensor) or weight.dim() != 2 or not weight.is_contiguous()
                or dense_kernel(x, weight) != DENSE_ROWS):
            return None
        weights.append(weight)
        biases.append(params["bias"])
    lib = cpu_ext.library()
    if lib is None:
        return None
    if x.dim() == 2:
        return lib.dense_rows_many(x, weights, biases)
    ys = lib.dense_rows_many(x.reshape(-1, x.shape[-1]), weights, biases)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


@cpu_ext.fake("zoo_cpu::dense_rows")
def _dense_rows_fake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@cpu_ext.fake("zoo_cpu::dense_widened")
def _dense_widened_fake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                        block_rows: int = 0) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@cpu_ext.fake("zoo_cpu::dense_rows_many")
def _dense_rows_many_fake(x: torch.Tensor, ws: list[torch.Tensor], biases: list[torch.Tensor | None]
                          ) -> list[torch.Tensor]:
    return [x.new_empty(x.shape[0], w.shape[0]) for w in ws]
