"""Packed weights: a weight stored as low-bit integers with their scales. Every quantiser, packer and unpacker of
the project is here; the kernels (architectures/kernels/) only multiply what this module packs.

GLM-130B's published INT8/INT4 checkpoints, MatMul-free LM's ternary weights and weight-only int8/int4
for any language model are one idea, built once here:

    Scheme          how a [out, in] weight is stored (`tensors`: names, shapes, dtypes and how each tensor lies
                    along the weight's rows and columns), packed, unpacked, and multiplied (`linear`, `bitlinear`)
    PackedLinear    nn.Linear's stand-in; its stored tensors are buffers named by the scheme (`forward_many`:
                    several that read one x, a layer's q, k and v, in one call of the CPU kernel)
    PackedEmbedding a tied output embedding, looked up by rows and used whole as the head
    PackedStack     a stacked [n, out, in] parameter (a mixture of experts' weights), each matrix packed
    pack_linears    swaps each of them in (on the meta device, before weights are assigned)

What a model can pack (`packable_paths`): every nn.Linear, every stacked weight a module lists in its
`packable_stacks`, and the embedding it names as `tied_embedding`. The native config records
{"scheme": name, "modules": [paths]} (NativeConfig.quantization), so loading rebuilds the packed modules without
guessing. Each scheme's `linear` runs the fastest kernel for the call where one applies (`Scheme.kernel`:
kernels/dequant_matmul.py, whose dispatch picks Triton on GPUs and zoo's own C++ kernel on CPU (csrc/quant_linear.cpp,
eager and inside a compiled step alike; aten's int8 / int4 kernels where that library could not be built), its
`reference` (dequantise, then multiply) elsewhere.
A kernel that reads its own arrangement of the codes (aten's int4 one) gets it from the scheme's `prepare`, once,
at the layer's first call: the stored tensors are replaced by it, not kept beside it, and the layer's state_dict
still gives the stored form.

Schemes: "int8-row" (symmetric, one scale per output row), "int4-row" (GLM-130B's published INT4: symmetric per
row, signed nibbles), both with "-gN" variants (N scale groups per row: GLM's merged tensor-parallel ranks),
"int4-group32/64/128" (and any even group size: affine, a scale and a zero point per group of input columns,
torchao's int4 weight-only arithmetic) and "ternary" (MatMul-free LM; its BitLinear is the fused kernel).
`quantize="int8"` is int8-row, `quantize="int4"` int4-group128 (the measured choice: BENCHMARKS.md).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels import bitlinear as bitlinear_kernels
from zoo.architectures.kernels.dequant_matmul import (
    cpu_kernels_available,
    cpu_quant_linear_many,
    fast_dequant_matmul,
    int4pack_mm_cpu,
)


class Stored(NamedTuple):
    """One stored tensor of a packed [out, in] weight: its shape and dtype, and how it lies along the weight's
    rows and columns (what splitting a packed weight by rows or columns, as tensor parallelism does, needs)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: the weight's float dtype
    by_row: bool  # axis 0 is the weight's output rows
    columns: int  # input columns one element of the last axis stands for (0: none: a per-row or per-matrix value)


TensorPlan = dict[str, Stored]  # stored tensor name -> Stored, in storage order


