"""3-D shape generation: a condition (image, views, depth maps, point cloud, voxels) -> a signed distance grid -> mesh.

The model module provides (zoo.architectures.wala is the one family so far):
  encode_condition(inputs) -> features   the condition encoder on preprocessed inputs
  denoise(x, t, features) -> output      the diffusion network (condition mapping and embeddings applied inside)
  sample(features, steps, guidance, generator, callback) -> latents
  decode(latents) -> sdf [B, R, R, R]
This module turns user inputs into the preprocessed tensors (the published preprocessing, stored in the native
config's extra), runs the sampler with a progress bar, and turns the grid into a mesh with PyMCubes (vertices
scaled as published: v / R * 2 - 1, triangle winding reversed), simplified by quadric edge collapse
(fast-simplification) to a face budget, saved with trimesh (.obj, .ply, .glb, .stl, .off) and previewed headless
with matplotlib. Optional libraries: pip install zoo[shapes].

Before any model is loaded, the command line checks what this task needs (`ShapeGenerator.cli_plan`, with
`required_modules` and `ShapeGenerator.output_suffixes`): the extras installed, every input present, every output
of a known format and none of them an input.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from zoo.checks import check_int
from zoo.tasks import Command, ZooModel, is_main_process, register_task
from zoo.tasks.vision import open_pil, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MESH_SUFFIXES = (".obj", ".ply", ".glb", ".gltf", ".stl", ".off")
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg")
HDF5_SUFFIXES = (".h5", ".h5df", ".hdf5", ".hdf")
PUBLISHED_SEED = 42  # run.py's --seed default (AutodeskAILab/WaLa bc2bdd9), set again before every input
DEFAULT_TARGET_FACES = 50_000  # a few MB as .obj: any viewer opens it at once; marching cubes gives ~10x more
MIN_TARGET_FACES = 4  # a closed surface (a tetrahedron)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"3-D shape output needs {module}; install the extra: pip install 'zoo[shapes]'") from None


# -- what the command line checks before loading anything --------------------------------------------------------------


def required_modules(preview: bool = False, simplify: bool = True, inputs: Sequence[Any] = ()) -> list[str]:
    """The optional modules a shape generation with these settings imports: wavelets, marching cubes and mesh files
    always; fast-simplification for a face budget; matplotlib for a preview; h5py for .h5 point clouds."""
    names = ["pywt", "mcubes", "trimesh"] + (["fast_simplification"] if simplify else [])
    names += ["matplotlib"] if preview else []
    names += ["h5py"] if any(Path(str(i)).suffix.lower() in HDF5_SUFFIXES for i in inputs) else []
    return names


def check_modules(names: Sequence[str]) -> None:
    """ImportError naming every missing one, with the install line."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ImportError(f"3-D shape generation needs {', '.join(missing)} (not installed); install the extra: "
                          "pip install 'zoo[shapes]'")


def check_mesh_path(path: str | Path, arg: str = "--out") -> Path:
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise ValueError(f"{arg} {path}: unknown mesh format {path.suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
    return path


def check_preview_path(path: str | Path, arg: str = "--preview") -> Path:
    path = Path(path)
    if path.suffix.lower() not in PREVIEW_SUFFIXES:
        raise ValueError(f"{arg} {path}: a preview is a picture; use one of {', '.join(PREVIEW_SUFFIXES)}")
    return path


def check_target_faces(value: Any, arg: str = "target_faces") -> int | None:
    """None (keep every face) or an integer >= 4."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < MIN_TARGET_FACES:
        raise ValueError(f"{arg}={value!r}: must be an integer >= {MIN_TARGET_FACES} (None keeps every face)")
    return int(value)


def check_steps(steps: Any, train_steps: int | None = None, recommended: Any = None) -> int:
    """An integer from 1 to the model's training steps (when known)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1 or (
            train_steps is not None and steps > train_steps):
        allowed = f"an integer from 1 to {train_steps}" if train_steps is not None else "an integer >= 1"
        hint = f" (this model recommends {recommended})" if recommended is not None else ""
        raise ValueError(f"steps={steps!r}: must be {allowed}{hint}")
    return int(steps)


