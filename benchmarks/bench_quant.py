"""What weight-only quantisation costs in accuracy and saves in memory, on the embedded trained model.

    python benchmarks/bench_quant.py                  # qwen2-tiny-stdlib, about a minute on 2 cores
    python benchmarks/bench_quant.py --no-write       # print only

The embedded model (qwen2-tiny-stdlib, trained on the Python standard library) is loaded in bf16 (the reference),
and with `quantize=` each of int8 (per output channel) and int4 (groups of 128, asymmetric), also fp32 for scale.
Text: the standard-library files its training script held out (scripts/train_tiny_stdlib.py), so none was
trained on. Reported against bf16, per scheme:

- weight bytes held by the loaded model (parameters and buffers) and their ratio to bf16;
- logits over --windows windows of --seq held-out tokens: max and mean absolute difference, and the mean
  difference over the spread (std) of bf16's logits; top-1 agreement over every position; held-out loss;
- greedy agreement: --prompts prompts (the first 32 tokens of held-out files), --new-tokens tokens each; the share
  of generated tokens before the first divergence, and how many prompts give the very same tokens.

Writes its section of BENCHMARKS.md ("quant").
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, update_section  # noqa: E402

import zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "qwen2-tiny-stdlib"
HEADER = ("| weights | held | / bf16 | max logit diff | mean logit diff | mean diff / spread | top-1 same as bf16 "
          "| held-out loss (nats/token) | greedy tokens before first divergence | identical greedy sequences |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
ROWS = [("fp32", dict(dtype=torch.float32)), ("int8", dict(quantize="int8")), ("int4", dict(quantize="int4"))]


def held_out_texts() -> list[str]:
    spec = importlib.util.spec_from_file_location("train_tiny_stdlib", ROOT / "scripts" / "train_tiny_stdlib.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return [train.read(p) for p in train.stdlib_files()[1]]


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.module.parameters(), *model.module.buffers()))


@torch.inference_mode()
def logits_of(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(w[None]).float() for w in windows])


def greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model.compile = False  # the same decoding path for every row: the numbers, not the compiler, are compared
    return [model.generate(p, max_new_tokens=new_tokens, temperature=0) for p in prompts]  # greedy


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, int]:
    """Share of tokens generated before the first divergence, and how many sequences are identical."""
    before = 0
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        before += n
    return before / sum(len(a) for a in ref), sum(a == b for a, b in zip(ref, got))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    ref = zoo.load(MODEL, dtype=torch.bfloat16)
    texts = held_out_texts()
    ids = [ref.tokenizer.encode(t) for t in texts]
    stream = torch.tensor([i for doc in ids for i in doc])
    step = max(a.seq, (len(stream) - a.seq) // a.windows)
    windows = torch.stack([stream[s:s + a.seq] for s in range(0, step * a.windows, step)])
    prompts = [doc[:32] for doc in ids if len(doc) >= 32][:a.prompts]
    ref_logits = logits_of(ref, windows)
    targets = windows[:, 1:].reshape(-1)

    def loss(lg: torch.Tensor) -> float:
        return float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), targets))

    ref_tokens = greedy(ref, prompts, a.new_tokens)
    spread = float(ref_logits.std())
    rows = [f"| bf16 (reference) | {weight_bytes(ref) / 2**20:.1f} MiB | 1.00 | - | - | - | 100% | "
            f"{loss(ref_logits):.4f} | 100% | {len(prompts)}/{len(prompts)} |"]
    for name, kw in ROWS:
        model = zoo.load(MODEL, **kw)
        lg = logits_of(model, windows)
        diff = (lg - ref_logits).abs()
        top1 = float((lg.argmax(-1) == ref_logits.argmax(-1)).float().mean())
        share, same = agreement(ref_tokens, greedy(model, prompts, a.new_tokens))
        rows.append(f"| {name} | {weight_bytes(model) / 2**20:.1f} MiB | {weight_bytes(model) / weight_bytes(ref):.2f} "
                    f"| {float(diff.max()):.3f} | {float(diff.mean()):.4f} | {float(diff.mean()) / spread:.4f} "
                    f"| {100 * top1:.1f}% | {loss(lg):.4f} | {100 * share:.0f}% | {same}/{len(prompts)} |")
        print(rows[-1], flush=True)
        del model

    body = f"""## Weight-only quantisation on the embedded model (`benchmarks/bench_quant.py`)

Command: `python benchmarks/bench_quant.py`. Machine: {machine()}.
Model: {MODEL} (5.8M parameters, trained on the Python standard library; its vocabulary of 8192 makes the tied
embedding most of it). Text: the {len(texts)} standard-library files its training held out; logits over
{a.windows} windows of {a.seq} tokens; greedy decoding of {a.new_tokens} tokens after {len(prompts)} prompts (each
file's first 32 tokens). All against the model loaded in bf16; "mean diff / spread" divides the mean absolute
logit difference by the standard deviation of bf16's logits ({spread:.2f}).

{HEADER}
""" + "\n".join(rows) + """

int8 is per output channel (symmetric, one scale a row), int4 groups of 128 input columns with a scale and an
offset each (asymmetric), both from `zoo.load(..., quantize=...)`; the tied embedding is held once, int8, for
lookups and the output head alike. A greedy divergence is where two near-tied tokens swap; after it the
continuations differ by construction, so "before first divergence" is the measure, not the share of equal tokens.
"""
    print(body)
    if not a.no_write:
        update_section("quant", body)


if __name__ == "__main__":
    main()
