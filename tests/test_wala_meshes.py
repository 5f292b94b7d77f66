"""Meshes people can use: simplification to a face budget stays close to the surface, watertightness is reported
for closed and open meshes, and the settings are refused by name. Analytic shapes, no model."""

from __future__ import annotations

import fast_simplification  # noqa: F401  (the shapes extra, installed with .[test]: these tests must run)
import mcubes  # noqa: F401
import numpy as np
import pytest
import trimesh

from zoo.tasks.shapes import MIN_TARGET_FACES, Mesh, check_target_faces

R = 0.6  # sphere radius, in the [-1, 1) cube the marching-cubes vertices live in


def sphere_sdf(n: int = 96, radius: float = R, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    g = np.mgrid[:n, :n, :n] / n * 2 - 1  # grid index i at i / n * 2 - 1, where Mesh.from_sdf puts vertices
    return np.sqrt(sum((g[i] - center[i]) ** 2 for i in range(3))) - radius


def distance_to_sphere(mesh: Mesh) -> float:
    """The largest distance from the mesh's surface to the true sphere (exact for each of 100k surface samples)."""
    points, _ = trimesh.sample.sample_surface(mesh.to_trimesh(), 100_000, seed=0)
    return float(np.abs(np.linalg.norm(points, axis=1) - R).max())


@pytest.fixture(scope="module")
def sphere() -> Mesh:
    return Mesh.from_sdf(sphere_sdf())


@pytest.mark.parametrize("target", [5000, 1000, 200])
def test_simplifying_a_sphere_keeps_at_most_the_target_faces_and_stays_close_to_it(sphere, target):
    assert len(sphere.faces) > 4 * target
    small = sphere.simplify(target)
    assert 0.9 * target <= len(small.faces) <= target
    assert small.full_faces == len(sphere.faces)
    # every point of the simplified surface within a few percent of the radius of the sphere (the full mesh: 0.05%)
    bound = {5000: 0.005, 1000: 0.015, 200: 0.04}[target]
    assert distance_to_sphere(sphere) < 0.001 and distance_to_sphere(small) < bound
    # and closed, enclosing the sphere's volume: a surface near the sphere that is not all of it would not
    assert small.watertight
    volume = 4 / 3 * np.pi * R**3
    assert abs(small.to_trimesh().volume - volume) < {5000: 0.003, 1000: 0.01, 200: 0.04}[target] * volume


def test_very_small_targets_are_reached_and_a_mesh_under_its_budget_is_kept_as_it_is(sphere):
    for target in (MIN_TARGET_FACES, 10):
        assert len(sphere.simplify(target).faces) <= target
    assert sphere.simplify(len(sphere.faces)) is sphere
    two = Mesh.from_sdf(np.minimum(sphere_sdf(64, 0.2, (0.4, 0, 0)), sphere_sdf(64, 0.2, (-0.4, 0, 0))))
    assert len(two.simplify(8).faces) <= 12  # two closed parts: at least 4 faces each; the fewest it can reach


def test_simplification_is_deterministic(sphere):
    a, b = sphere.simplify(700), sphere.simplify(700)
    assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)


def test_watertightness_is_reported_for_a_closed_and_an_open_mesh(sphere):
    assert sphere.watertight and "watertight" in repr(sphere)
    # a sphere larger than the grid: marching cubes leaves holes where it leaves the cube
    cut = Mesh.from_sdf(sphere_sdf(48, radius=1.2))
    assert len(cut.faces) > 0 and not cut.watertight and "open" in repr(cut)
    # half of a closed sphere's faces removed
    keep = sphere.vertices[sphere.faces].mean(axis=1)[:, 0] < 0
    half = Mesh(sphere.vertices, sphere.faces[keep])
    assert not half.watertight
    # an empty mesh (a grid with no zero crossing) is not closed
    assert Mesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64)).watertight is False


@pytest.mark.parametrize("value", [3, 0, -1, 2.5, True, "100"])
def test_bad_face_budgets_are_refused_by_name(sphere, value):
    with pytest.raises(ValueError, match=f"target_faces={value!r}".replace("(", r"\(").replace(".", r"\.")):
        sphere.simplify(value)
    assert check_target_faces(None) is None and check_target_faces(MIN_TARGET_FACES) == MIN_TARGET_FACES


def test_a_simplified_mesh_saves_and_reads_back_with_its_face_count(sphere, tmp_path):
    small = sphere.simplify(300)
    for suffix in (".obj", ".ply", ".stl"):
        back = trimesh.load(str(small.save(tmp_path / f"s{suffix}")), force="mesh")
        assert len(back.faces) == len(small.faces)


def test_a_mesh_alone_renders_one_view_and_a_preview_sheet_without_an_input_panel(sphere, tmp_path):
    from PIL import Image

    single = np.asarray(Image.open(sphere.render(tmp_path / "one.png")).convert("RGB")).astype(int)
    assert single.shape == (512, 512, 3)
    shaded = (single[..., 2] > single[..., 0] + 20)  # the bluish shade of the surface
    assert 0.1 < shaded.mean() < 0.9
    sheet = np.asarray(Image.open(sphere.preview(tmp_path / "sheet.png")).convert("RGB")).astype(int)
    assert sheet.shape == (1000, 1280, 3)
    top = sheet[100:640]
    assert (top[:, :300].sum(-1) < 700).mean() < 0.01  # no input recorded: no input panel, the shape centred
    assert (top[:, 320:960, 2] > top[:, 320:960, 0] + 20).mean() > 0.1
    with pytest.raises(ValueError, match="sheet.txt"):
        sphere.preview(tmp_path / "sheet.txt")


@pytest.mark.parametrize("kind", ["voxels", "views"])
def test_the_preview_draws_voxel_and_multi_view_inputs_beside_the_shape(sphere, tmp_path, kind):
    from PIL import Image

    from zoo.tasks.shapes import ConditionView

    if kind == "voxels":
        grid = np.zeros((16, 16, 16), np.float32)
        grid[4:12, 2:14, 4:12] = 1
        view, colour = ConditionView("voxels", grid, "input: 16^3 voxels"), (217, 162, 95)  # the voxels' face colour
    else:
        tiles = np.zeros((4, 64, 64, 3), np.uint8)
        tiles[..., 1] = 255  # four green views
        view, colour = ConditionView("images", tiles, "input: 4 views"), (0, 255, 0)
    sphere.condition = view
    try:
        pic = np.asarray(Image.open(sphere.preview(tmp_path / "p.png")).convert("RGB")).astype(int)
    finally:
        sphere.condition = None
    left, right = pic[100:640, :620], pic[100:640, 660:]
    near = lambda a: (np.abs(a - np.array(colour)).max(-1) < 60).mean()  # noqa: E731
    assert near(left) > (0.02 if kind == "voxels" else 0.3) and near(right) < 0.001
