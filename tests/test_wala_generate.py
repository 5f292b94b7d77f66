"""WaLa generation end to end on CPU with tiny converted models: same seed, same mesh; `zoo generate` writes a mesh
and a preview picture from an image and from a point cloud file, and shows the non-commercial license."""

from __future__ import annotations

import h5py  # the shapes extra, installed with .[test]: these tests must run, not skip
import mcubes  # noqa: F401
import numpy as np
import pytest
import pywt  # noqa: F401
import torch
import trimesh  # noqa: F401
from PIL import Image  # noqa: E402
from test_wala import LAYOUTS, Published, base_args  # noqa: E402

import zoo  # noqa: E402
from zoo.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wala-gen")
    out = {}
    for name in ("sv", "pc"):
        pub = Published(base_args(**LAYOUTS[name][0]), seed=1)
        # the tiny random decoder's low band, scaled to unit spread and shifted so that about 3% of the grid is
        # inside: a few smooth blobs (a mesh of moderate size) instead of noise crossing zero everywhere
        with torch.no_grad():
            conv = pub.vq.decoder.out_conv[2]
            conv.weight[1:], conv.bias[1:], conv.bias[0] = 0, 0, 0
            probe = torch.randn(1, 4, 12, 12, 12, generator=torch.Generator().manual_seed(0))
            low = pub.vq.decode_from_pre_quant(probe)
            conv.weight[0] /= low[0, 0].std()
            conv.bias[0] = -(low[0, 0].quantile(0.03) / low[0, 0].std())
        out[name] = zoo.convert(pub.save(root / f"src-{name}"), root / f"wala-{name}", progress=False)
    return out


def test_same_seed_gives_the_same_mesh_and_another_seed_another(tiny):
    model = zoo.load(tiny["pc"])
    points = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    a = model.generate(points, steps=2, seed=7)
    b = model.generate(points, steps=2, seed=7)
    assert len(a.faces) > 0
    assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)
    features = model.encode_condition(points)
    latents = [model.module.sample(features, 2, 3.0, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], latents[2])


def test_zoo_generate_turns_an_image_into_a_mesh_and_a_preview(tiny, tmp_path, capsys):
    image = tmp_path / "chair.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 240, 4), dtype=np.uint8), "RGBA").save(image)
    out, preview = tmp_path / "chair.obj", tmp_path / "chair_preview.png"
    assert main(["generate", str(tiny["sv"]), str(image), "--out", str(out), "--preview", str(preview),
                 "--steps", "2", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "Non-Commercial" in err and "diffusion" in err  # the license, and the progress bar over the steps
    assert out.read_text().count("\nf ") > 0
    pic = np.asarray(Image.open(preview).convert("RGB"))
    assert pic.shape[:2] == (512, 512) and (pic < 250).any()  # something drawn on the white background


def test_zoo_generate_turns_a_point_cloud_file_into_a_glb_and_a_preview(tiny, tmp_path):
    cloud = tmp_path / "ring.h5df"
    theta = np.linspace(0, 2 * np.pi, 200, dtype=np.float32)
    with h5py.File(cloud, "w") as f:
        f["points"] = np.stack([np.cos(theta), np.sin(theta), 0 * theta], axis=1) * 0.5
    out, preview = tmp_path / "ring.glb", tmp_path / "ring.png"
    assert main(["generate", str(tiny["pc"]), str(cloud), "--out", str(out), "--preview", str(preview),
                 "--steps", "2", "--seed", "3"]) == 0

    mesh = trimesh.load(str(out), force="mesh")
    assert len(mesh.faces) > 0 and preview.stat().st_size > 1000


def test_conditions_are_read_from_the_published_file_formats(tiny, tmp_path):
    import json

    model = zoo.load(tiny["pc"])
    pts = np.random.default_rng(2).standard_normal((30, 3)).astype(np.float32)
    np.save(tmp_path / "p.npy", pts)
    with h5py.File(tmp_path / "p.h5df", "w") as f:
        f["points"] = pts
    for path in (tmp_path / "p.npy", tmp_path / "p.h5df"):
        torch.testing.assert_close(model.preprocess(path), torch.from_numpy(pts)[None])
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        model.preprocess(np.zeros((5, 2), np.float32))
    from zoo.tasks.shapes import read_voxels

    (tmp_path / "v.json").write_text(json.dumps({"resolution": 16, "occupancy": [[0, 1, 2], [15, 15, 15], [16, 0, 0]],
                                                 "color": [[1, 1, 1]] * 3}))
    grid = read_voxels(tmp_path / "v.json", 16)
    assert grid.shape == (16, 16, 16) and grid.sum() == 2 and grid[0, 1, 2] == 1


@pytest.mark.parametrize("kwargs,words", [
    (dict(steps=0), ["steps=0", ">= 1"]), (dict(steps=-1), ["steps=-1"]), (dict(steps=2.5), ["steps=2.5"]),
    (dict(guidance=float("nan")), ["guidance=nan", "finite"]), (dict(guidance=-1.0), ["guidance=-1.0"]),
    (dict(seed=-3), ["seed=-3"]),
])
def test_bad_sampler_arguments_are_refused_by_name(tiny, kwargs, words):
    model = zoo.load(tiny["pc"])
    with pytest.raises(ValueError) as e:
        model.generate(np.zeros((16, 3), np.float32), **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_image_conditions_are_read_through_the_checked_reader(tiny, tmp_path):
    import struct
    import zlib

    from PIL import Image

    model = zoo.load(tiny["sv"])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (1, 1)).save(bomb)  # then its header made to claim more pixels than PIL's bomb limit
    data = bytearray(bomb.read_bytes())
    data[16:24] = struct.pack(">II", 30000, 30000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    bomb.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bomb.png: refused: .*decompression-bomb"):
        model.generate(bomb, steps=1)
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)).save(deep)
    from zoo.tasks.shapes import load_image

    img = np.asarray(load_image(deep, None))
    assert img.dtype == np.uint8 and 0 < img.max() <= 255 and len(np.unique(img)) > 200  # scaled to 8 bits, not clipped