def check_guidance(guidance: Any, recommended: Any = None) -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) \
            or guidance < 0:
        hint = f" (this model recommends {recommended})" if recommended is not None else ""
        raise ValueError(f"guidance={guidance!r}: must be a finite number >= 0{hint}")
    return float(guidance)


def check_seed(seed: Any) -> int:
    """An integer from 0 to 2^64 - 1 (torch.Generator's range); None is the published 42."""
    seed = PUBLISHED_SEED if seed is None else check_int(seed, "seed", 0)
    if seed > MAX_SEED:
        raise ValueError(f"seed={seed!r}: must be an integer from 0 to 2**64 - 1")
    return seed


def input_files(condition: str | Path) -> list[Path]:
    """The files one command-line condition names: itself, its images (a directory of views) or each of a
    comma-separated list of views."""
    text = os.fspath(condition)
    if "," in text and not Path(text).exists():
        return [Path(t.strip()) for t in text.split(",") if t.strip()]
    path = Path(text)
    if path.is_dir():
        return [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    return [path]


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


# -- meshes ----------------------------------------------------------------------------------------------------------


class Mesh:
    """A triangle mesh (vertices [V, 3] float, faces [F, 3] int). `sdf` is the signed distance grid it came from
    (kept by Mesh.from_sdf, dropped by generate: 64 MB a shape), `full_faces` the marching-cubes face count before
    simplification, `condition` what the shape was generated from (drawn beside it by `preview`)."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, sdf: np.ndarray | None = None):
        self.vertices, self.faces, self.sdf = vertices, faces, sdf
        self.full_faces = len(faces)
        self.condition: ConditionView | None = None
        self._watertight: bool | None = None

    def __repr__(self) -> str:
        state = "watertight" if self.watertight else "open"
        return f"Mesh({len(self.vertices)} vertices, {len(self.faces)} faces, {state})"

    @classmethod
    def from_sdf(cls, sdf: np.ndarray | torch.Tensor, level: float = 0.0) -> Mesh:
        """Marching cubes on the zero level (PyMCubes, as published); vertices in [-1, 1): v / R * 2 - 1."""
        mcubes = _need("mcubes")
        grid = sdf.detach().float().cpu().numpy() if isinstance(sdf, torch.Tensor) else np.asarray(sdf)
        if not np.isfinite(grid).all():
            raise ValueError("the signed distance grid has NaN or infinite values")
        vertices, faces = mcubes.marching_cubes(grid, level)
        vertices = vertices / grid.shape[0] * 2.0 - 1.0
        return cls(vertices, np.ascontiguousarray(faces[:, ::-1]).astype(np.int64), grid)

    @property
    def watertight(self) -> bool:
        """Closed: every edge shared by exactly two faces (trimesh's test). A shape that touches the edge of the
        grid, or an empty mesh, is not."""
        if self._watertight is None:
            self._watertight = len(self.faces) > 0 and bool(self.to_trimesh().is_watertight)
        return self._watertight

    def simplify(self, target_faces: int) -> Mesh:
        """At most `target_faces` faces by quadric edge collapse (fast-simplification); the mesh itself when it
        is already that small. A mesh of several parts cannot go below 4 faces a part: then the fewest reached."""
        check_target_faces(target_faces)
        if len(self.faces) <= target_faces:
            return self
        fs = _need("fast_simplification")
        v, f = self.vertices.astype(np.float64), self.faces
        for _ in range(4):  # one pass stops short of very small targets; each further pass starts from the last
            v, f = fs.simplify(v, f.astype(np.int64), target_count=target_faces)
            if len(f) <= target_faces:
                break
        out = Mesh(v, np.ascontiguousarray(f, dtype=np.int64), self.sdf)
        out.full_faces, out.condition = self.full_faces, self.condition
        return out

    def to_trimesh(self):
        trimesh = _need("trimesh")
        return trimesh.Trimesh(self.vertices, self.faces, process=False)

    def save(self, path: str | Path) -> Path:
        """Write the mesh; the format follows the suffix (.obj, .ply, .glb, .gltf, .stl, .off)."""
        path = check_mesh_path(path)
        if len(self.faces) == 0:
            raise ValueError("the mesh is empty (the signed distance grid has no zero crossing)")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_trimesh().export(str(path))
        return path

    def _for_drawing(self, max_faces: int) -> Mesh:
        """A copy light enough for matplotlib: simplified, or else marched on a coarser grid."""
        if len(self.faces) <= max_faces:
            return self
        if importlib.util.find_spec("fast_simplification") is not None:
            return self.simplify(max_faces)
        mesh, stride = self, 1
        while len(mesh.faces) > max_faces and self.sdf is not None and stride < 16:
            stride *= 2
            mesh = Mesh.from_sdf(self.sdf[::stride, ::stride, ::stride])
        return mesh

    def render(self, path: str | Path, size: int = 512, max_faces: int = 60000) -> Path:
        """A shaded picture of the mesh alone, from one side (headless matplotlib). See `preview` for the sheet with
        the input and four views around the shape."""
        plt = _pyplot()
        mesh = self._for_drawing(max_faces)
        if len(mesh.faces) == 0:
            raise ValueError("the mesh is empty; nothing to render")
        fig = plt.figure(figsize=(size / 100, size / 100), dpi=100)
        _draw_mesh(fig.add_subplot(projection="3d"), mesh, azim=-60)
        fig.subplots_adjust(0, 0, 1, 1)
        return _save_figure(fig, path)

    def preview(self, path: str | Path, title: str = "") -> Path:
        """One picture to judge the shape by: the input it came from (image, views, point cloud or voxels) beside a
        large render, and a strip of four views around the vertical axis (0, 90, 180, 270 degrees)."""
        plt = _pyplot()
        if len(self.faces) == 0:
            raise ValueError("the mesh is empty; nothing to render")
        big, small = self._for_drawing(30000), self._for_drawing(8000)
        fig = plt.figure(figsize=(12.8, 10.0), dpi=100)
        grid = fig.add_gridspec(2, 4, height_ratios=(2, 1), left=0.01, right=0.99, bottom=0.01, top=0.9,
                                hspace=0.12, wspace=0.04)
        state = "watertight" if self.watertight else "open (not watertight)"
        faces = f"{len(self.faces):,} faces" + (f" (from {self.full_faces:,})" if self.full_faces != len(self.faces)
                                                 else "")
        fig.suptitle((title + "\n" if title else "") + f"{len(self.vertices):,} vertices, {faces}, {state}",
                     fontsize=15)
        cond = self.condition
        if cond is not None:
            _draw_condition(fig, grid[0, :2], cond)
            main = fig.add_subplot(grid[0, 2:], projection="3d")
        else:
            main = fig.add_subplot(grid[0, 1:3], projection="3d")
        _draw_mesh(main, big, azim=-60)
        main.set_title("shape", fontsize=14)
        for n, azim in enumerate((0, 90, 180, 270)):
            ax = fig.add_subplot(grid[1, n], projection="3d")
            _draw_mesh(ax, small, azim=azim - 90, elev=15)
            ax.set_title(f"turned {azim}\N{DEGREE SIGN}", fontsize=13)
        return _save_figure(fig, path)


def _pyplot():
    _need("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = check_preview_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="white")
    plt.close(fig)
    return path


def _upright(xyz: np.ndarray) -> np.ndarray:
    """Shape coordinates (y up) -> matplotlib's (z up), by a rotation (x, y, z) -> (x, -z, y), not a mirror."""
    return np.stack([xyz[..., 0], -xyz[..., 2], xyz[..., 1]], axis=-1)


def _frame(ax, points: np.ndarray, azim: float, elev: float) -> None:
    lo, hi = points.min(0), points.max(0)
    center, half = (lo + hi) / 2, max((hi - lo).max() / 2 * 1.05, 1e-6)
    ax.set_xlim(center[0] - half, center[0] + half)
    ax.set_ylim(center[1] - half, center[1] + half)
    ax.set_zlim(center[2] - half, center[2] + half)
    ax.set_box_aspect((1, 1, 1), zoom=1.15)  # matplotlib leaves a wide margin round 3-D axes
    ax.view_init(elev=elev, azim=azim)
    ax.set_axis_off()


def _draw_mesh(ax, mesh: Mesh, azim: float, elev: float = 20) -> None:
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    tri = _upright(mesh.vertices[mesh.faces])
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    a, e = np.radians(azim), np.radians(elev)  # a head light, raised a little: every view is lit from its front
    light = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e) + 0.5])
    shade = 0.2 + 0.8 * np.abs(normals @ (light / np.linalg.norm(light)))
    colors = np.clip(np.outer(shade, [0.55, 0.65, 0.85]), 0, 1)
    ax.add_collection3d(Poly3DCollection(tri, facecolors=colors, edgecolors="none"))
    _frame(ax, tri.reshape(-1, 3), azim, elev)


