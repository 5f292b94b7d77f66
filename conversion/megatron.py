"""Megatron-style tensor parallelism of a checkpoint: merging rank pieces into one tensor, and splitting back.

The rules are GLM-130B's tools/convert_tp.py (SwissArmyTransformer's Megatron layout), by tensor name:
query_key_value and the embedding are cut by rows (whole heads, vocabulary ranges), the row-parallel dense /
dense_4h_to_h by input columns, the norms and the output biases are replicated, and dense_h_to_4h is cut
GLU-aware (each rank holds its own slice of BOTH GeGLU halves, so the merged tensor is all ranks' first halves,
then all ranks' second halves). Quantised weights' `weight_scale` (one per output row OF EACH RANK) follow their
weight; a row-parallel weight's scales merge into one column per rank.

`placements` says where each rank's piece goes in the merged tensor, so a streaming reader (conversion/sat_glm.py)
can read pieces straight into place; `merge_ranks` / `split_rank` do the same in memory.
"""

from __future__ import annotations

import torch

# tools/convert_tp.py's classes of tensors, by the name after "transformer.layers.{i}." / "transformer."
REPLICATED = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "attention.dense.bias", "mlp.dense_4h_to_h.bias",
              "final_layernorm.weight", "final_layernorm.bias", "attention.rotary_emb.inv_freq")
GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_h_to_4h.weight_scale")
ROW_PARALLEL = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")  # cut by input columns
ROW_PARALLEL_SCALES = ("attention.dense.weight_scale", "mlp.dense_4h_to_h.weight_scale")  # one column per rank


def tp_layout(key: str) -> str:
    """How a SAT tensor is spread over the ranks: replicated | glu | row | row_scale | column."""
    name = key.split(".", 3)[3] if key.startswith("transformer.layers.") else key.split(".", 1)[-1]
    if name in REPLICATED:
        return "replicated"
    if name in GLU:
        return "glu"
    if name in ROW_PARALLEL:
        return "row"
    if name in ROW_PARALLEL_SCALES:
        return "row_scale"
    return "column"  # query_key_value (+ bias, scale), word_embeddings


def placements(layout: str, piece: tuple[int, ...], tp: int) -> list[list[tuple[tuple, tuple]]]:
    """For each rank: (index into its piece, index into the merged tensor) pairs."""
    out = []
    for r in range(tp):
        if layout == "replicated":
            out.append([((), ())] if r == 0 else [])
        elif layout == "column":
            n = piece[0]
            out.append([((), (slice(r * n, (r + 1) * n),))])
        elif layout == "glu":
            half = piece[0] // 2
            out.append([((slice(0, half),), (slice(r * half, (r + 1) * half),)),
                        ((slice(half, 2 * half),), (slice(tp * half + r * half, tp * half + (r + 1) * half),))])
        elif layout == "row":
            n = piece[1]
            out.append([((), (slice(None), slice(r * n, (r + 1) * n)))])
        elif layout == "row_scale":  # [out] per rank -> [out, tp] (or [out, g] per rank -> [out, g * tp])
            g = piece[1] if len(piece) > 1 else 1
            out.append([((), (slice(None), slice(r * g, (r + 1) * g)))])
        else:
            raise ValueError(layout)
    return out


def merged_shape(key: str, piece: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape of the merged tensor whose rank pieces are each `piece` (ValueError if they cannot be one)."""
    layout = tp_layout(key)
    if layout == "replicated" or tp == 1:
        return piece
    if layout in ("column", "glu"):
        if layout == "glu" and piece[0] % 2:
            raise ValueError(f"a GLU-split tensor needs an even number of rows per rank, got {piece}")
        return (piece[0] * tp, *piece[1:])
    if layout == "row":
        return (piece[0], piece[1] * tp)
    g = piece[1] if len(piece) > 1 else 1
    return (piece[0], g * tp)


def merge_ranks(key: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """One tensor from its rank pieces (in memory; the streaming reader places pieces the same way)."""
    tp = len(pieces)
    if tp == 1:
        return pieces[0].clone()
    shape = merged_shape(key, tuple(pieces[0].shape), tp)
    out = torch.empty(shape, dtype=pieces[0].dtype)
    for r, places in enumerate(placements(tp_layout(key), tuple(pieces[0].shape), tp)):
        for src, dst in places:
            out[dst].copy_(pieces[r][src].reshape(out[dst].shape))
    return out


def rank_piece_shape(key: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape of one rank's piece of a merged tensor of `shape` (ValueError if it does not split)."""
    layout = tp_layout(key)
    if layout == "replicated" or tp == 1:
        return shape
    if layout in ("column", "glu"):
        if shape[0] % (2 * tp if layout == "glu" else tp):
            raise ValueError(f"{key}: {shape[0]} rows do not split over {tp} ranks"
                             + (" (two GeGLU halves per rank)" if layout == "glu" else ""))
        return (shape[0] // tp, *shape[1:])
    if shape[1] % tp:
        what = "columns" if layout == "row" else "scale groups"
        raise ValueError(f"{key}: {shape[1]} {what} do not split over {tp} ranks")
    if layout == "row_scale" and shape[1] == tp:
        return (shape[0],)
    return (shape[0], shape[1] // tp)


def split_rank(key: str, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of a merged tensor (a contiguous copy): the inverse of merge_ranks."""
    piece = rank_piece_shape(key, tuple(tensor.shape), tp)
    if tp == 1:
        return tensor.clone()
    out = torch.empty(piece, dtype=tensor.dtype)
    for src, dst in placements(tp_layout(key), piece, tp)[rank] or [((), ())]:
        out[src].copy_(tensor[dst].reshape(out[src].shape))
    return out


def split_ranks(key: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Every rank's piece of a merged tensor."""
    return [split_rank(key, tensor, tp, r) for r in range(tp)]
