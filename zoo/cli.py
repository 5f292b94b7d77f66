"""The `zoo` command: thin argument parsing over the same functions a Python user calls."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap


class UsageError(Exception):
    """A command line argparse could not read (unknown option, a word where a number goes, ...)."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line on stderr (what is wrong and where to look), not a
    usage block and a SystemExit."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zoo", description="A PyTorch model zoo and checkpoint hub.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help,
                              epilog="example:\n" + textwrap.indent(example, "  "),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = add("list", "List registered models.", "zoo list 'qwen2-*'")
    s.add_argument("pattern", nargs="?", help="shell-style pattern or substring")

    s = add("info", "Show a model's published config, source, license and card.", "zoo info qwen2-7b")
    s.add_argument("model", help="registry name or native directory")
    s.add_argument("--json", action="store_true", help="print the registry entry as JSON")
    s.add_argument("--tp", type=int, help="what a setup needs per GPU: tensor-parallel degree (imports torch: it "
                   "counts on the model built on the meta device)")
    s.add_argument("--pp", type=int, help="with --tp or alone: pipeline stages")
    s.add_argument("--quantize", help="with --tp/--pp: weights packed by this scheme (int8, int4, int4-row-g4, ...)")
    s.add_argument("--dtype", default="float16", help="with --tp/--pp: the float tensors' dtype (default float16)")
    s.add_argument("--gpu-memory", type=float, help="with --tp/--pp: GiB per GPU, to say whether it fits")

    s = add("convert", "Convert a published checkpoint to zoo's native format (or back with --to).",
            "zoo convert ./Qwen2-0.5B ./qwen2-0.5b\nzoo convert --to hf ./qwen2-0.5b ./Qwen2-0.5B-hf")
    s.add_argument("src", help="published checkpoint directory or file (a native directory with --to)")
    s.add_argument("out", help="output directory (written atomically)")
    s.add_argument("--format", help="force a source format instead of detecting it")
    s.add_argument("--to", help="export a native checkpoint to this published layout (e.g. hf)")
    s.add_argument("--dtype", help="store floating tensors in this dtype (float32, bfloat16, float16)")
    s.add_argument("--name", default="", help="model name recorded in config.json and the card")
    s.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard (default 5)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--config", help="JSON file of the model's numbers, for a layout published without a config "
                   "(GLM-130B's SAT release: SAT argument names, e.g. num_layers, hidden_size)")
    s.add_argument("--tp", type=int, help="with --to: the tensor-parallel degree of a layout split over ranks "
                   "(--to sat)")
    s.add_argument("--quantize", help="store linear weights packed: int8 (per output row) | int4 (groups of 128 "
                   "columns) | ternary (2 bits, for ternary-trained models: MatMul-free LM); weight-only")

    s = add("generate", "Generate from a prompt: text (streamed to stdout), or a 3D shape from a condition file.",
            'zoo generate qwen2-tiny-stdlib "def fibonacci(n):" --out fib.py\n'
            "zoo generate wala-sv-1b chair.png --out chair.obj --preview chair_render.png\n"
            "zoo generate wala-sv-1b a.png b.png --out-dir shapes/ --preview shapes/")
    s.add_argument("model", help="registry name, native directory or hf://org/name@rev")
    s.add_argument("prompt", help="the text prompt; for a shape model, the condition (image, point cloud, ...)")
    s.add_argument("inputs", nargs="*", metavar="MORE", help="shape models: more conditions, one shape each")
    s.add_argument("--out-dir", help="shape models: write each shape here as NAME.obj (default: here)")
    s.add_argument("--target-faces", type=int, help="shape models: simplify each mesh to at most N faces (default "
                   "50000, which any viewer opens at once; 0 keeps every marching-cubes face)")
    s.add_argument("--max-new-tokens", type=int, help=f"default {DEFAULTS['generate']['max_new_tokens']}")
    s.add_argument("--temperature", type=float, help="0 = greedy; default: the checkpoint's generation config")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int, help="random seed (shape models: default 42, as the published script)")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy/sampling)")
    s.add_argument("--length-penalty", type=float, default=1.0, help="beam score / new_tokens ** this")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="beam search: never repeat an n-gram")
    s.add_argument("--early-stopping", nargs="?", const="true", default="false", choices=["true", "false", "never"],
                   help="beam search: stop once num_beams beams finished (transformers' early_stopping)")
    s.add_argument("--num-return-sequences", type=int, default=1, help="beam search: print this many best beams")
    s.add_argument("--min-gen-length", type=int, default=0, help="no stop token among the first N new tokens")
    s.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    s.add_argument("--out", help="write the result here: the text (any file), or a mesh (.obj, .ply, .glb, .stl, "
                   ".off); never over an input")
    s.add_argument("--preview", help="shape models: also render the result to this picture (.png): the input "
                   "beside the shape and four views around it (several inputs: a directory, NAME.png each)")
    s.add_argument("--steps", type=int, help="diffusion steps (default: the model's recommended)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    s.add_argument("--dtype", help="compute dtype (default: as stored)")
    s.add_argument("--quantize", help="weight-only quantisation while loading: int8 (per output row) | int4 "
                   "(groups of 128 columns)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode each new token through one torch.compile'd step (default: only where measured "
                        "faster on this CPU for these weights and worth its compile; ZOO_COMPILE=0/1 sets the default)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--tp", type=int, help="tensor-parallel degree (inside torchrun)")

    s = add("predict", "Classify an image or a video (top-k labels), or segment an image (a mask).",
            "zoo predict swinv2-tiny-w8-256-in1k cat.jpg --top-k 5 --out labels.json\n"
            "zoo predict ./my-dinounet scan.png --out mask.png")
    s.add_argument("model")
    s.add_argument("file", help="image or video file")
    s.add_argument("--top-k", type=int,
                   help=f"classification: how many labels (default {DEFAULTS['predict']['top_k']})")
    s.add_argument("--out", help="write the result here: classification, the labels and scores as .json; "
                   "segmentation, the label mask as a .png, plus MASK_overlay.png")
    # segmentation (nnU-Net's inference): the overlay's slice of a volume, the folds, mirroring, postprocessing
    s.add_argument("--slice", type=int, help="segmentation of a volume: the slice (first axis) of the overlay PNG")
    s.add_argument("--folds", nargs="+", help="segmentation: the cross-validation folds to average (default: all)")
    s.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="segmentation: test-time mirroring, as nnU-Net (default on)")
    s.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=True,
                   help="segmentation: nnU-Net's connected-component postprocessing when the run has it (default on)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--onednn", choices=("dense", "pack", "off"),
                   help="linear layers on CPU through oneDNN on the model's weights, on a packed copy, or not "
                        "(default: ZOO_ONEDNN's setting, dense)")

    s = add("features", "Backbone features of an image or a video (DINOv3, and every classifier's pooled features).",
            "zoo features dinov3-vits16-lvd1689m cat.jpg --out feats.safetensors\n"
            "zoo features dinov3-vits16-lvd1689m cat.jpg --dense --out patches.safetensors")
    s.add_argument("model")
    s.add_argument("file", help="image or video file")
    s.add_argument("--dense", action="store_true", help="every tensor the backbone gives (class token, dense patch "
                   "features, registers), not only the pooled features")
    s.add_argument("--out", help="write the features here (.safetensors)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--onednn", choices=("dense", "pack", "off"),
                   help="linear layers on CPU through oneDNN on the model's weights, on a packed copy, or not "
                        "(default: ZOO_ONEDNN's setting, dense)")

    s = add("push", "Upload a native checkpoint directory to the Hugging Face Hub in one commit.",
            "zoo push ./qwen2-0.5b me/qwen2-0.5b-zoo --dry-run")
    s.add_argument("directory")
    s.add_argument("repo_id")
    s.add_argument("--revision", help="branch to commit to")
    s.add_argument("--private", action="store_true")
    s.add_argument("--message", help="commit message")
    s.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    s.add_argument("--dry-run", action="store_true", help="print the planned operations and upload nothing")

    s = add("pull", "Download a native checkpoint from the Hub (verified against its index).",
            "zoo pull me/qwen2-0.5b-zoo@main --local-dir ./qwen2-0.5b")
    s.add_argument("repo", help="org/name or org/name@revision")
    s.add_argument("--local-dir")
    s.add_argument("--token")
    p.commands = dict(sub.choices)  # name -> its parser (for the options a user typed, and their flags)
    return p


