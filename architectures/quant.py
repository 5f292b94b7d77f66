"""Packed weights: a linear layer whose weight is stored as low-bit integers with their scales.

GLM-130B's published INT8/INT4 checkpoints, MatMul-free LM's ternary weights and weight-only int8/int4
for any language model are one idea, built once here:

    Scheme        how a [out, in] weight is stored (names, shapes, dtypes), packed, unpacked and multiplied
    PackedLinear  nn.Linear's stand-in; its stored tensors are buffers named by the scheme
    pack_linears  swaps nn.Linear modules for PackedLinear (on the meta device, before weights are assigned)

The native config records {"scheme": name, "modules": [paths]} (NativeConfig.quantization), so loading
rebuilds the packed modules without guessing. Each scheme's `linear` routes to the fastest kernel measured for
the call (architectures/kernels/dequant_matmul.py: Triton on GPUs; on CPU fused matrix-vector code inside a
compiled decoding step, aten's int8 / int4 kernels eagerly), the plain reference (dequantise, then multiply)
elsewhere. A kernel that reads its own arrangement of the codes (aten's int4 one) gets it from the scheme's
`prepare`, once, at the layer's first call: the stored tensors are replaced by it, not kept beside it, and the
layer's state_dict still gives the stored form.

Schemes: "int8-row" (symmetric, one scale per output row), "int4-row" (GLM-130B's published INT4: symmetric per
row, signed nibbles), both with "-gN" variants (N scale groups per row: GLM's merged tensor-parallel ranks),
"int4-group32/64/128" (affine: a scale and a zero point per group of 32/64/128 input columns, torchao's int4
weight-only arithmetic) and "ternary" (MatMul-free LM). `quantize="int8"` is int8-row, `quantize="int4"`
int4-group128 (the measured choice: BENCHMARKS.md).
"""

from __future__ import annotations

import fnmatch
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels.bitlinear import pack_ternary, ternarize, unpack_ternary
from zoo.architectures.kernels.dequant_matmul import (
    dequant_matmul,
    dequantize,
    from_int4pack_cpu,
    int4pack_mm_cpu,
    quantize_affine_int4,
    to_int4pack_cpu,
)

TensorPlan = dict[str, tuple[tuple[int, ...], torch.dtype | None]]  # name -> (shape, dtype; None = float)


