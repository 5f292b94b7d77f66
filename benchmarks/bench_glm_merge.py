"""Peak memory of converting a GLM-130B-layout checkpoint (SAT tensor-parallel rank files) against its size.

    python benchmarks/bench_glm_merge.py                       # 256 MB, 1 GB, 4 GB synthetic checkpoints
    python benchmarks/bench_glm_merge.py --sizes 100 --tp 2 --json   # what tests/test_glm.py runs
    python benchmarks/bench_glm_merge.py --quant 256           # INT8/INT4 bytes and logits error against fp16

For each size a synthetic checkpoint is written in the exact published layout (DIR/latest,
DIR/<iteration>/mp_rank_XX_model_states.pt holding {"module": state_dict}, fp16, GLM-130B's tensor names and
per-rank shapes with the GLU-split dense_h_to_4h, rotary buffers included), with GLM-130B's proportions
(inner = 8/3 hidden, 8 rank files). A fresh process then imports zoo, notes its peak RSS (VmHWM), converts the
checkpoint with `zoo.convert` and notes the peak again; the growth is what the conversion held at once.
It is compared with the checkpoint's total size and with its largest merged tensor: streaming keeps it a small
multiple of the latter, whatever the former.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shape_for(total_mb: float, tp: int) -> dict:
    """GLM-130B's proportions scaled to about total_mb MB of fp16: 8 layers, vocab = 8 x hidden."""
    layers, heads = 8, 16
    hidden = math.sqrt(total_mb * 1e6 / (2 * layers * (4 + 3 * 8 / 3) + 2 * 8))
    unit = heads * 8 * tp  # whole heads per rank, GeGLU halves that split evenly
    hidden = max(unit, int(round(hidden / unit)) * unit)
    inner = (8 * hidden // 3) // (2 * tp) * (2 * tp)
    return dict(num_layers=layers, hidden_size=hidden, inner_hidden_size=inner, num_attention_heads=heads,
                vocab_size=8 * hidden, max_sequence_length=2048)


def write_checkpoint(directory: Path, args: dict, tp: int) -> tuple[int, int]:
    """Write the rank files one at a time; returns (total bytes, largest merged tensor bytes)."""
    import torch

    h, inner, v, n = args["hidden_size"], args["inner_hidden_size"], args["vocab_size"], args["num_layers"]
    hd = h // args["num_attention_heads"]
    (directory / "49300").mkdir(parents=True)
    (directory / "latest").write_text("49300")
    (directory / "model_config.json").write_text(json.dumps(args))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    total = 0
    for r in range(tp):
        sd = {"transformer.word_embeddings.weight": rnd(v // tp, h),
              "transformer.final_layernorm.weight": torch.ones(h).half(),
              "transformer.final_layernorm.bias": torch.zeros(h).half()}
        for i in range(n):
            p = f"transformer.layers.{i}."
            sd.update({
                p + "input_layernorm.weight": torch.ones(h).half(), p + "input_layernorm.bias": torch.zeros(h).half(),
                p + "attention.query_key_value.weight": rnd(3 * h // tp, h),
                p + "attention.query_key_value.bias": rnd(3 * h // tp),
                p + "attention.dense.weight": rnd(h, h // tp), p + "attention.dense.bias": torch.zeros(h).half(),
                p + "attention.rotary_emb.inv_freq": (1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)).half(),
                p + "post_attention_layernorm.weight": torch.ones(h).half(),
                p + "post_attention_layernorm.bias": torch.zeros(h).half(),
                p + "mlp.dense_h_to_4h.weight": rnd(2 * inner // tp, h),
                p + "mlp.dense_h_to_4h.bias": rnd(2 * inner // tp),
                p + "mlp.dense_4h_to_h.weight": rnd(h, inner // tp),
                p + "mlp.dense_4h_to_h.bias": torch.zeros(h).half(),
            })
        torch.save({"module": sd}, directory / "49300" / f"mp_rank_{r:02d}_model_states.pt")
        total += sum(t.numel() * t.element_size() for t in sd.values())
        del sd
    largest = 2 * max(v * h, 2 * inner * h, 3 * h * h)
    return total, largest


MEASURE = """
import json, sys
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
import torch, zoo
from zoo.conversion import convert
convert(sys.argv[3], sys.argv[4], progress=False)  # a tiny one first: one-time costs are not the conversion's
before = hwm()
convert(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"before": before, "after": hwm()}))
"""


def measure(src: Path, out: Path, warm: Path) -> dict:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out), str(warm), str(warm) + "-native"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"conversion failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quant_report(work: Path, size_mb: float) -> list[dict]:
    """Weight bytes and logits error of INT8 / INT4 (GLM-130B's scheme, packed, fp32 compute) against fp16, on a
    synthetic checkpoint of GLM-130B's proportions (random weights: the errors show the arithmetic, not quality)."""
    import torch

    import zoo

    src = work / "quant-sat"
    write_checkpoint(src, shape_for(size_mb, 2), 2)
    native = zoo.convert(src, work / "quant-native", progress=False)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    rows, reference = [], None
    for quantize in (None, "int8", "int4"):
        stored = zoo.load(native, quantize=quantize)  # fp16 as released (packed rows, fp16 scales and biases)
        weights = sum(t.numel() * t.element_size() for name, t in stored.module.state_dict().items()
                      if ".attn." in name or ".mlp." in name)
        model = zoo.load(native, dtype=torch.float32, quantize=quantize)  # compute in fp32, weights packed
        with torch.no_grad():
            logits = model(ids)
        reference = logits if reference is None else reference
        err = (logits - reference).abs()
        rows.append({"weights": quantize or "fp16", "linear_bytes": weights, "max_abs_err": float(err.max()),
                     "mean_abs_err": float(err.mean()), "logit_scale": float(reference.abs().max()),
                     "top1_agree": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())})
    shutil.rmtree(src)
    shutil.rmtree(work / "quant-native")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[256, 1024, 4096], help="checkpoint sizes in MB")
    p.add_argument("--tp", type=int, default=8, help="rank files (GLM-130B: 8)")
    p.add_argument("--work", help="scratch directory (default: a temporary one, removed afterwards)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--quant", type=float, metavar="MB", help="instead: INT8/INT4 weight bytes and logits error "
                   "against fp16 on a synthetic checkpoint of about MB megabytes")
    a = p.parse_args()
    if a.quant:
        work = Path(a.work or tempfile.mkdtemp(prefix="bench_glm_quant-"))
        rows = quant_report(work, a.quant)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        if a.json:
            print(json.dumps(rows))
            return
        print("| weights | linear-layer bytes | vs fp16 | max abs logit error | mean abs error | top-1 agreement |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            ratio = r["linear_bytes"] / rows[0]["linear_bytes"]
            print(f"| {r['weights']} | {r['linear_bytes'] / 2**20:,.1f} MiB | {ratio:.3f} | {r['max_abs_err']:.4f} "
                  f"(logits up to {r['logit_scale']:.1f}) | {r['mean_abs_err']:.5f} | {r['top1_agree']:.3f} |")
        return
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_glm_merge-"))
    rows = []
    try:
        warm = work / "warm"
        write_checkpoint(warm, shape_for(1, a.tp), a.tp)
        for size in a.sizes:
            args = shape_for(size, a.tp)
            src, out = work / f"sat-{size:g}", work / f"native-{size:g}"
            total, largest = write_checkpoint(src, args, a.tp)
            m = measure(src, out, warm)
            rows.append({"size_mb": size, "hidden": args["hidden_size"], "layers": args["num_layers"],
                         "rank_files": a.tp, "total_bytes": total, "largest_tensor_bytes": largest,
                         "peak_growth_bytes": m["after"] - m["before"], "baseline_bytes": m["before"]})
            shutil.rmtree(src)
            shutil.rmtree(out)
            shutil.rmtree(str(warm) + "-native")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(rows))
        return
    print("| checkpoint | rank files | largest merged tensor | peak RSS growth | growth / largest | growth / total |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        g, big, tot = r["peak_growth_bytes"], r["largest_tensor_bytes"], r["total_bytes"]
        print(f"| {tot / 2**20:,.0f} MiB (hidden {r['hidden']}) | {r['rank_files']} | {big / 2**20:,.1f} MiB "
              f"| {g / 2**20:,.1f} MiB | {g / big:.2f} | {g / tot:.3f} |")


if __name__ == "__main__":
    main()
