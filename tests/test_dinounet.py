"""Dino U-Net: zoo's network against the literal reference of the published code (tests/dinounet_reference.py), from
checkpoints written the way nnUNetTrainer.save_checkpoint writes them."""

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from zoo.architectures.dinounet import DinoUNetConfig, to_three_channels, variant_config
from zoo.conversion.base import detect_format
from zoo.conversion.nnunet import assemble
from zoo.weights.format import CheckpointError

import zoo
from tests.dinounet_reference import RefDinoUNet, RefDinoVisionTransformer, randomize
from tests.helpers import max_abs_diff

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def reference(seed: int = 0, norm: str = "instance", ffn: str = "mlp", depth: int = 12, tapped=(2, 5, 8, 11),
              classes: int = 3, features=(8, 16, 32, 64), rank: int = 64):
    """A tiny random Dino U-Net as the published code builds it (ViT width 64, 4 heads; SPM width 16; FAPM rank 64,
    so the last scale has no shortcut conv, as rank 256 with 256 channels upstream); the released backbones store
    their RoPE periods rounded to bfloat16."""
    backbone = RefDinoVisionTransformer(embed_dim=64, depth=depth, num_heads=4, ffn=ffn, hidden=128 if ffn == "mlp"
                                        else 96, local_cls_norm=True)
    net = RefDinoUNet(backbone, list(tapped), classes, features, norm=norm, conv_inplane=16, rank=rank).eval()
    randomize(net, seed)
    with torch.no_grad():
        backbone.rope_embed.periods.copy_(backbone.rope_embed.periods.bfloat16().float())
    return net


def plans(features=(8, 16, 32, 64), norm: str = "InstanceNorm2d", schemes=("ZScoreNormalization",),
          patch=(64, 64), spacing=(1.0, 1.0), use_mask=None, reader: str = "NaturalImage2DIO") -> dict:
    """plans.json as nnU-Net v2's planner writes it for a 2-D natural-image dataset (force_n_stages=4)."""
    module = "instancenorm" if norm == "InstanceNorm2d" else "batchnorm"
    n = len(schemes)
    return {
        "dataset_name": "Dataset777_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [999.0, 1.0, 1.0], "original_median_shape_after_transp": [1, 64, 64],
        "image_reader_writer": reader, "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 12,
            "patch_size": list(patch), "median_image_size_in_voxels": [64.0, 64.0], "spacing": list(spacing),
            "normalization_schemes": list(schemes),
            "use_mask_for_norm": list(use_mask or [False] * n),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 4, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv2d",
                    "kernel_sizes": [[3, 3]] * 4, "strides": [[1, 1], [2, 2], [2, 2], [2, 2]],
                    "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
                    "norm_op": f"torch.nn.modules.{module}.{norm}", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": True}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 255.0, "mean": 90.0 + c, "median": 88.0, "min": 0.0, "percentile_00_5": 3.0,
                     "percentile_99_5": 240.0, "std": 40.0} for c in range(n)},
    }


def dataset_json(channels=("CT",), labels=LABELS) -> dict:
    return {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": dict(labels), "numTraining": 42,
            "file_ending": ".png", "name": "Tiny liver", "description": "synthetic test images", "licence": "CC-BY-4.0"}


def save_like_nnunet(path: Path, network_weights: dict, plans_: dict, dataset: dict,
                     trainer: str = "DinoUNetTrainer_s") -> None:
    """What nnUNetTrainer.save_checkpoint writes after training on a GPU: the state dict (aliases included), SGD
    state, the grad scaler, the logger's lists of numpy scalars, init_args with torch.device('cuda'), every storage
    tagged cuda:0 (simulated on this CPU machine by tagging storages the way torch.save tags CUDA ones)."""
    params = [t for k, t in network_weights.items() if t.is_floating_point() and "running" not in k][:3]
    checkpoint = {
        "network_weights": network_weights,
        "optimizer_state": {"state": {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(params)},
                            "param_groups": [{"lr": 0.001, "momentum": 0.99, "dampening": 0, "weight_decay": 3e-5,
                                              "nesterov": True, "params": list(range(len(params)))}]},
        "grad_scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                              "_growth_tracker": 17},
        "logging": {"mean_fg_dice": [np.float32(0.61), np.float64(0.7)], "ema_fg_dice": [np.float64(0.65)],
                    "dice_per_class_or_region": [[np.float32(0.6), np.float32(0.7)]], "train_losses": [-0.5],
                    "val_losses": [np.float32(-0.4)], "lrs": [0.001], "epoch_start_timestamps": [1.7e9],
                    "epoch_end_timestamps": [1.7e9 + 60]},
        "_best_ema": np.float64(0.65),
        "current_epoch": 200,
        "init_args": {"plans": plans_, "configuration": "2d", "fold": 0, "dataset_json": dataset,
                      "unpack_dataset": True, "plans_identifier": "nnUNetPlans", "device": torch.device("cuda")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1),
    }
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(checkpoint, path)


