"""One ViT attention layer (zoo.architectures.vit.Attention) serves the four ViTs, under their published names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.architectures import vit
from zoo.architectures.dinov3 import DINOv3, DINOv3Config
from zoo.architectures.videomae2 import VideoMAEv2, VideoMAEv2Config
from zoo.architectures.wala_conditions import DinoAttention
from zoo.architectures.wala_uvit import SelfAttention


def test_the_four_vits_attend_through_one_layer_with_their_published_parameter_names():
    video = VideoMAEv2(VideoMAEv2Config(img_size=16, patch_size=8, num_frames=2, embed_dim=32, depth=1, num_heads=2,
                                        mlp_hidden=64))
    dino = DINOv3(DINOv3Config(embed_dim=32, depth=1, num_heads=2, ffn_hidden=64))
    wala_dino, wala_dit = DinoAttention(32, 2), SelfAttention(32, 2)
    for attn in (video.blocks[0].attn, dino.blocks[0].attn, wala_dino, wala_dit):
        assert isinstance(attn, vit.Attention)
    qv = {"qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias"}
    assert set(video.blocks[0].attn.state_dict()) == qv == set(dino.blocks[0].attn.state_dict())
    assert set(wala_dino.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert set(wala_dit.state_dict()) == {"qkv.weight", "qkv.bias", "q_norm.weight", "q_norm.bias", "k_norm.weight",
                                          "k_norm.bias", "proj.weight", "proj.bias"}


def test_attention_with_q_and_v_biases_is_plain_attention_with_a_zero_key_bias():
    torch.manual_seed(0)
    attn = vit.Attention(16, 2, bias="qv")
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 5, 16)
    bias = torch.cat([attn.q_bias, torch.zeros(16), attn.v_bias])
    q, k, v = F.linear(x, attn.qkv.weight, bias).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    expected = F.linear((weights @ v).transpose(1, 2).reshape(2, 5, 16), attn.proj.weight, attn.proj.bias)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_attention_refuses_an_unknown_bias_layout_by_name():
    with pytest.raises(ValueError, match="bias must be one of"):
        vit.Attention(16, 2, bias="k")
