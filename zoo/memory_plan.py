"""What a multi-GPU setup needs per GPU: the weight bytes each GPU holds, from a model's published config and its
family's tensor-parallel plan, and the KV cache it adds per 1024 tokens (the keys and values its blocks' k_proj
and v_proj make, the names zoo's decoders give them; None for a model without them).

A registry entry may declare the setups its publisher runs it on, `extra["setups"]`: a list of
    {"name": "INT4, TP 4", "gpus": 4, "gpu": "RTX 3090", "gpu_memory_gib": 24, "dtype": "float16",
     "quantize": "int4-row-g4", "tp": 4, "pp": 1, "source": "GLM-130B README"}
(`quantize` None for float weights; gpus = tp x pp). `zoo info` shows each with what it needs and whether the
named GPU holds it.

How the bytes are counted (`need`): the family's module is built on the meta device (packed as `quantize` packs
it, with the family's tp_plan, as loading does) and every stored tensor is counted as one rank of
zoo.tensor_parallel holds it: a planned module's tensors that lie along the split axis are cut into tp parts
(colwise / vocab / colwise_rep: rows, and a colwise bias; rowwise: input columns, which for a packed weight
cuts the codes and any per-group scales but leaves a per-row scale whole), everything else (norms, a rowwise
layer's bias, anything the plan does not name) is whole on every rank. With pp stages a GPU holds one stage's
consecutive blocks and the parts around them (embedding, final norm, head), as zoo.pipeline places them.
Packed storage per weight comes from the scheme's own description (quant.Scheme.tensors), never restated here.

Building on meta imports torch (seconds), so `zoo info` reads the numbers of the declared setups from the
registry snapshot (zoo/data/registry.json, section "setups", written by scripts/write_registry_snapshot.py);
this module imports torch only inside `need`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30
KV_TOKENS = 1024  # the KV cache is stated per this many tokens (of one sequence)


@dataclass(frozen=True)
class Setup:
    """One way to run a model: how many GPUs of which memory, and how the weights are stored and split."""

    name: str
    gpus: int
    gpu: str
    gpu_memory_gib: float
    dtype: str = "float16"  # the float tensors (and the compute dtype of packed ones)
    quantize: str | None = None  # a scheme of zoo.architectures.quant, None for float weights
    tp: int = 1
    pp: int = 1
    source: str = ""  # who runs it this way
    note: str = ""

    def __post_init__(self):
        if self.gpus != self.tp * self.pp:
            raise ValueError(f"setup {self.name!r}: {self.gpus} GPUs but tp {self.tp} x pp {self.pp}")


@dataclass(frozen=True)
class Need:
    """Bytes per GPU (the most loaded one) of a setup."""

    weights: int  # every stored tensor the GPU holds
    kv_cache: int | None  # keys and values of its layers per KV_TOKENS tokens of one sequence (None: no k/v proj)


def declared_setups(entry: Any) -> list[Setup]:
    """The setups a registry entry declares (extra["setups"])."""
    return [Setup(**s) for s in entry.extra.get("setups", ())]


# -- counting (imports torch) ------------------------------------------------------------------------------------


def need(family_name: str, config: dict[str, Any], dtype: str = "float16", quantize: str | None = None,
         tp: int = 1, pp: int = 1) -> Need:
    """Weight bytes per GPU and KV-cache bytes per KV_TOKENS tokens for a model of `family_name` with `config`,
    split over tp x pp GPUs (see the module docstring). A tp or pp the model cannot take is refused as loading
    refuses it (zoo.tensor_parallel.check_tensor_parallel, zoo.pipeline.check_pipeline)."""
    import torch

    from zoo.architectures.quant import PackedEmbedding, PackedLinear, pack_linears, packable_paths
    from zoo.device_map import model_parts
    from zoo.pipeline import check_pipeline
    from zoo.registry import get_family
    from zoo.tensor_parallel import check_tensor_parallel, resolve_plan

    family = get_family(family_name)
    module = family.build_meta(family.config_from_dict(config))
    plan: dict[str, str] = {}
    if tp > 1:  # heads and dimensions, checked on the float layers (packing keeps their paths)
        check_tensor_parallel(module, family.tp_plan, tp)
        plan = resolve_plan(module, family.tp_plan)
    if quantize:
        pack_linears(module, quantize, packable_paths(module, quantize), family.tp_plan)
    head, blocks = model_parts(module)
    check_pipeline(blocks, pp, family_name)
    itemsize = getattr(torch, dtype).itemsize

    def split(owner: str, attr: str, style: str) -> bool:
        """Does this tensor of a planned module lie along the axis its style cuts?"""
        sub = module.get_submodule(owner)
        if attr == "bias":
            return style != "rowwise"
        if isinstance(sub, PackedLinear | PackedEmbedding) and attr in sub.stored:
            out_f, in_f = sub.weight_shape
            stored = sub.scheme.tensors(out_f, in_f)[attr]
            if style != "rowwise":
                return stored.by_row
            if stored.columns and (in_f // tp) % stored.columns:
                raise ValueError(f"tp={tp} would cut {owner}.{attr} of {sub.scheme.name}: one stored element "
                                 f"stands for {stored.columns} input columns, and a rank holds {in_f // tp} of the "
                                 f"{in_f} (GLM's per-rank scales: a -g<N> scheme with N a multiple of tp)")
            return bool(stored.columns)
        return True  # a float weight: every style cuts it

    part_bytes: dict[str, int] = {}  # top-level part (a block "layers.3" or a head part "embed") -> bytes
    for key, t in module.state_dict().items():
        owner, _, attr = key.rpartition(".")
        n = t.numel() * (itemsize if t.is_floating_point() else t.element_size())
        if owner in plan and split(owner, attr, plan[owner]):
            n //= tp
        part = next((b for b in blocks if key.startswith(b + ".")), key.split(".")[0])
        part_bytes[part] = part_bytes.get(part, 0) + n
    kv_token: dict[str, int] = {}  # block -> bytes of keys and values per token on one GPU
    for path, sub in module.named_modules():
        if path.rpartition(".")[2] in ("k_proj", "v_proj") and hasattr(sub, "out_features"):
            block = next((b for b in blocks if path.startswith(b + ".")), None)
            if block is not None:
                out = sub.out_features // (tp if path in plan else 1)
                kv_token[block] = kv_token.get(block, 0) + out * itemsize
    around = sum(v for k, v in part_bytes.items() if k not in blocks)
    per = len(blocks) // pp
    stages = [blocks[s * per:(s + 1) * per] for s in range(pp)]
    weights = around + max(sum(part_bytes.get(b, 0) for b in stage) for stage in stages)
    kv = max(sum(kv_token.get(b, 0) for b in stage) for stage in stages) * KV_TOKENS if kv_token else None
    return Need(weights=weights, kv_cache=kv)


def setup_rows(entry: Any) -> list[dict[str, Any]]:
    """Each declared setup of `entry` with what it needs (live: imports torch): the snapshot's "setups" section."""
    return [{**asdict(s), **asdict(need(entry.family, entry.config, s.dtype, s.quantize, s.tp, s.pp))}
            for s in declared_setups(entry)]


