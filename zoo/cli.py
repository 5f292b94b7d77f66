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
            'zoo generate qwen2-tiny-stdlib "def fibonacci(n):"\n'
            "zoo generate wala-sv-1b chair.png --out chair.obj --preview chair.png")
    s.add_argument("model", help="registry name, native directory or hf://org/name@rev")
    s.add_argument("prompt", help="the text prompt; for a shape model, the condition (image, point cloud, ...)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, help="0 = greedy; default: the checkpoint's generation config")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy/sampling)")
    s.add_argument("--length-penalty", type=float, default=1.0, help="beam score / new_tokens ** this")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="beam search: never repeat an n-gram")
    s.add_argument("--early-stopping", nargs="?", const="true", default="false", choices=["true", "false", "never"],
                   help="beam search: stop once num_beams beams finished (transformers' early_stopping)")
    s.add_argument("--num-return-sequences", type=int, default=1, help="beam search: print this many best beams")
    s.add_argument("--min-gen-length", type=int, default=0, help="no stop token among the first N new tokens")
    s.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    s.add_argument("--out", help="write the result here (a mesh file: .obj, .ply, .glb)")
    s.add_argument("--preview", help="also render the result to this picture (.png)")
    s.add_argument("--steps", type=int, help="diffusion steps (default: the model's recommended)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    s.add_argument("--dtype", help="compute dtype (default: as stored)")
    s.add_argument("--quantize", help="weight-only quantisation while loading: int8 (per output row) | int4 "
                   "(groups of 128 columns)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode each new token through one torch.compile'd step (default: where it pays, a long "
                        "enough generation; ZOO_COMPILE=0/1 sets the default)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--tp", type=int, help="tensor-parallel degree (inside torchrun)")

    s = add("predict", "Classify an image or a video (top-k labels), or segment an image (a mask).",
            "zoo predict swinv2-tiny-w8-256-in1k cat.jpg --top-k 5\nzoo predict ./my-dinounet scan.png --out mask.png")
    s.add_argument("model")
    s.add_argument("file", help="image or video file")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--out", help="write the result here (segmentation: the label mask as a PNG, plus an overlay)")
    s.add_argument("--device", default="cpu")

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
    return p


def _cmd_list(a) -> None:
    import zoo
    from zoo.registry import get_entry

    rows = []
    for name in zoo.list_models(a.pattern):
        e = get_entry(name)
        rows.append((name, e.family, e.task, f"{e.params / 1e9:.2f}B", e.source.repo))
    if not rows:
        print(f"no registered model matches {a.pattern!r}" if a.pattern else "the registry is empty", file=sys.stderr)
        return
    widths = [max(len(r[i]) for r in rows) for i in range(4)]  # columns as wide as their longest value
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")


def _cmd_info(a) -> None:
    from pathlib import Path

    from zoo.registry import get_entry
    from zoo.weights.format import CARD_FILE

    path = Path(a.model)
    if path.is_dir():
        print(path.joinpath(CARD_FILE).read_text() if path.joinpath(CARD_FILE).is_file() else "")
        print(path.joinpath("config.json").read_text())
        return
    e = get_entry(a.model)
    if a.json:
        print(json.dumps(e.to_dict(), indent=2))
        return
    print(f"{e.name}: {e.description}")
    print(f"  family {e.family} · task {e.task} · {e.params:,} parameters · license {e.license}")
    if e.extra.get("license_url"):
        print(f"  license text {e.extra['license_url']}")
    print(f"  source {e.source.host}:{e.source.repo}@{e.source.revision} (layout {e.source.layout})")
    if e.extra.get("download"):
        print(f"  weights given out on request: {e.extra['download']}")
    print(f"  paper  {e.paper}")
    print("  published config:")
    for k, v in e.config.items():
        print(f"    {k:24s} {v}")
    from zoo.loading import zoo_home

    card = zoo_home() / "models" / e.name / CARD_FILE
    if card.is_file():
        print("\n" + card.read_text())


def _cmd_convert(a) -> None:
    import zoo

    if not a.max_shard_size > 0 or a.max_shard_size == float("inf"):
        raise ValueError(f"--max-shard-size {a.max_shard_size}: must be a finite number of GiB > 0")
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


def _cmd_generate(a) -> None:
    import zoo

    options = {} if a.compile is None else {"compile": a.compile}  # (shape models have no decoding step)
    zoo.load(a.model, dtype=a.dtype, device=a.device, tp=a.tp, quantize=a.quantize, **options).cli_generate(a)


def _cmd_predict(a) -> None:
    import zoo

    if a.top_k < 1:
        raise ValueError(f"--top-k {a.top_k}: must be an integer >= 1")
    zoo.load(a.model, device=a.device).cli_predict(a)


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


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause, each with a message that names the cause: bad arguments and input (ValueError,
    of which CheckpointError and DistributedConfigError are kinds), names (UnknownModelError), files, disks and
    the network (OSError: FileNotFoundError, FileExistsError, PermissionError, ConnectionError, ENOSPC, ...),
    a missing optional dependency (ImportError), and memory (MemoryError, torch.OutOfMemoryError)."""
    import torch

    from zoo.registry import UnknownModelError

    return (ValueError, UnknownModelError, OSError, ImportError, MemoryError, torch.OutOfMemoryError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; an expected error is printed on one line to stderr with exit status 2 (130 on ^C)."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
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
        print(f"zoo {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
