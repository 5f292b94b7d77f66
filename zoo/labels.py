"""Published label sets shipped with zoo (ImageNet, Kinetics): class index -> name."""

from __future__ import annotations

import gzip
from importlib.resources import files


def label_set(name: str) -> list[str]:
    """A label list shipped in zoo/data/labels (imagenet-1k, imagenet-22k, kinetics-400/600/700/710)."""
    root = files("zoo").joinpath("data", "labels")
    for fname in (f"{name}.txt", f"{name}.txt.gz"):
        path = root.joinpath(fname)
        if path.is_file():
            data = path.read_bytes()
            text = (gzip.decompress(data) if fname.endswith(".gz") else data).decode()
            return text.splitlines()
    raise ValueError(f"unknown label set {name!r}")