class Scheme:
    """How one weight matrix is stored packed. Subclasses define the layout; `linear` may be overridden."""

    name = ""
    rows_independent = True  # a row's stored tensors depend on that row alone (every packed tensor is [out, ...])

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        raise NotImplementedError

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pack_rows(self, weight: torch.Tensor, rows: int = 8192) -> dict[str, torch.Tensor]:
        """`pack`, a block of rows at a time where rows are independent: quantising works in fp32 with a few
        temporaries the size of its input, which for a whole 151936 x 896 embedding table is 2 GB at once."""
        if not self.rows_independent or weight.shape[0] <= rows:
            return self.pack(weight)
        blocks = [self.pack(weight[i:i + rows]) for i in range(0, weight.shape[0], rows)]
        return {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight the packed tensors stand for, in `dtype`."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.unpack(t, x.dtype), bias)

    def prepare(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The stored tensors rearranged for a faster kernel on this machine, or None where the stored form is
        what runs. Never written to a checkpoint (a kernel's arrangement may depend on the CPU)."""
        return None

    def restore(self, k: dict[str, torch.Tensor], plan: TensorPlan) -> dict[str, torch.Tensor]:
        """The stored tensors back from `prepare`'s (plan: this layer's `tensors(out, in)`)."""
        raise NotImplementedError

    def embedding_scheme(self) -> Scheme | None:
        """The scheme for an embedding table that is also the output head (PackedEmbedding), or None to keep it
        float. A table is read by rows (lookups) and whole (the head) from one stored copy."""
        return self


class Int4Kernel:
    """prepare/restore of the int4 schemes: aten's CPU int4 kernel (tinygemm) on its own packing of the codes,
    for bf16/fp16 computation (in fp32 that kernel is slower than dequantising: `bench_decode.py --kernels`)."""

    def prepare(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        scale = t["weight_scale"]
        if scale.dtype not in (torch.bfloat16, torch.float16):
            return None
        made = to_int4pack_cpu(t["weight"], scale, t.get("weight_zero"), scale.dtype)
        return None if made is None else {"int4pack": made[0], "int4pack_scales_zeros": made[1]}

    def restore(self, k: dict[str, torch.Tensor], plan: TensorPlan) -> dict[str, torch.Tensor]:
        (out_f, half_in), _ = plan["weight"]
        scale_shape, _ = plan["weight_scale"]
        groups = scale_shape[1] if len(scale_shape) == 2 else 1
        sz = k["int4pack_scales_zeros"]
        every = sz.shape[0] // groups  # kernel groups per stored group
        out = {"weight": from_int4pack_cpu(k["int4pack"], sz, half_in * 2),
               "weight_scale": sz[::every, :, 0].t().contiguous().reshape(scale_shape)}
        if "weight_zero" in plan:
            out["weight_zero"] = sz[::every, :, 1].t().contiguous().reshape(plan["weight_zero"][0])
        return out

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        if "int4pack" in t:
            return int4pack_mm_cpu(x, t["int4pack"], t["int4pack_scales_zeros"], bias)
        return dequant_matmul(x, t["weight"], t["weight_scale"], 4, bias, t.get("weight_zero"))

    def embedding_scheme(self) -> Scheme | None:
        # the fast int4 kernel reads its own arrangement, from which rows cannot be looked up: one copy of a tied
        # table serves both as int8 rows (llama.cpp also keeps its tied head wider than 4 bits)
        return SCHEMES["int8-row"]


class RowwiseInt(Scheme):
    """Symmetric integers with one scale per output row: w ~ q * scale[row], scale = max|w[row]| / qmax.

    This is GLM-130B's weight-only scheme (docs/quantization.md) and the usual int8 weight-only one.
    q = round(w / scale) (half to even), so the largest weight of a row maps to exactly +-qmax.
    With groups > 1 (scheme "<name>-g<groups>") each row has one scale per group of in/groups consecutive
    columns: GLM-130B's published INT8/INT4 files merged from their tensor-parallel ranks keep one scale per row
    per rank for the row-parallel weights."""

    def __init__(self, name: str, bits: int, groups: int = 1, whole_rows: bool = False):
        self.name, self.bits, self.qmax, self.groups = name, bits, 2 ** (bits - 1) - 1, groups
        self.whole_rows = whole_rows  # stored as `groups` scales per row, all equal: one scale over the whole row

    def rank_variant(self) -> RowwiseInt:
        """The same storage for a layer tensor parallelism splits by output rows (each rank holds whole rows, so
        one scale per row, repeated over the groups): what GLM-130B's convert_tp.py writes for those layers."""
        return type(self)(self.name, self.bits, self.groups, whole_rows=True)

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
        w = work.reshape(out, 1 if self.whole_rows else self.groups, -1)
        scale = w.abs().amax(dim=2) / self.qmax
        q = torch.round(w / scale.clamp(min=torch.finfo(work.dtype).tiny)[..., None])
        q = q.clamp(-self.qmax, self.qmax).to(torch.int8).reshape(out, n)
        scale = scale.to(weight.dtype).expand(out, self.groups).contiguous()
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

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        # the same product as dequantising in x's dtype (codes and a scale multiply exactly in fp32, and rounding
        # that product to x's dtype is what multiplying in x's dtype does), through the dispatching kernel
        return dequant_matmul(x, t["weight"], t["weight_scale"], self.bits, bias)


class NibbleInt4(Int4Kernel, RowwiseInt):
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


class AffineInt4(Int4Kernel, Scheme):
    """Int4 with a scale and a zero point per group of `group_size` consecutive input columns, torchao's int4
    weight-only arithmetic (its tinygemm layout): per group scale = (max - min) / 15, zero = min + 8 scale,
    w ~ code * scale + zero with codes in [-8, 7]. Stored: the codes as int4-row stores them (two signed nibbles
    per byte, even column high), weight_scale and weight_zero [out, in / group] in the weight's dtype.

    A layer whose input size the group size does not divide takes the largest of group_size / 2, / 4, ... that
    does (an even number: two codes per byte), so "int4" applies to every model; the shapes of its scales say which.
    """

    def __init__(self, group_size: int):
        self.name, self.group_size = f"int4-group{group_size}", group_size

    def group(self, in_features: int) -> int:
        g = self.group_size
        while g >= 2 and in_features % g:
            g //= 2
        if g < 2 or g % 2:
            raise ValueError(f"{self.name}: in_features {in_features} is odd; int4 packs two columns per byte")
        return g

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        groups = (out_features, in_features // self.group(in_features))
        return {"weight": ((out_features, in_features // 2), torch.int8), "weight_scale": (groups, None),
                "weight_zero": (groups, None)}

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale, zero = quantize_affine_int4(weight, self.group(weight.shape[1]))
        return {"weight": q, "weight_scale": scale, "weight_zero": zero}

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(t["weight"], t["weight_scale"], 4, t["weight_zero"]).to(dtype)


class Ternary(Scheme):
    """BitNet b1.58 / MatMul-free LM weights: codes {-1, 0, +1} and one absmean scale per matrix,
    w ~ codes * mean|w|; the codes 2 bits each, 4 per byte (zoo.architectures.kernels.bitlinear)."""

    name = "ternary"
    rows_independent = False  # one scale for the whole matrix

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

    def embedding_scheme(self) -> Scheme | None:
        return None  # one scale per matrix: not a table of rows


SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    SCHEMES[scheme.name] = scheme
    return scheme


register_scheme(RowwiseInt("int8-row", 8))
register_scheme(NibbleInt4("int4-row", 4))
for _size in (32, 64, 128):
    register_scheme(AffineInt4(_size))
register_scheme(Ternary())
ALIASES = {"int8": "int8-row", "int4": "int4-group128"}  # what zoo.load(quantize=...) and --quantize accept


def get_scheme(name: str | Scheme) -> Scheme:
    if isinstance(name, Scheme):
        return name
    key = ALIASES.get(name, name)
    sized = re.fullmatch(r"int4-group([1-9][0-9]*)", key)
    if key not in SCHEMES and sized and int(sized[1]) % 2 == 0:
        register_scheme(AffineInt4(int(sized[1])))
    grouped = re.fullmatch(r"(.+)-g([1-9][0-9]*)", key)
    if key not in SCHEMES and grouped and isinstance(SCHEMES.get(grouped[1]), RowwiseInt):
        base = SCHEMES[grouped[1]]  # "int4-row-g8": the rowwise scheme with 8 scale groups per row
        register_scheme(type(base)(key, base.bits, groups=int(grouped[2])))
    if key not in SCHEMES:
        raise ValueError(f"quantize={name!r}: unknown scheme; use one of {sorted({*ALIASES, *SCHEMES})}")
    return SCHEMES[key]


class PackedLinear(nn.Module):
    """y = x W^T + b with W stored packed (buffers named by the scheme); a drop-in for nn.Linear.

    At its first call outside a compiled graph the layer asks its scheme for a kernel's own arrangement of the
    tensors (`Scheme.prepare`) and, if there is one, holds that instead of the stored tensors (non-persistent
    buffers); `packed()` and the state_dict give the stored form either way."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str | Scheme,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = get_scheme(scheme)
        self.stored = tuple(self.scheme.tensors(out_features, in_features))
        for name, (shape, dt) in self.scheme.tensors(out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt or dtype or torch.get_default_dtype()))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.kernel: tuple[str, ...] | None = None  # names of the kernel's tensors once prepared; () = stored form
        self.register_state_dict_post_hook(_stored_form)

    def prepare(self) -> None:
        """Rearrange the tensors for the scheme's kernel, once (see the class docstring)."""
        if self.kernel is not None:
            return
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in and out of inference mode
            made = self.scheme.prepare(self.packed())
        self.kernel = tuple(made or ())
        if made:
            for name in self.stored:
                delattr(self, name)
            for name, t in made.items():
                self.register_buffer(name, t, persistent=False)

    def packed(self) -> dict[str, torch.Tensor]:
        """The stored tensors (rebuilt from the kernel's arrangement if the layer holds that)."""
        if self.kernel:
            plan = self.scheme.tensors(self.out_features, self.in_features)
            return self.scheme.restore({name: getattr(self, name) for name in self.kernel}, plan)
        return {name: getattr(self, name) for name in self.stored}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None and not torch.compiler.is_compiling():
            self.prepare()
        names = self.kernel or self.stored
        return self.scheme.linear(x, {name: getattr(self, name) for name in names}, self.bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.scheme.unpack(self.packed(), dtype or (self.bias.dtype if self.bias is not None else torch.float32))

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


class PackedEmbedding(nn.Module):
    """An embedding table stored packed that is also the model's output head (a tied head): `forward(ids)` looks
    rows up (dequantising only those), `as_head(h)` scores h against every row with the scheme's kernel."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str | Scheme, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.scheme = get_scheme(scheme)
        self.dtype = dtype or torch.get_default_dtype()
        self.stored = tuple(self.scheme.tensors(num_embeddings, embedding_dim))
        for name, (shape, dt) in self.scheme.tensors(num_embeddings, embedding_dim).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt or self.dtype))

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.stored}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = {name: t[ids.reshape(-1)] for name, t in self.packed().items()}  # every stored tensor is by row
        dtype = self.weight_scale.dtype  # the compute dtype
        return self.scheme.unpack(rows, dtype).view(*ids.shape, self.embedding_dim)

    def as_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.scheme.linear(h, self.packed(), None)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.scheme.unpack(self.packed(), dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}"


def _stored_form(module: PackedLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: a layer holding a kernel's arrangement reports its stored tensors."""
    if module.kernel:
        for name, t in module.packed().items():
            state_dict[prefix + name] = t


def linear_paths(module: nn.Module, patterns: list[str] | tuple[str, ...] = ("*",)) -> list[str]:
    """Paths of the nn.Linear modules whose path matches one of the glob patterns (or equals it)."""
    return [name for name, sub in module.named_modules()
            if type(sub) is nn.Linear and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def packable_paths(module: nn.Module, scheme: str | Scheme) -> list[str]:
    """What weight-only quantisation with `scheme` packs: every nn.Linear, and the embedding table a model also
    reads as its output head (the path it names in `tied_embedding`; the head streams the whole table for every
    token), when the scheme has an embedding scheme."""
    paths = linear_paths(module)
    tied = getattr(module, "tied_embedding", None)
    if tied and get_scheme(scheme).embedding_scheme() is not None:
        paths.append(tied)
    return paths


def module_scheme(module: nn.Module, path: str, scheme: str | Scheme, tp_plan: dict[str, str] | None = None) -> Scheme:
    """The scheme the module at `path` is packed with under `scheme` (an embedding: its embedding scheme).

    A rowwise scheme with N groups ("int8-row-g8") quantises as the N tensor-parallel ranks of the family's
    `tp_plan` do: a layer split by input rows ("rowwise") gets one scale per row per rank, any other layer one
    scale per whole row (stored repeated, so every layer keeps the one scheme's storage)."""
    scheme = get_scheme(scheme)
    if isinstance(module.get_submodule(path), nn.Embedding | PackedEmbedding):
        return scheme.embedding_scheme() or scheme
    if tp_plan and isinstance(scheme, RowwiseInt) and scheme.groups > 1 and _plan_style(tp_plan, path) != "rowwise":
        return scheme.rank_variant()
    return scheme


def _plan_style(plan: dict[str, str], path: str) -> str | None:
    parts = path.split(".")
    for pattern, style in plan.items():
        tokens = pattern.split(".")
        if len(tokens) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, tokens, strict=True)):
            return style
    return None


def pack_linears(module: nn.Module, scheme: str | Scheme, paths: list[str],
                 tp_plan: dict[str, str] | None = None) -> list[str]:
    """Replace the nn.Linear at each path by a PackedLinear of the same shape, and an nn.Embedding (a tied output
    embedding, see packable_paths) by a PackedEmbedding (call on the meta device). tp_plan: see module_scheme."""
    for path in paths:
        chosen = module_scheme(module, path, scheme, tp_plan) if isinstance(module.get_submodule(path), nn.Linear) \
            else get_scheme(scheme)
        old = module.get_submodule(path)
        owner, _, attr = path.rpartition(".")
        with torch.device(old.weight.device):
            if isinstance(old, nn.Linear):
                new = PackedLinear(old.in_features, old.out_features, old.bias is not None, chosen, old.weight.dtype)
            elif isinstance(old, nn.Embedding) and chosen.embedding_scheme() is not None:
                new = PackedEmbedding(old.num_embeddings, old.embedding_dim, chosen.embedding_scheme(),
                                      old.weight.dtype)
            else:
                raise ValueError(f"quantization record names {path}, which is a {type(old).__name__}, not a "
                                 "linear layer (or a tied output embedding)")
        setattr(module.get_submodule(owner) if owner else module, attr, new)
    return paths
