"""The segmentation interface on a converted Dino U-Net: nnU-Net's normalisation, resampling and sliding windows around
the network, masks with class names, and `zoo predict ... --out mask.png` writing a mask and an overlay."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from tests.test_dinounet import dataset_json, plans, reference, save_like_nnunet
from zoo.tasks.segmentation import gaussian_weights, window_starts

PATCH = (64, 64)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random Dino U-Net saved as nnU-Net does (64 x 64 training patches, z-score), converted once by
    `zoo convert CKPT OUT` (the layout detected)."""
    from zoo.cli import main

    root = tmp_path_factory.mktemp("dinounet")
    ref = reference(seed=7)
    save_like_nnunet(root / "checkpoint_final.pth", ref.state_dict(), plans(patch=PATCH), dataset_json())
    assert main(["convert", str(root / "checkpoint_final.pth"), str(root / "native")]) == 0
    assert json.loads((root / "native" / "config.json").read_text())["source"]["layout"] == "nnunet-dinounet"
    return ref, root / "native"


def zscore(a: np.ndarray) -> torch.Tensor:
    a = a.astype(np.float32)
    return torch.from_numpy((a - a.mean()) / a.std())


def pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (h, w), dtype=np.uint8)  # no zeros: nothing is cropped


def test_one_patch_is_the_network_on_the_zscored_image(converted):
    ref, native = converted
    model = zoo.load(native)
    image = pixels(*PATCH)
    result = model.segment(image, mirror=False)
    with torch.no_grad():
        expected = ref(zscore(image)[None, None]).argmax(1)[0].numpy()
    assert result.labels == ["background", "liver", "tumour"]
    assert result.mask.shape == PATCH and (result.mask == expected).all()
    same = model.predict(torch.from_numpy(image), mirror=False)  # a tensor; predict = segment
    assert same.mask.tolist() == result.mask.tolist()


def test_larger_image_is_tiled_and_a_zero_border_stays_background(converted):
    ref, native = converted
    model = zoo.load(native)
    image = np.zeros((110, 150), dtype=np.uint8)
    image[5:105, 10:140] = pixels(100, 130, seed=3)
    result = model.segment(image, mirror=False)
    assert result.mask.shape == (110, 150)
    assert (result.mask[:5] == 0).all() and (result.mask[:, 140:] == 0).all()  # outside the non-zero box
    assert 0 < len(result.areas()) <= 3 and sum(result.areas().values()) == 110 * 150
    # one tile where the image is a single patch wide: away from the overlaps the tiles agree with the network alone
    crop = image[5:105, 10:140]
    x = zscore(crop)
    with torch.no_grad():
        first_tile = ref(x[None, None, :64, :64]).argmax(1)[0].numpy()
    assert (result.mask[5:5 + 16, 10:10 + 16] == first_tile[:16, :16]).all()  # only tile 0 covers this corner


def test_window_positions_and_gaussian_weights_follow_nnunet():
    assert window_starts(100, 64, 0.5) == [0, 18, 36]  # ceil(36 / 32) + 1 tiles, spread evenly
    assert window_starts(64, 64, 0.5) == [0] and window_starts(512, 512, 0.5) == [0]
    assert window_starts(1000, 512, 0.5) == [0, 244, 488]
    from scipy.ndimage import gaussian_filter  # nnU-Net's compute_gaussian(tile, sigma_scale=1/8, value_scaling=10)

    tile = (64, 48)
    delta = np.zeros(tile)
    delta[32, 24] = 1
    g = gaussian_filter(delta, [t / 8 for t in tile], 0, mode="constant", cval=0)
    g = torch.from_numpy(g / (g.max() / 10)).half()
    g[g == 0] = g[g != 0].min()
    assert torch.equal(gaussian_weights(tile), g)  # kept in fp16, as nnUNetPredictor keeps it


def test_ct_normalisation_and_resampling_to_the_training_spacing_as_nnunets_predictor(tmp_path):
    from tests.test_dinounet_nnunet import nnunet, oracle

    ref = reference(seed=11)
    p = plans(schemes=("CTNormalization",), patch=PATCH, spacing=(2.0, 2.0))
    save_like_nnunet(tmp_path / "checkpoint_final.pth", ref.state_dict(), p, dataset_json())
    zoo.convert(tmp_path / "checkpoint_final.pth", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    image = pixels(128, 128, seed=5)
    result = model.segment(image, mirror=False, probabilities=True)  # 1 x 1 pixels, trained at 2 x 2: 64 x 64
    seg, probs = oracle(nnunet([ref], mirror=False, plans_=p), image[None, None], {"spacing": [999.0, 1.0, 1.0]})
    assert result.mask.shape == (128, 128) and (result.mask == seg[0]).all()
    assert np.abs(result.probabilities - probs[:, 0]).max() < 1e-4


def test_zoo_predict_writes_a_palette_mask_and_an_overlay(converted, tmp_path, capsys):
    from zoo.cli import main

    _, native = converted
    Image.fromarray(pixels(96, 80, seed=9)).save(tmp_path / "scan.png")
    assert main(["predict", str(native), str(tmp_path / "scan.png"), "--out", str(tmp_path / "mask.png")]) == 0
    printed = capsys.readouterr().out
    assert "mask.png" in printed and "mask_overlay.png" in printed and "px)" in printed
    mask = Image.open(tmp_path / "mask.png")
    assert mask.mode == "P" and mask.size == (80, 96)
    expected = zoo.load(native).segment(tmp_path / "scan.png").mask
    assert (np.asarray(mask) == expected).all()  # pixel values are the class indices
    overlay = Image.open(tmp_path / "mask_overlay.png")
    assert overlay.mode == "RGB" and overlay.width == 80 and overlay.height >= 96  # a legend below the picture
    card = (native / "README.md").read_text()
    assert "Tiny liver" in card and "DINOv3 License" in card and "1 = liver" in card
    assert json.loads((native / "config.json").read_text())["extra"]["mirror_axes"] == [0, 1]