def result_folder(root: Path, net, plans_: dict, dataset: dict, trainer: str = "DinoUNetTrainer_s") -> Path:
    """nnUNet_results/Dataset777_Tiny/<trainer>__nnUNetPlans__2d/ with plans.json, dataset.json and fold_0/."""
    folder = root / "Dataset777_Tiny" / f"{trainer}__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans_))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    save_like_nnunet(folder / "fold_0" / "checkpoint_final.pth", net.state_dict(), plans_, dataset, trainer)
    return folder


def logits_of(net, x):
    with torch.no_grad():
        return net(x)


def test_official_result_folder_converts_and_matches_the_reference_on_a_non_square_image(tmp_path):
    ref = reference()
    sd = ref.state_dict()
    assert "decoder.encoder.dinov3_adapter.backbone.cls_token" in sd and any(".all_modules." in k for k in sd)
    folder = result_folder(tmp_path, ref, plans(), dataset_json())
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(RuntimeError, match="CUDA"):  # the storages really are tagged for a GPU
        torch.load(ckpt, weights_only=False)
    assert detect_format(folder).name == "nnunet-dinounet"
    zoo.convert(folder, tmp_path / "native", progress=False)
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    cfg = native["config"]
    assert cfg["tapped_layers"] == [2, 5, 8, 11] and cfg["backbone"]["num_heads"] == 4
    assert cfg["backbone"]["rope_periods"] == "bfloat16" and cfg["spm_width"] == 16 and cfg["fapm_rank"] == 64
    assert (cfg["in_channels"], cfg["num_classes"], cfg["norm"], cfg["decoder_convs"]) == (1, 3, "instance", [2, 2, 2])
    assert native["extra"]["labels"] == ["background", "liver", "tumour"]
    assert native["extra"]["normalization"] == [{"scheme": "ZScoreNormalization", "use_mask": False}]
    assert native["extra"]["training_data"]["name"] == "Tiny liver" and native["source"]["license"] == "dinov3-license"
    stored = json.loads((tmp_path / "native" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith("decoder.encoder.") or "all_modules" in k or "bias_mask" in k for k in stored)
    model = zoo.load(tmp_path / "native")
    x = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(1))
    out = model(x)
    assert out.shape == (2, 3, 64, 96) and isinstance(model.module.fapm.scales[3].shortcut, torch.nn.Identity)
    assert max_abs_diff(out, logits_of(ref, x)) < 1e-4


def test_batchnorm_plans_two_channels_swiglu_and_a_deeper_vit_match_the_reference(tmp_path):
    ref = reference(seed=5, norm="batch", ffn="swiglu", depth=24, tapped=(4, 11, 17, 23), classes=2, rank=32)
    p = plans(norm="BatchNorm2d", schemes=("ZScoreNormalization", "CTNormalization"))
    ckpt = tmp_path / "checkpoint_best.pth"
    save_like_nnunet(ckpt, ref.state_dict(), p, dataset_json(("T1", "CT"), {"background": 0, "lesion": 1}),
                     trainer="DinoUNetTrainer_l")
    zoo.convert(ckpt, tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    assert model.config.tapped_layers == (4, 11, 17, 23) and model.config.norm == "batch"
    assert model.config.backbone.ffn == "swiglu"
    assert model.native.extra["normalization"][1]["percentile_99_5"] == 240.0
    x = torch.randn(1, 2, 96, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(to_three_channels(x)[:, 2], x[:, 0])  # 2 channels become [c0, c1, c0]
    assert max_abs_diff(model(x), logits_of(ref, x)) < 1e-4


def test_a_pickle_that_carries_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.zeros(1)}, "trainer_name": "DinoUNetTrainer_s", "x": Payload()}, ckpt)
    with pytest.raises(CheckpointError, match=r"refused.*mkdir.*never runs code"):
        zoo.convert(ckpt, tmp_path / "native", progress=False)
    assert not marker.exists() and not (tmp_path / "native").exists()