# per command, filled in after the checks, so giving one is always seen (generate's --top-k stays None: no top-k
# filter unless asked; predict's is how many labels)
DEFAULTS = {"generate": {"max_new_tokens": 128}, "predict": {"top_k": 5}}


def _cmd_list(a) -> None:
    from zoo.registry import disk_bytes, download_bytes, find_entry, human_bytes, list_models

    head = ("NAME", "FAMILY", "TASK", "PARAMS", "DOWNLOAD", "DISK", "LICENSE", "SOURCE")
    rows = []
    for name in list_models(a.pattern):
        e = find_entry(name)
        source = "ships inside zoo" if e.source.host == "package" else f"{e.source.host}:{e.source.repo}"
        rows.append((name, e.family, e.task, f"{e.params / 1e9:.2f}B", human_bytes(download_bytes(e)),
                     human_bytes(disk_bytes(e)), e.license, source))
    if not rows:
        print(f"no registered model matches {a.pattern!r}" if a.pattern else "the registry is empty", file=sys.stderr)
        return
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]  # as wide as the longest value
    right = {3, 4, 5}  # numbers align right
    for r in [head, *rows]:
        print("  ".join(f"{v:>{w}}" if i in right else f"{v:<{w}}" for i, (v, w) in
                        enumerate(zip(r, widths))).rstrip())
    print("\nDOWNLOAD: fetched on first use (about: parameters x published bytes each); DISK: the converted copy. "
          "The download stays in the Hub cache beside it (about twice the disk) until `hf cache rm model/REPO`. "
          "`zoo info NAME` gives the memory it needs.", file=sys.stderr)


