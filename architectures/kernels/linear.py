"""Linear layers at inference on CPU through oneDNN, the activation fused.

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
from zoo.architectures.kernels.dispatch import EAGER, backend

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
