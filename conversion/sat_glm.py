"""GLM-130B as released: a SwissArmyTransformer (SAT) tensor-parallel checkpoint.

    DIR/latest                                   the iteration tag, e.g. "49300"
    DIR/<iteration>/mp_rank_00_model_states.pt   one torch.save pickle per tensor-parallel rank, its "module"
    ...                                          entry the rank's state dict (fp16; 8 ranks for GLM-130B)
    DIR/<iteration>/mp_rank_07_model_states.pt

The ranks are merged tensor by tensor as the engine asks for them (`SATSource`), by the rules of GLM-130B's
tools/convert_tp.py (conversion/megatron.py). A merged tensor is written as soon as its pieces are read; the
rank files are opened by sources.PickleTensors (torch.load(weights_only=True, mmap=True) only to learn where
each tensor's bytes are) and the bytes are read with plain file reads straight into the merged tensor, so
resident memory stays about one merged tensor, not the 260 GB of the release.

The published INT8/INT4 checkpoints (tools/convert_tp.py --quantization-bit-width) carry `<weight>` as int8
(INT4: two columns per byte) and `<weight>_scale` (fp16, one per output row OF EACH RANK); merging keeps every
rank's scales, so a row-parallel weight gets one scale per row per rank (zoo.architectures.quant, "-g<N>").

`export_sat` writes a native checkpoint back in this layout (any tensor-parallel degree, megatron.split_rank),
with safetensors rank files (zoo writes no pickles); this format reads those too.
"""

from __future__ import annotations

import json
import os
import re
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from zoo.architectures.glm import GLMConfig
from zoo.conversion.base import Format
from zoo.conversion.megatron import merged_shape, placements, rank_piece_shape, split_rank, tp_layout
from zoo.conversion.rules import Drop, KeyMap, Rule, rename
from zoo.conversion.sources import PickleTensors, SafetensorsSource, TensorSource
from zoo.weights.format import CheckpointError

RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.(pt|safetensors)\Z")


class _SafetensorsRank:
    """A rank file zoo wrote (export_sat): same interface as PickleTensors."""

    def __init__(self, path: Path):
        self.path = path
        self.source = SafetensorsSource([path])

    def keys(self) -> list[str]:
        return self.source.keys()

    def meta(self, key: str) -> torch.Tensor:
        return self.source.meta(key)

    def read_into(self, key: str, out: torch.Tensor, index: tuple = ()) -> None:
        t = self.source.get(key)
        out.copy_((t[index] if index else t).reshape(out.shape))

    def read(self, key: str) -> torch.Tensor:
        return self.source.get(key)


def rank_files(src: Path) -> tuple[str, list[Path]]:
    """(iteration, rank files in rank order) of a SAT checkpoint directory; errors name what is missing."""
    latest = src / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{src}: no 'latest' file; a SAT checkpoint has DIR/latest and "
                              "DIR/<iteration>/mp_rank_XX_model_states.pt")
    iteration = latest.read_text().strip()
    folder = src / iteration
    if not iteration or "/" in iteration or iteration.startswith(".") or not folder.is_dir():
        raise CheckpointError(f"{latest}: names iteration {iteration!r}, but {folder} is not a directory")
    found = {}
    for p in folder.iterdir():
        m = RANK_FILE.match(p.name)
        if m:
            rank = int(m.group(1))
            if rank in found:
                raise CheckpointError(f"{folder}: two files for rank {rank}: {found[rank].name}, {p.name}")
            found[rank] = p
    if not found:
        raise CheckpointError(f"{folder}: no mp_rank_XX_model_states.pt files")
    missing = [r for r in range(max(found) + 1) if r not in found]
    if missing:
        raise CheckpointError(f"{folder}: rank file mp_rank_{missing[0]:02d}_model_states.pt is missing "
                              f"(found ranks {sorted(found)})")
    return iteration, [found[r] for r in range(len(found))]


