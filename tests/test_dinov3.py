"""DINOv3: zoo's ViT against timm's vit_*_dinov3 and transformers' DINOv3ViTModel, from all three published layouts."""

import json

import numpy as np
import pytest
import torch
from zoo.architectures.dinov3 import HASHES, SIZES, DINOv3, count_params, size_config
from zoo.conversion.base import detect_format
from zoo.weights.format import CheckpointError

import zoo
from tests.helpers import max_abs_diff

TINY = dict(embed_dim=64, depth=3, num_heads=4)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (LayerScale starts at 1e-5 and biases at zero: a block would be nearly the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = ("norm" in name and name.endswith("weight")) or "gamma" in name or "lambda1" in name
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_scale else 0.0))


def tiny_timm(arch: str = "vit_small_plus_patch16_dinov3_qkvb", seed: int = 0):
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=0, **TINY).eval()
    randomize(model, seed)
    return model


def save_timm(model, path, arch: str) -> None:
    from timm.models._hub import save_for_hf

    save_for_hf(model, path, safe_serialization=True, model_args=dict(TINY))
    assert json.loads((path / "config.json").read_text())["architecture"] == arch


def image(seed: int = 1, n: int = 2, h: int = 48, w: int = 80) -> torch.Tensor:
    """Non-square on purpose: RoPE normalises y and x by their own lengths."""
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def timm_tokens(ref, x):
    with torch.no_grad():
        return ref.forward_features(x)  # [B, 1 + 4 + N, D], final-normed


def assert_features_match(feats, tokens, grid):
    patches = feats.patch_tokens
    assert patches.shape == (tokens.shape[0], tokens.shape[-1], *grid)
    assert max_abs_diff(feats.cls_token, tokens[:, 0]) < 1e-4
    assert max_abs_diff(feats.register_tokens, tokens[:, 1:5]) < 1e-4
    assert max_abs_diff(patches.flatten(2).transpose(1, 2), tokens[:, 5:]) < 1e-4


