"""A malformed-input corpus: generated cases for every entry point, each with the error it must give.

    cases = build_corpus(workdir)           # zoo.load, zoo convert (every format), export, pull, predict,
    results = [run_case(c) for c in cases]  # generate, model(...), the CLI
    print(summary(results))

A case does one thing a user (or a damaged file) could do, and says what must happen: an error of the given
kinds whose message matches `match` (it names the file, tensor or argument), with nothing left behind at
`outputs`. Each result is one of:
  refused   the expected kind of error, naming what is wrong
  unnamed   an expected kind of error whose message does not name it
  crashed   any other exception: the CLI would print a traceback
  accepted  no error at all
and, apart from that, `partial` when an output (or a temporary directory beside it) was left behind.

Conversion cases are derived from zoo.conversion.formats() at run time, so a format that lands later gets its
generic cases (junk, empty, missing, other layouts' checkpoints, forced onto it) with no change here, and the
mutations of its own files once zoo/testing/corpus_seeds.py has a builder for it. The tests
(tests/test_corpus.py) and the reliability figure (benchmarks/reliability.py) both run this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# a message "names" its subject when it shows a path, a file, a tensor, or an argument with its value
NAMED = r"(/|\w+\.(json|safetensors|pth|pt|bin|ckpt|png|jpg|mp4)\b|\btensor \S+|\w+=\S)"


@dataclass
class Case:
    entry: str  # "load", "convert:<format>", "export", "pull", "predict", "generate", "call", "cli"
    name: str
    run: Callable[[], Any]
    errors: tuple[type[BaseException], ...]
    match: str = NAMED
    outputs: tuple[Path, ...] = ()  # must not exist afterwards, nor any temporary directory beside them
    cli: bool = False  # run() returns (exit code, stderr): refused means nonzero, one line, no traceback


@dataclass
class Result:
    case: Case
    outcome: str  # refused | unnamed | crashed | accepted
    partial: bool
    message: str = ""
    detail: str = field(default="", repr=False)


# ------------------------------------------------------------------------------------------------- running


def _leftovers(out: Path) -> list[Path]:
    found = [out] if out.exists() or out.is_symlink() else []
    if out.parent.is_dir():
        prefix = f".{out.name}."
        found += [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    return found


def run_case(case: Case) -> Result:
    detail = ""
    try:
        value = case.run()
    except case.errors as e:
        message = " ".join(str(e).split())
        outcome = "refused" if re.search(case.match, message) else "unnamed"
    except Exception as e:  # noqa: BLE001 - the point is to see everything
        message = f"{type(e).__name__}: {' '.join(str(e).split())}"
        outcome, detail = "crashed", traceback.format_exc()
    else:
        message, outcome = "", "accepted"
        if case.cli:  # one error line (other lines may be progress bars or notices), no traceback
            code, err = value
            errors = [line for line in err.splitlines() if re.match(r"zoo( \w+)?: error: ", line)]
            message = errors[0] if len(errors) == 1 else err.strip()
            if code == 0:
                outcome = "accepted"
            elif "Traceback" in err:
                outcome, detail = "crashed", err
            elif len(errors) == 1 and re.search(case.match, message):
                outcome = "refused"
            else:
                outcome = "unnamed"
    partial = any(_leftovers(out) for out in case.outputs)
    return Result(case, outcome, partial, message[:400], detail)


def cli(*argv: str) -> tuple[int, str]:
    """`zoo ARGV` in this process: (exit code, stderr). An exception escaping main() is re-raised (a crash)."""
    from zoo.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def summary(results: list[Result]) -> dict[str, int]:
    count = {k: sum(r.outcome == k for r in results) for k in ("refused", "unnamed", "crashed", "accepted")}
    return {"tried": len(results), **count, "partial": sum(r.partial for r in results)}


def by_entry(results: list[Result]) -> dict[str, dict[str, int]]:
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.case.entry.split(":")[0], []).append(r)
    return {k: summary(v) for k, v in sorted(groups.items())}


def failures(results: list[Result]) -> list[str]:
    return [f"[{r.outcome}{' +partial' if r.partial else ''}] {r.case.entry}: {r.case.name}: {r.message}"
            for r in results if r.outcome != "refused" or r.partial]


# ---------------------------------------------------------------------------------------- file mutation


PICKLES = (".pth", ".pt", ".bin", ".ckpt")


def weight_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    files = sorted(src.rglob("*.safetensors"))
    return files or sorted(p for p in src.rglob("*") if p.suffix in PICKLES)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Callable[[dict[str, torch.Tensor]], None]]:
    """A weight file's tensors and a function that writes a changed dict back the same way (same nesting)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file, save_file

        return load_file(path), lambda sd: save_file(sd, path, metadata={"format": "pt"})
    obj = torch.load(path, map_location="cpu", weights_only=False)  # a seed this corpus wrote itself
    nested = {k: v for k, v in obj.items() if isinstance(v, dict)} if isinstance(obj, dict) else {}
    if nested and not any(isinstance(v, torch.Tensor) for v in obj.values()):  # {"model": sd, "epoch": 3, ...}
        key = max(nested, key=lambda k: sum(isinstance(v, torch.Tensor) for v in nested[k].values()))
        return nested[key], lambda sd: torch.save({**obj, key: sd}, path)
    return obj, lambda sd: torch.save(sd, path)


def _largest(sd: dict[str, torch.Tensor], ndim: int | None = None, floating: bool = True) -> str:
    names = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and (ndim is None or v.ndim == ndim)
             and (not floating or v.is_floating_point())]
    return max(names, key=lambda k: (sd[k].numel(), k))


def _edit_tensors(src: Path, edit: Callable[[dict[str, torch.Tensor]], str]) -> str:
    """Apply `edit` to the weight file that holds the largest tensor; returns what edit returns (a name)."""
    files = weight_files(src)
    best = None
    for f in files:
        sd, save = read_tensors(f)
        size = max((v.numel() for v in sd.values() if isinstance(v, torch.Tensor)), default=0)
        if best is None or size > best[0]:
            best = (size, f)
    sd, save = read_tensors(best[1])
    sd = dict(sd)
    name = edit(sd)
    save(sd)
    return name