class DequantArgs(NamedTuple):
    """The tensors kernels/dequant_matmul.py multiplies by (fast_dequant_matmul's q, scale, bits and zero)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int


class Scheme:
    """How one weight matrix is stored packed: its quantiser, packing and unpacking (`tensors`, `pack`, `unpack`)
    and its linear (`linear`: the fastest kernel for the call, else `reference`) and BitLinear (`bitlinear`)."""

    name = ""
    names: tuple[str, ...] = ("weight", "weight_scale")  # what tensors() names, whatever the shape
    rows_independent = True  # a row's stored tensors depend on that row alone (every packed tensor is [out, ...])
    # packing a slice of whole scale groups of columns gives that slice of the whole packing (no value spans groups)
    columns_independent = True

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        raise NotImplementedError

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pack_rows(self, weight: torch.Tensor, rows: int = 8192) -> dict[str, torch.Tensor]:
        """`pack`, a block of rows at a time where rows are independent: quantising works in fp32 with a few
        temporaries the size of its input, which for a whole 151936 x 896 embedding table is 2 GB at once.
        A stack of matrices [E, out, in] (a mixture of experts' weights) is packed matrix by matrix."""
        if weight.dim() > 2:
            mats = [self.pack_rows(w, rows) for w in weight.reshape(-1, *weight.shape[-2:])]
            return {name: torch.stack([m[name] for m in mats]).reshape(*weight.shape[:-2], *mats[0][name].shape)
                    for name in mats[0]}
        if not self.rows_independent or weight.shape[0] <= rows:
            return self.pack(weight)
        blocks = [self.pack(weight[i:i + rows]) for i in range(0, weight.shape[0], rows)]
        return {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight the packed tensors stand for, in `dtype`."""
        raise NotImplementedError

    def kernel(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor | None:
        """x W^T + b by a kernel that reads the packed tensors, or None where none beats `reference` for this call."""
        return None

    def dequant_args(self, t: dict[str, torch.Tensor]) -> DequantArgs | None:
        """What `kernel` hands kernels/dequant_matmul.py's kernels for the tensors `t` (codes, scale, zero point,
        bits), or None where its kernel is another: PackedLinear.forward_many runs several such layers in one call."""
        return None

    def reference(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        """The definition: dequantise, then an ordinary linear in x's dtype."""
        return F.linear(x, self.unpack(t, x.dtype), bias)

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        y = self.kernel(x, t, bias)
        return self.reference(x, t, bias) if y is None else y

    def bitlinear(self, x: torch.Tensor, t: dict[str, torch.Tensor], norm_weight: torch.Tensor, eps: float,
                  in_features: int) -> torch.Tensor:
        """The MatMul-free LM's BitLinear (kernels/bitlinear.py) on this packed weight: a weight packed by another
        scheme (zoo.load(quantize="int8") of a latent checkpoint) stands in for the latent one."""
        return bitlinear_latent(x, norm_weight, eps, self.unpack(t, x.dtype))

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

    def for_columns(self, parts: int) -> Scheme:
        """The scheme of one of `parts` equal column slices of a weight packed by this one (tensor parallelism's
        rowwise split): the same, except where the scheme counts its scale groups per row."""
        return self


# -- the codes: int8, signed int4 nibbles, and aten's own int4 arrangement --------------------------------------


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> int8 bytes [out, in/2], (even << 4) | (odd & 0xF): GLM-130B's order
    (cuda/quantization.cu), the one int4 layout every scheme and kernel reads."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)


def unnibble(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of nibbles: arithmetic shifts sign-extend each half."""
    high, low = packed >> 4, (packed << 4) >> 4
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """codes [out, in] (any integer dtype) times their row's (or row group's) scale, plus the group's zero point,
    in `dtype`. In a 16-bit dtype with scales already in it (and no zero) directly in that dtype: the same numbers
    (a code of at most 8 bits times a 16-bit scale is exact in fp32, so both ways round once) for less than half the
    memory traffic; otherwise in fp32 (or wider), rounded once at the end."""
    out_f, in_f = codes.shape
    direct = zero is None and dtype in (torch.bfloat16, torch.float16) and scale.dtype == dtype
    work = dtype if direct else torch.promote_types(dtype, torch.float32)
    s = scale.to(work).reshape(out_f, -1)
    w = codes.to(work).view(out_f, s.shape[1], -1) * s[..., None]
    if zero is not None:
        w = w + zero.to(work).reshape(out_f, -1)[..., None]
    return w.view(out_f, in_f).to(dtype)


def quantize_affine_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int4 codes in [-8, 7] as nibbles, int8 [out, in / 2], scale, zero [out, in / group_size])
    by torchao's int4 weight-only arithmetic (`_choose_qparams_affine_tinygemm`, `_quantize_affine_tinygemm`):
    per group min/max, no zero kept exact, scale and zero in w's dtype and the codes rounded against those stored
    values. Computed in fp32 for fp32 weights, in w's dtype otherwise, as torchao."""
    out_f, in_f = w.shape
    if in_f % group_size or group_size % 2:
        raise ValueError(f"cannot quantise a [{out_f}, {in_f}] weight to int4 in groups of {group_size}: the input "
                         "size must be a multiple of the (even) group size")
    g = w.reshape(out_f, in_f // group_size, group_size)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-6)
    zero = low + scale * 8  # the mid-point code 8 stands at zero's place: w = (u - 8) * scale + zero
    start = zero - scale * 8
    u = torch.clamp(torch.round((g - start[..., None]) / scale[..., None]), 0, 15)
    codes = (u - 8).to(torch.int8).reshape(out_f, in_f)
    return nibbles(codes), scale, zero


INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes aten's CPU int4 kernel takes, largest first


def int4pack_group(in_features: int, group: int) -> int | None:
    """The largest group size aten's kernel takes that tiles a quantisation group of `group` columns (a per-row
    scale is one group of in_features), or None."""
    return next((g for g in INT4PACK_GROUPS if group % g == 0 and in_features % g == 0), None)


def to_int4pack_cpu(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Int4 nibbles, scale and zero [out, groups] -> (aten's packed weight, its scales and zeros [in / g, out, 2]
    in `dtype`) for kernels.dequant_matmul.int4pack_mm_cpu, or None where the kernel does not apply (outputs not a
    multiple of 16, groups it cannot tile). Its packing depends on the CPU's vector width: made when loading, never
    stored. Same bytes as ours: the weight is replaced, not duplicated."""
    out_f, in_f = q.shape[0], q.shape[1] * 2
    s = scale.reshape(out_f, -1)
    group = int4pack_group(in_f, in_f // s.shape[1])
    if out_f % 16 or group is None or q.device.type != "cpu":
        return None
    repeat = in_f // s.shape[1] // group  # a wider quantisation group spans several kernel groups
    s = s.repeat_interleave(repeat, dim=1)
    z = zero.reshape(out_f, -1).repeat_interleave(repeat, dim=1) if zero is not None else torch.zeros_like(s)
    codes = unnibble(q.view(torch.int8)).to(torch.int32) + 8  # the kernel reads unsigned codes: w = (u - 8) s + z
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scales_zeros = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scales_zeros


def from_int4pack_cpu(packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int) -> torch.Tensor:
    """Our nibbles back from aten's packing (exactly: the kernel applied to the identity with unit scales and zero
    offsets returns the signed codes themselves)."""
    n_groups, out_f = scales_zeros.shape[0], scales_zeros.shape[1]
    unit = torch.zeros(n_groups, out_f, 2, dtype=torch.bfloat16)
    unit[..., 0] = 1
    eye = torch.eye(in_features, dtype=torch.bfloat16)
    codes = torch._weight_int4pack_mm_for_cpu(eye, packed, in_features // n_groups, unit)  # [in, out]
    return nibbles(codes.t().to(torch.int8))


# -- the schemes ------------------------------------------------------------------------------------------------


class Int4Kernel:
    """prepare/restore of the int4 schemes. zoo's C++ CPU kernel (kernels/dequant_matmul.cpu_quant_linear) reads
    the stored nibbles as they are: nothing to prepare. Only where that library is unavailable, aten's CPU int4
    kernel (tinygemm) on its own packing of the codes, for bf16/fp16 computation (in fp32 that kernel is slower
    than dequantising: `bench_decode.py --kernels`)."""

    def prepare(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        scale = t["weight_scale"]
        if scale.dtype not in (torch.bfloat16, torch.float16) or t["weight"].device.type != "cpu":
            return None
        if cpu_kernels_available():
            return None
        made = to_int4pack_cpu(t["weight"], scale, t.get("weight_zero"), scale.dtype)
        return None if made is None else {"int4pack": made[0], "int4pack_scales_zeros": made[1]}

    def restore(self, k: dict[str, torch.Tensor], plan: TensorPlan) -> dict[str, torch.Tensor]:
        half_in = plan["weight"].shape[1]
        scale_shape = plan["weight_scale"].shape
        groups = scale_shape[1] if len(scale_shape) == 2 else 1
        sz = k["int4pack_scales_zeros"]
        every = sz.shape[0] // groups  # kernel groups per stored group
        out = {"weight": from_int4pack_cpu(k["int4pack"], sz, half_in * 2),
               "weight_scale": sz[::every, :, 0].t().contiguous().reshape(scale_shape)}
        if "weight_zero" in plan:
            out["weight_zero"] = sz[::every, :, 1].t().contiguous().reshape(plan["weight_zero"].shape)
        return out

    def dequant_args(self, t: dict[str, torch.Tensor]) -> DequantArgs | None:
        if "int4pack" in t:
            return None  # aten's kernel on its own packing
        return DequantArgs(t["weight"], t["weight_scale"], t.get("weight_zero"), 4)

    def kernel(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor | None:
        if "int4pack" in t:
            return int4pack_mm_cpu(x, t["int4pack"], t["int4pack_scales_zeros"], bias)
        q, scale, zero, bits = self.dequant_args(t)
        return fast_dequant_matmul(x, q, scale, bits, bias, zero)

    def reference(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        if "int4pack" in t:  # the stored form is gone: aten's kernel is the layer's arithmetic
            return int4pack_mm_cpu(x, t["int4pack"], t["int4pack_scales_zeros"], bias)
        return F.linear(x, self.unpack(t, x.dtype), bias)

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

    per_byte = 1  # codes per stored byte

    def __init__(self, name: str, bits: int, groups: int = 1, whole_rows: bool = False):
        self.name, self.bits, self.qmax, self.groups = name, bits, 2 ** (bits - 1) - 1, groups
        self.whole_rows = whole_rows  # stored as `groups` scales per row, all equal: one scale over the whole row

    @property
    def columns_independent(self) -> bool:
        return not self.whole_rows  # one scale over the whole row, stored per group

    def rank_variant(self) -> RowwiseInt:
        """The same storage for a layer tensor parallelism splits by output rows (each rank holds whole rows, so
        one scale per row, repeated over the groups): what GLM-130B's convert_tp.py writes for those layers."""
        return type(self)(self.name, self.bits, self.groups, whole_rows=True)

    def for_columns(self, parts: int) -> RowwiseInt:
        if self.groups == 1:  # one scale per whole row: every column slice keeps it
            return self
        if self.groups % parts:
            raise ValueError(f"{self.name}: {self.groups} scale groups per row do not split into {parts} column slices")
        groups = self.groups // parts
        base = self.name.rsplit("-g", 1)[0] if self.groups > 1 else self.name
        return type(self)(base if groups == 1 else f"{base}-g{groups}", self.bits, groups, self.whole_rows)

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        if in_features % self.groups:
            raise ValueError(f"{self.name}: in_features {in_features} is not a multiple of {self.groups} groups")
        if in_features % self.per_byte:
            raise ValueError(f"{self.name} packs {self.per_byte} columns per byte; in_features {in_features} is not "
                             f"a multiple of {self.per_byte}")
        scale = (out_features,) if self.groups == 1 else (out_features, self.groups)
        return {"weight": Stored((out_features, in_features // self.per_byte), torch.int8, True, self.per_byte),
                "weight_scale": Stored(scale, None, True, 0 if self.groups == 1 else in_features // self.groups)}

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
        return dequantize(self.integers(t), t["weight_scale"], dtype)

    def dequant_args(self, t: dict[str, torch.Tensor]) -> DequantArgs | None:
        return DequantArgs(t["weight"], t["weight_scale"], None, self.bits)

    def kernel(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor | None:
        q, scale, zero, bits = self.dequant_args(t)
        return fast_dequant_matmul(x, q, scale, bits, bias, zero)


class NibbleInt4(Int4Kernel, RowwiseInt):
    """4-bit rowwise integers, two per byte as GLM-130B publishes them (cuda/quantization.cu): byte j of a
    row holds column 2j in its high nibble and column 2j+1 in its low nibble, both signed (`nibbles`)."""

    per_byte = 2

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = self.quantize(weight)
        return {"weight": nibbles(q), "weight_scale": scale}

    def integers(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return unnibble(t["weight"])


class AffineInt4(Int4Kernel, Scheme):
    """Int4 with a scale and a zero point per group of `group_size` consecutive input columns, torchao's int4
    weight-only arithmetic (its tinygemm layout): per group scale = (max - min) / 15, zero = min + 8 scale,
    w ~ code * scale + zero with codes in [-8, 7]. Stored: the codes as int4-row stores them (two signed nibbles
    per byte, even column high), weight_scale and weight_zero [out, in / group] in the weight's dtype.

    A layer whose input size the group size does not divide takes the largest of group_size / 2, / 4, ... that
    does (an even number: two codes per byte), so "int4" applies to every model; the shapes of its scales say which.
    """

    names = ("weight", "weight_scale", "weight_zero")

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
        g = self.group(in_features)
        groups = Stored((out_features, in_features // g), None, True, g)
        return {"weight": Stored((out_features, in_features // 2), torch.int8, True, 2), "weight_scale": groups,
                "weight_zero": groups}

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale, zero = quantize_affine_int4(weight, self.group(weight.shape[1]))
        return {"weight": q, "weight_scale": scale, "weight_zero": zero}

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(unnibble(t["weight"]), t["weight_scale"], torch.float32, t["weight_zero"]).to(dtype)


# -- ternary: BitNet b1.58's absmean codes {-1, 0, +1}, 2 bits each -------------------------------------------

WEIGHT_MIN = 1e-5  # floor of a weight tensor's mean |W|
CODES_PER_BYTE = 4  # ternary codes, 2 bits each


def ternarize(w: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmean ternary: (codes in {-1, 0, 1} as `dtype`, scale [1] in w's dtype); w ~ codes * scale.

    In w's own dtype, as the published weight_quant runs on the model's weights (fp16 ones give fp16 scales and
    products, so codes on a rounding boundary fall as they fall there). The scale is what the published
    u = codes / s_w gives a code of 1: 1 / s_w, rounded to w's dtype, so codes * scale is u exactly."""
    inv = 1.0 / w.abs().mean().clamp(min=WEIGHT_MIN)
    codes = (w * inv).round().clamp(-1, 1)
    return codes.to(dtype), (1.0 / inv).reshape(1)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 ternary codes [out, in] -> uint8 [out, ceil(in / 4)].

    Column k goes to byte k // 4, bits 2*(k % 4) .. 2*(k % 4) + 1, as code + 1 (0: -1, 1: 0, 2: +1);
    the padding columns of a last partial byte hold the code for 0."""
    out_f, in_f = codes.shape
    pad = -in_f % CODES_PER_BYTE
    biased = (F.pad(codes.to(torch.int16), (0, pad)) + 1).to(torch.uint8).view(out_f, -1, CODES_PER_BYTE)
    shifts = torch.arange(0, 2 * CODES_PER_BYTE, 2, dtype=torch.uint8, device=codes.device)
    return (biased << shifts).sum(-1, dtype=torch.uint8)


def unpack_ternary(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 [out, ceil(in / 4)] -> ternary codes [out, in] as `dtype` (pack_ternary read backwards).

    One table lookup per byte: byte value -> its 4 codes, so a layer unpacks in a single pass."""
    table = _UNPACK_TABLE.to(device=packed.device, dtype=dtype)
    codes = F.embedding(packed.to(torch.int32), table).reshape(packed.shape[0], -1)
    return codes if codes.shape[1] == in_features else codes[:, :in_features]


_UNPACK_TABLE = ((torch.arange(256)[:, None] >> torch.arange(0, 2 * CODES_PER_BYTE, 2)) & 3) - 1  # [256, 4]


def bitlinear_latent(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """BitLinear on the latent (trained, full-precision) weight, ternarised for this call."""
    codes, scale = ternarize(weight, weight.dtype)
    return bitlinear_kernels.bitlinear_reference(x, norm_weight, eps, codes, scale)


class Ternary(Scheme):
    """BitNet b1.58 / MatMul-free LM weights: codes {-1, 0, +1} and one absmean scale per matrix,
    w ~ codes * scale with scale = 1 / (1 / mean|w|) rounded in the weight's dtype (`ternarize`); the codes 2 bits
    each, 4 per byte (`pack_ternary`). Its BitLinear is the fused kernel on the packed bytes where the dispatch
    picks it, else the reference on this layer's unpacked codes."""

    name = "ternary"
    rows_independent = False  # one scale for the whole matrix

    def tensors(self, out_features: int, in_features: int) -> TensorPlan:
        return {"weight": Stored((out_features, -(-in_features // 4)), torch.uint8, True, 4),
                "weight_scale": Stored((1,), None, False, 0)}

    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if weight.shape[1] % 4:
            raise ValueError(f"ternary packs four columns per byte; in_features {weight.shape[1]} is not a "
                             "multiple of 4")
        codes, scale = ternarize(weight)
        return {"weight": pack_ternary(codes), "weight_scale": scale}

    def unpack(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return unpack_ternary(t["weight"], t["weight"].shape[1] * 4, dtype) * t["weight_scale"].to(dtype)

    def reference(self, x: torch.Tensor, t: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        # the codes are exact in any float dtype: multiply by them, then scale once (no dequantised weight)
        y = F.linear(x, unpack_ternary(t["weight"], x.shape[-1], x.dtype)) * t["weight_scale"].to(x.dtype)
        return y if bias is None else y + bias

    def bitlinear(self, x: torch.Tensor, t: dict[str, torch.Tensor], norm_weight: torch.Tensor, eps: float,
                  in_features: int) -> torch.Tensor:
        y = bitlinear_kernels.bitlinear_fused(x, norm_weight, eps, t["weight"], t["weight_scale"])
        if y is not None:
            return y  # else the reference, which unpacks this one layer's codes for the call and drops them after
        codes = unpack_ternary(t["weight"], in_features, x.dtype)
        return bitlinear_kernels.bitlinear_reference(x, norm_weight, eps, codes, t["weight_scale"])

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
        for name, plan in self.scheme.tensors(out_features, in_features).items():
            self.register_buffer(name, torch.empty(plan.shape, dtype=plan.dtype or dtype or torch.get_default_dtype()))
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

    def held(self) -> dict[str, torch.Tensor]:
        """The tensors the scheme's kernel multiplies by: the stored ones or, once prepared, the kernel's own."""
        if self.kernel is None and not torch.compiler.is_compiling():
            self.prepare()
        buffers = self._buffers  # (every stored or prepared tensor is a buffer: no Module.__getattr__ per call)
        return {name: buffers[name] for name in self.kernel or self.stored}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scheme.linear(x, self.held(), self.bias)

    @staticmethod
    def forward_many(layers: Sequence[PackedLinear], x: torch.Tensor) -> list[torch.Tensor]:
        """[layer.forward(x) for layer in layers] (kernels/linear.py dense_many: q, k and v; gate and up), in one
        call of zoo's C++ kernel where each layer would run it (dequant_matmul.cpu_quant_linear_many), else one by
        one. The same numbers either way: the same kernel on the same tensors."""
        args = [layer.scheme.dequant_args(layer.held()) for layer in layers]
        if None not in args:
            ys = cpu_quant_linear_many(x, args, [layer.bias for layer in layers])
            if ys is not None:
                return ys
        return [layer.forward(x) for layer in layers]

    def bitlinear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """The MatMul-free LM's BitLinear with this weight (Scheme.bitlinear: the fused kernel for ternary codes)."""
        return self.scheme.bitlinear(x, self.packed(), norm_weight, eps, self.in_features)

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
        for name, plan in self.scheme.tensors(num_embeddings, embedding_dim).items():
            self.register_buffer(name, torch.empty(plan.shape, dtype=plan.dtype or self.dtype))

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


class PackedStack(nn.Module):
    """A stack of weight matrices [n, out, in] held as one nn.Parameter (a mixture of experts' stacked expert
    weights) stored packed: each matrix packed by the scheme, the packed tensors stacked ([n, *stored shape]).

    It stands where the parameter stood: `stack[i]` (an index or a tensor of indices) is the dequantised matrices,
    `stack.linear(x, i)` multiplies x by matrix i through the scheme's kernel."""

    def __init__(self, n: int, out_features: int, in_features: int, scheme: str | Scheme,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.n, self.out_features, self.in_features = n, out_features, in_features
        self.scheme = get_scheme(scheme)
        self.stored = tuple(self.scheme.tensors(out_features, in_features))
        for name, plan in self.scheme.tensors(out_features, in_features).items():
            self.register_buffer(name, torch.empty((n, *plan.shape),
                                                   dtype=plan.dtype or dtype or torch.get_default_dtype()))

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return self.n, self.out_features, self.in_features

    @property
    def shape(self) -> torch.Size:  # the parameter's shape, for code that asked it how many matrices it holds
        return torch.Size(self.weight_shape)

    def packed(self, index: int | None = None) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) if index is None else getattr(self, name)[index] for name in self.stored}

    def linear(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """x [..., in] @ matrix[index]^T."""
        return self.scheme.linear(x, self.packed(index), None)

    def __getitem__(self, index: int | torch.Tensor) -> torch.Tensor:
        """The dequantised matrices at `index`: [*index.shape, out, in], in the scales' dtype."""
        index = torch.as_tensor(index, device=self.weight_scale.device)
        picked = {name: t[index.reshape(-1)] for name, t in self.packed().items()}  # [k, *stored shape]
        dtype = self.weight_scale.dtype
        if self.scheme.rows_independent:  # every stored tensor is by row: all k matrices unpack as one
            mats = self.scheme.unpack({name: t.flatten(0, 1) for name, t in picked.items()}, dtype)
        else:
            mats = torch.stack([self.scheme.unpack({name: t[j] for name, t in picked.items()}, dtype)
                                for j in range(index.numel())])
        return mats.reshape(*index.shape, self.out_features, self.in_features)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self[torch.arange(self.n, device=self.weight_scale.device)].to(dtype or self.weight_scale.dtype)

    def extra_repr(self) -> str:
        return f"{self.n}, {self.out_features}, {self.in_features}, scheme={self.scheme.name}"


PACKED = (PackedLinear, PackedEmbedding, PackedStack)  # the modules whose weight is stored packed


# -- splitting a packed weight (tensor parallelism) ---------------------------------------------------------------


class Slice(NamedTuple):
    """Where one rank's part of a stored tensor lies: [start, stop) along `axis`, or the whole tensor (axis None:
    a value every part shares, such as a per-row scale under a column split); `shape`: the part's shape as the
    rank's own packed module stores it."""

    axis: int | None
    start: int
    stop: int
    shape: tuple[int, ...]


def split_packed(scheme: str | Scheme, out_features: int, in_features: int, by: str, parts: int,
                 rank: int) -> tuple[Scheme, dict[str, Slice]]:
    """The scheme and the stored-tensor slices of rank `rank`'s part of a packed [out, in] weight split into
    `parts` equal parts by output rows (by="rows": column-parallel layers, vocabulary splits) or by input columns
    (by="columns": row-parallel layers), read from `Stored`'s description of each tensor.

    A column split must not cut what one stored element stands for: a nibble pair, a scale group (int4-group128,
    GLM's per-rank scale groups "-gN"); that is refused with a ValueError naming the tensor, before any weight is
    read. A tensor that does not lie along the split axis (a per-row scale under a column split, a per-matrix
    scale) is whole on every rank: it holds for every part."""
    scheme = get_scheme(scheme)
    whole = scheme.tensors(out_features, in_features)
    size = out_features if by == "rows" else in_features
    if by not in ("rows", "columns") or size % parts:
        raise ValueError(f"{scheme.name}: {size} {by} do not split into {parts} equal parts")
    local_scheme = scheme if by == "rows" else scheme.for_columns(parts)
    local_out, local_in = (out_features // parts, in_features) if by == "rows" else (out_features, in_features // parts)
    local = local_scheme.tensors(local_out, local_in)
    slices: dict[str, Slice] = {}
    for name, st in whole.items():
        if by == "rows" and st.by_row:
            n = st.shape[0] // parts
            axis, length = 0, n
        elif by == "columns" and st.columns:
            if local_in % st.columns:
                raise ValueError(f"{scheme.name}: splitting {in_features} input columns into {parts} parts of "
                                 f"{local_in} would cut tensor {name!r}, whose elements stand for {st.columns} "
                                 "columns each (a nibble pair or a scale group)")
            axis, length = len(st.shape) - 1, local_in // st.columns
        else:
            axis, length = None, 0
        start = rank * length
        shape = local[name].shape
        want = (math.prod(st.shape) // st.shape[axis] * length) if axis is not None else math.prod(st.shape)
        if math.prod(shape) != want:
            raise ValueError(f"{scheme.name}: tensor {name!r} of a [{out_features}, {in_features}] weight does not "
                             f"split into {parts} parts by {by}")
        slices[name] = Slice(axis, start, start + length, tuple(shape))
    return local_scheme, slices


def stack_linear(x: torch.Tensor, stack: torch.Tensor | PackedStack, index: int) -> torch.Tensor:
    """x @ stack[index]^T for a stacked weight, float (an nn.Parameter [n, out, in]) or packed (PackedStack)."""
    return stack.linear(x, index) if isinstance(stack, PackedStack) else x @ stack[index].T


def float_key(path: str, module: nn.Module) -> str:
    """The state-dict key of the float weight a packed module at `path` stands for: "path.weight" for a linear
    layer or an embedding, the path itself for a stack (it replaced a parameter of that name)."""
    return path if isinstance(module, PackedStack) else f"{path}.weight"


def _stored_form(module: PackedLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: a layer holding a kernel's arrangement reports its stored tensors."""
    if module.kernel:
        for name, t in module.packed().items():
            state_dict[prefix + name] = t


def linear_paths(module: nn.Module, patterns: list[str] | tuple[str, ...] = ("*",)) -> list[str]:
    """Paths of the nn.Linear modules whose path matches one of the glob patterns (or equals it)."""
    return [name for name, sub in module.named_modules()
            if type(sub) is nn.Linear and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def stack_paths(module: nn.Module) -> list[str]:
    """Paths of the stacked weights a family's modules declare packable: a module lists the names of its
    [n, out, in] nn.Parameters in a `packable_stacks` attribute (qwen2_moe.Experts: its experts' weights)."""
    return [f"{path}.{name}" if path else name for path, sub in module.named_modules()
            for name in getattr(sub, "packable_stacks", ())]


def packable_paths(module: nn.Module, scheme: str | Scheme) -> list[str]:
    """What weight-only quantisation with `scheme` packs: every nn.Linear, every stacked weight a module declares
    (stack_paths), and the embedding table a model also reads as its output head (the path it names in
    `tied_embedding`; the head streams the whole table for every token), when the scheme has an embedding scheme."""
    paths = linear_paths(module) + stack_paths(module)
    tied = getattr(module, "tied_embedding", None)
    if tied and get_scheme(scheme).embedding_scheme() is not None:
        paths.append(tied)
    return paths


def _target(module: nn.Module, path: str) -> nn.Module | torch.Tensor:
    """The module at `path`, or the parameter (a stacked weight) of that name."""
    owner, _, attr = path.rpartition(".")
    parent = module.get_submodule(owner) if owner else module
    if attr in parent._parameters:
        return parent._parameters[attr]
    return module.get_submodule(path)


def module_scheme(module: nn.Module, path: str, scheme: str | Scheme, tp_plan: dict[str, str] | None = None) -> Scheme:
    """The scheme the weight at `path` is packed with under `scheme` (an embedding: its embedding scheme).

    A rowwise scheme with N groups ("int8-row-g8") quantises as the N tensor-parallel ranks of the family's
    `tp_plan` do: a layer split by input rows ("rowwise") gets one scale per row per rank, any other layer one
    scale per whole row (stored repeated, so every layer keeps the one scheme's storage)."""
    scheme = get_scheme(scheme)
    if isinstance(_target(module, path), nn.Embedding | PackedEmbedding):
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
    """Replace the nn.Linear at each path by a PackedLinear of the same shape, a stacked [n, out, in] parameter by
    a PackedStack, and an nn.Embedding (a tied output embedding, see packable_paths) by a PackedEmbedding (call on
    the meta device). tp_plan: see module_scheme."""
    scheme = get_scheme(scheme)
    for path in paths:
        old = _target(module, path)
        chosen = module_scheme(module, path, scheme, tp_plan) if isinstance(old, nn.Linear) else scheme
        owner, _, attr = path.rpartition(".")
        parent = module.get_submodule(owner) if owner else module
        if isinstance(old, nn.Parameter):
            if old.dim() != 3:
                raise ValueError(f"quantization record names {path}, a parameter of shape {tuple(old.shape)}, not "
                                 "a stack of weight matrices [n, out, in]")
            with torch.device(old.device):
                try:
                    new = PackedStack(*old.shape, scheme, old.dtype)
                except ValueError as e:
                    raise ValueError(f"{scheme.name!r} cannot pack {path} (stack {list(old.shape)}): {e}") from None
            delattr(parent, attr)
            setattr(parent, attr, new)
            continue
        with torch.device(old.weight.device):
            if isinstance(old, nn.Linear | nn.Embedding) and (isinstance(old, nn.Linear) or chosen.embedding_scheme()):
                shape = tuple(old.weight.shape)
                try:  # a scheme that cannot pack this shape is refused naming the layer (before any weight is read)
                    new = (PackedLinear(old.in_features, old.out_features, old.bias is not None, chosen,
                                        old.weight.dtype) if isinstance(old, nn.Linear) else
                           PackedEmbedding(old.num_embeddings, old.embedding_dim, chosen.embedding_scheme(),
                                           old.weight.dtype))
                except ValueError as e:
                    raise ValueError(f"{scheme.name!r} cannot pack {path} (weight {list(shape)}): {e}") from None
            else:
                raise ValueError(f"quantization record names {path}, which is a {type(old).__name__}, not a "
                                 "linear layer (or a tied output embedding)")
        setattr(parent, attr, new)
    return paths
