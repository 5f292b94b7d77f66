"""Vision inference throughput: zoo next to timm and transformers on the same weights, batch 1 and 32.

    python benchmarks/bench_vision.py                          # all pairs, CPU (about 20 minutes on 2 cores)
    python benchmarks/bench_vision.py --only swinv2-timm --batches 1 --rounds 1    # a quick try
    python benchmarks/bench_vision.py --compile                # adds zoo under torch.compile (Inductor, frozen)

Pairs (random weights, no download; the reference saves its own checkpoint, zoo converts it):
- swinv2-timm:          Swin V2-T (swinv2_tiny_window8_256) in timm vs zoo converted from timm's safetensors;
- swinv2-transformers:  the same shape as transformers' Swinv2ForImageClassification vs zoo converted from it;
- videomae2-transformers: VideoMAE V2 ViT-S/16 K710 shape (16 x 224^2 frames, 710 classes) as transformers'
  VideoMAEForVideoClassification vs zoo converted from it.

fp32, inference mode, --threads threads. Each pair runs alternating rounds (zoo, reference, zoo, ...) so drift on
a shared machine hits both; the median of the rounds is kept. Logits are compared first (max abs difference).
Writes its section of BENCHMARKS.md ("vision").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, update_section  # noqa: E402

PAIRS = ("swinv2-timm", "swinv2-transformers", "videomae2-transformers")


def randomize(model: torch.nn.Module) -> None:
    """Random values where the reference initialises to constants (timm zero-inits Swin V2's post-norms, which
    would make every block the identity and the comparison meaningless)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def build_pair(name: str, work: Path):
    """(zoo model, reference callable, input maker, label)."""
    import zoo

    if name == "swinv2-timm":
        import timm
        from timm.models._hub import save_for_hf

        ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False).eval()
        randomize(ref)
        save_for_hf(ref, work / name, safe_serialization=True)
        make = lambda b: (torch.randn(b, 3, 256, 256),)
        call = ref
        label = f"Swin V2-T 256px window 8 (timm {timm.__version__})"
    elif name == "swinv2-transformers":
        import transformers
        from transformers import Swinv2Config, Swinv2ForImageClassification

        cfg = Swinv2Config(image_size=256, window_size=8, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                           num_labels=1000)
        model = Swinv2ForImageClassification(cfg).eval()
        randomize(model)
        model.save_pretrained(work / name)
        make = lambda b: (torch.randn(b, 3, 256, 256),)
        call = lambda x: model(pixel_values=x).logits
        label = f"Swin V2-T 256px window 8 (transformers {transformers.__version__})"
    elif name == "videomae2-transformers":
        import transformers
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification

        cfg = VideoMAEConfig(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=384,
                             num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, layer_norm_eps=1e-6,
                             num_labels=710, use_mean_pooling=True)
        model = VideoMAEForVideoClassification(cfg).eval()
        randomize(model)
        model.save_pretrained(work / name)
        make = lambda b: (torch.randn(b, 3, 16, 224, 224),)
        call = lambda x: model(pixel_values=x.transpose(1, 2)).logits  # transformers takes [B, T, C, H, W]
        label = f"VideoMAE V2 ViT-S/16, 16x224^2, 710 classes (transformers {transformers.__version__})"
    else:
        raise SystemExit(f"unknown pair {name}; pairs: {PAIRS}")
    zoo.convert(work / name, work / f"{name}-native", progress=False)
    ours = zoo.load(work / f"{name}-native").module.eval()
    return ours, call, make, label


def per_second(fn, inputs, batch: int, iters: int) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        for _ in range(iters):
            fn(*inputs)
        return iters * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated pairs out of {', '.join(PAIRS)}")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is kept")
    ap.add_argument("--samples", type=int, default=32, help="inputs per round and batch size (at least one batch)")
    ap.add_argument("--compile", action="store_true", help="also time zoo under torch.compile (frozen weights)")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    pairs = a.only.split(",") if a.only else list(PAIRS)
    batches = [int(b) for b in a.batches.split(",")]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in pairs:
            ours, ref, make, label = build_pair(name, Path(tmp))
            with torch.inference_mode():
                x = make(2)
                diff = (ours(*x) - ref(*x)).abs().max().item()
            compiled = None
            if a.compile:
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True  # weights are constants: packed once, folded into the graph
                compiled = torch.compile(ours)
            for batch in batches:
                inputs = make(batch)
                iters = max(1, a.samples // batch)
                runs = {"zoo": [], "reference": [], "zoo compiled": []}
                with torch.inference_mode():
                    ours(*inputs), ref(*inputs)  # warm-up (and oneDNN weight packing)
                    if compiled is not None:
                        t = time.perf_counter()
                        compiled(*inputs)
                        notes.append(f"{name} batch {batch}: torch.compile took {time.perf_counter() - t:.0f} s")
                for _ in range(a.rounds):
                    runs["zoo"].append(per_second(ours, inputs, batch, iters))
                    runs["reference"].append(per_second(ref, inputs, batch, iters))
                    if compiled is not None:
                        runs["zoo compiled"].append(per_second(compiled, inputs, batch, iters))
                med = {k: statistics.median(v) for k, v in runs.items() if v}
                rows.append((name, label, batch, med, diff))
                print(name, batch, {k: round(v, 3) for k, v in med.items()},
                      {k: [round(s, 3) for s in v] for k, v in runs.items() if v}, flush=True)

    header = "| pair | batch | zoo per s | reference per s | zoo / reference |"
    rule = "|---|---:|---:|---:|---:|"
    if a.compile:
        header += " zoo compiled per s | compiled / reference |"
        rule += "---:|---:|"
    lines = [
        "## Vision inference: zoo vs timm and transformers (`benchmarks/bench_vision.py`)",
        "",
        f"Machine: {machine()}; {a.threads} threads, fp32, inference mode, random weights (the reference's "
        f"checkpoint converted by zoo). Images (or clips) per second, median of {a.rounds} alternating rounds of "
        f"{a.samples} samples.  ",
        f"Command: `python benchmarks/bench_vision.py{' --compile' if a.compile else ''}`",
        "",
        header,
        rule,
    ]
    for name, _, batch, med, _ in rows:
        line = (f"| {name} | {batch} | {med['zoo']:.2f} | {med['reference']:.2f} | "
                f"{med['zoo'] / med['reference']:.2f}x |")
        if "zoo compiled" in med:
            line += f" {med['zoo compiled']:.2f} | {med['zoo compiled'] / med['reference']:.2f}x |"
        lines.append(line)
    lines.append("")
    for name, label, _, _, diff in {r[0]: r for r in rows}.values():
        lines.append(f"- {name}: {label}; max abs logit difference zoo vs reference {diff:.1e}.")
    lines += [f"- {n}" for n in notes]
    text = "\n".join(lines)
    if not a.no_write:
        update_section("vision", text)
    print(text)


if __name__ == "__main__":
    main()
