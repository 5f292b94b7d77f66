"""3-D shape generation: a condition (image, views, depth maps, point cloud, voxels) -> a signed distance grid -> mesh.

The model module provides (zoo.architectures.wala is the one family so far):
  encode_condition(inputs) -> features   the condition encoder on preprocessed inputs
  denoise(x, t, features) -> output      the diffusion network (condition mapping and embeddings applied inside)
  sample(features, steps, guidance, generator, callback) -> latents
  decode(latents) -> sdf [B, R, R, R]
This module turns user inputs into the preprocessed tensors (the published preprocessing, stored in the native
config's extra), runs the sampler with a progress bar, and turns the grid into a mesh with PyMCubes (vertices
scaled as published: v / R * 2 - 1, triangle winding reversed), saved with trimesh (.obj, .ply, .glb, .stl, .off)
and rendered headless with matplotlib for a preview. Optional libraries: pip install zoo[shapes].
"""

from __future__ import annotations

import json
import math
import numbers
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from zoo.tasks import Command, ZooModel, is_main_process, register_task
from zoo.tasks.vision import open_pil, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MESH_SUFFIXES = (".obj", ".ply", ".glb", ".gltf", ".stl", ".off")


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"3-D shape output needs {module}; install the extra: pip install 'zoo[shapes]'") from None


# -- meshes ----------------------------------------------------------------------------------------------------------


class Mesh:
    """A triangle mesh (vertices [V, 3] float, faces [F, 3] int) with the signed distance grid it came from."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, sdf: np.ndarray | None = None):
        self.vertices, self.faces, self.sdf = vertices, faces, sdf

    def __repr__(self) -> str:
        return f"Mesh({len(self.vertices)} vertices, {len(self.faces)} faces)"

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

    def to_trimesh(self):
        trimesh = _need("trimesh")
        return trimesh.Trimesh(self.vertices, self.faces, process=False)

    def save(self, path: str | Path) -> Path:
        """Write the mesh; the format follows the suffix (.obj, .ply, .glb, .gltf, .stl, .off)."""
        path = Path(path)
        if path.suffix.lower() not in MESH_SUFFIXES:
            raise ValueError(f"{path}: unknown mesh format {path.suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
        if len(self.faces) == 0:
            raise ValueError("the mesh is empty (the signed distance grid has no zero crossing)")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_trimesh().export(str(path))
        return path

    def render(self, path: str | Path, size: int = 512, max_faces: int = 60000) -> Path:
        """A shaded picture of the mesh (headless matplotlib). Large meshes are previewed from a coarser marching
        cubes of the same grid."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from mpl_toolkits.mplot3d.art3d import Poly3DCollection

        mesh = self
        stride = 1
        while len(mesh.faces) > max_faces and self.sdf is not None and stride < 16:
            stride *= 2
            mesh = Mesh.from_sdf(self.sdf[::stride, ::stride, ::stride])
        v, f = mesh.vertices, mesh.faces
        if len(f) == 0:
            raise ValueError("the mesh is empty; nothing to render")
        # y up: plot (x, z, y)
        tri = v[f][:, :, [0, 2, 1]]
        normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
        light = np.array([0.4, -0.6, 0.7]) / np.linalg.norm([0.4, -0.6, 0.7])
        shade = 0.25 + 0.75 * np.abs(normals @ light)
        colors = np.clip(np.outer(shade, [0.55, 0.65, 0.85]), 0, 1)
        fig = plt.figure(figsize=(size / 100, size / 100), dpi=100)
        ax = fig.add_subplot(projection="3d")
        ax.add_collection3d(Poly3DCollection(tri, facecolors=colors, edgecolors="none"))
        lo, hi = tri.reshape(-1, 3).min(0), tri.reshape(-1, 3).max(0)
        center, half = (lo + hi) / 2, (hi - lo).max() / 2 * 1.05
        ax.set_xlim(center[0] - half, center[0] + half)
        ax.set_ylim(center[1] - half, center[1] + half)
        ax.set_zlim(center[2] - half, center[2] + half)
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=20, azim=-60)
        ax.set_axis_off()
        fig.subplots_adjust(0, 0, 1, 1)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, facecolor="white")
        plt.close(fig)
        return path


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
    if suffix in (".h5", ".h5df", ".hdf5", ".hdf"):
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
    """m.generate(condition) -> Mesh; m.denoise(x, t, features); m.decode(latents) -> SDF [B, R, R, R]."""

    commands = {"generate": Command(  # what `zoo generate` may pass (checked before loading)
        options=frozenset({"seed", "steps", "guidance", "out", "preview"}), inputs="paths", out=MESH_SUFFIXES,
        default_out="{stem}.obj", preview=(".png", ".jpg", ".jpeg", ".pdf", ".svg"),
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

    def generate(self, condition: Any, steps: int | None = None, guidance: float | None = None,
                 seed: int | None = None, progress: bool = False) -> Mesh:
        """A mesh for one condition: an image (path, PIL image or array), a list / directory of views, depth maps,
        a point cloud ([N, 3] array or file) or a voxel grid (R^3 array or WaLa's JSON). Same seed, same mesh."""
        d = self.generation_defaults
        steps = d["steps"] if steps is None else steps
        guidance = d["guidance"] if guidance is None else guidance
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps={steps!r}: must be an integer >= 1 (this model recommends {d['steps']})")
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) \
                or guidance < 0:
            raise ValueError(f"guidance={guidance!r}: must be a finite number >= 0 (this model recommends "
                             f"{d['guidance']})")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed={seed!r}: must be an integer >= 0 (or None)")
        steps, guidance = int(steps), float(guidance)
        features = self.encode_condition(condition)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="diffusion", unit="step", file=sys.stderr, disable=not is_main_process())
        with torch.inference_mode():
            latents = self.module.sample(features, steps, guidance, generator=generator,
                                         callback=(lambda n, total: bar.update(1)) if bar is not None else None)
            if bar is not None:
                bar.close()
            sdf = self.module.decode(latents[:1])[0]
        return Mesh.from_sdf(sdf)

    def cli_generate(self, args: Any) -> None:
        condition = args.prompt
        print(self.license_notice, file=sys.stderr)
        mesh = self.generate(condition, steps=getattr(args, "steps", None), guidance=getattr(args, "guidance", None),
                             seed=getattr(args, "seed", None), progress=True)
        out = Path(getattr(args, "out", None) or Path(str(condition).rstrip("/").split(",")[0]).stem + ".obj")
        mesh.save(out)
        print(f"wrote {out} ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces)", file=sys.stderr)
        if getattr(args, "preview", None):
            print(f"wrote {mesh.render(args.preview)}", file=sys.stderr)
