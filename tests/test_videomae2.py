"""VideoMAE V2: zoo's implementation against transformers' VideoMAE, from the official, hub and transformers layouts."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from zoo.architectures.videomae2 import VideoMAEv2Config, build, count_params
from zoo.conversion.base import detect_format

import zoo
from tests.helpers import max_abs_diff

TINY = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=48, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=96, layer_norm_eps=1e-6)
# ViT-S width (the official files carry no head count: it follows the published width), one block, 16 x 224^2
OFFICIAL_S = dict(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=384, num_hidden_layers=1,
                  num_attention_heads=6, intermediate_size=1536, layer_norm_eps=1e-6)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0))


def tiny_hf(kind: str = "classify", num_labels: int = 5, seed: int = 0, **overrides):
    from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification, VideoMAEModel

    cfg = VideoMAEConfig(**{**TINY, **overrides}, num_labels=num_labels,
                         id2label={i: f"action {i}" for i in range(num_labels)},
                         label2id={f"action {i}": i for i in range(num_labels)})
    cls = {"classify": VideoMAEForVideoClassification, "model": VideoMAEModel, "pretrain": VideoMAEForPreTraining}
    model = cls[kind](cfg).eval()
    randomize(model, seed)
    return model


def official_names(hf_state: dict[str, torch.Tensor], prefix: str = "videomae.") -> dict[str, torch.Tensor]:
    """transformers' VideoMAE names -> the official VisionTransformer names (qkv fused, q/v biases)."""
    out, s = {}, {k.removeprefix(prefix): v for k, v in hf_state.items()}
    out["patch_embed.proj.weight"] = s["embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = s["embeddings.patch_embeddings.projection.bias"]
    n = len({k.split(".")[2] for k in s if k.startswith("encoder.layer.")})
    pairs = [("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
             ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")]
    for i in range(n):
        p = f"encoder.layer.{i}.attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([s[p + f"{m}.weight"] for m in ("query", "key", "value")])
        out[f"blocks.{i}.attn.q_bias"], out[f"blocks.{i}.attn.v_bias"] = s[p + "query.bias"], s[p + "value.bias"]
        for a, b in pairs:
            for w in ("weight", "bias"):
                out[f"blocks.{i}.{b}.{w}"] = s[f"encoder.layer.{i}.{a}.{w}"]
    for a, b in (("fc_norm", "fc_norm"), ("classifier", "head"), ("layernorm", "norm")):
        for w in ("weight", "bias"):
            if f"{a}.{w}" in s:
                out[f"{b}.{w}"] = s[f"{a}.{w}"]
    return {k: v.clone() for k, v in out.items()}


def video(cfg: dict, seed: int = 1, n: int = 2) -> torch.Tensor:
    """[B, C, T, H, W] (ours and the official layout); transformers takes [B, T, C, H, W]."""
    shape = (n, 3, cfg["num_frames"], cfg["image_size"], cfg["image_size"])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("geometry", [{}, dict(image_size=28, patch_size=7, intermediate_size=208)],
                         ids=["patch8", "giant-like-patch7-mlp48/11"])
def test_logits_match_transformers_videomae(tmp_path, geometry):
    ref = tiny_hf(**geometry)
    ref.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf").name == "hf-videomae"
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    native = json.loads((tmp_path / "native" / "config.json").read_text())["config"]
    assert native["norm_eps"] == 1e-6 and native["fc_norm_eps"] == 1e-5  # read from the layout, not assumed
    model = zoo.load(tmp_path / "native")
    x = video({**TINY, **geometry})
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x.transpose(1, 2)).logits) < 1e-4
    assert model.labels == [f"action {i}" for i in range(5)]


def test_official_distilled_pth_under_module_matches_transformers(tmp_path):
    ref = tiny_hf(num_labels=710, **OFFICIAL_S)
    ref.fc_norm.eps = 1e-6  # the official fc_norm eps; transformers hard-codes 1e-5
    snapshot = tmp_path / "VideoMAE2"  # as a Hub snapshot of OpenGVLab/VideoMAE2 with one file fetched
    (snapshot / "distill").mkdir(parents=True)
    src = snapshot / "distill" / "vit_s_k710_dl_from_giant.pth"
    torch.save({"module": official_names(ref.state_dict())}, src)
    assert detect_format(src).name == "videomae2-official"
    assert detect_format(snapshot).name == "videomae2-official"
    zoo.convert(snapshot, tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    assert model.config.num_heads == 6 and model.config.fc_norm_eps == 1e-6
    assert model.labels[:2] == ["riding a bike", "marching"]  # the published Kinetics-710 label map
    x = video(OFFICIAL_S, n=1)
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x.transpose(1, 2)).logits) < 1e-4