@pytest.mark.parametrize("arch", ["vit_small_plus_patch16_dinov3_qkvb", "vit_base_patch16_dinov3"])
def test_timm_layouts_swiglu_with_bias_and_mlp_without_match_timm_on_a_non_square_image(tmp_path, arch):
    ref = tiny_timm(arch)
    save_timm(ref, tmp_path / "timm", arch)
    assert detect_format(tmp_path / "timm").name == "timm-dinov3"
    zoo.convert(tmp_path / "timm", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    assert model.config.ffn == ("swiglu" if "plus" in arch else "mlp")
    assert model.config.qkv_bias == arch.endswith("_qkvb")
    x = image()
    with torch.no_grad():
        feats = model.features(x, pooled=False)
    assert_features_match(feats, timm_tokens(ref, x), (3, 5))
    assert max_abs_diff(model.features(x), feats.cls_token) == 0  # the pooled descriptor is the class token


def official_state_dict(timm_model, seed: int = 3) -> dict[str, torch.Tensor]:
    """A timm model's weights under the official release's names, with what the release also holds: the fused q/k/v
    bias with a random (masked-out) key part, its bias_mask, RoPE periods rounded to bfloat16, the mask token and
    the local-crop class norm."""
    g = torch.Generator().manual_seed(seed)
    d = timm_model.embed_dim
    out = {}
    for k, v in timm_model.state_dict().items():
        if k.endswith("attn.q_bias"):
            v_bias = timm_model.state_dict()[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.randn(d, generator=g), v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
    if any("mlp.fc1_g" in k for k in out):  # SwiGLU: timm's fc1_g / fc1_x / fc2 are the official w1 / w2 / w3
        out = {k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2").replace("mlp.fc2", "mlp.w3"): v
               for k, v in out.items()}
    head_dim = d // timm_model.blocks[0].attn.num_heads
    k = torch.arange(head_dim // 4, dtype=torch.float32)
    out["rope_embed.periods"] = (100.0 ** (2 * k / (head_dim // 2))).bfloat16().float()
    out["mask_token"] = torch.randn(1, d, generator=g)
    out["local_cls_norm.weight"], out["local_cls_norm.bias"] = torch.randn(d, generator=g), torch.randn(d, generator=g)
    return out


def test_official_pth_with_masked_key_bias_and_bf16_periods_matches_timm_with_those_periods(tmp_path):
    ref = tiny_timm("vit_small_plus_patch16_dinov3_qkvb")
    sd = official_state_dict(ref)
    src = tmp_path / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"
    torch.save(sd, src)
    assert detect_format(src).name == "dinov3-official"
    zoo.convert(src, tmp_path / "native", progress=False)
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    assert native["config"]["rope_periods"] == "bfloat16" and native["config"]["ffn"] == "swiglu"
    assert native["source"]["license"] == "dinov3-license"
    assert "license_name: dinov3-license" in (tmp_path / "native" / "README.md").read_text()
    stored = set(json.loads((tmp_path / "native" / "model.safetensors.index.json").read_text())["weight_map"])
    assert not any(k.endswith(("periods", "bias_mask", "mask_token")) or "local_cls_norm" in k for k in stored)
    model = zoo.load(tmp_path / "native")
    with torch.no_grad():
        ref.rope.periods.copy_(sd["rope_embed.periods"])  # the official model computes with the stored periods
    x = image(2)
    with torch.no_grad():
        feats = model.features(x, pooled=False)
    assert_features_match(feats, timm_tokens(ref, x), (3, 5))


def test_official_pth_with_an_uninitialised_key_bias_mask_is_refused(tmp_path):
    sd = official_state_dict(tiny_timm("vit_small_plus_patch16_dinov3_qkvb"))
    sd["blocks.1.attn.qkv.bias_mask"] = torch.full_like(sd["blocks.1.attn.qkv.bias_mask"], float("nan"))
    torch.save(sd, tmp_path / "dinov3.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv\.bias_mask"):
        zoo.convert(tmp_path / "dinov3.pth", tmp_path / "native", progress=False)
    assert not (tmp_path / "native").exists()


def tiny_hf(gated: bool, seed: int = 0):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                          num_register_tokens=4, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
                          image_size=64)
    model = DINOv3ViTModel(cfg).eval()
    randomize(model, seed)
    return model


@pytest.mark.parametrize("gated", [True, False])
def test_transformers_dinov3vitmodel_matches_last_hidden_state_pooler_and_hidden_states(tmp_path, gated):
    ref = tiny_hf(gated)
    ref.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf").name == "hf-dinov3"
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    x = image(4, h=80, w=32)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        feats = model.features(x, pooled=False)
        taps = model.module.intermediate_layers(x, [0, 2])
    assert_features_match(feats, out.last_hidden_state, (5, 2))
    assert max_abs_diff(model.features(x), out.pooler_output) < 1e-4
    for (patches, cls), layer in zip(taps, (0, 2)):  # hidden_states[0] is the embedding output
        normed = ref.norm(out.hidden_states[layer + 1])
        assert max_abs_diff(patches, normed[:, 5:]) < 1e-4 and max_abs_diff(cls, normed[:, 0]) < 1e-4


def test_features_from_an_image_array_use_the_stored_preprocessing(tmp_path):
    ref = tiny_timm("vit_base_patch16_dinov3")
    save_timm(ref, tmp_path / "timm", "vit_base_patch16_dinov3")
    zoo.convert(tmp_path / "timm", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    assert model.preprocessing["resolution"] == 256 and model.preprocessing["interpolation"] == "bicubic"
    pixels = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    feats = model.features(pixels, pooled=False)
    assert feats.cls_token.shape == (1, 64) and feats.patch_tokens.shape == (1, 64, 16, 16)
    with pytest.raises(ValueError, match="backbone"):
        model.predict(pixels)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.zeros(1, 3, 40, 48))


def test_published_registry_configs_and_parameter_counts():
    readme = {"vits16": 21.6, "vits16plus": 28.7, "vitb16": 85.7, "vitl16": 303.1, "vith16plus": 840.6,
              "vit7b16": 6716.0}  # README: 21M, 29M, 86M, 300M, 840M, 6,716M
    for arch in SIZES:
        cfg = size_config(arch)
        with torch.device("meta"):
            assert count_params(cfg) == sum(p.numel() for p in DINOv3(cfg).parameters())
        assert round(count_params(cfg) / 1e6, 1) == readme[arch]
    assert len(zoo.list_models("dinov3-*")) == len(HASHES) == 8
    info = zoo.model_info("dinov3-vitl16-sat493m")
    assert info["source"]["repo"] == "timm/vit_large_patch16_dinov3_qkvb.sat493m"
    assert info["extra"]["mean"] == [0.430, 0.411, 0.296] and info["license"] == "dinov3-license"
    seven_b = zoo.model_info("dinov3-vit7b16-lvd1689m")["config"]
    assert seven_b["qkv_bias"] is False and seven_b["ffn"] == "swiglu" and seven_b["ffn_hidden"] == 8192