class Evil:
    """Unpickling this runs os.system: a checkpoint must never get that far."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy(src: Path, to: Path) -> Path:
    """A copy of a seed (a directory, or the directory holding a seed file); returns the copied src path."""
    base = src if src.is_dir() else src.parent
    shutil.copytree(base, to)
    return to if src.is_dir() else to / src.name


def _json_files(src: Path) -> list[Path]:
    base = src if src.is_dir() else src.parent
    return [base / "config.json"] if (base / "config.json").is_file() else []


def _map_json(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _map_json(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_json(v, fn) for v in value]
    return fn(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# mutations of a seed: (name, mutate(copy) -> regex the error must match)
def source_mutations(seed: Path) -> list[tuple[str, Callable[[Path], str]]]:
    muts: list[tuple[str, Callable[[Path], str]]] = []
    first = weight_files(seed)[0]
    rel = first.relative_to(seed) if seed.is_dir() else Path(first.name)

    def target(copy: Path) -> Path:
        return copy / rel if copy.is_dir() else copy

    def truncate(copy: Path) -> str:
        f = target(copy)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return re.escape(f.name)

    def zero(copy: Path) -> str:
        target(copy).write_bytes(b"")
        return re.escape(target(copy).name)

    def junk(copy: Path) -> str:
        target(copy).write_bytes(np.random.default_rng(0).bytes(4096))
        return re.escape(target(copy).name)

    def drop(copy: Path) -> str:
        gone = _edit_tensors(copy, lambda sd: sd.pop(name := _largest(sd)) is not None and name)
        return rf"{re.escape(gone.split('.', 1)[-1])}|tensor \S+"

    def extra(copy: Path) -> str:
        _edit_tensors(copy, lambda sd: sd.update({"zoo_corpus_extra.weight": torch.zeros(3, 5)}) or "")
        return "zoo_corpus_extra"

    def reshape(copy: Path) -> str:
        def edit(sd):
            name = _largest(sd, ndim=2)
            t = sd[name]
            sd[name] = torch.cat([t, t[:1]], 0)
            return name
        _edit_tensors(copy, edit)
        return r"tensor \S+|\w+\.(safetensors|pth|pt|bin)|config"

    def integer(copy: Path) -> str:
        def edit(sd):
            name = _largest(sd)
            sd[name] = sd[name].to(torch.int32)
            return name
        name = _edit_tensors(copy, edit)
        return rf"tensor \S+|{re.escape(name)}"

    def nan_header(copy: Path) -> str:  # a header whose JSON is damaged, size intact
        f = target(copy)
        data = bytearray(f.read_bytes())
        if f.suffix == ".safetensors":
            data[9:20] = b"~" * 11
        else:  # the pickle program: the middle of the zip's data.pkl entry
            import zipfile

            with zipfile.ZipFile(f) as z:
                program = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
            at = bytes(data).find(program) + len(program) // 2
            data[at: at + 16] = b"\xff" * 16
        f.write_bytes(bytes(data))
        return re.escape(f.name)

    muts += [("truncated weight file", truncate), ("zero-byte weight file", zero),
             ("random bytes as weight file", junk),
             ("damaged header bytes", nan_header), ("largest tensor missing", drop),
             ("an unexpected tensor", extra), ("a tensor with one row too many", reshape),
             ("a weight stored as int32", integer)]

    if first.suffix in PICKLES:
        def code(copy: Path) -> str:
            f = target(copy)
            marker = copy.parent / f"{copy.name}.PWNED"
            torch.save({"model": {"w": torch.zeros(2)}, "hook": Evil(marker)}, f)
            return NAMED  # "refused", or what the format misses once it cannot read the file

        def not_a_dict(copy: Path) -> str:
            f = target(copy)
            torch.save([torch.zeros(2), torch.ones(3)], f)
            return re.escape(f.name)

        muts += [("a pickle that runs code", code), ("a pickle holding a list, not a state dict", not_a_dict)]

    if _json_files(seed):
        def cfg(edit: Callable[[Any], Any]) -> Callable[[Path], str]:
            def mutate(copy: Path) -> str:
                path = _json_files(copy)[0]
                value = edit(json.loads(path.read_text()))
                path.write_text(value if isinstance(value, str) else json.dumps(value))
                return r"config|\w+=|field|\w+\.json"
            return mutate

        def no_config(copy: Path) -> str:
            _json_files(copy)[0].unlink()
            return r"config\.json|no known format|format"

        muts += [
            ("config.json missing", no_config),
            ("config.json not JSON", cfg(lambda c: "{ this is not json")),
            ("config.json a list", cfg(lambda c: [c])),
            ("config.json empty object", cfg(lambda c: {})),
            ("config.json numbers as strings", cfg(lambda c: _map_json(c, lambda v: f"{v}x" if _is_int(v) else v))),
            ("config.json integers negative", cfg(lambda c: _map_json(c, lambda v: -abs(v) - 1 if _is_int(v) else v))),
            ("config.json integers zero", cfg(lambda c: _map_json(c, lambda v: 0 if _is_int(v) else v))),
            ("config.json floats NaN", cfg(lambda c: json.dumps(_map_json(
                c, lambda v: float("nan") if isinstance(v, float) else v)))),
        ]

    index = (seed / "model.safetensors.index.json") if seed.is_dir() else None
    if index is not None and index.is_file():
        def idx(edit: Callable[[dict], Any]) -> Callable[[Path], str]:
            def mutate(copy: Path) -> str:
                path = copy / "model.safetensors.index.json"
                value = edit(json.loads(path.read_text()))
                path.write_text(value if isinstance(value, str) else json.dumps(value))
                return r"index\.json|\w+\.safetensors"
            return mutate

        def shard_gone(copy: Path) -> str:
            victim = sorted(copy.glob("model-*.safetensors"))[-1]
            victim.unlink()
            return re.escape(victim.name)

        muts += [("index not JSON", idx(lambda i: "[[[")),
                 ("index without weight_map", idx(lambda i: {"metadata": {}})),
                 ("index names a file outside the checkpoint", idx(lambda i: {
                     **i, "weight_map": {k: "../../outside.safetensors" for k in i["weight_map"]}})),
                 ("index lists a tensor no shard holds", idx(lambda i: {
                     **i, "weight_map": {**i["weight_map"],
                                         "model.zoo_corpus.weight": sorted(i["weight_map"].values())[0]}})),
                 ("a shard the index lists is missing", shard_gone)]
    return muts


# ------------------------------------------------------------------------------------------ the corpus


class Workspace:
    """Seeds (built once), their native conversions, and fresh directories for each case."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._n = 0
        self.seeds: dict[str, list[Path]] = {}
        self.natives: dict[str, Path] = {}  # family -> a converted native checkpoint

    def fresh(self, label: str) -> Path:
        self._n += 1
        d = self.root / "cases" / f"{self._n:04d}-{re.sub(r'[^A-Za-z0-9]+', '-', label)[:40]}"
        d.mkdir(parents=True)
        return d

    def build_seeds(self, only: set[str] | None = None) -> None:
        import zoo
        from zoo.conversion import formats
        from zoo.testing.corpus_seeds import SEEDS

        known = formats()
        for fmt, builders in SEEDS.items():
            if fmt not in known or (only is not None and fmt not in only):
                continue
            for i, build in enumerate(builders):
                src = build(self.root / "seeds" / f"{fmt}-{i}")
                self.seeds.setdefault(fmt, []).append(src)
                family = known[fmt].family
                if family not in self.natives:
                    self.natives[family] = zoo.convert(src, self.root / "natives" / family, format=fmt,
                                                       progress=False, name=f"corpus-{family}")


def convert_cases(ws: Workspace) -> list[Case]:
    import zoo
    from zoo.conversion import formats
    from zoo.weights.format import CheckpointError

    refused = (CheckpointError, ValueError, FileNotFoundError)
    cases: list[Case] = []

    def conv(src: Path, fmt: str | None, out: Path, **kw) -> Callable[[], Any]:
        return lambda: zoo.convert(src, out, format=fmt, progress=False, **kw)

    for fmt in sorted(formats()):
        entry = f"convert:{fmt}"
        # generic: any format, forced onto things that are not a checkpoint of it
        d = ws.fresh(f"{fmt}-missing")
        cases.append(Case(entry, "source does not exist", conv(d / "nothing-here", fmt, d / "out"), refused,
                          r"nothing-here", (d / "out",)))
        d = ws.fresh(f"{fmt}-empty")
        (d / "src").mkdir()
        cases.append(Case(entry, "empty source directory", conv(d / "src", fmt, d / "out"), refused,
                          NAMED, (d / "out",)))
        for suffix in (".safetensors", ".pth", ".bin"):
            d = ws.fresh(f"{fmt}-junk{suffix}")
            (d / "src").mkdir()
            (d / "src" / f"model{suffix}").write_bytes(np.random.default_rng(1).bytes(3000))
            (d / "src" / "config.json").write_text("{}")
            cases.append(Case(entry, f"junk model{suffix} with an empty config", conv(d / "src", fmt, d / "out"),
                              refused, NAMED, (d / "out",)))
            d = ws.fresh(f"{fmt}-junkfile{suffix}")
            (d / f"weights{suffix}").write_bytes(b"\x00" * 64)
            cases.append(Case(entry, f"a lone junk weights{suffix} file", conv(d / f"weights{suffix}", fmt, d / "out"),
                              refused, NAMED, (d / "out",)))
        d = ws.fresh(f"{fmt}-evil")
        (d / "src").mkdir()
        marker = d / "PWNED"
        torch.save({"model": {"w": torch.zeros(2)}, "hook": Evil(marker)}, d / "src" / "model.pth")
        (d / "src" / "config.json").write_text("{}")
        cases.append(Case(entry, "a pickle that runs code", _and_no_marker(conv(d / "src", fmt, d / "out"), marker),
                          refused, NAMED, (d / "out",)))
        # the other families' seeded checkpoints, forced onto this layout (within a family, one file may rightly
        # read as two layouts: WaLa's checkpoint holds both its weights and their EMA)
        for other, seeds in sorted(ws.seeds.items()):
            if formats()[other].family == formats()[fmt].family:
                continue
            d = ws.fresh(f"{fmt}-from-{other}")
            src = _copy(seeds[0], d / "src")
            cases.append(Case(entry, f"a {other} checkpoint forced as {fmt}", conv(src, fmt, d / "out"), refused,
                              NAMED, (d / "out",)))

    # mutations of each seed, converted both detected and forced
    for fmt, seeds in sorted(ws.seeds.items()):
        for n, seed in enumerate(seeds):
            for label, mutate in source_mutations(seed):
                d = ws.fresh(f"{fmt}-{label}")
                src = _copy(seed, d / "src")
                match = mutate(src)
                name = label + (" (sharded)" if n else "")
                marker = d / "src.PWNED"
                cases.append(Case(f"convert:{fmt}", name, _and_no_marker(conv(src, fmt, d / "out"), marker),
                                  refused, match, (d / "out",)))

    # arguments, on a good seed
    if "hf-qwen2" in ws.seeds:
        seed = ws.seeds["hf-qwen2"][0]
        e = "convert:arguments"
        for label, kw, match in [
            ("dtype='int8'", dict(dtype="int8"), r"dtype='int8'"),
            ("dtype=torch.int32", dict(dtype=torch.int32), r"dtype=torch.int32"),
            ("dtype=16", dict(dtype=16), r"dtype=16"),
            ("quantize='int3'", dict(quantize="int3"), r"quantize='int3'"),
            ("quantize=8", dict(quantize=8), r"quantize=8"),
            ("max_shard_bytes=0", dict(max_shard_bytes=0), r"max_shard_bytes=0"),
            ("max_shard_bytes=-5", dict(max_shard_bytes=-5), r"max_shard_bytes=-5"),
            ("format='nope'", dict(format="nope"), r"'nope'"),
            ("name=123", dict(name=123), r"name=123"),
            ("format=7", dict(format=7), r"format=7"),
        ]:
            d = ws.fresh(label)
            kw = {"format": None, **kw}
            fmt = kw.pop("format")
            cases.append(Case(e, label, conv(seed, fmt, d / "out", **kw), (ValueError,), match, (d / "out",)))
        d = ws.fresh("out-is-src")
        src = _copy(seed, d / "src")
        cases.append(Case(e, "out is the source directory (overwrite=True)",
                          _and_unchanged(lambda: zoo.convert(src, src, overwrite=True, progress=False), src),
                          (ValueError, FileExistsError), r"/src\b"))
        d = ws.fresh("out-exists")
        (d / "out").mkdir()
        (d / "out" / "keep.txt").write_text("mine")
        cases.append(Case(e, "out exists, no overwrite", _and_unchanged(conv(seed, None, d / "out"), d / "out"),
                          (FileExistsError,), r"/out: already exists"))
        cases.append(Case(e, "src is an empty string", lambda d=d: zoo.convert("", d / "o2", progress=False),
                          (ValueError, FileNotFoundError, CheckpointError), r"src=''|''", (d / "o2",)))
    return cases


