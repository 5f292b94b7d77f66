"""zoo vs transformers on the same Qwen2-0.5B-shaped checkpoint (random weights saved by transformers).

    python benchmarks/bench_qwen2.py [--layers 24] [--new-tokens 32]

Measures, side by side in one run: load time and peak RSS growth of the load (each in a fresh
process, file already in the page cache), and greedy decode tokens/s, in fp32 and bf16. Writes the
table into BENCHMARKS.md (section "qwen2"). Ratios are what to read; absolute numbers are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, update_section  # noqa: E402

LOAD = """
import resource, sys, time, torch
torch.set_num_threads({threads})
kind, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if kind == "zoo":
    import zoo
    fn = lambda: zoo.load(path, dtype=dtype)
else:
    from transformers import Qwen2ForCausalLM
    fn = lambda: Qwen2ForCausalLM.from_pretrained(path, dtype=dtype)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); m = fn(); dt = time.perf_counter() - t
print(dt, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def measure_load(kind: str, path: Path, dtype: str, threads: int, zoo_home: Path | None = None) -> tuple[float, float]:
    env = {**os.environ, **({"ZOO_HOME": str(zoo_home)} if zoo_home else {})}
    out = subprocess.run([sys.executable, "-c", LOAD.format(threads=threads), kind, str(path), dtype],
                         capture_output=True, text=True, check=True, env=env).stdout.split()
    return float(out[-2]), float(out[-1])


@torch.inference_mode()
def decode_speed(generate, n_new: int, repeats: int = 2) -> float:
    generate(4)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        generate(n_new)
        best = min(best, time.perf_counter() - t)
    return n_new / best


def compare_decode(ours, ref, prompt: torch.Tensor, n_new: int) -> tuple[float, float, bool]:
    def hf(n: int) -> torch.Tensor:
        return ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    zs = decode_speed(lambda n: ours.generate(prompt, max_new_tokens=n, temperature=0), n_new)
    hs = decode_speed(hf, n_new)
    same = ours.generate(prompt, max_new_tokens=8, temperature=0)[0] == hf(8)[0, -8:].tolist()
    return zs, hs, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="24 = the real Qwen2-0.5B depth")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--dir", type=Path, help="keep the checkpoints here (default: a temp dir)")
    args = ap.parse_args()
    threads = torch.get_num_threads()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    import zoo

    work = args.dir or Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    hf_dir, native_dir = work / "hf", work / "native"
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                      rms_norm_eps=1e-6, max_position_embeddings=32768)
    if not hf_dir.exists():
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(hf_dir)  # published checkpoints are bf16
    if not native_dir.exists():
        zoo.convert(hf_dir, native_dir, progress=False)

    rows = []
    prompt = torch.randint(0, 151643, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    for dtype in ("float32", "bfloat16"):
        home = Path(tempfile.mkdtemp(prefix="zoo-home-"))  # no record of verified files yet
        measure_load("transformers", hf_dir, dtype, threads)  # page cache warm-up
        measure_load("zoo", native_dir, dtype, threads, Path(tempfile.mkdtemp()))
        first, _ = measure_load("zoo", native_dir, dtype, threads, home)  # hashes every file
        zt, zm = measure_load("zoo", native_dir, dtype, threads, home)  # files already verified
        ht, hm = measure_load("transformers", hf_dir, dtype, threads)
        ours = zoo.load(native_dir, dtype=getattr(torch, dtype))
        ref = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
        rows.append((dtype, first, zt, ht, zm, hm, *compare_decode(ours, ref, prompt, args.new_tokens)))
        print(json.dumps(rows[-1]), flush=True)

    gib = 2**30
    lines = [
        "## Qwen2-0.5B shape: zoo vs transformers",
        "",
        f"Machine: {machine()}.  ",
        f"Checkpoint: Qwen2-0.5B shape ({args.layers} layers, vocab 151936, tied), random bf16 weights saved by "
        f"transformers; prompt {args.prompt_tokens} tokens, greedy decode {args.new_tokens} tokens, best of 2.  ",
        "Load: fresh process, files in the page cache; memory is the growth of peak RSS during the load.  ",
        "Command: `python benchmarks/bench_qwen2.py`",
        "",
        "| dtype | first load zoo, hashing (s) | load zoo (s) | load transformers (s) | load speed-up | "
        "load RSS zoo (GiB) | load RSS transformers (GiB) | decode zoo (tok/s) | decode transformers (tok/s) | "
        "decode ratio | same greedy tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, first, zt, ht, zm, hm, zs, hs, same in rows:
        lines.append(f"| {dtype} | {first:.2f} | {zt:.2f} | {ht:.2f} | {ht / zt:.1f}x | {zm / gib:.2f} | "
                     f"{hm / gib:.2f} | {zs:.1f} | {hs:.1f} | {zs / hs:.2f}x | {'yes' if same else 'NO'} |")
    lines += [
        "",
        "The first load of a checkpoint hashes every file against the index (sha256, about 1 GB here); later "
        "loads trust files whose size and mtime are unchanged since (recorded in $ZOO_HOME/verified.json). "
        "bf16 loads map the stored bf16 tensors without copying, so their RSS growth is pages touched, ~0.",
    ]
    update_section("qwen2", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