def _fields(pairs: list[tuple[str, object]], indent: str = "    ") -> None:
    """key  value lines, the values aligned after the longest key."""
    width = max((len(k) for k, _ in pairs), default=0)
    for k, v in pairs:
        print(f"{indent}{k:<{width}}  {v}")


def _cmd_info(a) -> None:
    from pathlib import Path

    from zoo.preflight import local_directory, zoo_home
    from zoo.registry import (
        disk_bytes,
        download_bytes,
        find_entry,
        hidden_config_fields,
        human_bytes,
        license_link,
        memory_bytes,
    )

    path = Path(a.model)
    if path.is_dir():
        if a.tp or a.pp or a.quantize is not None or a.gpu_memory is not None:
            raise ValueError("--tp, --pp, --quantize and --gpu-memory count a registry entry's setup; give its name")
        if not path.joinpath("config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; not a zoo native directory")
        print(path.joinpath("README.md").read_text() if path.joinpath("README.md").is_file() else "")
        print(path.joinpath("config.json").read_text())
        return
    e = find_entry(a.model)
    if a.json:
        print(json.dumps(e.to_dict(), indent=2))
        return
    setups = _setups(e, a)  # before anything is printed: an asked setup the model cannot take is refused first
    print(f"{e.name}: {e.description}")
    local = local_directory(e)
    facts: list[tuple[str, object]] = [
        ("family", e.family), ("task", e.task), ("parameters", f"{e.params:,}"),
        ("license", f"{e.license} ({license_link(e)})" if license_link(e) else e.license),
        ("source", f"{e.source.host}:{e.source.repo}@{e.source.revision} (layout {e.source.layout})"),
        ("paper", e.paper)]
    if e.extra.get("download"):
        facts.append(("weights", f"given out on request: {e.extra['download']}"))
    memory = memory_bytes(e)
    facts.append(("memory", ", ".join(f"{k} {human_bytes(v)}" for k, v in memory.items()) + " (the weights)"))
    if e.source.host == "package":
        facts.append(("download", f"none: ships inside zoo ({human_bytes(disk_bytes(e))})"))
    elif e.source.host == "hf":
        facts.append(("download", f"about {human_bytes(download_bytes(e))} on first use, kept in the Hub cache "
                                  f"(`hf cache rm model/{e.source.repo}` frees it)"))
        facts.append(("disk", f"about {human_bytes(disk_bytes(e))} converted, in {zoo_home() / 'models' / e.name}; "
                              "with the Hub cache, about twice that"))
    else:  # given out by the publisher: downloaded by hand, then converted
        facts.append(("download", f"about {human_bytes(download_bytes(e))}, by hand (see weights)"))
        facts.append(("disk", f"about {human_bytes(disk_bytes(e))} converted, in {zoo_home() / 'models' / e.name}, "
                              "beside the download until you delete it"))
    if local is not None:
        facts.append(("on this machine", str(local)))
        facts += _training_facts(local)
    _fields(facts, "  ")
    hidden = set(hidden_config_fields(e))
    shown = [(k, v) for k, v in e.config.items() if k not in hidden and v not in (None, [], {}, "")]
    print("  published config:")
    _fields(shown)
    if len(shown) < len(e.config):
        print(f"    ({len(e.config) - len(shown)} fields this model does not use are not shown; --json has them)")
    for line in setups:
        print(line)
    card = zoo_home() / "models" / e.name / "README.md"
    if card.is_file():
        print("\n" + card.read_text())