def test_the_allow_list_is_the_narrowest_that_reads_numpy_2_and_numpy_1_checkpoints(tmp_path):
    from zoo.conversion.nnunet import ALLOW
    from zoo.conversion.sources import load_pickle

    ckpt = tmp_path / "checkpoint_final.pth"
    save_like_nnunet(ckpt, {"w": torch.ones(2)}, plans(), dataset_json())
    data = load_pickle(ckpt, allow=ALLOW)
    assert data["_best_ema"] == 0.65 and data["init_args"]["device"] == torch.device("cuda")
    for name in [a for a in ALLOW if not isinstance(a, tuple)]:  # each of the four is needed
        with pytest.raises(CheckpointError, match="refused"):
            load_pickle(ckpt, allow=[a for a in ALLOW if a is not name])
    # numpy 1.x pickled the scalar constructor as numpy.core.multiarray.scalar: the same file as numpy 1.x wrote it
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(data, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    old = (tmp_path / "legacy.pth").read_bytes()
    assert old.count(b"numpy._core.multiarray\nscalar\n") == 1
    (tmp_path / "numpy1.pth").write_bytes(old.replace(b"numpy._core.multiarray\nscalar\n",
                                                      b"numpy.core.multiarray\nscalar\n"))
    assert load_pickle(tmp_path / "numpy1.pth", allow=ALLOW)["_best_ema"] == 0.65
    with pytest.raises(CheckpointError, match="numpy.core.multiarray.scalar"):
        load_pickle(tmp_path / "numpy1.pth", allow=[a for a in ALLOW if not isinstance(a, tuple)])


def test_head_only_checkpoint_is_assembled_with_the_backbone_file(tmp_path):
    ref = reference(seed=3)
    sd = ref.state_dict()
    backbone = {k.removeprefix("encoder.dinov3_adapter.backbone."): v for k, v in sd.items()
                if k.startswith("encoder.dinov3_adapter.backbone.")}
    head = {k: v for k, v in sd.items() if "dinov3_adapter.backbone." not in k}
    (tmp_path / "run").mkdir()
    save_like_nnunet(tmp_path / "run" / "checkpoint_final.pth", head, plans(), dataset_json())
    torch.save(backbone, tmp_path / "my_vits16.pth")
    with pytest.raises(CheckpointError, match="head only"):
        zoo.convert(tmp_path / "run", tmp_path / "nope", progress=False)
    assemble(tmp_path / "run", tmp_path / "my_vits16.pth", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    assert "my_vits16.pth" in model.native.source["path"]
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    assert max_abs_diff(model(x), logits_of(ref, x)) < 1e-4
    # a result folder holding the backbone file under its published name needs no help (and is no DINOv3 backbone)
    folder = tmp_path / "results" / "DinoUNetTrainer_s__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint_final.pth").rename(folder / "fold_0" / "checkpoint_final.pth")
    torch.save(backbone, folder / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    assert detect_format(folder).name == "nnunet-dinounet"
    zoo.convert(folder, tmp_path / "native2", progress=False)
    assert max_abs_diff(zoo.load(tmp_path / "native2")(x), logits_of(ref, x)) < 1e-4


def test_folds_with_different_backbones_mismatched_classes_and_other_networks_are_named(tmp_path):
    ref = reference(seed=1)
    folder = result_folder(tmp_path, ref, plans(), dataset_json())
    (folder / "fold_1").mkdir()
    save_like_nnunet(folder / "fold_1" / "checkpoint_final.pth", reference(seed=2).state_dict(), plans(),
                     dataset_json())
    with pytest.raises(CheckpointError, match=r"fold_1/checkpoint_final\.pth: tensor encoder\.dinov3_adapter\."
                                              r"backbone\.\S+ differs from the first fold's"):
        zoo.convert(folder, tmp_path / "native", progress=False)
    assert not (tmp_path / "native").exists()
    ckpt = tmp_path / "checkpoint_final.pth"
    save_like_nnunet(ckpt, ref.state_dict(), plans(), dataset_json(labels={"background": 0, "liver": 1}))
    with pytest.raises(CheckpointError, match=r"decoder\.seg_layers\.2\.weight: 3 outputs.*2 classes"):
        zoo.convert(ckpt, tmp_path / "native", progress=False)
    save_like_nnunet(ckpt, {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(4, 1, 3, 3)}, plans(),
                     dataset_json(), trainer="nnUNetTrainer")
    with pytest.raises(CheckpointError, match="not a Dino U-Net checkpoint.*nnUNetTrainer"):
        zoo.convert(ckpt, tmp_path / "native", progress=False)


def test_published_variants_tap_the_published_blocks():
    cfg = variant_config("DinoUNetTrainer_7b")
    assert cfg.tapped_layers == (9, 19, 29, 39) and cfg.backbone.embed_dim == 4096 and not cfg.backbone.qkv_bias
    assert variant_config("DinoUNetTrainer_l").tapped_layers == (4, 11, 17, 23)
    assert DinoUNetConfig(**json.loads(json.dumps(
        {"backbone": {"embed_dim": 64, "num_heads": 4}, "tapped_layers": [1, 2, 3, 4]}))).backbone.embed_dim == 64
    with pytest.raises(ValueError, match="do not exist"):
        DinoUNetConfig(tapped_layers=(2, 5, 8, 12))
