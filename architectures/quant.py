"""Packed weights: a linear layer whose weight is stored as low-bit integers with their scales.

GLM-130B's published INT8/INT4 checkpoints, MatMul-free LM's ternary weights and weight-only int8/int4
for any language model are one idea, built once here:

    Scheme        how a [out, in] weight is stored (names, shapes, dtypes), packed, unpacked and multiplied
    PackedLinear  nn.Linear's stand-in; its stored tensors are buffers named by the scheme
    pack_linears  swaps nn.Linear modules for PackedLinear (on the meta device, before weights are assigned)

The native config records {"scheme": name, "modules": [paths]} (NativeConfig.quantization), so loading
rebuilds the packed modules without guessing. Each scheme's `linear` is the plain reference (dequantise,
then multiply); a scheme may route to a fused or library kernel where one pays.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

TensorPlan = dict[str, tuple[tuple[int, ...], torch.dtype | None]]  # name -> (shape, dtype; None = float)


class Scheme:
    """How one weight matrix is stored packed. Subclasses define the layout; `linear` may be overridden."""

    name = ""

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        raise NotImplementedError

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight the packed tensors stand for, in `dtype`."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.unpack(t, x.dtype), bias)


class RowwiseInt(Scheme):
    """Symmetric integers with one scale per output row: w ~ q * scale[row], scale = max|w[row]| / qmax.

    This is GLM-130B's weight-only scheme (docs/quantization.md) and the usual int8 weight-only one.
    q = round(w / scale) (half to even), so the largest weight of a row maps to exactly +-qmax."""

    def __init__(self, name: str, bits: int):
        self.name, self.bits, self.qmax = name, bits, 2 ** (bits - 1) - 1

    def columns(self, in_features: int) -> int:
        return in_features

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        return {"weight": ((out_features, self.columns(in_features)), torch.int8),
                "weight_scale": ((out_features,), None)}

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = weight.abs().amax(dim=1) / self.qmax
        q = torch.round(weight.float() / scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None])
        return q.clamp(-self.qmax, self.qmax).to(torch.int8), scale

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = self.quantize(weight)
        return {"weight": q, "weight_scale": scale}

    def integers(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["weight"]

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return self.integers(t).to(dtype) * t["weight_scale"].to(dtype)[:, None]


class NibbleInt4(RowwiseInt):
    """4-bit rowwise integers, two per byte as GLM-130B publishes them (cuda/quantization.cu): byte j of a
    row holds column 2j in its high nibble and column 2j+1 in its low nibble, both signed."""

    def columns(self, in_features: int) -> int:
        if in_features % 2:
            raise ValueError(f"{self.name} packs two columns per byte; in_features {in_features} is odd")
        return in_features // 2

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = self.quantize(weight)
        return {"weight": nibbles(q), "weight_scale": scale}

    def integers(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return unnibble(t["weight"])


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> int8 bytes [out, in/2], (even << 4) | (odd & 0xF)."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)


def unnibble(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of nibbles: arithmetic shifts sign-extend each half."""
    high, low = packed >> 4, (packed << 4) >> 4
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1)


SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    SCHEMES[scheme.name] = scheme
    return scheme


register_scheme(RowwiseInt("int8-row", 8))
register_scheme(NibbleInt4("int4-row", 4))
ALIASES = {"int8": "int8-row", "int4": "int4-row"}  # what zoo.load(quantize=...) and --quantize accept


def get_scheme(name: str | Scheme) -> Scheme:
    if isinstance(name, Scheme):
        return name
    key = ALIASES.get(name, name)
    if key not in SCHEMES:
        raise ValueError(f"quantize={name!r}: unknown scheme; use one of {sorted({*ALIASES, *SCHEMES})}")
    return SCHEMES[key]


class PackedLinear(nn.Module):
    """y = x W^T + b with W stored packed (buffers named by the scheme); a drop-in for nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str | Scheme,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = get_scheme(scheme)
        self.stored = tuple(self.scheme.tensors(out_features, in_features))
        for name, (shape, dt) in self.scheme.tensors(out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt or dtype or torch.get_default_dtype()))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.stored}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scheme.linear(x, self.packed(), self.bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.scheme.unpack(self.packed(), dtype or (self.bias.dtype if self.bias is not None else torch.float32))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


def linear_paths(module: nn.Module, patterns: list[str] | tuple[str, ...] = ("*",)) -> list[str]:
    """Paths of the nn.Linear modules whose path matches one of the glob patterns (or equals it)."""
    return [name for name, sub in module.named_modules()
            if type(sub) is nn.Linear and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def pack_linears(module: nn.Module, scheme: str | Scheme, paths: list[str]) -> list[str]:
    """Replace the nn.Linear at each path by a PackedLinear of the same shape (call on the meta device)."""
    scheme = get_scheme(scheme)
    for path in paths:
        old = module.get_submodule(path)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"quantization record names {path}, which is a {type(old).__name__}, not a linear layer")
        owner, _, attr = path.rpartition(".")
        with torch.device(old.weight.device):
            new = PackedLinear(old.in_features, old.out_features, old.bias is not None, scheme, old.weight.dtype)
        setattr(module.get_submodule(owner) if owner else module, attr, new)
    return paths