def test_official_pretraining_pth_gives_encoder_features(tmp_path):
    """A pre-training file (encoder.* with its final norm, plus a decoder that is dropped)."""
    ref = tiny_hf("model", use_mean_pooling=False, **OFFICIAL_S)
    enc = {f"encoder.{k}": v for k, v in official_names(ref.state_dict(), prefix="").items()}
    dec = {f"decoder.{k}": torch.zeros(4) for k in ("norm.weight", "norm.bias", "head.bias")}
    dec.update({"encoder_to_decoder.weight": torch.zeros(8, 384), "mask_token": torch.zeros(1, 1, 8),
                "decoder.blocks.0.attn.qkv.weight": torch.zeros(24, 8)})
    torch.save({"model": {**enc, **dec}}, tmp_path / "vit_s_pt.pth")
    zoo.convert(tmp_path / "vit_s_pt.pth", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    assert model.config.final_norm == "norm" and model.config.num_classes == 0
    x = video(OFFICIAL_S, n=1)
    with torch.no_grad():
        tokens = ref(x.transpose(1, 2)).last_hidden_state
    assert max_abs_diff(model.features(x, pooled=False), tokens) < 1e-4
    assert max_abs_diff(model.features(x), tokens.mean(1)) < 1e-4
    with pytest.raises(ValueError, match="backbone without a classifier"):
        model.predict(x)


def write_hub_layout(ref, directory: Path) -> Path:
    """The tiny backbone `ref` in the hub custom-code layout (OpenGVLab/VideoMAEv2-*: `model.`-prefixed official
    names, config.json with auto_map and model_config)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({f"model.{k}": v for k, v in official_names(ref.state_dict()).items()}, directory / "model.safetensors")
    model_config = dict(img_size=32, patch_size=8, in_chans=3, num_classes=0, embed_dim=48, depth=2, num_heads=4,
                        mlp_ratio=2, qkv_bias=True, drop_path_rate=0.0, init_values=0.0, use_learnable_pos_emb=False,
                        tubelet_size=2, use_mean_pooling=True, with_cp=False, num_frames=4, cos_attn=False,
                        layer_norm_eps=1e-6)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "VideoMAEv2_Base", "architectures": ["VideoMAEv2"],
        "auto_map": {"AutoModel": "modeling_videomaev2.VideoMAEv2", "AutoConfig": "modeling_config.VideoMAEv2Config"},
        "model_config": model_config}))
    return directory


def test_hub_custom_code_layout_matches_transformers_features(tmp_path):
    ref = tiny_hf(num_labels=0)
    ref.fc_norm.eps = 1e-6
    src = write_hub_layout(ref, tmp_path / "VideoMAEv2-Tiny")
    assert detect_format(src).name == "videomae2-hub"
    zoo.convert(src, tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    x = video(TINY)
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x.transpose(1, 2)).logits) < 1e-4  # no head: logits are the features


def test_transformers_pretraining_checkpoint_converts_to_its_encoder(tmp_path):
    ref = tiny_hf("pretrain", use_mean_pooling=False)
    ref.save_pretrained(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    x = video(TINY)
    with torch.no_grad():
        assert max_abs_diff(model.features(x, pooled=False), ref.videomae(x.transpose(1, 2)).last_hidden_state) < 1e-4


def test_param_count_and_published_registry():
    for name in ("videomae2-s-k710-distilled", "videomae2-giant"):
        cfg = VideoMAEv2Config(**zoo.model_info(name)["config"])
        with torch.device("meta"):
            assert count_params(cfg) == sum(p.numel() for p in build(cfg).parameters())
    giant = zoo.model_info("videomae2-g-k710")
    assert giant["config"]["patch_size"] == 14 and giant["config"]["mlp_hidden"] == 6144
    assert round(giant["params"] / 1e9, 2) == 1.01
    assert zoo.model_info("videomae2-b-k710-distilled")["source"]["files"] == ("distill/vit_b_k710_dl_from_giant.pth",)
    assert round(zoo.model_info("videomae2-base")["params"] / 1e6, 1) == 86.2  # the hub card: 86.2M
