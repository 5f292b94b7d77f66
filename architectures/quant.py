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
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels.bitlinear import pack_ternary, ternarize, unpack_ternary

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
    q = round(w / scale) (half to even), so the largest weight of a row maps to exactly +-qmax.
    With groups > 1 (scheme "<name>-g<groups>") each row has one scale per group of in/groups consecutive
    columns: GLM-130B's published INT8/INT4 files merged from their tensor-parallel ranks keep one scale per row
    per rank for the row-parallel weights."""

    def __init__(self, name: str, bits: int, groups: int = 1):
        self.name, self.bits, self.qmax, self.groups = name, bits, 2 ** (bits - 1) - 1, groups

    def columns(self, in_features: int) -> int:
        return in_features

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        if in_features % self.groups:
            raise ValueError(f"{self.name}: in_features {in_features} is not a multiple of {self.groups} groups")
        scale = (out_features,) if self.groups == 1 else (out_features, self.groups)
        return {"weight": ((out_features, self.columns(in_features)), torch.int8), "weight_scale": (scale, None)}

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, n = weight.shape
        if n % self.groups:
            raise ValueError(f"{self.name}: {n} columns are not a multiple of {self.groups} groups")
        # fp16 weights are quantised in fp16 arithmetic, as GLM-130B's quantization/layers.py and
        # tools/convert_tp.py do it (w / scale rounds to fp16 before round()): the published bytes, exactly
        work = weight if weight.dtype == torch.float16 else weight.float()
        w = work.reshape(out, self.groups, n // self.groups)
        scale = w.abs().amax(dim=2) / self.qmax
        q = torch.round(w / scale.clamp(min=torch.finfo(work.dtype).tiny)[..., None])
        q = q.clamp(-self.qmax, self.qmax).to(torch.int8).reshape(out, n)
        scale = scale.to(weight.dtype)
        return q, scale[:, 0] if self.groups == 1 else scale

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = self.quantize(weight)
        return {"weight": q, "weight_scale": scale}

    def integers(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["weight"]

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q, scale = self.integers(t).to(dtype), t["weight_scale"].to(dtype)
        if scale.dim() == 1:
            return q * scale[:, None]
        out, n = q.shape
        return (q.view(out, scale.shape[1], n // scale.shape[1]) * scale[:, :, None]).view(out, n)


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


class Ternary(Scheme):
    """BitNet b1.58 / MatMul-free LM weights: codes {-1, 0, +1} and one absmean scale per matrix,
    w ~ codes * mean|w|; the codes 2 bits each, 4 per byte (zoo.architectures.kernels.bitlinear)."""

    name = "ternary"

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        return {"weight": ((out_features, -(-in_features // 4)), torch.uint8), "weight_scale": ((1,), None)}

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if weight.shape[1] % 4:
            raise ValueError(f"ternary packs four columns per byte; in_features {weight.shape[1]} is not a "
                             "multiple of 4")
        codes, scale = ternarize(weight)
        return {"weight": pack_ternary(codes), "weight_scale": scale}

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return unpack_ternary(t["weight"], t["weight"].shape[1] * 4, dtype) * t["weight_scale"].to(dtype)


SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    SCHEMES[scheme.name] = scheme
    return scheme


register_scheme(RowwiseInt("int8-row", 8))
register_scheme(NibbleInt4("int4-row", 4))
register_scheme(Ternary())
ALIASES = {"int8": "int8-row", "int4": "int4-row"}  # what zoo.load(quantize=...) and --quantize accept


def get_scheme(name: str | Scheme) -> Scheme:
    if isinstance(name, Scheme):
        return name
    key = ALIASES.get(name, name)
    grouped = re.fullmatch(r"(.+)-g([1-9][0-9]*)", key)
    if key not in SCHEMES and grouped and isinstance(SCHEMES.get(grouped[1]), RowwiseInt):
        base = SCHEMES[grouped[1]]  # "int4-row-g8": the rowwise scheme with 8 scale groups per row
        register_scheme(type(base)(key, base.bits, groups=int(grouped[2])))
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
