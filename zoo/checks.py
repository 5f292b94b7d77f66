"""Checks for the arguments a user passes in: each error names the argument, the value, and what is allowed.

zoo.load, zoo.convert and the CLI call these before any file is read or any request is made, so a typo costs
nothing. The checks depend on torch only (and on zoo.architectures.quant for scheme names, imported when asked).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import torch


def check_int(value: Any, arg: str, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An integer (not a bool, not a float), at least `minimum`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{arg}={value!r}: must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise ValueError(f"{arg}={value!r}: must be an integer >= {minimum}")
    return int(value)


def check_bool(value: Any, arg: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{arg}={value!r}: must be True or False")
    return value


def check_name_or_path(value: Any, arg: str = "name_or_path") -> str:
    """A registry name, a directory or an hf:// address: a non-empty string or path."""
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"{arg}={value!r}: expected a registry name, a native directory or 'hf://org/name@rev' "
                         f"(a string or path), got {type(value).__name__}")
    text = os.fspath(value)
    if not str(text).strip():
        raise ValueError(f"{arg}={value!r}: empty; give a registry name (`zoo list`), a native directory or "
                         "'hf://org/name@rev'")
    return str(text)


def _accelerator_available(kind: str) -> bool:
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def check_device(device: Any, arg: str = "device") -> torch.device:
    """A device that exists on this machine: 'cpu', 'cuda', 'cuda:N' (N < the visible GPUs), 'mps', ...

    An integer N means cuda:N, as in torch. The meta device holds no data, so it is refused.
    """
    if isinstance(device, bool):
        raise ValueError(f"{arg}={device!r}: not a device; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if isinstance(device, torch.device):
        d = device
    elif isinstance(device, numbers.Integral):
        if device < 0:
            raise ValueError(f"{arg}={device!r}: a device index is >= 0")
        d = torch.device("cuda", int(device))
    elif isinstance(device, str) and device.strip():
        try:
            d = torch.device(device.strip().lower())
        except (RuntimeError, ValueError):
            raise ValueError(f"{arg}={device!r}: not a device; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    else:
        raise ValueError(f"{arg}={device!r}: not a device; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if d.type == "cpu":
        return d
    if d.type == "meta":
        raise ValueError(f"{arg}={device!r}: the meta device holds no data; use 'cpu', 'cuda' or 'cuda:N'")
    if d.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            why = "torch was built without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
            raise ValueError(f"{arg}={device!r}: this machine has no CUDA device ({why}); use 'cpu'")
        if d.index is not None and d.index >= n:
            raise ValueError(f"{arg}={device!r}: this machine has {n} CUDA device(s): cuda:0..cuda:{n - 1}")
        return d
    if d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{arg}={device!r}: MPS (Apple GPU) is not available here; use 'cpu'")
        return d
    if not _accelerator_available(d.type):
        raise ValueError(f"{arg}={device!r}: no {d.type} device is available here; use 'cpu' or 'cuda:N'")
    return d


def check_quantize(name: Any, arg: str = "quantize") -> str | None:
    """None, or a scheme name zoo.architectures.quant knows ("int8", "int4", "int8-row", "int4-row-g8", ...)."""
    if name is None:
        return None
    from zoo.architectures.quant import ALIASES, SCHEMES, get_scheme

    if not isinstance(name, str) or not name:
        raise ValueError(f"{arg}={name!r}: must be a scheme name, one of {sorted({*ALIASES, *SCHEMES})}")
    try:
        get_scheme(name)
    except ValueError:
        raise ValueError(f"{arg}={name!r}: unknown scheme; use one of {sorted({*ALIASES, *SCHEMES})}") from None
    return name


def check_memory_map(device_map: Any, max_memory: Any) -> None:
    """device_map is 'auto' or {part: device}; max_memory {device: size} goes with device_map only."""
    if device_map is not None and not (device_map == "auto" or isinstance(device_map, dict)):
        raise ValueError(f"device_map={device_map!r}: must be 'auto' or a dict {{part: device}}")
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map={}: empty; give {'': 'cpu'} to place everything on one device, or 'auto'")
        for key in device_map:
            if not isinstance(key, str):
                raise ValueError(f"device_map key {key!r}: must be a module path (a string, '' for everything)")
    if max_memory is not None:
        if device_map is None:
            raise ValueError("max_memory is used with device_map='auto'; pass device_map='auto' as well")
        if not isinstance(max_memory, dict) or not max_memory:
            raise ValueError(f"max_memory={max_memory!r}: must be a non-empty dict {{device: size}}, "
                             "e.g. {'cuda:0': '10GiB', 'cpu': '16GiB'}")


def find_nan(value: Any, path: str = "") -> str | None:
    """The first NaN number in a config (nested dicts and lists), as "field" or "field[2]"; None if none.

    A NaN is never a published number; a config holding one (a damaged file) would compute NaN everywhere."""
    if isinstance(value, float) and math.isnan(value):
        return path or "value"
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((hit for p, v in items if (hit := find_nan(v, p))), None)


def check_onednn(mode: Any, arg: str = "onednn") -> str | None:
    """None (the process's setting, ZOO_ONEDNN), or one of zoo.settings.ONEDNN_MODES: "off", "dense", "pack"."""
    from zoo.settings import ONEDNN_MODES

    if mode is None:
        return None
    if not isinstance(mode, str) or mode not in ONEDNN_MODES:
        raise ValueError(f"{arg}={mode!r}: must be one of {', '.join(repr(m) for m in ONEDNN_MODES)} (or None: "
                         "ZOO_ONEDNN's setting)")
    return mode


def _same(a: Any, b: Any) -> bool:
    """One file under two names: equal resolved paths, or the same inode (a hard link, a bind mount)."""
    a, b = os.path.realpath(a), os.path.realpath(b)  # "new/../x" names x even while new/ does not exist
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _inside(path: Any, directory: Any) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return real != top and real.startswith(top.rstrip(os.sep) + os.sep)


def check_outputs(outputs: dict[str, Any], inputs: list[Any]) -> None:
    """Every output file (by the argument that names it: {"--out x.obj": path}) can be written, and none is an input
    (same resolved path or same inode), an existing file inside an input directory, or another output. Called before
    any work, so a typo never costs a run, and a run never writes over what it read."""
    seen: dict[str, str] = {}
    for arg, path in outputs.items():
        if os.path.isdir(path):
            raise ValueError(f"{arg}: is a directory; give a file name")
        for src in inputs:
            if _same(path, src) or (os.path.isfile(path) and os.path.isdir(src) and _inside(path, src)):
                what = "the input" if not os.path.isdir(src) or _same(path, src) else "a file of the input directory"
                raise ValueError(f"{arg}: is {what} {src}; zoo never writes an output over an input, give another "
                                 "name")
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{arg}: the same file as {seen[real]}; give each output its own name")
        seen[real] = arg
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):  # missing directories are created when the output is written
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{arg}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise PermissionError(f"{arg}: not writable here (no permission to write in {parent})")


def check_output_directory(out: Any, sources: list[Any], arg: str = "OUT") -> None:
    """A directory a command writes (or replaces, with --overwrite) is none of its sources, holds none of them and
    lies inside none of them."""
    for src in sources:
        if src is None:
            continue
        if _same(out, src) or _inside(src, out):
            raise ValueError(f"{arg} {out}: {'is' if _same(out, src) else 'holds'} the input {src}; writing there "
                             "would destroy it, give another output directory")
        if os.path.isdir(src) and _inside(out, src):
            raise ValueError(f"{arg} {out}: lies inside the input directory {src}; give an output directory "
                             "outside it")


def check_beam_search(num_beams: Any, length_penalty: Any, no_repeat_ngram_size: Any, early_stopping: Any,
                      num_return_sequences: Any, min_gen_length: Any) -> None:
    """Beam-search settings (transformers' names; min_gen_length is GLM-130B's): each value, then the
    combinations that make no sense, by name."""
    for name, value in (("num_beams", num_beams), ("num_return_sequences", num_return_sequences)):
        check_int(value, name, minimum=1)
    for name, value in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_gen_length", min_gen_length)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an integer >= 0 (0: off)")
    lp = length_penalty
    if isinstance(lp, bool) or not isinstance(lp, numbers.Real) or not math.isfinite(lp):
        raise ValueError(f"length_penalty={lp!r}: must be a finite number (1.0: score per token; > 1 favours "
                         "longer, < 1 shorter beams)")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping={early_stopping!r}: must be True, False or 'never'")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} > num_beams={num_beams}: beam search "
                         "returns at most num_beams sequences")
    if num_beams == 1:
        given = [f"{k}={v!r}" for k, v, default in (("length_penalty", lp, 1.0),
                                                    ("no_repeat_ngram_size", no_repeat_ngram_size, 0),
                                                    ("early_stopping", early_stopping, False)) if v != default]
        if given:
            raise ValueError(f"{', '.join(given)}: beam-search settings; give num_beams > 1")


def check_decoding_strategy(num_beams: int, temperature: Any, top_k: Any, top_p: Any, stream: bool,
                            seed: Any = None) -> None:
    """Beam search keeps the most likely beams: it draws nothing and cannot stream (its best text is known only
    at the end). A sampling setting or stream=True beside num_beams > 1 is refused by name."""
    if num_beams <= 1:
        return
    sampling = [f"{k}={v!r}" for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                          ("seed", seed)) if v is not None and not (k == "temperature" and v == 0)]
    if sampling:
        raise ValueError(f"num_beams={num_beams} with {', '.join(sampling)}: beam search does not sample; "
                         "drop the sampling settings or use num_beams=1")
    if stream:
        raise ValueError(f"num_beams={num_beams} with stream=True: beam search knows its best text only at the end; "
                         "use stream=False or num_beams=1")

