"""Dino U-Net's segment() against nnU-Net v2's own inference.

The oracle is nnunetv2 (PyPI, Apache-2.0, the test extra): its nnUNetPredictor, set up with manual_initialization
on the literal reference network (tests/dinounet_reference.py), the weights of every fold, and the plans and
dataset.json zoo converted from; predict_single_npy_array gives its probabilities and segmentation (its
DefaultPreprocessor, resampling, sliding window, mirroring, fold average, export). Its SimpleITKIO reads the
volumes, and its remove_connected_components functions are the oracle of the postprocessing.
"""

import json
import pickle
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.postprocessing.remove_connected_components import (
    apply_postprocessing,
    remove_all_but_largest_component_from_segmentation,
)
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from zoo.weights.format import CheckpointError

import zoo
from tests.test_dinounet import dataset_json, plans, reference, save_like_nnunet

PLANS = plans(spacing=(1.4, 1.4), use_mask=[True], reader="SimpleITKIO")  # resampled in-plane, z-score in the mask
BACKBONE = "encoder.dinov3_adapter.backbone."


def fold_networks(n: int = 2):
    """n reference networks with their own heads and one frozen backbone, as n folds of a DinoUNetTrainer train."""
    nets = [reference(seed=10 + k) for k in range(n)]
    for net in nets[1:]:
        net.encoder.dinov3_adapter.backbone.load_state_dict(nets[0].encoder.dinov3_adapter.backbone.state_dict())
    return nets


def result_folder(root, nets, plans_=PLANS):
    folder = root / "Dataset777_Tiny" / "DinoUNetTrainer_s__nnUNetPlans__2d"
    for k, net in enumerate(nets):
        (folder / f"fold_{k}").mkdir(parents=True)
        sd = net.state_dict()
        save_like_nnunet(folder / f"fold_{k}" / "checkpoint_final.pth", sd, plans_, dataset_json())
    (folder / "plans.json").write_text(json.dumps(plans_))
    (folder / "dataset.json").write_text(json.dumps(dataset_json()))
    return folder


def nnunet(nets, folds=None, mirror=True, plans_=PLANS):
    """nnUNetPredictor on the CPU with the reference network and the given folds' weights."""
    folds = list(range(len(nets))) if folds is None else folds
    manager = PlansManager(plans_)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(reference(seed=99), manager, manager.get_configuration("2d"),
                                    [nets[f].state_dict() for f in folds], dataset_json(), "DinoUNetTrainer_s", (0, 1))
    return predictor


