# ruff: noqa: UP006, UP007, UP035, UP045  (the published typing, kept literal)
"""THUDM/GLM-130B `tools/convert_tp.py` (commit 7636bd8, as at HEAD 212215c), vendored as the oracle of GLM-130B's
published INT8/INT4 arithmetic: re-split the SAT ranks to the target TP degree, then quantise each rank's slice of
the four linear weights with one fp16 scale per row of that slice.

Copyright Aohan Zeng and the GLM-130B authors; Apache License 2.0
(https://github.com/THUDM/GLM-130B/blob/main/LICENSE). Changes from the published file, all to run on CPU without
its CUDA kernels: `merged_sd.cuda()` / `.cpu()` are dropped; `compress_int4_weight` (kernels/__init__.py, a CUDA
kernel from cuda/quantization.cu) is written out as its documented arithmetic, output[i] = (input[2i] << 4) |
(input[2i+1] & 0b1111); `main` takes and returns the rank state dicts instead of reading and writing files.
The rest is the published text.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch

SEQUENTIAL_LAYERS = [
    "input_layernorm.weight",
    "input_layernorm.bias",
    "attention.dense.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_4h_to_h.bias",
    "attention.rotary_emb.inv_freq",
    "final_layernorm.weight",
    "final_layernorm.bias",
]

GLU_LAYERS = [
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
]

QUANTIZED_LAYERS = [
    "attention.dense.weight",
    "attention.query_key_value.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
]

LAYER_CONCAT_DIM = {"attention.dense.weight": 1, "mlp.dense_4h_to_h.weight": 1}


def compress_int4_weight(weight: torch.Tensor) -> torch.Tensor:  # cuda/quantization.cu int4WeightCompression
    return (weight[:, 0::2] << 4) | (weight[:, 1::2] & 0b00001111)


def merge_weights(
    key: str,
    sd_list: List[Dict],
    tp_index: int,
    original_tp: int,
    target_tp: int,
    cat_dim: int,
    is_glu: bool,
    quantization_bit_width: Optional[int],
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    if original_tp >= target_tp:
        if is_glu:
            if original_tp > target_tp:
                num_part = original_tp // target_tp
                assert len(sd_list) == num_part
                part1, part2 = [], []
                for i in range(len(sd_list)):
                    chunks = torch.chunk(sd_list[i][key], 2, dim=cat_dim)
                    part1.append(chunks[0])
                    part2.append(chunks[1])
                merged_sd = torch.cat(part1 + part2, dim=cat_dim)
            else:
                merged_sd = sd_list[0][key]
        else:
            merged_sd = torch.cat([sd[key] for sd in sd_list], dim=cat_dim)
    else:
        assert len(sd_list) == 1
        num_part = target_tp // original_tp
        if is_glu:
            offset = tp_index % num_part
            chunks = torch.chunk(sd_list[0][key], num_part * 2, dim=cat_dim)
            merged_sd = torch.cat([chunks[offset], chunks[num_part + offset]], dim=cat_dim)
        else:
            # without clone, torch will save entire tensor
            merged_sd = torch.chunk(sd_list[0][key], num_part, dim=cat_dim)[tp_index % num_part].clone()

    if quantization_bit_width is not None:
        weight = merged_sd
        weight_scale = (weight.abs().max(dim=-1).values / ((2 ** (quantization_bit_width - 1)) - 1)).half()
        weight = torch.round(weight / weight_scale[:, None]).to(torch.int8)
        if quantization_bit_width == 4:
            weight = compress_int4_weight(weight)
        return weight, weight_scale

    return merged_sd


def create_checkpoint(
    sd_list: List[Dict], tp_index: int, original_tp: int, target_tp: int, quantization_bit_width: Optional[int]
) -> Dict:
    new_sd = {}
    for key in sd_list[0].keys():
        name = ".".join(key.split(".")[3 if key.startswith("transformer.layers") else 1 :])
        if name in SEQUENTIAL_LAYERS:
            new_sd[key] = sd_list[0][key]
        else:
            new_sd[key] = merge_weights(
                key,
                sd_list,
                tp_index=tp_index,
                original_tp=original_tp,
                target_tp=target_tp,
                cat_dim=LAYER_CONCAT_DIM.get(name, 0),
                is_glu=name in GLU_LAYERS,
                quantization_bit_width=quantization_bit_width if name in QUANTIZED_LAYERS else None,
            )
            if quantization_bit_width is not None and name in QUANTIZED_LAYERS:
                new_sd[key], new_sd[f"{key}_scale"] = new_sd[key]
    new_sd = {"module": new_sd}
    return new_sd


def main(ranks: List[Dict], target_tp: int, quantization_bit_width: Optional[int]) -> List[Dict]:
    """main() of the published script on in-memory rank "module" dicts: the target ranks' "module" dicts."""
    original_tp = len(ranks)
    out = []
    for i in range(0, target_tp):
        num_parts = original_tp // target_tp
        sd_list = [
            ranks[j]
            for j in (
                range(i * num_parts, (i + 1) * num_parts)
                if target_tp <= original_tp
                else [i // (target_tp // original_tp)]
            )
        ]
        out.append(create_checkpoint(sd_list, i, original_tp, target_tp, quantization_bit_width)["module"])
    return out
