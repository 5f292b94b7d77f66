"""Swin V2-T (swinv2_tiny_window8_256 shape) images/s, zoo vs timm on the same weights, side by side.

Random weights (no download): timm builds the model, zoo converts timm's saved layout, both run the same
inputs in one process, alternating, fp32, inference mode. Writes its section of BENCHMARKS.md.

    python benchmarks/bench_swinv2.py [--threads 2] [--iters 10] [--batch-iters 2] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

import zoo

BEGIN, END = "<!-- swinv2 -->", "<!-- /swinv2 -->"


def images_per_s(fn, x: torch.Tensor, iters: int) -> float:
    with torch.inference_mode():
        fn(x)  # warm-up
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return iters * x.shape[0] / (time.perf_counter() - t)


def write_section(text: str, path: Path) -> None:
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    section = f"{BEGIN}\n{text.strip()}\n{END}"
    if BEGIN in old:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: section, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    path.write_text(new)


def main() -> None:
    import timm
    from timm.models._hub import save_for_hf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10, help="timed batch-1 iterations")
    ap.add_argument("--batch-iters", type=int, default=2, help="timed batch-32 iterations")
    ap.add_argument("--rounds", type=int, default=3, help="alternating zoo/timm rounds; the median is kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(ref, f"{tmp}/timm", safe_serialization=True)
        zoo.convert(f"{tmp}/timm", f"{tmp}/native", progress=False)
        model = zoo.load(f"{tmp}/native", device=a.device)
    ref = ref.to(a.device)
    x1 = torch.randn(1, 3, 256, 256, device=a.device)
    with torch.inference_mode():
        diff = (model(x1) - ref(x1)).abs().max().item()
    rows = []
    for batch, iters in ((1, a.iters), (32, a.batch_iters)):
        x = torch.randn(batch, 3, 256, 256, device=a.device)
        ours, theirs = [], []
        for _ in range(a.rounds):  # alternate so drift on a shared machine hits both
            ours.append(images_per_s(model.module, x, iters))
            theirs.append(images_per_s(ref, x, iters))
        ours_m, theirs_m = statistics.median(ours), statistics.median(theirs)  # robust to a noisy neighbour
        rows.append((batch, ours_m, theirs_m))
        print(f"batch {batch:2d}: zoo {ours_m:7.2f} img/s   timm {theirs_m:7.2f} img/s  (rounds: zoo "
              f"{', '.join(f'{v:.2f}' for v in ours)}; timm {', '.join(f'{v:.2f}' for v in theirs)})")

    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {a.threads} threads"
    lines = [
        "## Swin V2-T image classification (`benchmarks/bench_swinv2.py`)",
        "",
        f"swinv2_tiny_window8_256 shape (28.3M params, 256x256, window 8), random weights, fp32, inference mode; "
        f"{device}, torch {torch.__version__}, timm {timm.__version__}, {platform.machine()}. "
        f"Median of {a.rounds} alternating zoo/timm rounds; "
        f"batch 1: {a.iters} iterations, batch 32: {a.batch_iters}. "
        f"Max abs logit difference zoo vs timm: {diff:.1e}.",
        "",
        "| batch | zoo images/s | timm images/s | zoo / timm |",
        "|---:|---:|---:|---:|",
        *[f"| {b} | {o:.2f} | {t:.2f} | {o / t:.2f} |" for b, o, t in rows],
    ]
    write_section("\n".join(lines), Path(a.out))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