def oracle(predictor, data, properties):
    seg, probs = predictor.predict_single_npy_array(data.astype(np.float32), properties, None, None, True)
    return seg, probs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two folds in an nnU-Net result folder, converted by `zoo convert` into one native checkpoint."""
    from zoo.cli import main

    root = tmp_path_factory.mktemp("dinounet_nnunet")
    nets = fold_networks(2)
    folder = result_folder(root, nets)
    assert main(["convert", str(folder), str(root / "native")]) == 0
    return nets, folder, root / "native"


def picture(h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    """Pixels with a zero border and a zero hole inside (the hole is filled in the normalisation mask)."""
    a = np.zeros((h, w), np.float32)
    a[6:h - 4, 9:w - 7] = np.random.default_rng(seed).integers(1, 256, (h - 10, w - 16))
    a[40:50, 50:60] = 0
    return a


def test_a_picture_gives_nnunet_predictors_probabilities_and_mask(converted):
    nets, _, native = converted
    model = zoo.load(native)
    assert model.config.folds == 2 and model.folds == [0, 1]
    stored = json.loads((native / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("extra_folds.0.decoder.seg_layer") for k in stored)
    assert not any("backbone" in k for k in stored if k.startswith("extra_folds."))  # one frozen backbone, stored once
    image = picture()
    ours = model.segment(image, probabilities=True)  # mirroring on and both folds, as nnU-Net's defaults
    seg, probs = oracle(nnunet(nets), image[None, None], {"spacing": [999.0, 1.0, 1.0]})
    assert ours.mask.shape == image.shape and ours.probabilities.shape == (3, *image.shape)
    assert np.abs(ours.probabilities - probs[:, 0]).max() < 1e-4
    assert (ours.mask == seg[0]).all() and len(np.unique(seg)) > 1


def test_one_fold_of_several_and_mirroring_off_match_the_predictor_set_up_the_same_way(converted):
    nets, _, native = converted
    model = zoo.load(native)
    image = picture(70, 64, seed=1)
    ours = model.segment(image, folds=[1], mirror=False, probabilities=True)
    seg, probs = oracle(nnunet(nets, folds=[1], mirror=False), image[None, None], {"spacing": [999.0, 1.0, 1.0]})
    assert np.abs(ours.probabilities - probs[:, 0]).max() < 1e-4 and (ours.mask == seg[0]).all()
    mirrored = model.segment(image, folds=[1], probabilities=True).probabilities
    assert np.abs(mirrored - ours.probabilities).max() > 1e-3  # mirroring is on unless switched off
    with pytest.raises(ValueError, match=r"folds=\[3\]: this checkpoint holds folds \[0, 1\]"):
        model.segment(image, folds=[3])


def write_scan(path, seed: int = 0) -> np.ndarray:
    """A small CT-like volume [Z, Y, X] with a spacing, an origin and an oblique direction of its own."""
    a = np.zeros((3, 50, 70), np.int16)
    a[:, 4:47, 5:66] = np.random.default_rng(seed).integers(-900, 1200, (3, 43, 61))
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.8, 0.7, 1.5))
    img.SetOrigin((12.5, -40.0, 7.25))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return a


def test_zoo_predict_on_a_nifti_volume_writes_nnunets_mask_with_the_source_geometry(converted, tmp_path, capsys):
    from zoo.cli import main

    nets, _, native = converted
    scan = tmp_path / "scan.nii.gz"
    write_scan(scan)
    data, props = SimpleITKIO().read_images([str(scan)])
    seg, probs = oracle(nnunet(nets), data, props)
    ours = zoo.load(native).segment(scan, probabilities=True)
    assert ours.mask.shape == (3, 50, 70) and np.abs(ours.probabilities - probs).max() < 1e-4
    assert (ours.mask == seg).all() and len(np.unique(seg)) > 1
    out = tmp_path / "seg.nii.gz"
    model_quick = {"mirror": False, "folds": [1]}  # the flags reach segment() (cheaper than the defaults)
    assert main(["predict", str(native), str(scan), "--out", str(out), "--slice", "1", "--no-mirror", "--folds",
                 "1"]) == 0
    assert "seg_overlay.png" in capsys.readouterr().out
    src, written = sitk.ReadImage(str(scan)), sitk.ReadImage(str(out))
    assert written.GetSpacing() == src.GetSpacing() and written.GetOrigin() == src.GetOrigin()
    assert written.GetDirection() == src.GetDirection()
    expected = zoo.load(native).segment(scan, **model_quick).mask
    assert (sitk.GetArrayFromImage(written) == expected).all() and not (expected == seg).all()
    ours.save(tmp_path / "default.nrrd")  # any format SimpleITK writes: nnU-Net's mask, the geometry kept
    again = sitk.ReadImage(str(tmp_path / "default.nrrd"))
    assert (sitk.GetArrayFromImage(again) == seg).all()
    assert np.allclose(again.GetDirection(), src.GetDirection(), atol=1e-12)  # NRRD stores it as decimal text
    import nibabel

    assert np.allclose(nibabel.load(str(out)).affine, nibabel.load(str(scan)).affine, atol=1e-6)
    from PIL import Image

    overlay = Image.open(tmp_path / "seg_overlay.png")
    assert overlay.mode == "RGB" and overlay.width == 70 and overlay.height >= 50


def test_the_backbone_runs_under_bf16_autocast_only_when_asked_on_a_cpu(converted):
    _, _, native = converted
    model = zoo.load(native)
    seen = []
    hook = model.module.backbone.blocks[0].register_forward_pre_hook(
        lambda m, args: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else
                                    args[0].dtype))
    image = picture(64, 64, seed=2)
    fp32 = model.segment(image, mirror=False, probabilities=True).probabilities
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = model.segment(image, mirror=False, probabilities=True, autocast=True).probabilities
    hook.remove()
    assert set(seen) == {torch.bfloat16} and model.module.backbone_autocast is False
    assert 0 < np.abs(bf16 - fp32).max() < 0.2  # the same prediction in a coarser dtype
    with pytest.raises(ValueError, match="autocast='yes'"):
        model.segment(image, autocast="yes")


def with_postprocessing(folder, root, kind: str):
    """The result folder with nnU-Net's postprocessing in crossval_results_folds_0_1 (as find_best_configuration
    leaves it): keep the largest component of all foreground, then of label 2."""
    fns = [remove_all_but_largest_component_from_segmentation] * 2
    kwargs = [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]
    copy = root / f"results_{kind}" / folder.name
    shutil.copytree(folder, copy)
    (copy / "crossval_results_folds_0_1").mkdir()
    if kind == "pkl":
        with open(copy / "crossval_results_folds_0_1" / "postprocessing.pkl", "wb") as f:
            pickle.dump((fns, kwargs), f)  # as batchgenerators' save_pickle writes it
    else:
        (copy / "crossval_results_folds_0_1" / "postprocessing.json").write_text(json.dumps(
            {"postprocessing_fns": [f.__name__ for f in fns], "postprocessing_kwargs": kwargs}))
    return copy, fns, kwargs


@pytest.mark.parametrize("kind", ["pkl", "json"])
def test_nnunets_connected_component_postprocessing_is_on_by_default_and_off_with_a_flag(converted, tmp_path, kind):
    nets, folder, native = converted
    copy, fns, kwargs = with_postprocessing(folder, tmp_path, kind)
    zoo.convert(copy, tmp_path / "pp", progress=False)
    model = zoo.load(tmp_path / "pp")
    assert model.native.extra["postprocessing"] == [{"labels_or_regions": [1, 2], "background_label": 0},
                                                    {"labels_or_regions": 2, "background_label": 0}]
    image = picture(seed=3)
    quick = {"mirror": False, "folds": [0]}  # (the predictions themselves are proven above)
    raw = zoo.load(native).segment(image, **quick).mask
    post = model.segment(image, **quick).mask
    expected = apply_postprocessing(raw[None], fns, kwargs)[0]  # nnU-Net's own functions on nnU-Net's layout
    assert (post == expected).all() and (post != raw).any()
    assert (model.segment(image, postprocess=False, **quick).mask == raw).all()


def test_a_postprocessing_pickle_that_names_other_code_is_refused_and_nothing_runs(converted, tmp_path):
    _, folder, _ = converted
    copy, _, kwargs = with_postprocessing(folder, tmp_path, "pkl")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.mkdir, (str(marker),))

    with open(copy / "crossval_results_folds_0_1" / "postprocessing.pkl", "wb") as f:
        pickle.dump(([Payload()], kwargs[:1]), f)
    with pytest.raises(CheckpointError, match=r"postprocessing\.pkl: refused: it names posix\.mkdir"):
        zoo.convert(copy, tmp_path / "pp", progress=False)
    assert not marker.exists() and not (tmp_path / "pp").exists()


@pytest.mark.parametrize("force", [None, True, False])
@pytest.mark.parametrize("spacing,target,shape", [
    ([999.0, 1.0, 1.0], [999.0, 1.4, 1.4], (1, 23, 31)),  # a picture: in-plane, the out-of-plane axis apart
    ([1.5, 0.7, 0.8], [1.5, 1.4, 1.4], (3, 20, 26)),  # nearly isotropic: one 3-D spline
    ([4.0, 1.0, 1.0], [2.0, 1.0, 1.25], (4, 12, 15)),  # z resampled apart, with map_coordinates of order_z
])
def test_resampling_is_nnunets_resample_data_or_seg_to_shape(spacing, target, shape, force):
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape

    from zoo.tasks.segmentation import new_shape_for, resample

    data = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    new = new_shape_for(shape, spacing, target)
    assert new == list(compute_new_shape(shape, spacing, target))
    for order, order_z in ((3, 0), (1, 0), (1, 1)):
        ours = resample(data, new, spacing, target, order=order, order_z=order_z, force_separate_z=force)
        theirs = resample_data_or_seg_to_shape(data, new, spacing, target, is_seg=False, order=order, order_z=order_z,
                                               force_separate_z=force)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_keeping_the_largest_component_is_nnunets_function():
    from zoo.tasks.segmentation import keep_largest_component

    rng = np.random.default_rng(0)
    mask = (rng.random((3, 30, 30)) < 0.35).astype(np.uint8) * rng.integers(1, 4, (3, 30, 30)).astype(np.uint8)
    tie = np.zeros((1, 9, 9), np.uint8)
    tie[0, 1:3, 1:3] = tie[0, 6:8, 6:8] = 2  # two components of one size: both stay
    for seg in (mask, tie):
        for what in (1, 2, [1, 2], (1, 3), [(1, 2), 3]):
            expected = remove_all_but_largest_component_from_segmentation(seg, what)
            assert np.array_equal(keep_largest_component(seg, what), expected), what


def test_nibabel_volumes_are_read_and_written_as_nnunets_nibabelio(tmp_path):
    import nibabel
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO

    from zoo.tasks.segmentation import read_volume, write_volume

    affine = np.array([[0.0, -0.7, 0.0, 12.0], [0.8, 0.0, 0.0, -3.0], [0.0, 0.0, 1.5, 7.0], [0, 0, 0, 1]])
    a = np.random.default_rng(0).integers(0, 300, (20, 16, 3)).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(a, affine), str(tmp_path / "scan.nii.gz"))
    ours = read_volume(tmp_path / "scan.nii.gz", "NibabelIO")
    data, props = NibabelIO().read_images([str(tmp_path / "scan.nii.gz")])
    assert np.array_equal(ours.data, data) and np.allclose(ours.spacing, props["spacing"])
    mask = (ours.data[0] > 150).astype(np.uint8)
    write_volume(mask, tmp_path / "ours.nii.gz", ours.geometry)
    NibabelIO().write_seg(mask, str(tmp_path / "theirs.nii.gz"), props)
    mine, theirs = nibabel.load(str(tmp_path / "ours.nii.gz")), nibabel.load(str(tmp_path / "theirs.nii.gz"))
    assert np.array_equal(mine.affine, theirs.affine) and np.allclose(mine.affine, affine)
    assert np.array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))


def test_a_result_folder_converts_its_numbered_folds_and_leaves_fold_all_as_nnunet_does(tmp_path):
    nets = fold_networks(3)
    folder = result_folder(tmp_path, nets)
    (folder / "fold_1").rename(folder / "fold_all")  # nnUNetPredictor.auto_detect_available_folds skips fold_all
    (folder / "fold_2").rename(folder / "fold_4")
    zoo.convert(folder, tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    assert model.folds == [0, 4] and model.config.folds == 2
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.module(x, fold=1), nets[2](x), atol=1e-4)  # fold_4 holds the third network
    zoo.convert(folder / "fold_all", tmp_path / "all", progress=False)  # a fold named on its own
    assert zoo.load(tmp_path / "all").folds == ["all"]
