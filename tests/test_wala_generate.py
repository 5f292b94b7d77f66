"""WaLa generation end to end on CPU with tiny converted models: same seed, same mesh (42, the published default,
when none is given); batches give one shape per input, each as if alone, decoded one at a time; meshes simplified to
a face budget with watertightness reported; `zoo generate` writes meshes and previews (the input beside four views
of the shape) from images and point cloud files, checks everything it can before the diffusion, never writes over
an input, and runs every value its checks accept."""

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


def test_zoo_generate_turns_an_image_into_a_mesh_and_a_preview(tiny, tmp_path, capsys):
    image = tmp_path / "chair.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 240, 4), dtype=np.uint8), "RGBA").save(image)
    out, preview = tmp_path / "chair.obj", tmp_path / "chair_preview.png"
    # --steps 1: the smallest value the check accepts (it used to raise IndexError in the sampler)
    assert main(["generate", str(tiny["sv"]), str(image), "--out", str(out), "--preview", str(preview),
                 "--steps", "1", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "Non-Commercial" in err and "diffusion" in err  # the license, and the progress bar over the steps
    faces = out.read_text().count("\nf ")
    assert 0 < faces <= 50000 and f"{faces:,} faces" in err and "watertight" in err
    pic = np.asarray(Image.open(preview).convert("RGB"))
    assert pic.shape[:2] == (1000, 1280) and (pic < 250).any()  # something drawn on the white background


def test_zoo_generate_turns_a_point_cloud_file_into_a_glb_and_a_preview(tiny, tmp_path, capsys):
    cloud = tmp_path / "ring.h5df"
    theta = np.linspace(0, 2 * np.pi, 200, dtype=np.float32)
    with h5py.File(cloud, "w") as f:
        f["points"] = np.stack([np.cos(theta), np.sin(theta), 0 * theta], axis=1) * 0.5
    out, preview = tmp_path / "ring.glb", tmp_path / "ring.png"
    assert main(["generate", str(tiny["pc"]), str(cloud), "--out", str(out), "--preview", str(preview),
                 "--steps", "2", "--seed", "3", "--target-faces", "0"]) == 0  # 0: every marching-cubes face

    mesh = trimesh.load(str(out), force="mesh")
    assert len(mesh.faces) > 50000 and preview.stat().st_size > 1000
    assert "simplified" not in capsys.readouterr().err


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
    (dict(steps=0), ["steps=0", "from 1 to 1000"]), (dict(steps=-1), ["steps=-1"]), (dict(steps=2.5), ["steps=2.5"]),
    (dict(steps=1001), ["steps=1001", "from 1 to 1000"]),  # one more than the model was trained with
    (dict(guidance=float("nan")), ["guidance=nan", "finite"]), (dict(guidance=-1.0), ["guidance=-1.0"]),
    (dict(seed=-3), ["seed=-3"]), (dict(seed=2**64), ["seed=18446744073709551616", "2**64 - 1"]),
    (dict(target_faces=3), ["target_faces=3", ">= 4"]), (dict(target_faces=0), ["target_faces=0", "None"]),
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


# -- reproducibility and batches ---------------------------------------------------------------------------------------


def cloud(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def alone(tiny):
    """Two point clouds, each generated on its own with no seed given (one step: the decoding is what costs)."""
    model = zoo.load(tiny["pc"])
    return model, [model.generate(cloud(s), steps=1) for s in (10, 11)]


def same(a, b) -> bool:
    return np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)


def test_without_a_seed_the_published_seed_42_is_used_so_the_same_input_gives_the_same_mesh(alone):
    from zoo.tasks.shapes import PUBLISHED_SEED

    model, (first, _) = alone
    assert PUBLISHED_SEED == 42  # run.py's --seed default at AutodeskAILab/WaLa bc2bdd9
    assert same(model.generate(cloud(10), steps=1), first)
    assert same(model.generate(cloud(10), steps=1, seed=42), first)
    features = model.encode_condition(cloud(10))
    other = model.module.sample(features, 1, 3.0, generator=torch.Generator().manual_seed(7))
    ours = model.module.sample(features, 1, 3.0, generator=torch.Generator().manual_seed(42))
    assert not torch.equal(other, ours)  # the seed matters: 42 is a choice, not a constant


def test_a_batch_gives_one_shape_per_input_each_as_if_alone_decoded_one_at_a_time(alone, monkeypatch):
    model, meshes = alone
    decoded = []
    decode = model.module.decode
    monkeypatch.setattr(model.module, "decode", lambda latents: decoded.append(latents.shape[0]) or decode(latents))
    batch = model.generate([cloud(10), cloud(11)], steps=1)
    assert isinstance(batch, list) and len(batch) == 2
    assert all(same(a, b) for a, b in zip(batch, meshes))
    assert decoded == [1, 1]  # one 256^3 grid at a time, whatever the batch


def test_a_list_is_a_batch_of_conditions_and_a_nested_list_of_numbers_one_point_cloud(alone):
    model, _ = alone
    assert model.is_batch([cloud(1), cloud(2)]) and not model.is_batch(cloud(1))
    assert not model.is_batch(cloud(1).tolist())  # [[x, y, z], ...]: one cloud


def test_generate_simplifies_to_the_face_budget_and_reports_watertightness(alone):
    model, (first, _) = alone
    assert 0 < len(first.faces) <= 50000 < first.full_faces  # the default budget (the CLI test keeps every face)
    small = model.generate(cloud(10), steps=1, target_faces=500)
    assert len(small.faces) <= 500 < small.full_faces == first.full_faces  # the same grid, fewer faces
    for mesh in (first, small):
        assert mesh.watertight == bool(mesh.to_trimesh().is_watertight)
        assert mesh.sdf is None  # the 64 MB grid is not kept with the mesh
    # the simplified mesh stays in the box of the larger one
    assert np.all(small.vertices.min(0) >= first.vertices.min(0) - 0.02)
    assert np.all(small.vertices.max(0) <= first.vertices.max(0) + 0.02)


# -- the command line --------------------------------------------------------------------------------------------------


def write_ring(path, scale=0.5):
    theta = np.linspace(0, 2 * np.pi, 200, dtype=np.float32)
    with h5py.File(path, "w") as f:
        f["points"] = np.stack([np.cos(theta), np.sin(theta), 0 * theta], axis=1) * scale
    return path


def test_zoo_generate_writes_one_mesh_and_one_preview_per_input_into_directories(tiny, tmp_path, capsys):
    a, b = write_ring(tmp_path / "a.h5"), write_ring(tmp_path / "b.h5", 0.3)
    shapes = tmp_path / "shapes"
    assert main(["generate", str(tiny["pc"]), str(a), str(b), "--out-dir", str(shapes), "--preview", str(shapes),
                 "--steps", "1", "--target-faces", "2000"]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in shapes.iterdir()) == ["a.obj", "a.png", "b.obj", "b.png"]
    for name in ("a", "b"):
        mesh = trimesh.load(str(shapes / f"{name}.obj"), force="mesh")
        assert 0 < len(mesh.faces) <= 2000
        assert f"wrote {shapes / name}.obj ({len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces" in err
    assert err.count("watertight") == 2 and "(1/2)" in err and "(2/2)" in err


def test_the_extreme_values_the_checks_accept_run(alone, monkeypatch):
    """Steps 1000 (the training schedule itself), guidance 0, seeds 0 and 2^64 - 1, the smallest face budget."""
    from zoo.tasks.shapes import MIN_TARGET_FACES

    model, (first, _) = alone
    features = model.encode_condition(cloud(10))
    for steps, guidance, seed in ((1, 0.0, 0), (2, 3.0, 2**64 - 1)):
        latents = model.module.sample(features, steps, guidance, generator=torch.Generator().manual_seed(seed))
        assert torch.isfinite(latents).all()
    calls = []
    monkeypatch.setattr(model.module, "guided", lambda x, t, *a: calls.append(int(t[0])) or torch.zeros_like(x))
    assert torch.isfinite(model.module.sample(features, 1000, 3.0, generator=torch.Generator())).all()
    assert calls == list(range(999, -1, -1))  # every training timestep, once, last to first
    assert len(first.simplify(MIN_TARGET_FACES).faces) <= MIN_TARGET_FACES * 100  # runs (a shape in many parts)


def test_a_guidance_that_makes_the_diffusion_diverge_is_named(alone):
    model, _ = alone
    with pytest.raises(ValueError, match=r"guidance=1e\+300: the diffusion diverged"):
        model.generate(cloud(10), steps=1, guidance=1e300)


@pytest.mark.parametrize("case", ["preview over the input", "out over the input", "out-dir over an input",
                                  "two inputs, one name", "--out for two inputs", "--out and --out-dir",
                                  "unknown mesh format", "unknown picture format", "a missing second input",
                                  "the shapes extra missing", "the simplifier missing", "--target-faces 3",
                                  "--steps 0", "--seed 2**64"])
def test_outputs_and_extras_are_checked_before_the_diffusion_and_inputs_are_never_overwritten(tiny, tmp_path,
                                                                                                monkeypatch, capsys,
                                                                                                case):
    import importlib.util

    from zoo.architectures.wala import WaLa

    monkeypatch.chdir(tmp_path)
    image = tmp_path / "chair.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    ring = write_ring(tmp_path / "ring.obj.h5")
    (tmp_path / "sub").mkdir()
    ring2 = write_ring(tmp_path / "sub" / "ring.obj.h5")
    ply = tmp_path / "cloud.ply"
    trimesh.PointCloud(np.random.default_rng(0).standard_normal((50, 3))).export(str(ply))
    before = {p: p.read_bytes() for p in (image, ring, ring2, ply)}
    sv, pc = str(tiny["sv"]), str(tiny["pc"])
    argv, words = {
        "preview over the input": ([sv, str(image), "--out", "c.obj", "--preview", str(image)], ["chair.png", "input"]),
        "out over the input": ([pc, str(ply), "--out", str(ply)], ["cloud.ply", "input"]),
        "out-dir over an input": ([sv, "chair.png", "--out-dir", str(tmp_path), "--preview", "."], ["chair.png"]),
        "two inputs, one name": ([pc, str(ring), str(ring2), "--out-dir", "shapes"], ["ring.obj.obj", "both"]),
        "--out for two inputs": ([pc, str(ring), str(ply), "--out", "x.obj"], ["--out", "--out-dir"]),
        "--out and --out-dir": ([pc, str(ring), "--out", "x.obj", "--out-dir", "d"], ["--out", "--out-dir"]),
        "unknown mesh format": ([pc, str(ring), "--out", "x.xyz"], ["x.xyz", "unknown", "format"]),
        "unknown picture format": ([pc, str(ring), "--preview", "x.txt"], ["x.txt", "picture"]),
        "a missing second input": ([pc, str(ring), "nothing.h5"], ["nothing.h5"]),
        "the shapes extra missing": ([pc, str(ring)], ["mcubes", "zoo[shapes]"]),
        "the simplifier missing": ([pc, str(ring)], ["fast_simplification", "zoo[shapes]"]),
        "--target-faces 3": ([pc, str(ring), "--target-faces", "3"], ["--target-faces 3"]),
        "--steps 0": ([pc, str(ring), "--steps", "0"], ["--steps 0"]),
        "--seed 2**64": ([pc, str(ring), "--seed", str(2**64)], ["--seed 18446744073709551616"]),
    }[case]
    if case.endswith("missing"):
        gone = words[0]
        find = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == gone else find(name, *a))

    def no_diffusion(*args, **kwargs):
        raise AssertionError("the diffusion ran before the arguments were checked")

    monkeypatch.setattr(WaLa, "sample", no_diffusion)
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err
    assert {p: p.read_bytes() for p in before} == before  # every input as it was
    assert not list(tmp_path.glob("*.obj")) and not (tmp_path / "shapes").exists()


def test_the_preview_shows_the_input_beside_the_shape_and_four_views_around_it(alone, tmp_path):
    """One glance: the condition on the left (a point cloud, drawn in colour), the shaded shape on the right, four
    turned views in a strip below, and the numbers in the title."""
    model, (first, _) = alone
    pic = np.asarray(Image.open(first.preview(tmp_path / "p.png", title="ring")).convert("RGB")).astype(int)
    assert pic.shape == (1000, 1280, 3)
    top, strip = pic[100:640], pic[660:]
    blue = lambda a: ((a[..., 2] > a[..., 0] + 20) & (a[..., 2] > 60)).mean()  # noqa: E731 (the mesh's shade)
    drawn = lambda a: (a.sum(-1) < 700).mean()  # noqa: E731 (anything not white)
    assert drawn(top[:, :620]) > 0.003 and drawn(top[:, 660:]) > 0.02  # the input (64 points), the shape
    assert blue(top[:, 660:]) > 0.02
    for n in range(4):  # each of the four views has the shape in it
        assert blue(strip[:, n * 320 + 10:(n + 1) * 320 - 10]) > 0.01
    # an image condition is shown as the model saw it: its colours appear in the left panel
    sv = zoo.load(alone[0].directory.parent / "wala-sv")
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    x = sv.preprocess(red)
    view = sv.condition_view(x)
    assert view.kind == "images" and view.data.shape == (1, 224, 224, 3) and (view.data[..., 0] == 255).all()
    first.condition = view
    pic = np.asarray(Image.open(first.preview(tmp_path / "q.png")).convert("RGB")).astype(int)
    left = pic[100:640, :620]
    assert ((left[..., 0] > 240) & (left[..., 1] < 30) & (left[..., 2] < 30)).mean() > 0.3


def test_the_command_line_plan_needs_no_model_and_names_what_it_will_write(tmp_path):
    """What a pre-flight calls before loading or downloading anything: the plan, the modules, the formats."""
    import argparse

    from zoo.tasks import get_task

    task = get_task("shape-generation")
    a, b = write_ring(tmp_path / "a.h5"), write_ring(tmp_path / "b.h5")
    args = argparse.Namespace(prompt=str(a), inputs=[str(b)], out=None, out_dir=str(tmp_path / "shapes"),
                              preview=str(tmp_path / "pics"), target_faces=None, steps=None, guidance=None, seed=None)
    assert task.cli_plan(args) == [(str(a), tmp_path / "shapes" / "a.obj", tmp_path / "pics" / "a.png"),
                                   (str(b), tmp_path / "shapes" / "b.obj", tmp_path / "pics" / "b.png")]
    assert task.cli_required_modules(args) == ["pywt", "mcubes", "trimesh", "fast_simplification", "matplotlib",
                                               "h5py"]
    args.target_faces, args.preview = 0, None
    assert task.cli_required_modules(args) == ["pywt", "mcubes", "trimesh", "h5py"]
    assert ".obj" in task.output_suffixes["out"] and ".png" in task.output_suffixes["preview"]
    assert not (tmp_path / "shapes").exists()  # planning writes nothing
