"""Linear layers at inference on CPU through oneDNN with the weight packed once, the activation fused.

    y = act(x W^T + b)          act: None or "gelu" (exact, erf)

PyTorch's F.linear on CPU re-reads W in its plain row-major layout on every call; oneDNN's matmul runs
faster from its own blocked layout (torch.ops.mkldnn._reorder_linear_weight, the packing Inductor's
freezing pass applies), and applies GELU in the matmul's epilogue instead of a second pass over the output.
Measured on the vision models' shapes (benchmarks/bench_vision.py): about 1.2x per matmul, fp32.

`linear` packs a layer's weight on its first call and keeps the packed copy on the layer (not in its
state dict; it costs one more copy of the weight), keyed by the weight's storage and version counter, so a
reloaded or modified weight is packed again. It takes this path only for fp32 CPU tensors outside autograd
and outside torch.compile (Inductor packs by itself); everywhere else it is F.linear (+ F.gelu).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = (None, "gelu")
_PACKED = "_zoo_onednn_weight"  # attribute of the nn.Linear holding (key, packed weight)


def onednn_available() -> bool:
    return (os.environ.get("ZOO_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _key(w: torch.Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        version = -1
    return (w.data_ptr(), version, w.dtype, w.shape)


def packed_weight(layer: nn.Linear) -> torch.Tensor:
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
            and not torch.compiler.is_compiling() and onednn_available())


def linear(layer: nn.Linear, x: torch.Tensor, activation: str | None = None,
           bias: torch.Tensor | None | str = "layer") -> torch.Tensor:
    """act(x W^T + b) with the layer's weight; `bias` replaces the layer's bias when given (None: no bias)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    b = layer.bias if isinstance(bias, str) else bias
    if _fast(layer, x):
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight(layer), b, activation or "none", [],
                                                  "none" if activation == "gelu" else "")
    y = F.linear(x, layer.weight, b)
    return F.gelu(y) if activation == "gelu" else y


def gelu_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fc2(gelu(fc1(x))), the ViT feed-forward (zoo.architectures.layers.Mlp), through `linear`."""
    return linear(mlp.fc2, linear(mlp.fc1, x, "gelu"))
