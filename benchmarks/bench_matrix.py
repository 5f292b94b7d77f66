"""The whole matrix, one machine, one run: zoo in {fp32, bf16} x {none, int8, int4} x {default, compile on, compile
off} next to transformers at the same float dtype and llama.cpp at the same bits (issue 20's goals, cell by cell).

    python benchmarks/bench_matrix.py                      # every cell, Qwen2-0.5B shape (about 20 minutes)
    python benchmarks/bench_matrix.py --quick              # a smoke run: 2 layers, a small vocabulary, < 60 s
    python benchmarks/bench_matrix.py --isa avx2 --llama-cpp-path /work/llama_avx2   # the AVX2 paths on any x86
    python benchmarks/bench_matrix.py --cells 'zoo-bf16-*,transformers-bf16,llama.cpp-bf16'

The checkpoint, its GGUF files and the workers are bench_decode.py's: a Qwen2-0.5B-shaped checkpoint with random
bf16 weights (zoo's int8 / int4 cells load it stored quantised by `zoo convert --quantize`, as llama.cpp's Q8_0 /
Q4_K_M cells read files its quantizer wrote). Every cell runs in its own fresh process with the same thread count,
best of --repeats generations in each of --rounds rounds over all cells. Per cell:

- decode tokens/s: the tokens after the first, timed apart from the prefill;
- prefill (s): the time to the first token of a --prompt-tokens prompt (prefill and the first token), warm;
- first call (s): the first generation of the process (4 tokens), what a user meets: one-time preparation of the
  kernels and, on compile-on cells, the compile. Compile-on cells first run a throwaway process that fills the
  Inductor cache (its first call is the cold compile, reported too), so the measured process meets a warm compile;
- whether the decoding went through the compiled step.

zoo's default cells pass no compile= and run without ZOO_COMPILE: what `zoo.load(dir)` then `generate(...)` does.
The Inductor cache is the benchmark's own (under --dir) unless TORCHINDUCTOR_CACHE_DIR is set.
`--isa avx2` sets ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 for the zoo and transformers workers (the
AVX2 kernels on an AVX-512 machine); pair it with `--llama-cpp-path DIR`, a llama-cpp-python built with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF" and installed with `pip install --target DIR`.

PASS / MISS per cell, issue 20's goals: decode at or above transformers at the same dtype (every cell); on default
cells, decode >= 1.0x llama.cpp bf16, >= 0.9x Q8_0 for int8, >= 1.0x Q4_K_M for int4; prefill within 1.5x
llama.cpp's at the same bits; a default cell that chose the compiled step where compile-off decodes faster misses.
Writes the table into BENCHMARKS.md (section "matrix-<isa>") unless --no-write.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (  # noqa: E402
    make_checkpoints,
    module_bytes_per_token,
    prompt_ids,
    worker_bandwidth,
    worker_llama_cpp,
    worker_transformers,
)
from common import update_section  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
QUANTS = ("none", "int8", "int4")
MODES = ("default", "on", "off")  # compile= not given / True / False
LLAMA = {"none": "llama.cpp-bf16", "int8": "llama.cpp-Q8_0", "int4": "llama.cpp-Q4_K_M"}  # same bits a weight
LLAMA_FILES = {"llama.cpp-bf16": "model-bf16.gguf", "llama.cpp-Q8_0": "model-q8_0.gguf",
               "llama.cpp-Q4_K_M": "model-q4_k_m.gguf"}
# issue 20, goal 1: a default cell's decode against llama.cpp at the same bits; goal 2: prefill within 1.5x
DECODE_GOAL = {"none": 1.0, "int8": 0.9, "int4": 1.0}
PREFILL_GOAL = 1.5
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
           "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}}
QUICK = dict(layers=2, vocab=32000, new_tokens=8, prompt_tokens=16, rounds=1, repeats=1)


def zoo_cells() -> dict[str, dict]:
    return {f"zoo-{d}-{q}-{m}": {"dtype": DTYPES[d], "quant": q, "mode": m}
            for d in DTYPES for q in QUANTS for m in MODES}


def all_cells() -> dict[str, tuple[str, dict]]:
    cells = {name: ("zoo", opts) for name, opts in zoo_cells().items()}
    cells.update({f"transformers-{d}": ("transformers", {"dtype": DTYPES[d]}) for d in DTYPES})
    cells.update({name: ("llama.cpp", {"file": f}) for name, f in LLAMA_FILES.items()})
    return cells


def select(patterns: str | None, cells: dict) -> list[str]:
    """The cells named by comma-separated names or shell patterns (all when None); an unknown one is an error."""
    if not patterns:
        return list(cells)
    chosen = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        hits = [c for c in cells if fnmatch.fnmatchcase(c, pattern)]
        if not hits:
            raise SystemExit(f"--cells: {pattern!r} names no cell; cells are {', '.join(cells)}")
        chosen += [c for c in hits if c not in chosen]
    return [c for c in cells if c in chosen]  # the matrix's order


# -- workers (each in a fresh process) ---------------------------------------------------------------------------


def worker_zoo(args, opts: dict) -> dict:
    import torch

    import zoo
    from zoo import generation

    torch.set_num_threads(args.threads)
    kwargs = {"dtype": getattr(torch, opts["dtype"])}
    if opts["mode"] != "default":
        kwargs["compile"] = opts["mode"] == "on"
    directory = args.paths["native"] if opts["quant"] == "none" else args.paths[f"native-{opts['quant']}"]
    t = time.perf_counter()
    model = zoo.load(directory, **kwargs)
    load_s = time.perf_counter() - t

    def run(prompt, n):
        return model.generate(prompt, max_new_tokens=n, temperature=0, stream=True)

    t = time.perf_counter()
    stream = run(args.prompt, min(4, args.new_tokens))
    next(stream)
    first_token_s = time.perf_counter() - t
    list(stream)
    first_call_s = time.perf_counter() - t
    best = {"ttft": float("inf"), "tok_s": 0.0}
    for _ in range(args.repeats):
        stamps = []
        start = time.perf_counter()
        for _tok in run(args.prompt, args.new_tokens):
            stamps.append(time.perf_counter())
        best["ttft"] = min(best["ttft"], stamps[0] - start)
        if len(stamps) > 1:
            best["tok_s"] = max(best["tok_s"], (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    step = generation._STEPS.get(model.module)
    module = model.module
    return {**best, "load_s": load_s, "first_token_s": first_token_s, "first_call_s": first_call_s,
            "compiled": bool(step is not None and step.batches and not step.failed),
            "isa": torch.backends.cpu.get_cpu_capability(),
            "bytes_per_token": module_bytes_per_token(module, getattr(module, "lm_head", None) is None)}


def worker(kind: str, args, opts: dict) -> dict:
    args.model_dir, args.hf_dir, args.gguf_dir = args.paths["native"], args.paths["hf"], args.paths["gguf"]
    args.device = "cpu"
    if kind == "llama.cpp" and args.llama_cpp_path:
        sys.path.insert(0, args.llama_cpp_path)  # a second llama-cpp-python build (e.g. AVX2 only)
    if kind == "zoo":
        return worker_zoo(args, opts)
    if kind == "transformers":
        out = worker_transformers(args, opts)
        out["isa"] = __import__("torch").backends.cpu.get_cpu_capability()
        return out
    if kind == "llama.cpp":
        out = worker_llama_cpp(args, opts)
        import llama_cpp

        out["built"] = str(Path(llama_cpp.__file__).parent.parent)
        return out
    if kind == "machine":
        from common import machine

        return {"machine": machine(), **(worker_bandwidth(args) if opts.get("bandwidth") else {})}
    raise SystemExit(f"unknown worker {kind}")


# -- parent ------------------------------------------------------------------------------------------------------


def run_worker(kind: str, args, opts: dict | None = None, timeout: float = 1800, env_extra: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens), "--vocab",
           str(args.vocab or 0), "--opts", json.dumps(opts or {}), "--paths", json.dumps(args.paths)]
    if args.llama_cpp_path:
        cmd += ["--llama-cpp-path", args.llama_cpp_path]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "ZOO_HOME": args.paths["zoo_home"]}
    env.pop("ZOO_COMPILE", None)  # the default cells are the default; the others pass compile= themselves
    if kind != "llama.cpp" and args.isa:
        env.update(ISA_ENV[args.isa])
    env.update(env_extra or {})
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode < 0 or done.returncode > 128:  # killed by a signal (a crash inside a native library)
        sig = -done.returncode if done.returncode < 0 else done.returncode - 128
        return {"error": f"crashed (signal {sig})", "crashed": True}
    if done.returncode != 0 or not lines:
        last = [ln for ln in done.stderr.strip().splitlines() if "Error" in ln or "error" in ln]
        return {"error": (last or done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def run_llama(args, opts: dict) -> dict:
    """A llama.cpp cell; where its repacked weight layouts (AMX, ...) crash the process, again without them."""
    if opts["file"] not in CRASHED:
        got = run_worker("llama.cpp", args, opts)
        if not got.get("crashed"):
            return got
        CRASHED[opts["file"]] = got["error"]
    again = run_worker("llama.cpp", args, opts, env_extra={"ZOO_BENCH_LLAMA_REPACK": "0"})
    if "tok_s" in again:
        again["note"] = f"{CRASHED[opts['file']]} with llama.cpp's repacked weight layouts; measured without them"
    return again


CRASHED: dict[str, str] = {}  # GGUF files whose cells crashed with repacked layouts (retried without, every round)


def verdict(name: str, r: dict, results: dict) -> str:
    """PASS, or MISS and the goals missed (see the module's docstring); "-" where nothing can be compared."""
    opts = zoo_cells().get(name)
    if opts is None or "tok_s" not in r:
        return "-"
    d = "fp32" if opts["dtype"] == "float32" else "bf16"
    missed, compared = [], False
    hf = results.get(f"transformers-{d}", {}).get("tok_s")
    if hf:
        compared = True
        if r["tok_s"] < hf:
            missed.append("< transformers")
    anchor = results.get(LLAMA[opts["quant"]], {})
    if anchor.get("tok_s") and opts["mode"] == "default" and not (d == "fp32" and opts["quant"] == "none"):
        compared = True
        goal = DECODE_GOAL[opts["quant"]]
        if r["tok_s"] < goal * anchor["tok_s"]:
            missed.append(f"decode < {goal}x llama.cpp")
    if anchor.get("ttft") and not (d == "fp32" and opts["quant"] == "none"):
        compared = True
        if r["ttft"] > PREFILL_GOAL * anchor["ttft"]:
            missed.append(f"prefill > {PREFILL_GOAL}x llama.cpp")
    if opts["mode"] == "default" and r.get("compiled"):
        off = results.get(name.removesuffix("default") + "off", {}).get("tok_s")
        if off:
            compared = True
            if off > r["tok_s"]:
                missed.append("compiled by default, slower than eager")
    if not compared:
        return "-"
    return "MISS: " + "; ".join(missed) if missed else "PASS"


def table(results: dict, cold: dict) -> list[str]:
    lines = ["| cell | decode tok/s | vs transformers | vs llama.cpp, same bits | prefill (s) | prefill vs llama.cpp | "
             "first call (s) | compiled | goals |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, r in results.items():
        if "tok_s" not in r:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} | | | | | | | |")
            continue
        opts = zoo_cells().get(name)
        hf = lcpp = None
        if opts is not None:
            d = "fp32" if opts["dtype"] == "float32" else "bf16"
            hf = results.get(f"transformers-{d}", {})
            if not (d == "fp32" and opts["quant"] == "none"):
                lcpp = (LLAMA[opts["quant"]], results.get(LLAMA[opts["quant"]], {}))
        vs_hf = f"{r['tok_s'] / hf['tok_s']:.2f}x" if hf and hf.get("tok_s") else "-"
        vs_lcpp = f"{r['tok_s'] / lcpp[1]['tok_s']:.2f}x ({lcpp[0].split('-')[1]})" if lcpp and lcpp[1].get(
            "tok_s") else "-"
        pre = f"{r['ttft'] / lcpp[1]['ttft']:.2f}x" if lcpp and lcpp[1].get("ttft") else "-"
        first = f"{r['first_call_s']:.2f}" if "first_call_s" in r else "-"
        if name in cold:
            first += f" (cold {cold[name]:.1f})"
        compiled = ("yes" if r.get("compiled") else "no") if "compiled" in r else "-"
        lines.append(f"| {name} | {r['tok_s']:.1f} | {vs_hf} | {vs_lcpp} | {r['ttft']:.3f} | {pre} | {first} | "
                     f"{compiled} | {verdict(name, r, results)} |")
    return lines


def speedups(results: dict, isa: str) -> list[str]:
    """compile-on over compile-off decode per weights: the rows of zoo.generation.COMPILED_SPEEDUP this run
    measured (the table the default decision reads)."""
    out = []
    for d, dtype in DTYPES.items():
        for q in QUANTS:
            on = results.get(f"zoo-{d}-{q}-on", {}).get("tok_s")
            off = results.get(f"zoo-{d}-{q}-off", {}).get("tok_s")
            if on and off:
                weights = dtype if q == "none" else q
                out.append(f'("cpu", "{isa}", "{weights}"): {on / off:.2f},  # {on:.1f} / {off:.1f} ({d})')
    return out


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=positive, default=24, help="24 = the real Qwen2-0.5B depth")
    ap.add_argument("--new-tokens", type=positive, default=64)
    ap.add_argument("--prompt-tokens", type=positive, default=64)
    ap.add_argument("--threads", type=positive, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=positive, default=2, help="generations per process; the best is kept")
    ap.add_argument("--rounds", type=positive, default=2, help="rounds over all cells; each cell keeps its best")
    ap.add_argument("--cells", help="comma-separated cell names or shell patterns (default: all), e.g. "
                                    "'zoo-bf16-*,transformers-bf16,llama.cpp-bf16'")
    ap.add_argument("--isa", choices=sorted(ISA_ENV), help="force ATen's and oneDNN's instruction set for the zoo "
                                                            "and transformers workers")
    ap.add_argument("--llama-cpp-path", help="import llama_cpp from this directory (pip install --target DIR), e.g. "
                                             "a build for the --isa instruction set")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 60 s): 2 layers, vocabulary 32000, 8 new tokens, 16-token prompt, one round "
                         "of one generation, no compile-on cells unless --cells names them")
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help="keep checkpoints and the Inductor cache here (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.llama_cpp_path and not (Path(args.llama_cpp_path) / "llama_cpp").is_dir():
        ap.error(f"--llama-cpp-path {args.llama_cpp_path}: no llama_cpp package in that directory")
    if args.quick:
        for key, value in QUICK.items():
            if ap.get_default(key) == getattr(args, key) or key == "vocab":
                setattr(args, key, value)
    args.vocab = args.vocab or None
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        args.paths = json.loads(args.paths)
        args.prompt = prompt_ids(args.prompt_tokens, min(151643, args.vocab or 151643))
        print(json.dumps(worker(args.worker, args, json.loads(args.opts))), flush=True)
        return

    cells = all_cells()
    wanted = select(args.cells, cells)
    if args.quick and not args.cells:
        wanted = [c for c in wanted if not c.endswith("-on")]
    work = args.dir or Path(tempfile.mkdtemp(prefix="zoo-bench-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, native_dir, gguf_dir, notes = make_checkpoints(work, args.layers, args.vocab)
    args.paths = {"native": str(native_dir), "hf": str(hf_dir), "gguf": str(gguf_dir),
                  "zoo_home": str(work / "zoo_home"),
                  **{f"native-{q}": str(work / f"native-{q}") for q in ("int8", "int4")}}
    # the compile-on cells' Inductor cache: the benchmark's own, so "cold" is cold (unless the user set one)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "zoo_home" / "inductor"))
    host = run_worker("machine", args, {"bandwidth": not args.quick})
    read = f"plain read (torch.sum over 1 GiB) {host['read_gbs']:.1f} GB/s" if "read_gbs" in host else ""
    print(host.get("machine"), read, flush=True)

    cold = {}  # compile-on cells: the first call of a throwaway process, which fills the Inductor cache
    for name in wanted:
        if name.endswith("-on"):
            got = run_worker("zoo", args, cells[name][1])
            cold[name] = got.get("first_call_s", float("nan"))
            print("warm-up", name, f"first call {cold[name]:.1f} s", flush=True)
    results: dict[str, dict] = {}
    for r in range(args.rounds):
        shift = r % len(wanted)
        for name in wanted[shift:] + wanted[:shift]:
            engine, opts = cells[name]
            got = run_llama(args, opts) if engine == "llama.cpp" else run_worker(engine, args, opts)
            print(f"round {r + 1}", name, json.dumps(got), flush=True)
            if name not in results or got.get("tok_s", 0) > results[name].get("tok_s", 0):
                results[name] = got
    results = {name: results[name] for name in wanted}

    isa = next((r["isa"] for r in results.values() if "isa" in r), "?")
    builds = sorted({r["built"] for r in results.values() if "built" in r})
    command = "python benchmarks/bench_matrix.py" + "".join(
        f" {flag}" for flag, on in (("--quick", args.quick), (f"--isa {args.isa}", args.isa),
                                    (f"--llama-cpp-path {args.llama_cpp_path}", args.llama_cpp_path),
                                    (f"--layers {args.layers}", args.layers != 24 and not args.quick)) if on)
    lines = [
        f"## The matrix on {isa}: zoo vs transformers vs llama.cpp (`benchmarks/bench_matrix.py`)",
        "",
        f"Machine: {host.get('machine', '?')}; ATen dispatches to **{isa}**"
        f"{f' (forced: --isa {args.isa})' if args.isa else ''}{'; ' + read if read else ''}.  ",
        f"llama.cpp: llama-cpp-python from {', '.join(builds) or '-'}.  ",
        f"Checkpoint: Qwen2-0.5B shape ({args.layers} layers, vocab {args.vocab or 151936}, tied head), random bf16 "
        f"weights; prompt {args.prompt_tokens} tokens, greedy, {args.new_tokens} new tokens; best of {args.repeats} "
        f"generations in each of {args.rounds} rounds, each cell in a fresh process with {args.threads} threads.  ",
        f"Command: `{command}`",
        "",
        *table(results, cold),
        "",
        "Cells: zoo-<dtype>-<weights>-<compile: default (none given) | on | off>. Prefill: time to the first token "
        "(warm). First call: the process's first 4-token generation (one-time preparation; compile-on cells: the "
        "warm compile, and in brackets the cold one of the throwaway process that filled the Inductor cache).",
    ]
    measured = speedups(results, isa)
    if measured:
        lines += ["", "Compiled over eager decode measured here (zoo.generation.COMPILED_SPEEDUP's form):", "",
                  "```", *measured, "```"]
    notes += [f"{name}: {r['note']}" for name, r in results.items() if "note" in r]
    lines += ["", *[f"Note: {n}" for n in notes]]
    text = "\n".join(lines)
    if not args.no_write and not args.quick:
        update_section(f"matrix-{isa.lower()}", text)
    print(text)


if __name__ == "__main__":
    main()