class SATSource(TensorSource):
    """The merged (tensor-parallel degree 1) tensors of a SAT checkpoint, each merged when asked for."""

    def __init__(self, src: Path, check_replicated: bool = True):
        super().__init__()
        self.src = Path(src)
        self.iteration, self.files = rank_files(self.src)
        # Megatron/DeepSpeed-style rank files may carry the training arguments beside "module" (an
        # argparse.Namespace: plain data); nothing else that needs a class is let in
        self.ranks = [_SafetensorsRank(p) if p.suffix == ".safetensors" else PickleTensors(p, allow=(Namespace,))
                      for p in self.files]
        self.tp = len(self.ranks)
        self.check_replicated = check_replicated
        keys0 = self.ranks[0].keys()
        for rank in self.ranks[1:]:
            missing = [k for k in keys0 if k not in set(rank.keys())]
            extra = [k for k in rank.keys() if k not in set(keys0)]
            if missing or extra:
                what = f"lacks tensor {missing[0]}" if missing else f"has tensor {extra[0]}, which rank 0 lacks"
                raise CheckpointError(f"{rank.path}: {what} ({self.files[0].name} and this file differ)")
        # A quantised release: every packed weight gets one scale per row per rank (the row-parallel ones have
        # that already, the column-parallel ones repeat their one scale), so one "-g<tp>" scheme fits all four.
        self.scale_groups = self.tp if self.tp > 1 and any(k.endswith(".weight_scale") for k in keys0) else 1
        self._shapes: dict[str, tuple[int, ...]] = {}
        for key in keys0:
            piece = tuple(self.ranks[0].meta(key).shape)
            for rank in self.ranks[1:]:
                if tuple(rank.meta(key).shape) != piece or rank.meta(key).dtype != self.ranks[0].meta(key).dtype:
                    raise CheckpointError(f"{rank.path}: tensor {key} is {tuple(rank.meta(key).shape)} "
                                          f"{rank.meta(key).dtype}, rank 0 has {piece} {self.ranks[0].meta(key).dtype}")
            try:
                self._shapes[key] = merged_shape(key, piece, self.tp)
            except ValueError as e:
                raise CheckpointError(f"{self.files[0]}: tensor {key}: {e}") from None
            if self._repeats_scale(key):
                self._shapes[key] = (*self._shapes[key], self.scale_groups)
            self._where[key] = (self.files[0], None)

    def meta(self, key: str) -> torch.Tensor:
        return torch.empty(self._shapes[key], dtype=self.ranks[0].meta(key).dtype, device="meta")

    def piece_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.ranks[0].meta(key).shape)

    def _repeats_scale(self, key: str) -> bool:
        return self.scale_groups > 1 and key.endswith(".weight_scale") and tp_layout(key) in ("column", "glu")

    def bits(self) -> int | None:
        """8 or 4 for a quantised release (INT4 packs two columns per byte), None for a float one."""
        if not any(k.endswith(".weight_scale") for k in self.keys()):
            return None
        hidden = self._shapes["transformer.word_embeddings.weight"][1]
        qkv = self._shapes["transformer.layers.0.attention.query_key_value.weight"]
        return 4 if qkv[1] * 2 == hidden else 8

    def get(self, key: str) -> torch.Tensor:
        if self._repeats_scale(key):
            merged = self._merge(key, self._shapes[key][:-1])
            return merged[:, None].expand(-1, self.scale_groups).contiguous()
        return self._merge(key, self._shapes[key])

    def _merge(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        piece = self.piece_shape(key)
        out = torch.empty(shape, dtype=self.ranks[0].meta(key).dtype)
        if self.tp == 1:
            self.ranks[0].read_into(key, out)
            return out
        layout = tp_layout(key)
        for r, places in enumerate(placements(layout, piece, self.tp)):
            for src, dst in places:
                self.ranks[r].read_into(key, out[dst], src)
        if layout == "replicated" and self.check_replicated:
            other = torch.empty_like(out)
            for rank in self.ranks[1:]:
                rank.read_into(key, other)
                if not torch.equal(other, out):
                    raise CheckpointError(f"{rank.path}: tensor {key} differs from rank 0's copy; it should be "
                                          "the same on every rank")
        return out


# -- SAT names <-> zoo's ---------------------------------------------------------------------------------------


def _qkv_rule(src: str, dst_prefix: str, suffix: str, c: GLMConfig) -> Rule:
    """The fused, per-head interleaved query_key_value ([q, k, v] of head 0, then of head 1, ...) <-> separate
    q/k/v projections. Works for weights, biases, scales and packed int4 rows alike (it permutes rows)."""
    n, hd = c.n_heads, c.head_dim
    names = tuple(f"{dst_prefix}.{p}.{suffix}" for p in ("q_proj", "k_proj", "v_proj"))

    def forward(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        w = ts[0]
        if w.shape[0] != 3 * n * hd:
            raise ValueError(f"expected {3 * n * hd} = 3 x {n} heads x {hd} rows (per-head [q, k, v]), "
                             f"got shape {tuple(w.shape)}")
        per_head = w.reshape(n, 3, hd, *w.shape[1:])
        return [per_head[:, j].reshape(n * hd, *w.shape[1:]).contiguous() for j in range(3)]

    def backward(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        q = ts[0]
        stacked = torch.stack([t.reshape(n, hd, *q.shape[1:]) for t in ts], dim=1)
        return [stacked.reshape(3 * n * hd, *q.shape[1:])]

    return Rule((src,), names, forward, backward, doc="per-head [q, k, v] <-> q_proj, k_proj, v_proj")


def _halves_rule(src: str, dst: tuple[str, str]) -> Rule:
    """GeGLU's dense_h_to_4h (merged: all first halves, then all second halves) <-> up_proj (x1) and
    gate_proj (x2, the GELU branch)."""

    def forward(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        if ts[0].shape[0] % 2:
            raise ValueError(f"a GeGLU input projection needs an even number of rows, got {tuple(ts[0].shape)}")
        return [t.contiguous() for t in ts[0].chunk(2, dim=0)]

    return Rule((src,), dst, forward, lambda ts: [torch.cat(ts, dim=0)], doc="[x1; x2] <-> up_proj, gate_proj")


def glm_keymap(c: GLMConfig, quantized: bool = False, lm_head: str | None = None) -> KeyMap:
    """SAT / ChatGLM names (merged) <-> zoo's, for the config `c`. quantized: the four linear weights come as
    weight + weight_scale. lm_head: the published name of a separate output head, if the model has one."""
    L = "transformer.layers.{i}."
    rules = [
        rename("transformer.word_embeddings.weight", "embed.weight"),
        rename("transformer.final_layernorm.weight", "norm.weight"),
        rename("transformer.final_layernorm.bias", "norm.bias"),
    ]
    for sat, ours in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
        for p in ("weight", "bias"):
            rules.append(rename(f"{L}{sat}.{p}", f"layers.{{i}}.{ours}.{p}"))
    weights = ("weight", "weight_scale") if quantized else ("weight",)
    for suffix in (*weights, "bias"):
        rules.append(_qkv_rule(f"{L}attention.query_key_value.{suffix}", "layers.{i}.attn", suffix, c))
        rules.append(rename(f"{L}attention.dense.{suffix}", f"layers.{{i}}.attn.o_proj.{suffix}"))
        rules.append(rename(f"{L}mlp.dense_4h_to_h.{suffix}", f"layers.{{i}}.mlp.down_proj.{suffix}"))
        if c.mlp == "geglu":
            rules.append(_halves_rule(f"{L}mlp.dense_h_to_4h.{suffix}",
                                      (f"layers.{{i}}.mlp.up_proj.{suffix}", f"layers.{{i}}.mlp.gate_proj.{suffix}")))
        else:
            rules.append(rename(f"{L}mlp.dense_h_to_4h.{suffix}", f"layers.{{i}}.mlp.up_proj.{suffix}"))
    if lm_head:
        rules.append(rename(lm_head, "lm_head.weight"))
    return KeyMap(rules, [Drop(f"{L}attention.rotary_emb.inv_freq", "derived: recomputed from the config")])


# -- config ------------------------------------------------------------------------------------------------

# SAT argument names (configs/model_glm_130b.sh; `--num-layers` or num_layers) -> GLMConfig fields
SAT_ARGS = {"num_layers": "n_layers", "hidden_size": "dim", "inner_hidden_size": "inner_size",
            "num_attention_heads": "n_heads", "vocab_size": "vocab_size", "max_sequence_length": "max_seq_len",
            "position_encoding_2d": "position_2d", "layernorm_epsilon": "norm_eps",
            "hidden_size_per_attention_head": "head_dim",
            # not SAT arguments, but the token ids the mask and position rules use (GLM-130B's by default)
            "mask_token_id": "mask_token_id", "gmask_token_id": "gmask_token_id",
            "smask_token_id": "smask_token_id", "sop_token_id": "sop_token_id"}
# SAT arguments that say nothing about the weights' meaning here
SAT_IGNORED = {"model_parallel_size", "fp16", "bf16", "tokenizer_type", "skip_init", "load", "model_class",
               "hidden_dropout", "attention_dropout", "no_glu", "layernorm_order"}


def sat_config(args: dict[str, Any], where: str) -> dict[str, Any]:
    """GLMConfig fields from SAT arguments; refuses what GLM-130B's model code does not do."""
    fields: dict[str, Any] = {}
    for raw, value in args.items():
        key = raw.lstrip("-").replace("-", "_")
        if key in SAT_ARGS:
            fields[SAT_ARGS[key]] = value
        elif key not in SAT_IGNORED:
            raise CheckpointError(f"{where}: unknown argument {raw!r}; known: {', '.join(sorted(SAT_ARGS))}")
    norm = {k.lstrip("-").replace("-", "_"): v for k, v in args.items()}
    if norm.get("no_glu"):
        raise CheckpointError(f"{where}: no_glu=true (a plain GELU MLP) is not GLM-130B's architecture; "
                              "not supported")
    if norm.get("layernorm_order", "post") != "post":
        raise CheckpointError(f"{where}: layernorm_order {norm['layernorm_order']!r}: GLM-130B uses 'post' "
                              "(DeepNorm); other orders are not supported")
    return fields


def _registered_config(shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, Any]:
    """The published config of the registered GLM whose shapes these are (the release has no config.json)."""
    from zoo.registry import get_entry, list_models

    dim = shapes["transformer.word_embeddings.weight"][1]
    vocab = shapes["transformer.word_embeddings.weight"][0]
    n_layers = len({k.split(".")[2] for k in shapes if k.startswith("transformer.layers.")})
    h4 = shapes.get("transformer.layers.0.mlp.dense_h_to_4h.weight", (0,))[0]
    for name in list_models():
        e = get_entry(name)
        c = e.config
        if (e.family == "glm" and e.source.layout == "sat-glm" and c["dim"] == dim and c["vocab_size"] == vocab
                and c["n_layers"] == n_layers and 2 * c["inner_size"] == h4):
            return dict(c)
    raise CheckpointError(
        f"{where}: no registered GLM model has these shapes (hidden {dim}, {n_layers} layers, vocabulary {vocab}, "
        f"dense_h_to_4h {h4} rows) and the release has no config; pass --config FILE, a JSON object with SAT "
        "argument names (num_layers, hidden_size, inner_hidden_size, num_attention_heads, vocab_size, "
        "max_sequence_length, position_encoding_2d)")


class SATGLM(Format):
    name = "sat-glm"
    family = "glm"
    description = "SwissArmyTransformer tensor-parallel checkpoint of GLM-130B (DIR/latest, DIR/<iter>/mp_rank_*)"
    takes_config = True
    exports_as = "sat"  # zoo convert --to sat NATIVE OUT --tp N
    copy_files = ("ice_text.model",)

    def source_info(self, src: Path) -> dict[str, Any]:
        from zoo.architectures.glm import GLM_130B_LICENSE, GLM_130B_LICENSE_URL, PAPER

        return {"license": GLM_130B_LICENSE, "license_url": GLM_130B_LICENSE_URL, "paper": PAPER}

    def detect(self, src: Path) -> bool:
        try:
            rank_files(Path(src))
        except CheckpointError:
            return False
        return True

    def open(self, src: Path) -> SATSource:
        return SATSource(src)

    def native_config(self, src: Path, config: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        source = SATSource(src)
        shapes = {k: tuple(source.meta(k).shape) for k in source.keys()}
        if config is not None:
            fields = sat_config(config, "--config")
        elif (src / "model_config.json").is_file():  # newer SAT saves its arguments beside the checkpoint
            fields = sat_config(json.loads((src / "model_config.json").read_text()), str(src / "model_config.json"))
        else:
            fields = _registered_config(shapes, str(src))
        n_heads = fields.get("n_heads")
        if n_heads and n_heads % source.tp:
            raise CheckpointError(f"{src}: {n_heads} attention heads do not split over the {source.tp} rank files")
        extra: dict[str, Any] = {"tensor_parallel_source": source.tp, "iteration": source.iteration}
        return fields, extra

    def keymap(self, c: GLMConfig) -> KeyMap:
        return glm_keymap(c, quantized=True)  # the weight_scale rules only match a quantised release

    def quantization(self, src: Path) -> dict[str, Any]:
        source = SATSource(src, check_replicated=False)
        bits = source.bits()
        if bits is None:
            return {}
        n_layers = len({k.split(".")[2] for k in source.keys() if k.startswith("transformer.layers.")})
        paths = [f"layers.{i}.{p}" for i in range(n_layers)
                 for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.gate_proj",
                           "mlp.down_proj")]
        groups = f"-g{source.scale_groups}" if source.scale_groups > 1 else ""
        return {"scheme": f"int{bits}-row{groups}", "modules": paths}

    def write_export(self, model_dir: Path, out: Path, overwrite: bool, progress: bool, tp: int = 1,
                     iteration: str | None = None) -> Path:
        return export_sat(model_dir, out, tp=tp, iteration=iteration, overwrite=overwrite, progress=progress)


FORMATS = [SATGLM()]



def export_sat(model_dir: str | Path, out: str | Path, tp: int = 1, iteration: str | None = None,
               overwrite: bool = False, progress: bool = False) -> Path:
    """Write a native GLM checkpoint in the SAT tensor-parallel layout with `tp` ranks:
    OUT/latest and OUT/<iteration>/mp_rank_XX_model_states.safetensors (SAT's names and per-rank pieces; zoo
    writes safetensors, never pickles). Streams: one merged tensor at a time, each rank's piece cut from it."""
    from zoo.conversion.engine import AtomicDirectory, plan_jobs, run_jobs_meta
    from zoo.weights.format import read_config
    from zoo.weights.writer import TensorSpec, write_tensors

    from zoo.registry import get_family

    model_dir, out = Path(model_dir), Path(out)
    native = read_config(model_dir)
    if native.family != "glm":
        raise CheckpointError(f"{model_dir}: a {native.family} checkpoint; the SAT layout is GLM's")
    c = get_family("glm").config_from_dict(native.config)
    if c.position_2d or not c.tie_embeddings:
        raise CheckpointError(f"{model_dir}: the SAT GLM-130B layout has 1-D positions and a tied output head")
    for what, n in (("attention heads", c.n_heads), ("vocabulary rows", c.vocab_size),
                    ("GeGLU columns", c.inner_size)):
        if not isinstance(tp, int) or tp < 1 or n % tp:
            raise CheckpointError(f"tp={tp} does not divide the {n} {what} of {model_dir}")
    quantized = bool(getattr(native, "quantization", None))
    tensors = SafetensorsSource(sorted(model_dir.glob("*.safetensors")))
    keymap = glm_keymap(c, quantized=quantized).reversed()
    jobs = plan_jobs(tensors.keys(), keymap, lambda k: str(tensors.file_of(k)))
    planned = run_jobs_meta(jobs, tensors)
    owner = {k: job for job in jobs for k in job.dst}
    iteration = str(iteration or native.extra.get("iteration") or "release")
    with AtomicDirectory(out, overwrite) as tmp:
        (tmp / "latest").write_text(iteration)
        # the arguments SAT itself saves beside a checkpoint (model_config.json), so the layout reads back alone
        fields = vars(c)
        args = {sat: fields[ours] for sat, ours in SAT_ARGS.items()}
        args.update(model_class="GLM130B", model_parallel_size=tp, layernorm_order="post")
        (tmp / "model_config.json").write_text(json.dumps(args, indent=2) + "\n")
        folder = tmp / iteration
        folder.mkdir()
        for rank in range(tp):
            specs = [TensorSpec(k, rank_piece_shape(k, tuple(planned[k].shape), tp), planned[k].dtype)
                     for job in jobs for k in job.dst]
            cache: dict[str, torch.Tensor] = {}

            def produce(spec: TensorSpec, rank: int = rank, cache: dict = cache) -> torch.Tensor:
                if spec.name not in cache:
                    cache.clear()
                    job = owner[spec.name]
                    cache.update(zip(job.dst, job.rule.forward([tensors.get(k) for k in job.src])))
                return split_rank(spec.name, cache.pop(spec.name), tp, rank)

            part = folder / f".rank{rank}"
            part.mkdir()
            write_tensors(part, specs, produce, max_shard_bytes=2**62, progress=progress)
            os.rename(part / "model.safetensors", folder / f"mp_rank_{rank:02d}_model_states.safetensors")
            for leftover in part.iterdir():
                leftover.unlink()
            part.rmdir()
    return out