def snapshot_setups() -> dict[str, list[dict[str, Any]]]:
    """Entry name -> setup_rows, for every registered entry that declares setups (the snapshot's "setups")."""
    from zoo.registry import get_entry, list_models

    return {name: rows for name in list_models() if (rows := setup_rows(get_entry(name)))}


# -- reading and showing (no torch) -------------------------------------------------------------------------------


def setups_with_needs(entry: Any) -> list[tuple[Setup, Need]]:
    """The entry's declared setups and their needs: from the registry snapshot while it is current and holds
    them for these very setups, else computed (importing torch)."""
    from zoo.registry import snapshot_section

    declared = declared_setups(entry)
    if not declared:
        return []
    rows = snapshot_section("setups").get(entry.name)
    if not rows or [Setup(**{k: r[k] for k in Setup.__dataclass_fields__}) for r in rows] != declared:
        rows = setup_rows(entry)
    return [(Setup(**{k: r[k] for k in Setup.__dataclass_fields__}),
             Need(**{k: r[k] for k in Need.__dataclass_fields__})) for r in rows]


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def headroom(setup: Setup, n: Need) -> tuple[bool, str]:
    """(whether the weights fit the GPU's memory, what is left and how many tokens of KV cache that holds)."""
    left = setup.gpu_memory_gib * GIB - n.weights
    if left < 0:
        return False, f"short by {gib(-left)}"
    tokens = f" (KV cache for {int(left / n.kv_cache * KV_TOKENS):,} tokens)" if n.kv_cache else ""
    return True, f"{gib(left)}{tokens}"


def table(rows: list[tuple[Setup, Need]]) -> list[str]:
    """The lines `zoo info` prints for these setups: one row each, then where each comes from."""
    header = ("setup", "GPUs", "weights per GPU", "fits", "headroom", f"KV cache per {KV_TOKENS} tokens")
    cells = [header]
    for s, n in rows:
        fits, left = headroom(s, n)
        kv = f"{n.kv_cache / GIB:.2f} GiB" if n.kv_cache else "-"
        cells.append((s.name, f"{s.gpus} x {s.gpu} {s.gpu_memory_gib:g} GiB", gib(n.weights), "yes" if fits else "no",
                      left, kv))
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    for s, _ in rows:
        how = f"{s.quantize} packed, the rest {s.dtype}" if s.quantize else s.dtype
        lines.append(f"{s.name}: {'; '.join(x for x in (how, s.source, s.note) if x)}")
    return lines
