"""Swin V2: zoo's implementation against timm's swinv2 and transformers' Swinv2, from all three published layouts."""

import json
import re

import pytest
import torch
from zoo.architectures.swinv2 import PUBLISHED, SwinV2Config, build, count_params
from zoo.conversion.base import detect_format

import zoo
from tests.helpers import max_abs_diff

TINY = dict(img_size=64, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4)
LABELS = [f"thing {i}" for i in range(10)]


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere: timm zero-inits the post-norms (a block would be the identity), and some logit
    scales above ln 100 exercise the clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 5 + 1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name and "weight" in name else 0))


def tiny_timm(num_classes: int = 10, seed: int = 0, **overrides):
    import timm

    kw = {**TINY, **overrides}
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=num_classes, **kw).eval()
    randomize(model, seed)
    return model


def save_timm(model, path, labels=LABELS):
    from timm.models._hub import save_for_hf

    save_for_hf(model, path, safe_serialization=True, model_config={"label_names": labels} if labels else None)


def official_state_dict(timm_model) -> dict[str, torch.Tensor]:
    """The official release's key names: merging at the end of stage i, `head.*`, derived buffers included."""
    out = {}
    buffers = dict(timm_model.named_buffers())
    for k, v in {**timm_model.state_dict(), **buffers}.items():
        if k.endswith("k_bias"):
            continue  # timm-only zero buffer; the official model has no key bias at all
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v.clone()
    return out


def image(seed: int = 1, n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_logits_match_timm_from_timm_safetensors(tmp_path):
    ref = tiny_timm()
    save_timm(ref, tmp_path / "timm")
    assert detect_format(tmp_path / "timm").name == "timm-swinv2"
    zoo.convert(tmp_path / "timm", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    x = image()
    with torch.no_grad():
        expected = ref(x)
    assert max_abs_diff(model(x), expected) < 1e-4
    assert model.labels == LABELS
    assert max_abs_diff(model.features(x), ref.forward_head(ref.forward_features(x), pre_logits=True)) < 1e-4


def test_official_pth_with_derived_buffers_and_pretrained_windows_matches_timm(tmp_path):
    ref = tiny_timm(num_classes=7, pretrained_window_sizes=(3, 2))
    sd = official_state_dict(ref)
    assert "layers.0.blocks.1.attn_mask" in sd and "layers.0.downsample.reduction.weight" in sd
    torch.save({"model": sd, "epoch": 300}, tmp_path / "swinv2_tiny_patch4_window4_64.pth")
    src = tmp_path / "swinv2_tiny_patch4_window4_64.pth"
    assert detect_format(src).name == "swinv2-official"
    zoo.convert(src, tmp_path / "native", progress=False)
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    assert native["config"]["img_size"] == 64 and native["config"]["window_size"] == 4
    assert native["config"]["pretrained_window_sizes"] == [3, 2]  # recovered from the stored coords tables
    assert native["extra"]["crop_pct"] == 0.875  # the official eval transform: resize size/0.875, center crop
    stored = set(json.loads((tmp_path / "native" / "model.safetensors.index.json").read_text())["weight_map"])
    assert not any(k.endswith(("relative_position_index", "relative_coords_table", "attn_mask")) for k in stored)
    model = zoo.load(tmp_path / "native")
    x = image(2)
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x)) < 1e-4


def tiny_hf(num_labels: int = 10, seed: int = 0, headless: bool = False):
    from transformers import Swinv2Config, Swinv2ForImageClassification, Swinv2Model

    cfg = Swinv2Config(image_size=64, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4,
                       pretrained_window_sizes=[0, 3], num_labels=num_labels,
                       id2label={i: f"hf {i}" for i in range(num_labels)},
                       label2id={f"hf {i}": i for i in range(num_labels)})
    model = (Swinv2Model(cfg) if headless else Swinv2ForImageClassification(cfg)).eval()
    randomize(model, seed)
    return model


def test_logits_match_transformers_swinv2(tmp_path):
    ref = tiny_hf()
    ref.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf").name == "hf-swinv2"
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    x = image(3)
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x).logits) < 1e-4
    assert model.labels[3] == "hf 3"


def test_headless_transformers_swinv2model_features_match_pooler(tmp_path):
    ref = tiny_hf(headless=True)
    ref.save_pretrained(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    x = image(4)
    with torch.no_grad():
        out = ref(x)
    assert max_abs_diff(model.features(x), out.pooler_output) < 1e-4
    assert max_abs_diff(model.features(x, pooled=False).flatten(1, 2), out.last_hidden_state) < 1e-4


def test_resolution_transfer_to_a_larger_window_matches_timm(tmp_path):
    """Trained at 64 px / window 4, run at 128 px / window 8 with the CPB normalised by the old window."""
    import timm

    small = tiny_timm()
    save_timm(small, tmp_path / "timm")
    zoo.convert(tmp_path / "timm", tmp_path / "native", progress=False)
    big = zoo.load(tmp_path / "native").reconfigure(img_size=128, window_size=8, pretrained_window_sizes=(4, 4))
    attn = big.module.layers[0].blocks[0].attn
    assert attn.relative_position_index.shape == (64, 64) and not attn.relative_position_index.is_meta
    assert big.preprocessing["resolution"] == 128
    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=10,
                            **{**TINY, "img_size": 128, "window_size": 8, "pretrained_window_sizes": (4, 4)}).eval()
    ref.load_state_dict(small.state_dict())
    x = image(5, size=128)
    with torch.no_grad():
        assert max_abs_diff(big(x), ref(x)) < 1e-4
    with pytest.raises(ValueError, match="64x64"):
        zoo.load(tmp_path / "native")(x)  # the original size is fixed by its window partition


def test_convert_cli_detects_the_layout(tmp_path, capsys):
    from zoo.cli import main

    save_timm(tiny_timm(), tmp_path / "timm")
    assert main(["convert", str(tmp_path / "timm"), str(tmp_path / "native")]) == 0
    assert json.loads((tmp_path / "native" / "config.json").read_text())["source"]["layout"] == "timm-swinv2"


def test_param_count_formula_and_published_registry():
    for name in ("swinv2-tiny-w8-256-in1k", "swinv2-large-w12to24-192to384-in22k-ft-in1k"):
        cfg = SwinV2Config(**zoo.model_info(name)["config"])
        with torch.device("meta"):
            assert count_params(cfg) == sum(p.numel() for p in build(cfg).parameters())
    info = zoo.model_info("swinv2-base-w12to16-192to256-in22k-ft-in1k")
    assert info["config"]["pretrained_window_sizes"] == (12, 12, 12, 6)
    assert info["extra"]["interpolation"] == "bicubic" and info["extra"]["crop_pct"] == 0.9
    assert zoo.model_info("swinv2-large-w12-192-in22k")["config"]["num_classes"] == 21841
    assert len(PUBLISHED) == 12
    assert round(zoo.model_info("swinv2-tiny-w8-256-in1k")["params"] / 1e6) == 28  # paper: 28M
