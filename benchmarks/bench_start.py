"""Start-up cost: `import zoo` + load + first token, against a bare `import torch`, each in a fresh process.

    python benchmarks/bench_start.py                 # the embedded model and a Qwen2-0.5B-shaped checkpoint
    python benchmarks/bench_start.py --no-05b        # the embedded model only (seconds)
    python benchmarks/bench_start.py --isa avx2 --profile   # the AVX2 paths, and where the first token's time goes

What a user waits for before the first token of `zoo generate`: the interpreter importing torch and zoo, the
checkpoint being opened (files in the page cache: warm start; sha256 already recorded as verified), the model
built and its weights mapped, and one token generated. Each step is timed inside a fresh process; the best of
--repeats processes is kept. Also lists which heavy modules `import zoo` pulls in before they are needed.
`--isa avx2` sets ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 in the measured processes (an AVX-512
machine running its AVX2 paths); `--profile` adds, per model, the operators that took the first token's time
(torch.profiler, one more process), which says what is left for the kernels.
Writes its section of BENCHMARKS.md ("start").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, update_section  # noqa: E402

HEAVY = ("torch.distributed.tensor", "sympy", "torch._dynamo", "torch._inductor", "transformers", "timm", "triton",
         "huggingface_hub", "jinja2", "PIL", "tokenizers", "torchvision", "scipy", "av")

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
mode, target, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"import_torch": t_torch - t0}
if mode != "torch":
    import zoo
    t_zoo = time.perf_counter()
    out["import_zoo"] = t_zoo - t_torch
    out["heavy"] = sorted(m for m in json.loads(sys.argv[4]) if m in sys.modules)
    if mode in ("generate", "profile"):
        model = zoo.load(target)
        t_load = time.perf_counter()
        out["load"] = t_load - t_zoo
        if mode == "profile":
            with torch.profiler.profile() as prof:
                model.generate(prompt, max_new_tokens=1, temperature=0)
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
            out["ops"] = [(e.key, e.count, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total)
                          for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]]
        first = model.generate(prompt, max_new_tokens=1, temperature=0)
        out["first_token"] = time.perf_counter() - t_load
        out["isa"] = torch.backends.cpu.get_cpu_capability()
out["total"] = time.perf_counter() - t0
print(json.dumps(out))
"""


ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
ENV: dict[str, str] = {}  # what --isa adds to the measured processes' environment


def probe(mode: str, target: str, prompt, zoo_home: str) -> dict:
    env = {**os.environ, "ZOO_HOME": zoo_home, **ENV}
    done = subprocess.run([sys.executable, "-c", PROBE, mode, target, json.dumps(prompt), json.dumps(HEAVY)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {target}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(n: int, *args) -> dict:
    runs = [probe(*args) for _ in range(n)]
    return min(runs, key=lambda r: r["total"])


def make_05b(work: Path) -> Path:
    """A Qwen2-0.5B-shaped checkpoint (random bf16 weights saved by transformers), converted to zoo's format."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import zoo

    hf, native = work / "hf", work / "native"
    if not native.exists():
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                          rms_norm_eps=1e-6, max_position_embeddings=32768)
        if not hf.exists():
            torch.manual_seed(0)
            Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(hf)
        zoo.convert(hf, native, progress=False)
    return native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-05b", action="store_true", help="skip the Qwen2-0.5B-shaped checkpoint")
    ap.add_argument("--dir", type=Path, help="keep the 0.5B checkpoint here (bench_decode.py's --dir works too)")
    ap.add_argument("--prompt-tokens", type=int, default=8, help="the 0.5B-shaped model's prompt (default 8)")
    ap.add_argument("--isa", choices=sorted(ISA_ENV), help="force ATen's and oneDNN's instruction set")
    ap.add_argument("--profile", action="store_true", help="also list the operators the first token spent its time in")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    a = ap.parse_args()
    if a.prompt_tokens < 1 or a.repeats < 1:
        ap.error("--prompt-tokens and --repeats must be at least 1")
    ENV.update(ISA_ENV.get(a.isa, {}))
    home = tempfile.mkdtemp(prefix="zoo-home-")  # one ZOO_HOME: files are hashed on the first load only
    cases = [("qwen2-tiny-stdlib (embedded, 5.8M parameters)", "qwen2-tiny-stdlib", "def fibonacci(n):")]
    if not a.no_05b:
        work = a.dir or Path(tempfile.mkdtemp(prefix="zoo-bench-start-"))
        native = make_05b(work)
        cases.append((f"Qwen2-0.5B shape (bf16, 494M parameters, {a.prompt_tokens}-token prompt)", str(native),
                      list(range(100, 100 + a.prompt_tokens))))
    torch_only = best_of(a.repeats, "torch", "", None, home)["total"]
    import_zoo = best_of(a.repeats, "import", "", None, home)
    rows, profiles = [], []
    for label, target, prompt in cases:
        probe("generate", target, prompt, home)  # first load: hashes the files, fills the page cache
        r = best_of(a.repeats, "generate", target, prompt, home)
        rows.append((label, r))
        print(label, json.dumps(r), flush=True)
        if a.profile:
            ops = probe("profile", target, prompt, home)["ops"]
            profiles.append((label, ops))
            print("  first token's operators:", json.dumps(ops), flush=True)
    lines = [
        "## Start-up: import + load + first token (`benchmarks/bench_start.py`)",
        "",
        f"Machine: {machine()}; measured processes dispatch to **{rows[0][1].get('isa', '?')}**"
        f"{f' (forced: --isa {a.isa})' if a.isa else ''}. Fresh process per measurement, best of {a.repeats}; "
        "files in the page cache and already verified (the first load of a checkpoint also hashes it).  ",
        f"Bare `python -c 'import torch'`: {torch_only:.2f} s. `import zoo` after torch: "
        f"{import_zoo['import_zoo']:.2f} s; heavy modules it imports: {', '.join(import_zoo['heavy']) or 'none'}.",
        "",
        "| model | import torch (s) | import zoo (s) | load (s) | first token (s) | total (s) | over bare torch (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['import_torch']:.2f} | {r['import_zoo']:.2f} | {r['load']:.2f} | "
                     f"{r['first_token']:.2f} | {r['total']:.2f} | {r['total'] - torch_only:.2f} |")
    for label, ops in profiles:
        lines += ["", f"Where the first token's time goes, {label} (torch.profiler, self CPU time):", ""]
        lines += [f"- {name}: {count} calls, {sec:.2f} s ({share:.0%})" for name, count, sec, share in ops]
    text = "\n".join(lines)
    if not a.no_write:
        update_section("start" if not a.isa else f"start-{a.isa}", text)
    print(text)


if __name__ == "__main__":
    main()