def _draw_condition(fig, cell, cond: ConditionView) -> None:
    if cond.kind == "images":
        ax = fig.add_subplot(cell)
        picture, corners = _mosaic(cond.data)
        ax.imshow(picture)
        if len(corners) > 1:  # number the views: the order the model reads them in
            for n, (y, x) in enumerate(corners):
                ax.text(x + 6, y + 6, str(n + 1), fontsize=13, va="top", ha="left",
                        bbox=dict(facecolor="white", edgecolor="#888888", pad=2))
        ax.set_axis_off()
    elif cond.kind == "points":
        ax = fig.add_subplot(cell, projection="3d")
        pts = cond.data[:: max(1, len(cond.data) // 4000)]  # enough points to see the shape, few enough to draw
        up = _upright(pts)
        ax.scatter(up[:, 0], up[:, 1], up[:, 2], s=3 if len(up) > 1000 else 14, c=up[:, 2], cmap="viridis",
                   depthshade=False)  # coloured by height; sparse clouds in larger dots
        _frame(ax, up, azim=-60, elev=20)
    else:
        ax = fig.add_subplot(cell, projection="3d")
        filled = np.flip(cond.data.transpose(0, 2, 1), axis=1) > 0.5  # grid (i, j, k) -> plot (i, -k, j)
        ax.voxels(filled, facecolors="#d9a25f", edgecolors="#7a5a30", linewidth=0.3)
        _frame(ax, np.array([[0, 0, 0], filled.shape]), azim=-60, elev=20)
    ax.set_title(cond.label, fontsize=13)


def _mosaic(images: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """[V, H, W, 3] uint8 -> one picture (two columns for 4 views, three for 6; each tile framed in grey, so a
    white background still shows its edge) and the top-left corner of each tile."""
    v, h, w, _ = images.shape
    cols = 1 if v == 1 else (3 if v > 4 else 2)
    rows = -(-v // cols)
    gap, edge = max(h // 20, 4), 2
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    corners = []
    for n, img in enumerate(images):
        y, x = divmod(n, cols)[0] * (h + gap), divmod(n, cols)[1] * (w + gap)
        out[y: y + h, x: x + w] = 136
        out[y + edge: y + h - edge, x + edge: x + w - edge] = img[edge:-edge, edge:-edge]
        corners.append((y, x))
    return out, corners


class ConditionView:
    """What a shape was generated from, for the preview: `kind` images ([V, H, W, 3] uint8, as the encoder saw them),
    points ([N, 3]) or voxels ([R, R, R]), and a caption."""

    def __init__(self, kind: str, data: np.ndarray, label: str):
        self.kind, self.data, self.label = kind, data, label


# -- conditions -------------------------------------------------------------------------------------------------------


def load_image(path: str | Path, over_white: bool | None) -> Image.Image:
    """WaLa's load_image: RGB; with over_white None, greyscale-with-alpha (LA) images go over white, others drop
    their alpha (PIL's convert); with over_white True every image is composited over white."""
    img = open_pil(path)  # junk, empty files and decompression bombs are refused by name there
    if over_white is None and img.mode == "LA":
        over_white = True
    if over_white:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "WHITE"), rgba).convert("RGB")
    return to_rgb(img, f"image {path}")  # 16-bit scaled to 8, not clipped


def image_from_array(a: Any) -> Image.Image:
    arr = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"an image array must be HxW or HxWx(1|3|4) uint8; got shape {arr.shape}, {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def numbered(paths: Sequence[Path]) -> list[Path]:
    """View files in order of the number in their names (3.png, 6.png, 10.png), else by name."""
    def key(p: Path):
        m = re.search(r"\d+", p.stem)
        return (0, int(m.group()), p.name) if m else (1, 0, p.name)

    return sorted(paths, key=key)


def read_points(path: Path) -> np.ndarray:
    """A point cloud file: HDF5 (.h5/.h5df/.hdf5, dataset 'points', as published), .npy/.npz, a mesh or point file
    trimesh reads (.ply, .obj, .off, .stl: its vertices) or text columns (.xyz, .txt, .csv)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such point cloud file")
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        h5py = _need("h5py")
        with h5py.File(path, "r") as f:
            if "points" not in f:
                raise ValueError(f"{path}: no 'points' dataset (found {sorted(f)})")
            return np.asarray(f["points"][:], dtype=np.float32)
    if suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            key = "points" if "points" in z else list(z)[0]
            return z[key].astype(np.float32)
    if suffix in (".ply", ".obj", ".off", ".stl", ".glb"):
        loaded = _need("trimesh").load(str(path), process=False)
        return np.asarray(loaded.vertices, dtype=np.float32)
    if suffix in (".xyz", ".txt", ".csv", ".pts"):
        return np.loadtxt(path, delimiter="," if suffix == ".csv" else None, dtype=np.float32)[:, :3]
    raise ValueError(f"{path}: unknown point cloud format {suffix!r} (.h5, .npy, .npz, .ply, .obj, .xyz, ...)")


def read_voxels(path: Path, resolution: int) -> np.ndarray:
    """A voxel file: WaLa's JSON ({"resolution", "occupancy": [[x, y, z], ...]}) or a .npy occupancy grid."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such voxel file")
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    try:
        data = json.loads(path.read_text())
        res, occ = int(data["resolution"]), np.asarray(data["occupancy"], dtype=np.int64).reshape(-1, 3)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a voxel JSON with 'resolution' and 'occupancy' ({e})") from None
    if res != resolution:
        raise ValueError(f"{path}: a {res}^3 grid; this model takes {resolution}^3")
    grid = np.zeros((res + 1,) * 3, dtype=np.float32)  # as published: indices == res fall off the edge
    grid[occ[:, 0], occ[:, 1], occ[:, 2]] = 1
    return grid[:-1, :-1, :-1]


# -- the task ---------------------------------------------------------------------------------------------------------


@register_task("shape-generation")
class ShapeGenerator(ZooModel):
    """m.generate(condition) -> Mesh; m.denoise(x, t, features); m.decode(latents) -> SDF [B, R, R, R].

    For a command-line pre-flight (no model needed): `cli_plan(args)` checks everything `cli_generate` will need
    and returns what it will write; `cli_required_modules(args)` and `output_suffixes` are its parts."""

    output_suffixes = {"out": MESH_SUFFIXES, "preview": PREVIEW_SUFFIXES}  # per output option

    commands = {"generate": Command(  # what `zoo generate` may pass (checked before loading)
        options=frozenset({"seed", "steps", "guidance", "out", "preview", "out_dir", "target_faces", "inputs"}),
        inputs="paths", out=MESH_SUFFIXES,
        default_out="{stem}.obj", preview=PREVIEW_SUFFIXES,
        needs=("pywt", "mcubes", "trimesh", "matplotlib"), extra="shapes")}

    @property
    def license_notice(self) -> str:
        name = self.native.extra.get("license_name") or self.native.source.get("license") or "see the model card"
        return f"{self.name or self.family.name}: weights under {name}; non-commercial use only (see the model card)"

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return dict(self.native.extra.get("generation") or {"steps": 5, "guidance": 3.0})

    def denoise(self, x: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module.denoise(x.to(self.device, self.dtype), t.to(self.device), features.to(self.device,
                                                                                                      self.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module.decode(latents.to(self.device, self.dtype))

    # inputs
    def _image(self, item: Any, over_white: bool | None) -> torch.Tensor:
        from zoo.tasks.vision import center_crop, normalize, resize_short

        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item  # already preprocessed [3, H, W]
        p = self.native.extra.get("preprocessing", {})
        img = load_image(item, over_white) if isinstance(item, (str, Path)) else (
            item.convert("RGB") if isinstance(item, Image.Image) else image_from_array(item))
        res = int(p.get("resolution", 224))
        img = center_crop(resize_short(img, res, p.get("interpolation", "bilinear")), res)
        return normalize(img, p.get("mean", [0.5] * 3), p.get("std", [0.5] * 3))

    def preprocess(self, condition: Any) -> torch.Tensor:
        """A user condition -> the batch of one the condition encoder takes."""
        c = self.config
        if c.condition in ("image", "depth"):
            over_white = None if self.native.extra.get("preprocessing", {}).get("la_over_white") else False
            if c.views == 1:
                if isinstance(condition, (list, tuple)):
                    if len(condition) != 1:
                        raise ValueError(f"this model takes one image; got {len(condition)}")
                    condition = condition[0]
                return self._image(condition, over_white)[None]
            views = condition
            if isinstance(views, (str, Path)) and Path(views).is_dir():
                views = numbered([p for p in Path(views).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
            elif isinstance(views, str) and "," in views:
                views = [v.strip() for v in views.split(",") if v.strip()]
            if not isinstance(views, (list, tuple)) or len(views) != c.views:
                n = len(views) if isinstance(views, (list, tuple)) else 1
                raise ValueError(f"this model takes {c.views} views (a list, a comma-separated list of files or a "
                                 f"directory of {c.views} images, in training-view order); got {n}")
            return torch.stack([self._image(v, over_white) for v in views])[None]
        if c.condition == "pointcloud":
            pts = read_points(Path(condition)) if isinstance(condition, (str, Path)) else (
                condition.float() if isinstance(condition, torch.Tensor) else torch.from_numpy(
                    np.asarray(condition, dtype=np.float32)))
            pts = torch.as_tensor(pts, dtype=torch.float32)
            if pts.dim() == 2:
                pts = pts[None]
            if pts.dim() != 3 or pts.shape[-1] != 3 or pts.shape[1] == 0:
                raise ValueError(f"a point cloud must be [N, 3] points; got shape {tuple(pts.shape)}")
            return pts
        r = c.voxel_resolution
        vox = read_voxels(Path(condition), r) if isinstance(condition, (str, Path)) else condition
        vox = torch.as_tensor(np.asarray(vox) if not isinstance(vox, torch.Tensor) else vox).float()
        while vox.dim() < 5:
            vox = vox[None]
        if tuple(vox.shape[-4:]) != (1, r, r, r):
            raise ValueError(f"a voxel grid must be {r}^3 occupancy; got shape {tuple(vox.shape)}")
        return vox

    def encode_condition(self, condition: Any) -> torch.Tensor:
        """Encoder features for a condition, as the diffusion network receives them."""
        x = self.preprocess(condition)
        with torch.inference_mode():
            return self.module.encode_condition(x.to(self.device, self.dtype))

    def is_batch(self, condition: Any) -> bool:
        """Whether `condition` is several conditions (one shape each) rather than one: a list of images for a
        one-view model; a list of view lists / directories / comma-separated lists for a multi-view model; a list
        of files or arrays for point clouds and voxels (a plain nested list of numbers is one cloud)."""
        if not isinstance(condition, (list, tuple)):
            return False
        c = self.config
        if c.condition in ("image", "depth"):
            if c.views == 1:
                return True
            return len(condition) > 0 and all(isinstance(v, (list, tuple)) or (isinstance(v, (str, Path)) and (
                Path(v).is_dir() or "," in str(v))) for v in condition)
        return len(condition) > 0 and all(isinstance(v, (str, Path, np.ndarray, torch.Tensor)) for v in condition)

    def condition_view(self, x: torch.Tensor) -> ConditionView:
        """A preprocessed condition as a person looks at it (images un-normalised to 8 bits)."""
        c = self.config
        if c.condition in ("image", "depth"):
            p = self.native.extra.get("preprocessing", {})
            mean = torch.tensor(p.get("mean", [0.5] * 3)).view(3, 1, 1)
            std = torch.tensor(p.get("std", [0.5] * 3)).view(3, 1, 1)
            imgs = (x.detach().float().cpu().reshape(-1, 3, *x.shape[-2:]) * std + mean).clamp(0, 1)
            what = "depth map" if c.condition == "depth" else "image"
            label = (f"input: {c.views} {what}s, training-view order" if c.views > 1 else f"input {what}") + \
                f" ({x.shape[-1]} px, as the model sees it)"
            return ConditionView("images", (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), label)
        if c.condition == "pointcloud":
            pts = x.detach().float().cpu().reshape(-1, 3).numpy()
            return ConditionView("points", pts, f"input: {len(pts):,} points")
        grid = x.detach().float().cpu().reshape(x.shape[-3:]).numpy()
        return ConditionView("voxels", grid, f"input: {grid.shape[0]}^3 voxels ({int((grid > 0.5).sum())} filled)")

    def generate(self, condition: Any, steps: int | None = None, guidance: float | None = None,
                 seed: int | None = None, target_faces: int | None = DEFAULT_TARGET_FACES,
                 progress: bool = False) -> Mesh | list[Mesh]:
        """A mesh for a condition: an image (path, PIL image or array), a list / directory of views, depth maps,
        a point cloud ([N, 3] array or file) or a voxel grid (R^3 array or WaLa's JSON); a list of conditions
        (see `is_batch`) gives a list of meshes, one shape at a time. `seed` (default 42, as the published script)
        is set again for every input, so an input gives the same shape alone or in a batch. The mesh is simplified
        to at most `target_faces` faces (None: every marching-cubes face); `.watertight` says whether it is closed."""
        d = self.generation_defaults
        steps = check_steps(d["steps"] if steps is None else steps, self.config.train_steps, d["steps"])
        guidance = check_guidance(d["guidance"] if guidance is None else guidance, d["guidance"])
        seed, target_faces = check_seed(seed), check_target_faces(target_faces)
        batch = self.is_batch(condition)
        prepared = [self.preprocess(c) for c in (condition if batch else [condition])]  # every input read first
        meshes = [self.shape_from(x, steps, guidance, seed, target_faces,
                                  progress=f"shape {n + 1}/{len(prepared)}" if progress and batch else progress)
                  for n, x in enumerate(prepared)]
        return meshes if batch else meshes[0]

    def shape_from(self, x: torch.Tensor, steps: int, guidance: float, seed: int, target_faces: int | None,
                   progress: bool | str = False) -> Mesh:
        """One shape from one preprocessed condition (checked arguments: see `generate`)."""
        with torch.inference_mode():
            features = self.module.encode_condition(x.to(self.device, self.dtype))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=progress if isinstance(progress, str) else "diffusion", unit="step",
                       file=sys.stderr, disable=not is_main_process())
        with torch.inference_mode():
            latents = self.module.sample(features, steps, guidance, generator=generator,
                                         callback=(lambda n, total: bar.update(1)) if bar is not None else None)
            if bar is not None:
                bar.close()
            if not torch.isfinite(latents).all():
                raise ValueError(f"guidance={guidance!r}: the diffusion diverged (non-finite latents); use a smaller "
                                 f"guidance (this model recommends {self.generation_defaults['guidance']})")
            sdf = self.module.decode(latents[:1])[0]
        mesh = Mesh.from_sdf(sdf)
        del sdf
        mesh.sdf = None  # 64 MB a shape; a batch keeps only its meshes
        mesh = mesh.simplify(target_faces) if target_faces is not None else mesh
        mesh.condition = self.condition_view(x)
        return mesh

    # -- the command line ---------------------------------------------------------------------------------------------

    @classmethod
    def cli_required_modules(cls, args: Any) -> list[str]:
        faces = getattr(args, "target_faces", None)
        return required_modules(preview=bool(getattr(args, "preview", None)), simplify=faces != 0,
                                inputs=cls.cli_inputs(args))

    @staticmethod
    def cli_inputs(args: Any) -> list[str]:
        """The conditions on the command line: the prompt, then any more (one shape each)."""
        return [args.prompt, *(getattr(args, "inputs", None) or [])]

    @classmethod
    def cli_plan(cls, args: Any) -> list[tuple[str, Path, Path | None]]:
        """(condition, mesh path, preview path or None) per input, after checking, before any model is loaded:
        the extras installed, the numbers, every input present, every output of a known format, no output written
        over an input or over another output. One input: --out FILE (default NAME.obj here) and --preview FILE;
        several: --out-dir DIR (default here) gets NAME.obj each and, with --preview DIR, NAME.png each there (a
        --preview with no picture suffix, or an existing directory, is a directory for one input too)."""
        inputs = cls.cli_inputs(args)
        out, out_dir, preview = getattr(args, "out", None), getattr(args, "out_dir", None), getattr(args, "preview",
                                                                                                    None)
        faces = getattr(args, "target_faces", None)
        if faces is not None and faces != 0 and not (isinstance(faces, int) and faces >= MIN_TARGET_FACES):
            raise ValueError(f"target_faces={faces}: must be 0 (keep every face) or an integer >= {MIN_TARGET_FACES}")
        check_modules(cls.cli_required_modules(args))
        for name, check in (("steps", check_steps), ("guidance", check_guidance), ("seed", check_seed)):
            if getattr(args, name, None) is not None:
                check(getattr(args, name))
        if out and out_dir:
            raise ValueError(f"--out {out} and --out-dir {out_dir}: give one (--out for one input, --out-dir for "
                             "several)")
        if out and len(inputs) > 1:
            raise ValueError(f"--out {out} names one file for {len(inputs)} inputs; use --out-dir DIR (NAME.obj each)")
        files = [f for c in inputs for f in input_files(c)]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{f}: no such input file")
        plan = []
        for c in inputs:
            stem = Path(str(c).rstrip("/").split(",")[0]).stem
            mesh = check_mesh_path(out) if out else Path(out_dir or ".") / f"{stem}.obj"
            pic = None
            folder = bool(preview) and (Path(preview).is_dir() or str(preview).endswith(("/", os.sep))
                                        or not Path(preview).suffix)
            if preview and len(inputs) == 1 and not folder:
                pic = check_preview_path(preview)
            elif preview:
                pic = Path(preview) / f"{stem}.png"
            plan.append((c, mesh, pic))
        written: dict[Path, str] = {}
        for c, mesh, pic in plan:
            given = "--out-dir" if out_dir else "--out" if out else "the default output (NAME.obj here)"
            for option, path in ((given, mesh), ("--preview", pic)):
                if path is None:
                    continue
                hit = next((f for f in files if _same_file(path, f)), None)
                if hit is not None:
                    raise ValueError(f"{option}: {path} is the input {hit}; writing there would destroy it (name "
                                     "another output)")
                key = path.resolve()
                if key in written:
                    raise ValueError(f"{path}: both {written[key]} and {c} would be written there (rename an input "
                                     "or use --out-dir)")
                written[key] = str(c)
        return plan

    def cli_generate(self, args: Any) -> None:
        plan = self.cli_plan(args)
        faces = getattr(args, "target_faces", None)
        target = DEFAULT_TARGET_FACES if faces is None else (None if faces == 0 else faces)
        d = self.generation_defaults
        steps = check_steps(d["steps"] if args.steps is None else args.steps, self.config.train_steps, d["steps"])
        guidance = check_guidance(d["guidance"] if args.guidance is None else args.guidance, d["guidance"])
        seed = check_seed(args.seed)
        print(self.license_notice, file=sys.stderr)
        prepared = [self.preprocess(c) for c, _, _ in plan]  # a bad input stops the run before any diffusion
        for n, ((condition, out, preview), x) in enumerate(zip(plan, prepared)):
            label = "diffusion" if len(plan) == 1 else f"{Path(str(condition)).name} ({n + 1}/{len(plan)})"
            mesh = self.shape_from(x, steps, guidance, seed, target, progress=label)
            mesh.save(out)
            simplified = f", simplified from {mesh.full_faces:,}" if mesh.full_faces != len(mesh.faces) else ""
            state = "watertight" if mesh.watertight else "open: not watertight"
            print(f"wrote {out} ({len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces{simplified}; {state})",
                  file=sys.stderr)
            if preview is not None:
                title = f"{self.name or self.family.name}: {Path(str(condition)).name} (steps {steps}, guidance " \
                        f"{guidance:g}, seed {seed})"
                print(f"wrote {mesh.preview(preview, title=title)}", file=sys.stderr)