def _setups(e, a) -> list[str]:
    """The lines on what each declared setup needs per GPU (from the registry snapshot: no torch), or on the one
    asked for with --tp / --pp (counted now: imports torch)."""
    from zoo.memory_plan import GIB, KV_TOKENS, Setup, need, setups_with_needs, table

    if not (a.tp or a.pp):
        if a.quantize is not None or a.gpu_memory is not None:
            raise ValueError("--quantize and --gpu-memory describe a setup: give --tp (or --pp) with them")
        rows = setups_with_needs(e)
        head = "  what each setup needs per GPU (weights by the config's arithmetic; activations come on top):"
        return [head] + ["    " + line for line in table(rows)] if rows else []
    tp, pp = a.tp or 1, a.pp or 1
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    what = f"{a.quantize or a.dtype}, TP {tp}" + (f" x PP {pp}" if pp > 1 else "")
    n = need(e.family, e.config, a.dtype, a.quantize, tp, pp)
    if a.gpu_memory is None:  # nothing to compare with: the bytes alone
        kv = f", KV cache {n.kv_cache / GIB:.2f} GiB per {KV_TOKENS} tokens" if n.kv_cache else ""
        return [f"  {what}: {n.weights / GIB:.1f} GiB of weights per GPU{kv} (--gpu-memory GIB: does it fit)"]
    asked = Setup(name=what, gpus=tp * pp, gpu="GPU", gpu_memory_gib=a.gpu_memory, dtype=a.dtype,
                  quantize=a.quantize, tp=tp, pp=pp, source="asked")
    return ["  what this setup needs per GPU (weights by the config's arithmetic; activations come on top):"] + \
        ["    " + line for line in table([(asked, n)])]


def _training_facts(directory) -> list[tuple[str, object]]:
    """What training recorded in a native config (zoo's own models): the held-out loss first."""
    try:
        training = json.loads((directory / "config.json").read_text()).get("extra", {}).get("training") or {}
    except (OSError, ValueError, AttributeError):
        return []
    out = []
    if "held_out_loss" in training:
        files = f" on {training['held_out_files']} held-out files" if "held_out_files" in training else ""
        out.append(("held-out loss", f"{training['held_out_loss']} nats/token{files}"))
    rest = ", ".join(f"{k} {v}" for k, v in training.items() if k not in ("held_out_loss", "held_out_files"))
    return out + ([("training", rest)] if rest else [])


