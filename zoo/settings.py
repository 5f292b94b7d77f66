"""zoo's runtime switches: each read from the environment once, here, when zoo is imported, and each also an
argument where a user looks for it.

    ZOO_ONEDNN   oneDNN linear layers for the vision models on CPU (architectures/kernels/linear.py):
                 1 (default) | pack | 0                          zoo.load(onednn="dense" | "pack" | "off"),
                                                                 zoo generate/predict --onednn
    ZOO_COMPILE  decoding through one torch.compile'd step (zoo.generation.compile_wanted):
                 unset (default: where measured faster on this   zoo.load(compile=True | False), --compile
                 CPU for these weights and worth its compile,
                 zoo.generation.COMPILED_SPEEDUP) | 1 | 0
    ZOO_QUANT_ACTIVATIONS  int8 / int4 linear layers on CPU multiply integers, decoding and prefill alike:
                 1 (default) | 0                                 (architectures/kernels/dequant_matmul.py)
                 1: each row of x quantised to int8 per block of 32 (int8) or 64 (int4) columns, one fp32
                 scale per block, integer dot products with the codes (llama.cpp Q8_0's arithmetic: ~0.5% of
                 a row's output off the weight-only product); 0: weight-only, the codes times the exact
                 activations in fp32 (the scheme's reference arithmetic). Read at each call, so a change of
                 SETTINGS.quant_activations applies to eager and compiled steps alike (Dynamo guards on it).
    ZOO_HOME     where converted registry models and the verified-files record live (default ~/.cache/zoo).
                 A location rather than a switch: read at each use (`zoo_home`), so a process can point it
                 elsewhere (the tests give each test its own). Inductor's caches go to $ZOO_HOME/inductor
                 unless TORCHINDUCTOR_CACHE_DIR is set (zoo.generation.inductor_cache).

An argument wins over the environment; the environment only sets the default. Code reads SETTINGS, never
os.environ, for these; `from_environ` builds them from a given environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ONEDNN_MODES = ("off", "dense", "pack")  # no oneDNN | on the model's own weights | on a packed second copy


@dataclass
class Settings:
    onednn: str = "dense"  # one of ONEDNN_MODES
    compile: bool | None = None  # None: where measured faster and worth its compile
    quant_activations: bool = True  # int8 activations for the CPU int8 / int4 kernels


def onednn_from_text(text: str) -> str:
    """A ZOO_ONEDNN value as a mode: 0/off/false/no -> "off", pack -> "pack", anything else (1, on) -> "dense"."""
    text = text.strip().lower()
    if text in ("0", "off", "false", "no"):
        return "off"
    return "pack" if text == "pack" else "dense"


def compile_from_text(text: str) -> bool | None:
    """A ZOO_COMPILE value: unset or empty -> None (the default decision), 0 -> False, anything else -> True."""
    text = text.strip()
    return None if not text else text != "0"


def flag_from_text(text: str) -> bool:
    """An on/off value: 0/off/false/no -> False, anything else (1, on, empty) -> True."""
    return text.strip().lower() not in ("0", "off", "false", "no")


def from_environ(environ: Mapping[str, str] = os.environ) -> Settings:
    return Settings(onednn=onednn_from_text(environ.get("ZOO_ONEDNN", "1")),
                    compile=compile_from_text(environ.get("ZOO_COMPILE", "")),
                    quant_activations=flag_from_text(environ.get("ZOO_QUANT_ACTIVATIONS", "1")))


SETTINGS = from_environ()


def zoo_home() -> Path:
    """Where converted registry models live: $ZOO_HOME, else ~/.cache/zoo (read at each call, see above)."""
    return Path(os.environ.get("ZOO_HOME") or Path.home() / ".cache" / "zoo")
