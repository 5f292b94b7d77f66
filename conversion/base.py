"""A published checkpoint format, and convert / export built on the shared streaming engine."""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from zoo.architectures.quant import get_scheme, module_scheme, pack_linears, packable_paths
from zoo.conversion.engine import (
    INPUT_ERRORS,
    AtomicDirectory,
    check_against_model,
    check_paths,
    pack_jobs,
    plan_jobs,
    reading,
    run_jobs_meta,
    stream_write,
)
from zoo.conversion.rules import KeyMap, pattern_regex
from zoo.conversion.sources import SafetensorsSource, TensorSource, open_source
from zoo.weights.format import (
    CheckpointError,
    NativeConfig,
    dtype_name,
    parse_dtype,
    read_config,
    write_config,
)
from zoo.weights.reader import Checkpoint

from zoo.checks import find_nan
from zoo.family import Family, get_family
from zoo.plugins import declared

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",  # newer transformers save the chat template beside tokenizer_config.json
)


class Format:
    """One published layout. Subclasses fill in detection, config mapping and the key map."""

    name: str = ""
    family: str = ""
    description: str = ""
    exports_as: str | None = None  # `zoo convert --to NAME` target this format serves ("hf"), if any
    copy_files: tuple[str, ...] = TOKENIZER_FILES
    # A layout published without a config (GLM-130B's SAT release) takes one from the user (`--config FILE`):
    # native_config(src, config=dict) is then called with it.
    takes_config: bool = False

    def detect(self, src: Path) -> bool:
        raise NotImplementedError

    def native_config(self, src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """(family config fields, extra: generation defaults / preprocessing / labels)."""
        raise NotImplementedError

    def keymap(self, config: Any) -> KeyMap:
        raise NotImplementedError

    def open(self, src: Path) -> TensorSource:
        return open_source(src)

    def export_config(self, native: NativeConfig, config: Any) -> dict[str, Any]:
        raise NotImplementedError(f"format {self.name} cannot be exported to")

    def keep_dtype(self, key: str) -> bool:
        """Tensors that stay in their stored dtype when --dtype converts the rest."""
        return False

    def source_info(self, src: Path) -> dict[str, Any]:
        """Facts about the published weights every conversion records (license, paper), when the layout knows them."""
        return {}

    def quantization(self, src: Path) -> dict[str, Any]:
        """For a layout published with packed weights: {"scheme": name, "modules": [native module paths]}."""
        return {}

    def write_export(self, model_dir: Path, out: Path, overwrite: bool, progress: bool, **options: Any) -> Path:
        """A layout that is more than the key map read backwards (e.g. split over tensor-parallel ranks) writes
        itself here; formats that do not override it get the generic export, which takes no options."""
        raise NotImplementedError


_FORMATS: dict[str, Format] = {}
_loaded = False


def formats() -> dict[str, Format]:
    """Every format declared by a module of zoo.conversion (as FORMATS = [...])."""
    global _loaded
    if not _loaded:
        _loaded = True
        for declared_formats in declared(__package__, "FORMATS"):
            for fmt in declared_formats:
                _FORMATS[fmt.name] = fmt
    return dict(_FORMATS)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def detect_format(src: Path, name: str | None = None) -> Format:
    known = formats()
    if name is not None:
        if name not in known:
            raise CheckpointError(f"unknown format {name!r}; known formats: {', '.join(sorted(known))}")
        return known[name]
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    hits = [f for f in known.values() if _detects(f, src)]
    if len(hits) != 1:
        what = "matches several formats: " + ", ".join(f.name for f in hits) if hits else "is in no known format"
        raise CheckpointError(f"{src}: {what}; pass --format NAME (one of {', '.join(sorted(known))})")
    return hits[0]


def _detects(fmt: Format, src: Path) -> bool:
    """A format claims src; one that cannot even read it (junk, a foreign layout) does not."""
    try:
        return bool(fmt.detect(src))
    except (OSError, *INPUT_ERRORS):
        return False


def published_names(keymap: KeyMap):
    """native key -> the published key(s) it is made from, for error messages."""
    reverse = keymap.reversed()

    def name(native_key: str) -> str:
        for rule in reverse.rules:  # a published tensor split into several native ones names each of them
            for pattern in rule.src:
                m = pattern_regex(pattern).match(native_key)
                if m and (len(rule.src) == 1 or len(rule.dst) == 1):
                    return " + ".join(p.format(**m.groupdict()) for p in rule.dst)
        return native_key

    return name


def expected_state(family: Family, config: Any, quantization: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    module = family.build_meta(config)
    if quantization:
        pack_linears(module, quantization["scheme"], list(quantization["modules"]))
    return dict(module.state_dict())


def _stored_dtype(planned: dict[str, torch.Tensor], dtype: torch.dtype | None) -> str:
    if dtype is not None:
        return dtype_name(dtype)
    floats = [t.dtype for t in planned.values() if t.dtype.is_floating_point]
    return dtype_name(max(set(floats), key=floats.count)) if floats else "float32"


def convert(src: str | Path, out: str | Path, *args: Any, **kwargs: Any) -> Path:
    """Convert a published checkpoint into the native format, streaming tensor by tensor (see _convert).

    The arguments are checked before anything is read, and whatever a damaged or foreign source makes a
    format's parser raise comes out as a CheckpointError naming the source."""
    from zoo.checks import check_quantize

    src, out = check_paths(src, out)
    bound = inspect.signature(_convert).bind(src, out, *args, **kwargs)
    parse_dtype(bound.arguments.get("dtype"))
    check_quantize(bound.arguments.get("quantize"))
    shard = bound.arguments.get("max_shard_bytes", 1)
    if isinstance(shard, bool) or not isinstance(shard, int) or shard <= 0:
        raise ValueError(f"max_shard_bytes={shard!r}: must be a whole number of bytes > 0")
    for arg in ("format", "name", "command"):
        if not isinstance(bound.arguments.get(arg) or "", str):
            raise ValueError(f"{arg}={bound.arguments[arg]!r}: must be a string")
    given = bound.arguments.get("format")
    with reading(src, f"read as {given}" if given else ""):
        return _convert(*bound.args, **bound.kwargs)


def _convert(
    src: str | Path,
    out: str | Path,
    format: str | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    name: str = "",
    source: dict[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
    command: str | None = None,
    quantize: str | None = None,
    config: str | Path | dict[str, Any] | None = None,
) -> Path:
    """Convert a published checkpoint into the native format, streaming tensor by tensor.

    quantize: store every linear layer's weight packed ("int8", "int4" or a scheme of zoo.architectures.quant),
    quantised tensor by tensor on the way.
    config: for a layout published without a config (Format.takes_config): a JSON file (or dict) of its numbers,
    in the names the layout's own code uses."""
    from zoo.cards import write_card

    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    fmt = detect_format(src, format)
    family = get_family(fmt.family)
    if config is None:
        fields, extra = fmt.native_config(src)
    elif not fmt.takes_config:
        raise CheckpointError(f"{src}: layout {fmt.name} carries its own config; --config is not used for it")
    else:
        given = config if isinstance(config, dict) else read_json(Path(config))
        if not isinstance(given, dict):
            raise CheckpointError(f"{config}: expected a JSON object of config values")
        fields, extra = fmt.native_config(src, config=given)
    if (nan := find_nan(fields) or find_nan(extra, "preprocessing")) is not None:
        raise CheckpointError(f"{src}: config value {nan} is NaN")
    try:
        config = family.config_from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src}: config does not fit {family.name}: {e}") from None
    tensors = fmt.open(src)
    where = lambda key: str(tensors.file_of(key)) if key in tensors else str(src)
    jobs = plan_jobs(tensors.keys(), fmt.keymap(config), where)
    planned = run_jobs_meta(jobs, tensors)
    keymap = fmt.keymap(config)
    quantization = fmt.quantization(src)
    if quantize is not None:
        if quantization:
            raise CheckpointError(f"{src}: already published quantized ({quantization['scheme']}); drop --quantize")
        scheme = get_scheme(quantize)
        check_against_model(planned, expected_state(family, config), str(src), published_names(keymap))
        meta = family.build_meta(config)
        paths = packable_paths(meta, scheme)  # every linear layer, and a tied output embedding
        jobs = pack_jobs(jobs, paths, {p: module_scheme(meta, p, scheme, family.tp_plan) for p in paths})
        planned = run_jobs_meta(jobs, tensors)
        quantization = {"scheme": scheme.name, "modules": paths}
    check_against_model(planned, expected_state(family, config, quantization), str(src), published_names(keymap))
    target = parse_dtype(dtype)
    native = NativeConfig(
        family=family.name,
        config=fields,
        name=name or out.name,
        task=family.task,
        dtype=_stored_dtype(planned, target),
        source={"path": str(src), "layout": fmt.name, **fmt.source_info(src), **(source or {})},
        extra=extra,
        quantization=quantization,
    )
    command = command or " ".join(["zoo", "convert", *sys.argv[1:]]) if Path(sys.argv[0]).name == "zoo" else command
    with AtomicDirectory(out, overwrite) as tmp:
        stream_write(tmp, jobs, tensors, planned, target, max_shard_bytes, progress, fmt.keep_dtype)
        write_config(tmp, native)
        base = src if src.is_dir() else src.parent
        for fname in fmt.copy_files:
            if (base / fname).is_file():
                shutil.copy2(base / fname, tmp / fname)
        write_card(tmp, native, command=command or f"zoo convert {src} {out}")
    return out


def export(model_dir: str | Path, out: str | Path, *args: Any, **kwargs: Any) -> Path:
    """Write a native checkpoint back in a published layout (see _export); the checkpoint is verified first
    (every file the index lists, against its sha256), and errors name it."""
    model_dir, out = check_paths(model_dir, out, "model_dir")
    read_config(model_dir)
    Checkpoint(model_dir, verify=True)
    with reading(model_dir):
        return _export(model_dir, out, *args, **kwargs)


def _export(model_dir: str | Path, out: str | Path, to: str = "hf", overwrite: bool = False,
           progress: bool = True, **options: Any) -> Path:
    """Write a native checkpoint back in a published layout (the key map read backwards, or the format's own
    writer, which may take options such as tp=N)."""
    model_dir, out = Path(model_dir), Path(out)
    native = read_config(model_dir)
    if native.quantization:
        raise CheckpointError(f"{model_dir}: stored quantized ({native.quantization.get('scheme')}); export needs the "
                              "float weights: convert the published checkpoint again without --quantize")
    family = get_family(native.family)
    config = family.config_from_dict(native.config)
    matches = [f for f in formats().values() if f.family == family.name and f.exports_as == to]
    if not matches:
        raise CheckpointError(f"{model_dir}: family {family.name} has no exporter to {to!r}")
    fmt = matches[0]
    if type(fmt).write_export is not Format.write_export:
        return fmt.write_export(model_dir, out, overwrite=overwrite, progress=progress, **options)
    if options:
        raise CheckpointError(f"export to {to!r} takes no options; got {', '.join(sorted(options))}")
    files = sorted(model_dir.glob("*.safetensors"))
    tensors = SafetensorsSource(files)
    jobs = plan_jobs(tensors.keys(), fmt.keymap(config).reversed(), lambda k: str(tensors.file_of(k)))
    planned = run_jobs_meta(jobs, tensors)
    with AtomicDirectory(out, overwrite) as tmp:
        stream_write(tmp, jobs, tensors, planned, None, 5 * 2**30, progress)
        (tmp / "config.json").write_text(json.dumps(fmt.export_config(native, config), indent=2) + "\n")
        for fname in fmt.copy_files:
            if (model_dir / fname).is_file():
                shutil.copy2(model_dir / fname, tmp / fname)
    return out
