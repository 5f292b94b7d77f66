# Copyright THUDM (Tsinghua KEG / Zhipu AI). Licensed under the Apache License 2.0 (LICENSE beside this file).
# Vendored as a test oracle from THUDM/chatglm-6b-int4's quantization.py and quantization_kernels.c (README.md):
# the published Python statements verbatim, the compiled kernels transliterated element for element.
"""ChatGLM-6B's INT8/INT4 weight quantisation and its CPU dequantisation (W8A16LinearCPU)."""

from __future__ import annotations

import torch


# void compress_int4_weight(void *weight, void *out, int n, int m)
# {
#     for(int i=0;i<n*m;i++)
#     {
#         (*(unsigned char*)(out)) = ((*(unsigned char*)(weight)) << 4);
#         weight += sizeof(char);
#         (*(unsigned char*)(out)) |= ((*(unsigned char*)(weight)) & 15);
#         weight += sizeof(char);
#         out += sizeof(char);
#     }
# }
# (the CUDA kernel int4WeightCompressionDevice: output[i] = (input[i * 2] << 4) | (input[i * 2 + 1] & 0b00001111))
def compress_int4_weight(weight: torch.Tensor) -> torch.Tensor:  # (n, m)
    n, m = weight.size(0), weight.size(1)
    assert m % 2 == 0
    u = weight.view(torch.uint8).to(torch.int32)  # unsigned char
    out = ((u[:, 0::2] << 4) & 0xFF) | (u[:, 1::2] & 15)
    return out.to(torch.uint8).view(torch.int8)


# void extract_int8_weight_to_float(void *weight, void *scale_list, void *out, int n, int m)
# {
#     for(int i=0;i<n;i++)
#         for(int j=0;j<m;j++)
#             (*(float*)(out + sizeof(float) * (i * m + j))) = (*(float*)(scale_list + sizeof(float) * i)) *
#                 (*(char*)(weight + sizeof(char) * (i * m + j)));
# }
#
# void extract_int4_weight_to_float(void *weight, void *scale_list, void *out, int n, int m)
# {
#     for(int i=0;i<n;i++)
#     {
#         for(int j=0;j<m;j++)
#         {
#             (*(float*)(out)) = (*(float*)(scale_list)) * ((*(char*)(weight)) >> 4);
#             out += sizeof(float);
#             (*(float*)(out)) = (*(float*)(scale_list)) * (((char)((*(unsigned char*)(weight)) << 4))>> 4);
#             out += sizeof(float);
#             weight += sizeof(char);
#         }
#         scale_list += sizeof(float);
#     }
# }
def extract_weight_to_float(weight: torch.Tensor, scale_list: torch.Tensor, source_bit_width: int) -> torch.Tensor:
    """extract weight on cpu to float32 (scale_list is float32: the CPU path runs the model after .float())"""
    assert scale_list.dtype == torch.float32, "the C kernel reads the scales as float"
    n, m = weight.size(0), weight.size(1)
    scale = scale_list[:, None]
    c = weight.to(torch.int32)  # char (signed on the platforms the kernels are built for)
    if source_bit_width == 8:
        return scale * c.to(torch.float32)
    elif source_bit_width == 4:
        high = c >> 4
        low = (((weight.view(torch.uint8).to(torch.int32) << 4) & 0xFF) ^ 0x80) - 0x80  # (char)(uchar << 4)
        low = low >> 4
        out = torch.empty(n, m * 2, dtype=torch.float32)
        out[:, 0::2] = scale * high.to(torch.float32)
        out[:, 1::2] = scale * low.to(torch.float32)
        return out
    else:
        assert False, "Unsupported bit-width"


def quantize_weight(weight_tensor: torch.Tensor, weight_bit_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantizedLinear.__init__ given a float weight_tensor: (self.weight, self.weight_scale)."""
    weight_scale = (weight_tensor.abs().max(dim=-1).values / ((2 ** (weight_bit_width - 1)) - 1)).half()
    weight = torch.round(weight_tensor / weight_scale[:, None]).to(torch.int8)
    if weight_bit_width == 4:
        weight = compress_int4_weight(weight)
    return weight, weight_scale


def w8a16_linear_cpu(inp: torch.Tensor, quant_w: torch.Tensor, scale_w: torch.Tensor, weight_bit_width: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16LinearCPU.forward, then QuantizedLinear.forward's bias."""
    inp_shape = inp.size()
    out_features = quant_w.size(0)
    inp = inp.contiguous().view(-1, inp.size(-1))
    weight = extract_weight_to_float(quant_w, scale_w, weight_bit_width)
    output = inp.mm(weight.t())
    output = output.view(*(inp_shape[:-1] + (out_features,)))
    if bias is not None:
        output = output + bias
    return output