def _cmd_convert(a) -> None:
    import zoo
    from zoo.checks import check_output_directory

    if not a.max_shard_size > 0 or a.max_shard_size == float("inf"):
        raise ValueError(f"--max-shard-size {a.max_shard_size}: must be a finite number of GiB > 0")
    check_output_directory(a.out, [a.src, a.config])
    if a.to:
        ignored = [f"--{k.replace('_', '-')}" for k in ("format", "dtype", "quantize", "config") if getattr(a, k)]
        if ignored:
            raise ValueError(f"--to exports a native checkpoint as it is; {', '.join(ignored)} applies to "
                             "converting a published one")
        out = zoo.export(a.src, a.out, to=a.to, overwrite=a.overwrite, **({"tp": a.tp} if a.tp else {}))
    else:
        if a.tp:
            raise ValueError("--tp applies to an export (--to); a conversion reads every rank the checkpoint has")
        out = zoo.convert(a.src, a.out, format=a.format, dtype=a.dtype, overwrite=a.overwrite, name=a.name,
                          max_shard_bytes=int(a.max_shard_size * 2**30), quantize=a.quantize, config=a.config,
                          command="zoo convert " + " ".join(sys.argv[2:]))
    print(f"wrote {out}", file=sys.stderr)


def _run_task(command: str, a, load_options: dict) -> None:
    """generate / predict / features: every check the model's task declares, before loading or downloading; then
    load, and hand the arguments to the task."""
    from pathlib import Path

    import zoo
    from zoo.preflight import check_command, find_model
    from zoo.tasks import is_main_process

    target = find_model(a.model)
    spec = check_command(command, target, a.given, a)  # (zoo.hub says how much a first use downloads)
    model = zoo.load(a.model, **load_options)
    if spec is None:  # not known before loading (an hf:// address): the same checks, on the model's own task
        target.task, target.config = model.task, dict(model.native.config)
        spec = check_command(command, target, a.given, a)
    for dest, value in DEFAULTS.get(command, {}).items():
        if hasattr(a, dest) and getattr(a, dest) is None:
            setattr(a, dest, value)
    made: list[Path] = []  # directories made for the outputs (checked writable), removed again if the task refuses
    for out in (getattr(a, "out", None), getattr(a, "preview", None)):
        if out:
            parent = Path(out).absolute().parent
            made += [d for d in (parent, *parent.parents) if not d.exists()]
            parent.mkdir(parents=True, exist_ok=True)
    run = getattr(model, f"cli_{command}")
    try:
        if spec.out_from_stdout and a.out and is_main_process():  # (under torchrun only rank 0 prints, so writes)
            with _Tee(a.out):
                run(a)
        else:
            run(a)
    except BaseException:
        for d in made:  # deepest first: a refused or failed run leaves no directory it made behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise


class _Tee:
    """What the command prints also goes to a file (written beside, renamed into place when the command ends)."""

    def __init__(self, path: str):
        from pathlib import Path

        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{__import__('os').getpid()}.tmp")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "w")  # noqa: SIM115 - closed in __exit__
        self.stdout = sys.stdout
        sys.stdout = self
        return self

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stdout.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stdout.flush()

    def __exit__(self, kind, value, tb) -> None:
        import os

        sys.stdout = self.stdout
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
            print(f"wrote {self.path}", file=sys.stderr)
        else:
            self.tmp.unlink(missing_ok=True)


def _cmd_generate(a) -> None:
    options = {} if a.compile is None else {"compile": a.compile}  # (shape models have no decoding step)
    _run_task("generate", a, dict(dtype=a.dtype, device=a.device, tp=a.tp, quantize=a.quantize, **options))


def _cmd_predict(a) -> None:
    if a.top_k is not None and a.top_k < 1:
        raise ValueError(f"--top-k {a.top_k}: must be an integer >= 1")
    _run_task("predict", a, dict(device=a.device, onednn=a.onednn))


def _cmd_features(a) -> None:
    _run_task("features", a, dict(device=a.device, onednn=a.onednn))


def _cmd_push(a) -> None:
    from zoo.hub import push

    push(a.directory, a.repo_id, revision=a.revision, private=a.private, message=a.message, token=a.token,
         dry_run=a.dry_run)