def _and_no_marker(fn: Callable[[], Any], marker: Path) -> Callable[[], Any]:
    def run():
        try:
            return fn()
        finally:
            if marker.exists():
                raise AssertionError(f"code in a checkpoint ran: {marker} exists")
    return run


def _listing(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


def _and_unchanged(fn: Callable[[], Any], path: Path) -> Callable[[], Any]:
    def run():
        before = _listing(path)
        try:
            return fn()
        finally:
            if _listing(path) != before:
                raise AssertionError(f"{path} was changed by a refused call")
    return run


def native_mutations(native: Path) -> list[tuple[str, Callable[[Path], None], str]]:
    """(name, mutate(copy of a native dir), regex) for zoo.load."""
    from safetensors.torch import load_file, save_file

    from zoo.weights.reader import sha256_file

    def shard(copy: Path) -> Path:
        return sorted(copy.glob("*.safetensors"))[0]

    def index(copy: Path) -> Path:
        return copy / "model.safetensors.index.json"

    def config(copy: Path) -> Path:
        return copy / "config.json"

    def edit_json(path_of, edit) -> Callable[[Path], None]:
        def mutate(copy: Path) -> None:
            value = edit(json.loads(path_of(copy).read_text()))
            path_of(copy).write_text(value if isinstance(value, str) else json.dumps(value))
        return mutate

    def rewrite(edit) -> Callable[[Path], None]:  # change tensors, and the index's sha256 to match
        def mutate(copy: Path) -> None:
            f = shard(copy)
            sd = dict(load_file(f))
            edit(sd)
            save_file(sd, f)
            i = json.loads(index(copy).read_text())
            i["metadata"]["sha256"][f.name] = sha256_file(f)
            i["weight_map"] = {k: v for k, v in i["weight_map"].items() if v != f.name or k in sd}
            i["weight_map"].update({k: f.name for k in sd})
            index(copy).write_text(json.dumps(i))
        return mutate

    def flip(copy: Path) -> None:
        data = bytearray(shard(copy).read_bytes())
        data[-1] ^= 0xFF
        shard(copy).write_bytes(bytes(data))

    def bigger(sd):
        k = _largest(sd, ndim=2)
        sd[k] = torch.cat([sd[k], sd[k][:1]])

    def as_int(sd):
        k = _largest(sd)
        sd[k] = sd[k].to(torch.int32)

    def fields_as_strings(c):
        c["config"] = {k: (f"{v}x" if _is_int(v) else v) for k, v in c["config"].items()}
        return c

    def fields_negative(c):
        c["config"] = {k: (-abs(v) - 1 if _is_int(v) else v) for k, v in c["config"].items()}
        return c

    named_shard = r"\w+\.safetensors"
    return [
        ("shard truncated", lambda c: shard(c).write_bytes(shard(c).read_bytes()[:-9]), named_shard),
        ("shard zero bytes", lambda c: shard(c).write_bytes(b""), named_shard),
        ("shard random bytes", lambda c: shard(c).write_bytes(np.random.default_rng(2).bytes(2000)), named_shard),
        ("shard one byte flipped", flip, named_shard + r": sha256 mismatch"),
        ("shard missing", lambda c: shard(c).unlink(), named_shard + ": missing shard"),
        ("shard is a directory", lambda c: (shard(c).unlink(), shard_dir(c)), named_shard),
        ("index missing", lambda c: index(c).unlink(), r"index\.json"),
        ("index not JSON", lambda c: index(c).write_text("{"), r"index\.json"),
        ("index a list", lambda c: index(c).write_text("[]"), r"index\.json"),
        ("index without sha256", edit_json(index, lambda i: {**i, "metadata": {}}), r"index\.json"),
        ("index sha256 of a number", edit_json(index, lambda i: {**i, "metadata": {"sha256": 5}}), r"index\.json"),
        ("index weight_map a string", edit_json(index, lambda i: {**i, "weight_map": "model.safetensors"}),
         r"index\.json"),
        ("index names a tensor the file lacks", edit_json(index, lambda i: {
            **i, "weight_map": {**i["weight_map"], "zoo.corpus.weight": next(iter(i["weight_map"].values()))}}),
         r"zoo\.corpus\.weight"),
        ("index escapes the directory", edit_json(index, lambda i: {
            **i, "weight_map": {k: "../x.safetensors" for k in i["weight_map"]},
            "metadata": {"sha256": {"../x.safetensors": "0" * 64}}}), r"escapes"),
        ("config missing", lambda c: config(c).unlink(), r"config\.json"),
        ("config not JSON", lambda c: config(c).write_text("family: x"), r"config\.json"),
        ("config a list", lambda c: config(c).write_text("[1, 2]"), r"config\.json"),
        ("config from a newer zoo", edit_json(config, lambda c: {**c, "zoo_schema": 99}), r"config\.json"),
        ("config schema a string", edit_json(config, lambda c: {**c, "zoo_schema": "one"}), r"config\.json"),
        ("config of an unknown family", edit_json(config, lambda c: {**c, "family": "nope"}), r"'nope'"),
        ("config family a number", edit_json(config, lambda c: {**c, "family": 3}), r"family|config\.json"),
        ("config with an unknown field", edit_json(config, lambda c: {**c, "config": {**c["config"], "zz": 1}}),
         r"zz"),
        ("config field values as strings", edit_json(config, fields_as_strings), r"config|\w+="),
        ("config field values negative", edit_json(config, fields_negative), r"config|\w+=|tensor \S+"),
        ("config 'config' not an object", edit_json(config, lambda c: {**c, "config": [1]}), r"config"),
        ("config quantization record damaged", edit_json(config, lambda c: {
            **c, "quantization": {"scheme": "int8-row", "modules": ["no.such.module"]}}), r"no\.such\.module|config"),
        ("a tensor with one row too many", rewrite(bigger), r"tensor \S+"),
        ("a weight stored as int32", rewrite(as_int), r"tensor \S+"),
        ("a tensor missing", rewrite(lambda sd: sd.pop(_largest(sd))), r"tensor \S+"),
        ("an unexpected tensor", rewrite(lambda sd: sd.update({"zoo.corpus.weight": torch.zeros(2)})),
         r"zoo\.corpus\.weight"),
    ]


def shard_dir(copy: Path) -> None:
    (sorted(copy.glob("*.safetensors.index.json"))[0].parent / "model.safetensors").mkdir(exist_ok=True)


def load_cases(ws: Workspace) -> list[Case]:
    import zoo
    from zoo.registry import UnknownModelError
    from zoo.weights.format import CheckpointError

    cases: list[Case] = []
    for family, native in sorted(ws.natives.items()):
        for label, mutate, match in native_mutations(native):
            d = ws.fresh(f"load-{family}-{label}")
            copy = Path(shutil.copytree(native, d / "native"))
            mutate(copy)
            cases.append(Case("load", f"{family}: {label}", lambda copy=copy: zoo.load(copy),
                              (CheckpointError, ValueError, FileNotFoundError), match))
    some = next(iter(ws.natives.values()), None) or Path("/nonexistent")
    bad_args = [
        ("dtype='float8'", dict(dtype="float8"), r"dtype='float8'"),
        ("dtype='int8'", dict(dtype="int8"), r"dtype='int8'"),
        ("dtype=torch.int64", dict(dtype=torch.int64), r"dtype=torch.int64"),
        ("dtype=3", dict(dtype=3), r"dtype=3"),
        ("device='gpu'", dict(device="gpu"), r"device='gpu'"),
        ("device='cuda:9'", dict(device="cuda:9"), r"device='cuda:9'"),
        ("device='meta'", dict(device="meta"), r"device='meta'"),
        ("device=-1", dict(device=-1), r"device=-1"),
        ("device=None", dict(device=None), r"device=None"),
        ("tp=0", dict(tp=0), r"tp=0"),
        ("tp=-2", dict(tp=-2), r"tp=-2"),
        ("tp='2'", dict(tp="2"), r"tp='2'"),
        ("tp=1.5", dict(tp=1.5), r"tp=1\.5"),
        ("quantize='int3'", dict(quantize="int3"), r"quantize='int3'"),
        ("quantize=4", dict(quantize=4), r"quantize=4"),
        ("device_map='balanced'", dict(device_map="balanced"), r"device_map='balanced'"),
        ("device_map={}", dict(device_map={}), r"device_map=\{\}"),
        ("device_map={0: 'cpu'}", dict(device_map={0: "cpu"}), r"device_map key 0"),
        ("device_map={'': 'tpu'}", dict(device_map={"": "tpu"}), r"'tpu'"),
        ("max_memory without device_map", dict(max_memory={"cpu": "1GiB"}), r"max_memory"),
        ("max_memory='1GiB'", dict(device_map="auto", max_memory="1GiB"), r"max_memory='1GiB'"),
        ("max_memory={'cpu': 'lots'}", dict(device_map="auto", max_memory={"cpu": "lots"}), r"'lots'"),
        ("max_memory={'cpu': -1}", dict(device_map="auto", max_memory={"cpu": -1}), r"-1"),
        ("max_memory={'cpu': nan}", dict(device_map="auto", max_memory={"cpu": float("nan")}), r"nan"),
        ("max_memory={'disk': '1GiB'}", dict(device_map="auto", max_memory={"disk": "1GiB"}), r"disk"),
        ("revision on a directory", dict(revision="v1"), r"revision='v1'"),
        ("verify='yes'", dict(verify="yes"), r"verify='yes'"),
        ("tp with device_map", dict(tp=2, device_map="auto"), r"tp"),
        ("device with device_map", dict(device="cuda:0", device_map="auto"), r"device='cuda:0'"),
        ("onednn='fast'", dict(onednn="fast"), r"onednn='fast'"),
        ("onednn=True", dict(onednn=True), r"onednn=True"),
    ]
    for label, kw, match in bad_args:
        cases.append(Case("load", f"argument {label}", lambda kw=kw: zoo.load(some, **kw), (ValueError,), match))
    lm = ws.natives.get("qwen2")  # pipeline stages: a language model's blocks (zoo.pipeline)
    if lm is not None:
        n = json.loads((lm / "config.json").read_text())["config"]["n_layers"]
        for label, kw, match in [
            ("pp=0", dict(pp=0), r"pp=0"),
            ("pp='2'", dict(pp="2"), r"pp='2'"),
            ("pp=1.5", dict(pp=1.5), r"pp=1\.5"),
            ("pp with device_map", dict(pp=2, device_map="auto"), r"pp=2 with device_map"),
            ("pp with quantize outside torchrun", dict(pp=2, quantize="int8"), r"pp=2 runs one process per pipeline"),
            ("pp with a tp not dividing the heads", dict(pp=2, tp=64), r"tp=64 does not divide"),
            (f"pp={n + 1} not dividing the {n} blocks", dict(pp=n + 1), rf"pp={n + 1} does not divide the {n} blocks"),
            (f"pp={n} outside torchrun", dict(pp=n), rf"pp={n} runs one process per pipeline stage.*torchrun"),
        ]:
            cases.append(Case("load", f"argument {label}", lambda kw=kw: zoo.load(lm, **kw), (ValueError,), match))
    for label, name, errors, match in [
        ("name ''", "", (ValueError,), r"name_or_path=''"),
        ("name None", None, (ValueError,), r"name_or_path=None"),
        ("name 42", 42, (ValueError,), r"name_or_path=42"),
        ("unknown registry name", "qwen2-7bb", (UnknownModelError,), r"qwen2-7bb"),
        ("missing directory", "./no/such/dir", (FileNotFoundError,), r"no/such/dir"),
        ("a file, not a directory", str(some / "config.json"), (FileNotFoundError, CheckpointError), r"config\.json"),
        ("a published checkpoint, not converted", str(ws.seeds.get("hf-qwen2", [some])[0]), (CheckpointError,),
         r"zoo convert"),
        ("hf:// with a bad repo id", "hf://a/b/c", (ValueError,), r"'a/b/c'"),
        ("hf:// with a bad revision", "hf://acme/x@..", (ValueError,), r"'\.\.'"),
    ]:
        cases.append(Case("load", label, lambda name=name: zoo.load(name), errors, match))
    return cases


def export_cases(ws: Workspace) -> list[Case]:
    import zoo
    from zoo.conversion import formats
    from zoo.weights.format import CheckpointError

    cases: list[Case] = []
    exportable = {f.family for f in formats().values() if f.exports_as}
    errs = (CheckpointError, ValueError, FileNotFoundError, FileExistsError)
    for family, native in sorted(ws.natives.items()):
        d = ws.fresh(f"export-{family}")
        if family not in exportable:
            cases.append(Case("export", f"{family}: no exporter", lambda n=native, d=d: zoo.export(
                n, d / "out", to="hf", progress=False), errs, r"no exporter", (d / "out",)))
            continue
        for label, mutate, match in [
            ("config missing", lambda c: (c / "config.json").unlink(), r"config\.json"),
            ("shard missing", lambda c: [p.unlink() for p in c.glob("*.safetensors")], r"weight|safetensors|missing"),
            ("shard truncated", lambda c: [p.write_bytes(p.read_bytes()[:100]) for p in c.glob("*.safetensors")],
             r"\w+\.safetensors"),
            ("stored quantized", lambda c: _json_edit(c / "config.json", lambda j: {
                **j, "quantization": {"scheme": "int8-row", "modules": []}}), r"quantized"),
        ]:
            d = ws.fresh(f"export-{family}-{label}")
            copy = Path(shutil.copytree(native, d / "native"))
            mutate(copy)
            cases.append(Case("export", f"{family}: {label}", lambda c=copy, d=d: zoo.export(
                c, d / "out", to="hf", progress=False), errs, match, (d / "out",)))
        d = ws.fresh(f"export-{family}-args")
        cases.append(Case("export", f"{family}: to='nope'", lambda n=native, d=d: zoo.export(
            n, d / "out", to="nope", progress=False), errs, r"'nope'", (d / "out",)))
        cases.append(Case("export", f"{family}: out is the model directory", _and_unchanged(
            lambda n=native: zoo.export(n, n, to="hf", overwrite=True, progress=False), native), errs, r"/"))
        cases.append(Case("export", f"{family}: not a native directory", lambda d=d: zoo.export(
            d, d / "out2", progress=False), errs, r"config\.json", (d / "out2",)))
    return cases


def _json_edit(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def pull_cases(ws: Workspace, hub: Any = None) -> list[Case]:
    """Names and revisions are refused before any request (an unreachable endpoint proves none is made); with a
    Hub test server, what a server can send back wrong as well."""
    from zoo.hub import pull, push
    from zoo.weights.format import CheckpointError

    cases: list[Case] = []
    for spec in ["acme/../x", "-acme/x", "a/b/c", "acme/x y", "acme/x@..", "acme/x@a..b", "acme/x@-rf",
                 "acme/x@my branch", "acme/x@v1.lock", "acme/x@a@{1}", "", "acme/x@", "acme/x@/main", "ac me"]:
        cases.append(Case("pull", f"spec {spec!r}", _offline_endpoint(lambda spec=spec: pull(spec)), (ValueError,),
                          r"not a valid|empty"))
    cases.append(Case("pull", "revision twice", _offline_endpoint(lambda: pull("acme/x@v1", revision="v2")),
                      (ValueError,), r"revision given twice"))
    cases.append(Case("pull", "revision a number", _offline_endpoint(lambda: pull("acme/x", revision=3)),
                      (ValueError,), r"\b3\b"))
    native = next(iter(ws.natives.values()), None)
    if native is not None:
        for repo in ["bad id", "a/b/c", "", "-x/y"]:
            cases.append(Case("pull", f"push to {repo!r}", _offline_endpoint(lambda repo=repo: push(
                native, repo, dry_run=True)), (ValueError,), r"not a valid|empty"))
        cases.append(Case("pull", "push to a commit hash", lambda: push(native, "me/x", revision="a" * 40),
                          (ValueError,), r"commit hash"))
    if hub is not None:
        for label, files, match in hub_repos(ws):
            repo = f"corpus/{re.sub(r'[^a-z0-9]+', '-', label.lower())}"
            hub.repo(repo).commit(files)
            cases.append(Case("pull", f"server: {label}", lambda repo=repo: pull(repo),
                              (CheckpointError, FileNotFoundError, ValueError), match))
        cases.append(Case("pull", "server: no such repository", lambda: pull("corpus/does-not-exist"),
                          (FileNotFoundError,), r"corpus/does-not-exist"))
        cases.append(Case("pull", "server: no such revision", lambda: pull("corpus/does-not-exist@nope"),
                          (FileNotFoundError,), r"nope"))
    return cases


def hub_repos(ws: Workspace) -> list[tuple[str, dict[str, bytes], str]]:
    native = next(iter(ws.natives.values()))
    files = {p.name: p.read_bytes() for p in native.iterdir() if p.is_file()}
    shard = next(k for k in files if k.endswith(".safetensors"))
    index = json.loads(files["model.safetensors.index.json"])
    flipped = bytearray(files[shard])
    flipped[-1] ^= 0xFF
    return [
        ("a shard whose bytes differ from the index", {**files, shard: bytes(flipped)}, rf"{shard} does not match"),
        ("a truncated shard", {**files, shard: files[shard][:-100]}, rf"{shard}"),
        ("no index", {k: v for k, v in files.items() if k != "model.safetensors.index.json"}, r"index"),
        ("index lists a shard that is not there", {k: v for k, v in files.items() if k != shard}, rf"{shard}"),
        ("index escapes the directory", {**files, "model.safetensors.index.json": json.dumps({
            **index, "weight_map": {k: "../../x.safetensors" for k in index["weight_map"]},
            "metadata": {"sha256": {"../../x.safetensors": "0" * 64}}}).encode()}, r"escapes"),
        ("a published checkpoint, not native", {"config.json": b'{"model_type": "qwen2"}', shard: files[shard]},
         r"not a zoo checkpoint"),
        ("config not JSON", {**files, "config.json": b"{"}, r"config\.json|not a zoo checkpoint"),
    ]


def _offline_endpoint(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run with HF_ENDPOINT at a closed port: a request would fail with ConnectionError, not the expected error."""
    def run():
        from zoo.testing.olah_server import free_port

        saved = os.environ.get("HF_ENDPOINT")
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
        try:
            return fn()
        finally:
            if saved is None:
                os.environ.pop("HF_ENDPOINT", None)
            else:
                os.environ["HF_ENDPOINT"] = saved
    return run


# ----------------------------------------------------------------------------------- images and videos


def png_bytes(width: int, height: int, bit_depth: int = 8, color_type: int = 2, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: any header (a decompression bomb's, 16-bit RGB) with the given (or zero) rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    if rows is None:
        rows = b"".join(b"\x00" + bytes(width * channels * bit_depth // 8) for _ in range(min(height, 4)))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def predict_cases(ws: Workspace) -> list[Case]:
    import zoo

    cases: list[Case] = []
    errs = (ValueError, FileNotFoundError)
    models = {}
    for family in sorted(ws.natives):
        native = ws.natives[family]
        task = json.loads((native / "config.json").read_text())["task"]
        classes = json.loads((native / "config.json").read_text())["config"].get("num_classes", 0)
        if task in ("image-classification", "video-classification") and classes:
            models.setdefault(task, zoo.load(native))
    d = ws.fresh("predict-files")
    files = {
        "missing.png": None,
        "empty.png": b"",
        "junk.png": b"not a picture at all" * 10,
        "truncated.png": png_bytes(64, 64, rows=b"".join(b"\x00" + np.random.default_rng(r).bytes(64 * 3)
                                                         for r in range(64)))[:6000],  # cut inside the pixel data
        "bomb.png": png_bytes(30000, 30000, bit_depth=1, color_type=0),
        "bomb-warning.png": png_bytes(10000, 10000, bit_depth=1, color_type=0),
        "text.jpg": b"GIF89a but not really",
    }
    for name, data in files.items():
        if data is not None:
            (d / name).write_bytes(data)
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32)).save(d / "float.tiff")
    (d / "folder.png").mkdir()
    image_model = models.get("image-classification")
    if image_model is not None:
        m = image_model
        for name in [*files, "float.tiff", "folder.png"]:
            cases.append(Case("predict", f"image file {name}", lambda p=d / name: m.predict(p), errs,
                              re.escape(name)))
        res = m.native.extra["resolution"]
        for label, inputs, match in [
            ("empty list", [], r"empty"),
            ("float64 array", np.zeros((8, 8, 3)), r"float64"),
            ("bool array", np.zeros((8, 8, 3), bool), r"bool"),
            ("int64 values over 255", np.full((8, 8, 3), 300), r"300"),
            ("two channels", np.zeros((8, 8, 2), np.uint8), r"2 channels"),
            ("five channels", np.zeros((8, 8, 5), np.uint8), r"5 channels|channels"),
            ("zero-size array", np.zeros((0, 8, 3), np.uint8), r"empty"),
            ("a 4-D uint8 array", np.zeros((2, 8, 8, 3), np.uint8), r"shape"),
            ("a dict", {"image": 1}, r"dict"),
            ("None", None, r"NoneType"),
            ("a float tensor [H, W]", torch.zeros(res, res), r"shape"),
            ("a float tensor of the wrong size", torch.zeros(3, res + 8, res + 8), r"\d+x\d+"),
            ("a float tensor with 4 channels", torch.zeros(1, 4, res, res), r"channel"),
            ("a float tensor [1, 1, 3, H, W]", torch.zeros(1, 1, 3, res, res), r"shape"),
        ]:
            cases.append(Case("predict", f"image input: {label}", lambda x=inputs: m.predict(x), (ValueError,), match))
        for k in (0, -1, 1.5, "3", None):
            cases.append(Case("predict", f"top_k={k!r}", lambda k=k: m.predict(np.zeros((8, 8, 3), np.uint8), top_k=k),
                              (ValueError,), rf"top_k={re.escape(repr(k))}"))
        for label, x, match in [("uint8 pixels", torch.zeros(1, 3, res, res, dtype=torch.uint8), r"uint8"),
                                ("a list", [[1.0]], r"list"), ("wrong resolution", torch.zeros(1, 3, 7, 7), r"7x7")]:
            cases.append(Case("call", f"image model(x): {label}", lambda x=x: m(x), (ValueError,), match))
    video_model = models.get("video-classification")
    if video_model is not None:
        v = video_model
        (d / "empty.mp4").write_bytes(b"")
        (d / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
        write_frameless_video(d / "frameless.avi")
        for name in ["missing.mp4", "empty.mp4", "junk.mp4", "frameless.avi", "folder.png"]:
            cases.append(Case("predict", f"video file {name}", lambda p=d / name: v.predict(p), errs, re.escape(name)))
        n = v.native.extra.get("num_frames", 4)
        for label, x, match in [("no frames", [], r"no frames"), ("a 3-D uint8 tensor", torch.zeros(8, 8, 3,
                                dtype=torch.uint8), r"shape"), ("frames with 2 channels", [np.zeros((8, 8, 2),
                                np.uint8)] * n, r"channels"), ("a float tensor [T, H, W]", torch.zeros(n, 8, 8),
                                r"shape"), ("an int", 7, r"int")]:
            cases.append(Case("predict", f"video input: {label}", lambda x=x: v.predict(x), (ValueError,), match))
        res = v.native.extra["resolution"]
        cases.append(Case("call", "video model(x): 4 frames too many", lambda: v(torch.zeros(1, 3, n + 4, res, res)),
                          (ValueError,), r"frames"))
    return cases


def segmentation_cases(ws: Workspace) -> list[Case]:
    """Dino U-Net's segment() and `zoo predict` on volumes: broken NIfTI headers, 4-D and empty volumes, channels on
    different grids, and every argument (step, folds, mirror, postprocess, autocast, spacing, --slice, --out)."""
    native = ws.natives.get("dinounet")
    if native is None:
        return []
    import nibabel
    import SimpleITK as sitk

    import zoo

    m = zoo.load(native)
    d = ws.fresh("segment-volumes")

    def scan(name: str, shape=(3, 40, 40), spacing=(0.8, 0.7, 1.5)) -> Path:
        img = sitk.GetImageFromArray(np.random.default_rng(0).integers(1, 200, shape).astype(np.int16))
        img.SetSpacing(spacing)
        sitk.WriteImage(img, str(d / name))
        return d / name

    good = scan("good.nii.gz")
    other = scan("other_spacing.nii.gz", spacing=(0.8, 0.7, 3.0))
    scan("plain.nii")
    broken = bytearray((d / "plain.nii").read_bytes())
    broken[0:4] = (1234).to_bytes(4, "little")  # sizeof_hdr is not 348: no NIfTI header
    broken[40:56] = bytes(16)  # and its dim fields zeroed
    (d / "broken_header.nii").write_bytes(bytes(broken))
    (d / "truncated.nii.gz").write_bytes(good.read_bytes()[:200])
    (d / "cut_in_the_voxels.nii.gz").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])  # header intact
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "junk.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 3, 2), np.float32), np.eye(4)), str(d / "four_d.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(np.ones((8, 0, 3), np.float32), np.eye(4)), str(d / "zero_voxels.nii.gz"))
    (d / "folder.nii.gz").mkdir()
    errs = (ValueError, FileNotFoundError)
    cases = [Case("predict", f"volume file {name}", lambda p=d / name: m.segment(p), errs, re.escape(name))
             for name in ["missing.nii.gz", "broken_header.nii", "truncated.nii.gz", "cut_in_the_voxels.nii.gz",
                          "empty.nii.gz", "junk.nrrd",
                          "four_d.nii.gz", "zero_voxels.nii.gz", "folder.nii.gz"]]
    cases.append(Case("predict", "channel files with mismatched spacing", lambda: m.segment([good, other]), errs,
                      r"other_spacing\.nii\.gz.*do not match"))
    picture = np.full((40, 40), 7, np.uint8)
    for label, kwargs, match in [
        ("step=0", {"step": 0}, r"step=0"), ("step=1.5", {"step": 1.5}, r"step=1\.5"),
        ("step='0.5'", {"step": "0.5"}, r"step='0\.5'"), ("folds=[7]", {"folds": [7]}, r"folds=\[7\]"),
        ("folds=[]", {"folds": []}, r"folds=\[\]"), ("folds=[0, 0]", {"folds": [0, 0]}, r"folds=\[0, 0\]"),
        ("folds=True", {"folds": True}, r"folds=True"), ("mirror='yes'", {"mirror": "yes"}, r"mirror='yes'"),
        ("postprocess=None", {"postprocess": None}, r"postprocess=None"),
        ("probabilities=1", {"probabilities": 1}, r"probabilities=1"),
        ("autocast='yes'", {"autocast": "yes"}, r"autocast='yes'"),
        ("spacing=(0, 1)", {"spacing": (0, 1)}, r"spacing=\(0, 1\)"),
        ("spacing=(nan, 1)", {"spacing": (float("nan"), 1.0)}, r"spacing=\(nan, 1\.0\)"),
        ("spacing=(1,)", {"spacing": (1.0,)}, r"spacing=\(1\.0,\)"),
        ("spacing='ab'", {"spacing": "ab"}, r"spacing='ab'|spacing="),
    ]:
        cases.append(Case("predict", f"segment(picture, {label})", lambda kw=kwargs: m.segment(picture, **kw),
                          (ValueError,), match))
    for label, image, kwargs, match in [
        ("a 4-D array without spacing", np.ones((1, 2, 8, 8)), {}, r"spacing"),
        ("a 4-D array with 2 spacings", np.ones((1, 2, 8, 8)), {"spacing": (1, 1)}, r"spacing=\(1, 1\)"),
        ("an empty 4-D array", np.ones((1, 0, 8, 8)), {"spacing": (1, 1, 1)}, r"empty"),
        ("a volume file with a spacing", good, {"spacing": (1, 1, 1)}, r"good\.nii\.gz"),
        ("NaN intensities", np.full((8, 8), np.nan), {}, r"NaN"),
        ("a 5-D array", np.ones((1, 1, 2, 8, 8)), {}, r"shape"),
        ("a string array", np.array([["a"]]), {}, r"<U1|numbers"),
    ]:
        cases.append(Case("predict", f"segment({label})", lambda x=image, kw=kwargs: m.segment(x, **kw),
                          (ValueError,), match))
    png = d / "picture.png"
    from PIL import Image

    Image.fromarray(picture).save(png)
    for label, argv, out, match in [
        ("a volume's mask into a PNG", [good, "--out", d / "seg.png"], d / "seg.png", r"volume"),
        ("--out seg.txt", [good, "--out", d / "seg.txt"], d / "seg.txt", r"seg\.txt"),
        ("--slice 99", [good, "--out", d / "a.nii.gz", "--slice", "99"], d / "a.nii.gz", r"slice=99"),
        ("--slice -1", [good, "--out", d / "b.nii.gz", "--slice", "-1"], d / "b.nii.gz", r"slice=-1"),
        ("--slice on a picture", [png, "--out", d / "c.png", "--slice", "1"], d / "c.png", r"--slice 1"),
        ("--folds 9", [good, "--out", d / "e.nii.gz", "--folds", "9"], d / "e.nii.gz", r"(?:folds=|--folds )\[9\]"),
        ("a 4-D NIfTI", [d / "four_d.nii.gz", "--out", d / "f.nii.gz"], d / "f.nii.gz", r"four_d\.nii\.gz"),
        ("a broken header", [d / "broken_header.nii", "--out", d / "g.nii.gz"], d / "g.nii.gz", r"broken_header"),
    ]:
        cases.append(Case("cli", f"predict a segmentation: {label}",
                          lambda a=argv: cli("predict", native, *a), (), match, outputs=(out,), cli=True))
    return cases


def write_frameless_video(path: Path) -> None:
    """A video file (AVI) with a video stream and no frame in it."""
    import av

    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    out.start_encoding()  # writes the header of a stream that never gets a frame
    out.close()
    assert path.is_file(), path


# ---------------------------------------------------------------------------------- text: generate, call


def text_cases(ws: Workspace) -> list[Case]:
    import zoo

    model = zoo.load("qwen2-tiny-stdlib")
    v = model.vocab_size
    cases: list[Case] = []
    for label, prompt, match in [
        ("id past the vocabulary", [v + 5], rf"{v + 5}"), ("negative id", [-5], r"-5"), ("empty list", [], r"prompt"),
        ("empty row in a batch", [[1, 2], []], r"empty"), ("float ids", [1.5, 2], r"1\.5"),
        ("bool ids", [True, 2], r"True"), ("string ids", ["a", 1], r"prompt"), ("None", None, r"None"),
        ("a dict", {"text": "hi"}, r"prompt"), ("a float tensor", torch.randn(1, 3), r"float32"),
        ("a 3-D id tensor", torch.ones(1, 1, 3, dtype=torch.long), r"prompt"),
        ("a bool tensor", torch.ones(1, 3, dtype=torch.bool), r"bool"), ("an empty string", "", r"empty|prompt"),
        ("lists three deep", [[[1]]], r"prompt|integers"), ("a number", 5, r"prompt"),
    ]:
        cases.append(Case("generate", f"prompt: {label}", lambda p=prompt: model.generate(p, max_new_tokens=2),
                          (ValueError,), match))
    for kw in [dict(top_k=-3), dict(top_k=0), dict(top_k=2.5), dict(temperature=float("nan")), dict(temperature=-1),
               dict(temperature=float("inf")), dict(temperature="hot"), dict(temperature=1.0, top_p=0.0),
               dict(temperature=1.0, top_p=1.5), dict(temperature=1.0, top_p=float("nan")), dict(max_new_tokens=-3),
               dict(max_new_tokens=2.5), dict(max_new_tokens="4"), dict(max_new_tokens=None), dict(seed=-1),
               dict(seed="x"), dict(stop=""), dict(stop=[3]), dict(stop=[""])]:
        label = ", ".join(f"{k}={val!r}" for k, val in kw.items())
        first = list(kw)[-1]
        cases.append(Case("generate", label, lambda kw=kw: model.generate("x = 1", **{"max_new_tokens": 2, **kw}),
                          (ValueError,), rf"{first}"))
    cases.append(Case("generate", "stream=True with a batch", lambda: model.generate(["a", "b"], stream=True,
                      max_new_tokens=2), (ValueError,), r"stream"))
    cases.append(Case("generate", "context exceeded without extrapolation", _no_extrapolation(model),
                      (ValueError,), r"context"))
    for label, messages, match in [("a string", "hi", r"messages"), ("a dict without content", [{"role": "user"}],
                                   r"messages"), ("a list of strings", ["hi"], r"messages")]:
        cases.append(Case("generate", f"chat messages: {label}", lambda m=messages: model.chat(m, max_new_tokens=2),
                          (ValueError,), match))
    for label, ids, match in [
        ("float ids", torch.randn(1, 3), r"float32"), ("1-D ids", torch.tensor([1, 2, 3]), r"\(3,\)"),
        ("3-D ids", torch.ones(1, 2, 3, dtype=torch.long), r"\(1, 2, 3\)"),
        ("zero-length ids", torch.ones(1, 0, dtype=torch.long), r"\(1, 0\)"),
        ("id past the vocabulary", torch.tensor([[1, v]]), rf"{v}"), ("negative id", torch.tensor([[-1, 2]]), r"-1"),
        ("a list", [[1, 2]], r"list"), ("None", None, r"NoneType"),
        ("a bool tensor", torch.ones(1, 2, dtype=torch.bool), r"bool"),
    ]:
        cases.append(Case("call", f"text model(x): {label}", lambda x=ids: model(x), (ValueError,), match))
    for kw, match in [  # beam search: each setting, then the combinations that make no sense, by name
        (dict(num_beams=0), r"num_beams=0"), (dict(num_beams=2.5), r"num_beams=2\.5"),
        (dict(num_beams=True), r"num_beams=True"),
        (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences=3"),
        (dict(num_beams=2, num_return_sequences=0), r"num_return_sequences=0"),
        (dict(num_beams=2, length_penalty=float("nan")), r"length_penalty=nan"),
        (dict(num_beams=2, length_penalty="long"), r"length_penalty='long'"),
        (dict(num_beams=2, no_repeat_ngram_size=-1), r"no_repeat_ngram_size=-1"),
        (dict(num_beams=2, early_stopping="sometimes"), r"early_stopping='sometimes'"),
        (dict(min_gen_length=-2), r"min_gen_length=-2"), (dict(length_penalty=2.0), r"length_penalty=2\.0"),
        (dict(num_beams=2, temperature=0.7), r"temperature=0\.7"), (dict(num_beams=2, top_k=5), r"top_k=5"),
        (dict(num_beams=2, top_p=0.9), r"top_p=0\.9"), (dict(num_beams=2, seed=3), r"seed=3"),
        (dict(num_beams=2, stream=True), r"stream=True"),
    ]:
        label = ", ".join(f"{k}={val!r}" for k, val in kw.items())
        cases.append(Case("generate", label, lambda kw=kw: model.generate("x = 1", **{"max_new_tokens": 2, **kw}),
                          (ValueError,), match))
    return cases


def _no_extrapolation(model) -> Callable[[], Any]:
    def run():
        import dataclasses

        saved = model.family
        model.family = dataclasses.replace(saved, extrapolates=False)
        try:
            return model.generate([5] * (model.config.max_seq_len - 2), max_new_tokens=8)
        finally:
            model.family = saved
    return run


# ------------------------------------------------------------------------------------------------ the CLI


def cli_cases(ws: Workspace) -> list[Case]:
    from zoo.conversion import formats

    text = "qwen2-tiny-stdlib"
    image = next((n for f, n in sorted(ws.natives.items()) if json.loads((n / "config.json").read_text())["task"] ==
                  "image-classification" and json.loads((n / "config.json").read_text())["config"].get("num_classes")),
                 None)
    seed = ws.seeds.get("hf-qwen2", [None])[0]
    d = ws.fresh("cli")
    (d / "junk.png").write_bytes(b"junk")
    (d / "bomb.png").write_bytes(png_bytes(30000, 30000, bit_depth=1, color_type=0))
    out = ws.fresh("cli-out") / "out"  # outside d, which cases also use as a source (OUT inside SRC is refused)
    argvs: list[tuple[str, list[str], str]] = [
        ("no command", [], r"command"),
        ("unknown command", ["frobnicate"], r"frobnicate"),
        ("unknown option", ["list", "--colour"], r"--colour"),
        ("missing argument", ["convert", "only-src"], r"out"),
        ("--max-new-tokens abc", ["generate", text, "x", "--max-new-tokens", "abc"], r"'abc'"),
        ("--max-new-tokens -3", ["generate", text, "x", "--max-new-tokens", "-3"], r"--max-new-tokens -3"),
        ("--temperature nan", ["generate", text, "x", "--temperature", "nan"], r"--temperature nan"),
        ("--temperature -1", ["generate", text, "x", "--temperature", "-1"], r"--temperature -1"),
        ("--top-k 0", ["generate", text, "x", "--top-k", "0", "--temperature", "1"], r"--top-k 0"),
        ("--top-p 2", ["generate", text, "x", "--top-p", "2", "--temperature", "1"], r"--top-p 2"),
        ("--seed -1", ["generate", text, "x", "--seed", "-1"], r"--seed -1"),
        ("--device gpu", ["generate", text, "x", "--device", "gpu"], r"--device gpu"),
        ("--device cuda:7", ["generate", text, "x", "--device", "cuda:7"], r"--device cuda:7"),
        ("--dtype int8", ["generate", text, "x", "--dtype", "int8"], r"--dtype int8"),
        ("--tp 0", ["generate", text, "x", "--tp", "0"], r"--tp 0"),
        ("--tp 2 outside torchrun", ["generate", text, "x", "--tp", "2"], r"--tp 2|torchrun|WORLD_SIZE"),
        ("--quantize int3", ["generate", text, "x", "--quantize", "int3"], r"--quantize int3"),
        ("generate with an unknown model", ["generate", "qwen2-7bb", "x"], r"qwen2-7bb"),
        ("generate with a missing directory", ["generate", "./no/such", "x"], r"no/such"),
        ("predict with a text model", ["predict", text, str(d / "junk.png")], r"text-generation"),
        ("info of an unknown name", ["info", "nope-model"], r"nope-model"),
        ("info of a directory without config", ["info", str(d)], r"config\.json"),
        ("pull a bad repo id", ["pull", "a/b/c"], r"'a/b/c'"),
        ("pull a bad revision", ["pull", "acme/x@.."], r"'\.\.'"),
        ("push a bad repo id", ["push", str(d), "bad id", "--dry-run"], r"bad id|config\.json"),
        ("convert a missing source", ["convert", str(d / "nothing"), str(out)], r"nothing"),
        ("convert an unknown format", ["convert", str(d), str(out), "--format", "nope"], r"'nope'"),
        ("convert --max-shard-size 0", ["convert", str(d), str(out), "--max-shard-size", "0"], r"--max-shard-size"),
        ("convert --max-shard-size nan", ["convert", str(d), str(out), "--max-shard-size", "nan"], r"--max-shard-size"),
        ("convert --max-shard-size -1", ["convert", str(d), str(out), "--max-shard-size", "-1"], r"--max-shard-size"),
        ("convert --to nope", ["convert", "--to", "nope", str(d), str(out)], r"config\.json|'nope'"),
        ("convert --to hf --dtype", ["convert", "--to", "hf", "--dtype", "bf16", str(d), str(out)], r"--dtype"),
        ("convert a junk source", ["convert", str(d / "junk.png"), str(out)], r"junk\.png"),
        ("--num-beams 0", ["generate", text, "x", "--num-beams", "0"], r"--num-beams 0"),
        ("--num-beams with --temperature", ["generate", text, "x", "--num-beams", "2", "--temperature", "1"],
         r"--temperature 1\.0"),
        ("--num-return-sequences past --num-beams", ["generate", text, "x", "--num-beams", "2",
                                                     "--num-return-sequences", "3"], r"--num-return-sequences 3"),
        ("--length-penalty nan", ["generate", text, "x", "--num-beams", "2", "--length-penalty", "nan"],
         r"--length-penalty nan"),
        ("--no-repeat-ngram-size -1", ["generate", text, "x", "--num-beams", "2", "--no-repeat-ngram-size", "-1"],
         r"--no-repeat-ngram-size -1"),
        ("--early-stopping maybe", ["generate", text, "x", "--early-stopping", "maybe"], r"maybe"),
        ("--min-gen-length -1", ["generate", text, "x", "--min-gen-length", "-1"], r"--min-gen-length -1"),
    ]
    if image is not None:
        argvs += [("predict --top-k 0", ["predict", str(image), str(d / "junk.png"), "--top-k", "0"], r"--top-k 0"),
                  ("predict a junk image", ["predict", str(image), str(d / "junk.png")], r"junk\.png"),
                  ("predict a missing image", ["predict", str(image), str(d / "none.png")], r"none\.png"),
                  ("generate with an image model", ["generate", str(image), "x"], r"image-classification")]
    if seed is not None:
        argvs += [("convert --dtype int8", ["convert", str(seed), str(out), "--dtype", "int8"], r"--dtype int8"),
                  ("convert --quantize int3", ["convert", str(seed), str(out), "--quantize", "int3"],
                   r"--quantize int3")]
    for family, native in sorted(ws.natives.items()):  # every task's CLI hooks, with files they cannot use
        named = rf"{NAMED}|corpus-{family}"  # a path, an argument, or the model that cannot do this
        argvs += [(f"predict with a {family} model on a junk file", ["predict", str(native), str(d / "junk.png")],
                   named),
                  (f"predict with a {family} model on a missing file", ["predict", str(native), str(d / "no.png")],
                   named),
                  (f"generate with a {family} model from a junk file", ["generate", str(native), str(d / "junk.png"),
                                                                        "--max-new-tokens", "2", "--steps", "1",
                                                                        "--out", str(d / "o.obj")], named),
                  (f"generate with a {family} model, --steps -1", ["generate", str(native), "x", "--steps", "-1",
                                                                   "--max-new-tokens", "-1"], rf"{named}|^.*\bx: "),
                  (f"predict with a {family} model on a decompression bomb", ["predict", str(native),
                                                                              str(d / "bomb.png")], named),
                  (f"generate with a {family} model from a decompression bomb", [
                      "generate", str(native), str(d / "bomb.png"), "--max-new-tokens", "2", "--steps", "1",
                      "--out", str(d / "o.obj")], named)]
    argvs += shape_cli_argvs(ws, d, out)
    argvs += _cli_output_cases(ws, d, text, image)
    for fmt in sorted(formats()):
        argvs.append((f"convert --format {fmt} on a junk file", ["convert", str(d / "junk.png"), str(out), "--format",
                                                                 fmt], NAMED))
    inputs = [d / "junk.png", *ws.natives.values()]  # no refused command may change any of them
    return [Case("cli", label, _and_intact(lambda argv=argv: cli(*argv), inputs), (), match, (out,), cli=True)
            for label, argv, match in argvs]


def shape_cli_argvs(ws: Workspace, d: Path, out: Path) -> list[tuple[str, list[str], str]]:
    """`zoo generate` with a shape model: each number just past the edge its check allows (the edges themselves
    run: tests/test_wala_generate.py), outputs of unknown formats or over an input, a batch given one output file."""
    from PIL import Image

    native = next((n for n in ws.natives.values() if json.loads((n / "config.json").read_text())["task"] ==
                   "shape-generation"), None)
    if native is None:
        return []
    image = d / "chair.png"
    Image.new("RGB", (32, 32), "gray").save(image)
    base = ["generate", str(native), str(image)]
    mesh = str(out / "chair.obj")
    steps = json.loads((native / "config.json").read_text())["config"]["train_steps"]

    def said(name: str, value: str) -> str:  # a value named as the API says it (steps=0) or the CLI (--steps 0)
        return rf"(?:{name}=|--{name.replace('_', '-')} ){value}"

    return [
        ("shapes: --steps 0", [*base, "--out", mesh, "--steps", "0"], said("steps", r"0")),
        (f"shapes: --steps {steps + 1} (past the training schedule)", [*base, "--out", mesh, "--steps",
                                                                     str(steps + 1)], said("steps", rf"{steps + 1}")),
        ("shapes: --guidance -0.5", [*base, "--out", mesh, "--guidance", "-0.5"], said("guidance", r"-0\.5")),
        ("shapes: --guidance inf", [*base, "--out", mesh, "--guidance", "inf"], said("guidance", r"inf")),
        ("shapes: --seed -1", [*base, "--out", mesh, "--seed", "-1"], said("seed", r"-1")),
        ("shapes: --seed 2**64", [*base, "--out", mesh, "--seed", str(2**64)], said("seed", r"18446744073709551616")),
        ("shapes: --target-faces 3", [*base, "--out", mesh, "--target-faces", "3"], said("target_faces", r"3")),
        ("shapes: --target-faces -1", [*base, "--out", mesh, "--target-faces", "-1"], said("target_faces", r"-1")),
        ("shapes: --out of an unknown format", [*base, "--out", str(out / "x.xyz")], r"x\.xyz"),
        ("shapes: --preview of an unknown format", [*base, "--out", mesh, "--preview", str(out / "p.txt")],
         r"p\.txt"),
        ("shapes: --preview over the input", [*base, "--out", mesh, "--preview", str(image)], r"chair\.png"),
        ("shapes: --out over the input", [*base, "--out", str(image)], r"chair\.png"),
        ("shapes: --out for two inputs", [*base, str(image), "--out", mesh], r"--out"),
        ("shapes: two inputs writing one file", [*base, str(image), "--out-dir", str(out)], r"chair\.obj"),
        ("shapes: a missing second input", [*base, str(d / "none.png"), "--out-dir", str(out)], r"none\.png"),
    ]


def _digest(path: Path) -> list[tuple[str, str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]


def _and_intact(fn: Callable[[], Any], paths: list[Path]) -> Callable[[], Any]:
    """fn, then a check that every file under `paths` has the bytes it had (an output never lands on an input)."""
    def run():
        before = [_digest(p) for p in paths]
        try:
            return fn()
        finally:
            if [_digest(p) for p in paths] != before:
                raise AssertionError(f"a refused command changed one of {[str(p) for p in paths]}")
    return run


def _cli_output_cases(ws: Workspace, d: Path, text: str, image: Path | None) -> list[tuple[str, list[str], str]]:
    """Outputs over inputs, outputs of unknown formats or in impossible places, options a task does not take,
    commands a task does not run: each refused by name before any model is loaded."""
    junk = d / "junk.png"
    (d / "link.png").unlink(missing_ok=True)
    os.link(junk, d / "link.png")  # a second name of the same file (same inode)
    model_dir = next(iter(ws.natives.values()), d)
    overlay = d / "m_overlay.png"  # an input named as a segmentation's overlay of --out m.png is named
    overlay.write_bytes(junk.read_bytes())
    cases = [
        ("generate --out onto a file of the model directory", [
            "generate", str(model_dir), "x", "--out", str(model_dir / "config.json")], r"config\.json|--"),
        ("generate --out under a file", ["generate", text, "x", "--out", str(junk / "x.txt")], r"junk\.png"),
        ("generate --out a directory", ["generate", text, "x", "--out", str(d)], r"--out"),
        ("generate --steps on a language model", ["generate", text, "x", "--steps", "3"], r"--steps"),
        ("generate --preview on a language model", ["generate", text, "x", "--preview", "p.png"], r"--preview"),
        ("features with a language model", ["features", text, str(junk)], r"text-generation"),
        ("convert onto its own source", ["convert", str(d), str(d), "--overwrite"], r"is the input"),
        ("convert into its own source", ["convert", str(d), str(d / "inside")], r"inside the input"),
        ("convert over a directory holding the source", ["convert", str(junk), str(d), "--overwrite"], r"holds"),
        ("export onto its own source", ["convert", "--to", "hf", str(d), str(d), "--overwrite"], r"is the input"),
    ]
    if image is not None:
        cases += [
            ("predict --out onto the input image", ["predict", str(image), str(junk), "--out", str(junk)],
             r"junk\.png"),
            ("predict --out onto a hard link of the input", ["predict", str(image), str(junk), "--out",
                                                           str(d / "link.png")], r"link\.png"),
            ("predict --out labels.txt", ["predict", str(image), str(junk), "--out", str(d / "labels.txt")],
             r"labels\.txt"),
            ("predict --out into a file", ["predict", str(image), str(junk), "--out", str(junk / "l.json")],
             r"junk\.png"),
            ("features --out feats.json", ["features", str(image), str(junk), "--out", str(d / "f.json")],
             r"f\.json"),
            ("features --top-k", ["features", str(image), str(junk), "--top-k", "3"], r"--top-k"),
        ]
    for family, native in sorted(ws.natives.items()):
        task = json.loads((native / "config.json").read_text())["task"]
        if task == "shape-generation":
            cases += [
                (f"generate with a {family} model, --preview onto the input", [
                    "generate", str(native), str(junk), "--out", str(d / "s.obj"), "--preview", str(junk)],
                 r"junk\.png"),
                (f"generate with a {family} model, --out .xyz", [
                    "generate", str(native), str(junk), "--out", str(d / "s.xyz")], r"s\.xyz"),
                (f"generate with a {family} model, --preview .gif", [
                    "generate", str(native), str(junk), "--out", str(d / "s.obj"), "--preview", str(d / "p.gif")],
                 r"p\.gif"),
                (f"generate with a {family} model, --out = --preview", [
                    "generate", str(native), str(junk), "--out", str(d / "s.obj"), "--preview", str(d / "s.obj")],
                 r"s\.obj"),
                (f"generate with a {family} model, --max-new-tokens", [
                    "generate", str(native), str(junk), "--max-new-tokens", "3"], r"--max-new-tokens"),
            ]
        if task == "image-segmentation":
            cases += [
                (f"predict with a {family} model, --out onto the input", [
                    "predict", str(native), str(junk), "--out", str(junk)], r"junk\.png"),
                (f"predict with a {family} model, the overlay onto the input", [
                    "predict", str(native), str(overlay), "--out", str(d / "m.png")], r"m_overlay\.png"),
                (f"predict with a {family} model, --top-k", [
                    "predict", str(native), str(junk), "--top-k", "3"], r"--top-k"),
            ]
        if task == "image-feature-extraction":
            cases += [(f"predict with a {family} backbone", ["predict", str(native), str(junk)], r"zoo features")]
    return cases


# ------------------------------------------------------------------------------------------------- all


def build_corpus(root: Path, hub: Any = None) -> list[Case]:
    """Every case, in a workspace under root (seeds are built first: a few seconds)."""
    ws = Workspace(root)
    ws.build_seeds()
    return (convert_cases(ws) + load_cases(ws) + export_cases(ws) + pull_cases(ws, hub) + predict_cases(ws)
            + segmentation_cases(ws) + text_cases(ws) + cli_cases(ws))


def run_corpus(root: Path, hub: Any = None) -> list[Result]:
    import warnings

    cases = build_corpus(root, hub)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [run_case(c) for c in cases]


__all__ = ["Case", "Result", "build_corpus", "by_entry", "failures", "run_case", "run_corpus", "summary"]