def _cmd_pull(a) -> None:
    from zoo.hub import pull

    print(pull(a.repo, local_dir=a.local_dir, token=a.token))


def _one_line(e: BaseException) -> str:
    """An error message on one line (library messages may span several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " …"


def _flag(action: argparse.Action, value: object = None) -> str:
    """The flag as a user types it: the long form (--no-compile for a false BooleanOptionalAction)."""
    longs = [o for o in action.option_strings if o.startswith("--")] or action.option_strings
    if value is False and any(o.startswith("--no-") for o in longs):
        return next(o for o in longs if o.startswith("--no-"))
    return next((o for o in longs if not o.startswith("--no-")), longs[0])


def _given(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """dest -> flag, for every option the user gave (a value other than the option's default)."""
    out = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            value = getattr(args, action.dest, None)
            if value != action.default:
                out[action.dest] = _flag(action, value)
        elif action.nargs == "*" and getattr(args, action.dest, None):  # more positional inputs (shape models)
            out[action.dest] = action.metavar or action.dest
    return out


def in_cli_words(message: str, parser: argparse.ArgumentParser | None) -> str:
    """The Python API's words in a message -> the command line's: `max_new_tokens=-1` -> `--max-new-tokens -1`,
    `overwrite=True` -> `--overwrite`, for the options of the command that ran."""
    import re

    for action in parser._actions if parser else []:
        if not action.option_strings or action.dest == "help":
            continue
        flag, dest = _flag(action), re.escape(action.dest)
        if action.nargs == 0:  # store_true: overwrite=True -> --overwrite
            message = re.sub(rf"(?<![\w-]){dest}=True\b", flag, message)
            continue
        message = re.sub(rf"(?<![\w.-]){dest}=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)",
                         lambda m, flag=flag: f"{flag} {_unquoted(m.group(1))}", message)
        if "_" in action.dest:  # a bare Python name ("0 < top_p <= 1"); plain words (file, seed) are left alone
            message = re.sub(rf"(?<![\w.-]){dest}(?![\w=])", flag, message)
    message = re.sub(r"\(or None\b", "(or leave it out", message)  # the Python default, as the command line has it
    return re.sub(r"(--[\w-]+) \(\1\)", r"\1", message)  # "pass --overwrite (overwrite=True)": said once


def _unquoted(value: str) -> str:
    """'gpu' -> gpu, as it was typed; a value with spaces keeps its quotes."""
    inner = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value
    return inner if inner and " " not in inner else value


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause, each with a message that names the cause: bad arguments and input (ValueError,
    of which CheckpointError and DistributedConfigError are kinds), names (UnknownModelError), files, disks and
    the network (OSError: FileNotFoundError, FileExistsError, PermissionError, ConnectionError, ENOSPC, ...),
    a missing optional dependency (ImportError), and memory (MemoryError, torch.OutOfMemoryError: only when torch
    was imported, which `zoo list` and `zoo info` never do)."""
    from zoo.registry import UnknownModelError

    torch = sys.modules.get("torch")
    oom = (torch.OutOfMemoryError,) if torch is not None and hasattr(torch, "OutOfMemoryError") else ()
    return (ValueError, UnknownModelError, OSError, ImportError, MemoryError, *oom)


def main(argv: list[str] | None = None) -> int:
    """Run one command; an expected error is printed on one line to stderr with exit status 2 (130 on ^C)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    sub = parser.commands.get(args.command)
    args.given = _given(sub, args) if sub else {}
    try:
        globals()[f"_cmd_{args.command}"](args)
    except KeyboardInterrupt:
        print(f"zoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zoo list | head`: the reader left early; nothing went wrong here
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented recipe
        return 0
    except _expected_errors() as e:
        package = (getattr(e, "name", None) or "").split(".")[0]
        if isinstance(e, ImportError) and package and package != "zoo":
            e = ImportError(f"{e}; this needs the optional package {package!r} (pip install {package})")
        print(f"zoo {args.command}: error: {in_cli_words(_one_line(e), sub)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
