"""Per-rank memory while loading under tensor parallelism, against what zoo.memory_plan says each rank holds.

    python benchmarks/bench_tp_memory.py [--tp 4,8] [--layers 8] [--dim 2048] [--rows fp16,int8,...] [--isolate]
        [--dir /tmp/zoo-bench-tp-memory] [--no-write]
    python benchmarks/bench_tp_memory.py --quick      # a tiny model at tp 2, a smoke run (< 30 s on an idle machine)

The model is GLM-130B scaled down (heads of 128, GeGLU inner width 8/3 of the hidden size, vocabulary 150528 / 8,
fp16 random weights). For each tensor-parallel degree N it writes the synthetic N-rank SAT checkpoint
(conversion/sat_glm.export_sat: OUT/latest, OUT/<iter>/mp_rank_XX_model_states.safetensors) and converts it as a
published one is converted, then loads it with tp=N in N gloo processes on the CPU (torch.distributed.run):

  fp16          the fp16 checkpoint converted from the N ranks
  int8 / int4   converted from the N ranks packed with per-rank scales (`--quantize int8-row-gN` / `int4-row-gN`,
                what GLM-130B's convert_tp.py writes at MP N), loaded with tp=N
  int8-load / int4-load   the fp16 checkpoint quantised while loading (zoo.load(tp=N, quantize=...-gN))

Each rank records its peak RSS growth while loading (VmHWM after the load minus its RSS before it; /proc/self/
clear_refs resets the peak between rows, malloc_trim hands freed memory back first; --isolate runs every row in
its own processes instead) and its RSS after the load, against the bytes zoo.memory_plan computes for one rank
(the packed bytes / N of the split tensors plus the replicated ones: what `zoo info glm-130b` states for the real
model). A row the loader refuses (quantize with tp before it is supported) says "refused: <why>".
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("fp16", "int8", "int4", "int8-load", "int4-load")
MIB = 2**20


def glm_shape(dim: int, layers: int) -> dict:
    """GLM-130B's proportions at hidden size `dim` (GLM-130B: 12288, 96 heads, inner 32768, vocabulary 150528)."""
    inner = (dim * 8 // 3 + 63) // 64 * 64  # a multiple of 64: whole GeGLU columns and int4 byte pairs per rank
    return dict(vocab_size=150528 // 8, dim=dim, n_layers=layers, n_heads=dim // 128, inner_size=inner)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    """Hand freed memory back (gc, malloc_trim), reset VmHWM to the current RSS; return that RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def worker(a) -> None:
    """One rank: load each row's checkpoint with tp=WORLD_SIZE, record the peak RSS growth of the load."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import parallel  # noqa: F401  (imported before the baseline)

    import zoo

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    jobs = json.loads(a.jobs)
    warm = next(iter(jobs.values()))  # one load first, not measured: code and one-time state are not the model's
    try:
        warm_model = zoo.load(warm["dir"], tp=tp, verify=False)
        del warm_model
    except Exception:  # noqa: BLE001  (the measured run reports it)
        pass
    for row, job in jobs.items():
        dist.barrier()
        before = _reset_peak()
        t0 = time.perf_counter()
        result: dict = {"row": row, "rank": rank, "tp": tp}
        try:
            model = zoo.load(job["dir"], tp=tp, quantize=job.get("quantize"), verify=False)
            result.update(load_s=time.perf_counter() - t0, peak_growth=_status("VmHWM") - before,
                          resident=_status("VmRSS") - before)
            del model
        except Exception as e:  # noqa: BLE001  (a refusal is a result: the row says why)
            result["refused"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        Path(a.out, f"{row}.tp{tp}.rank{rank}.json").write_text(json.dumps(result))
        gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def write_fp16(directory: Path, config: dict) -> None:
    """A native fp16 GLM checkpoint of random weights (std 0.02, norms 1), written tensor by tensor."""
    import torch
    from zoo.weights.format import NativeConfig, write_config
    from zoo.weights.writer import TensorSpec, write_tensors

    from zoo.family import get_family

    fam = get_family("glm")
    module = fam.build_meta(fam.config_from_dict(config))
    specs = [TensorSpec(k, tuple(v.shape), torch.float16) for k, v in module.state_dict().items()]
    gen = torch.Generator().manual_seed(0)

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name.endswith("norm.weight"):
            return torch.ones(spec.shape, dtype=torch.float16)
        return (torch.randn(spec.shape, generator=gen) * 0.02).half()

    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory, specs, produce, progress=False)
    write_config(directory, NativeConfig(family="glm", config=config, name=directory.name, task=fam.task))


def prepare(a, config: dict, tp: int, rows: list[str]) -> dict[str, dict]:
    """The checkpoints of one tensor-parallel degree (kept between runs: a directory with config.json is reused)."""
    from zoo.conversion.sat_glm import export_sat

    import zoo

    base = a.dir / f"glm-{config['dim']}d-{config['n_layers']}l"
    native, sat = base / "fp16-written", base / f"sat-tp{tp}"
    if not (native / "config.json").is_file():
        print(f"writing {native}", file=sys.stderr, flush=True)
        write_fp16(native, config)
    if not (sat / "latest").is_file():
        export_sat(native, sat, tp=tp, overwrite=True)
    jobs: dict[str, dict] = {}
    for row in rows:
        bits = row[3] if row.startswith("int") else None
        scheme = f"int{bits}-row-g{tp}" if bits else None
        if row.endswith("-load"):
            jobs[row] = {"dir": str(base / f"fp16-tp{tp}"), "quantize": scheme, "scheme": scheme}
            continue
        out = base / (f"fp16-tp{tp}" if scheme is None else f"{scheme}")
        if not (out / "config.json").is_file():
            print(f"converting {sat} -> {out}", file=sys.stderr, flush=True)
            zoo.convert(sat, out, quantize=scheme, progress=False, overwrite=True)
        jobs[row] = {"dir": str(out), "scheme": scheme}
    if any(r.endswith("-load") for r in rows) and not (base / f"fp16-tp{tp}" / "config.json").is_file():
        zoo.convert(sat, base / f"fp16-tp{tp}", progress=False, overwrite=True)
    return jobs


def launch(a, tp: int, jobs: dict[str, dict]) -> None:
    groups = [{r: j} for r, j in jobs.items()] if a.isolate else [jobs]
    for group in groups:
        payload = {r: {"dir": j["dir"], "quantize": j.get("quantize")} for r, j in group.items()}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
               str(Path(__file__).resolve()), "--worker", "--out", str(a.out), "--jobs", json.dumps(payload)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        print(f"tp={tp}: loading {', '.join(group)} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def summarise(a, config: dict, tp: int, jobs: dict[str, dict]) -> list[dict]:
    from zoo.memory_plan import need

    out = []
    for row, job in jobs.items():
        ranks = [json.loads(p.read_text()) for p in sorted(Path(a.out).glob(f"{row}.tp{tp}.rank*.json"))]
        expected = need("glm", config, "float16", job["scheme"], tp=tp).weights
        refused = next((r["refused"] for r in ranks if "refused" in r), None)
        out.append({"row": row, "tp": tp, "scheme": job["scheme"] or "float16", "expected": expected,
                    "refused": refused, "ranks": len(ranks),
                    "peak": max((r.get("peak_growth", 0) for r in ranks), default=0),
                    "resident": max((r.get("resident", 0) for r in ranks), default=0),
                    "load_s": max((r.get("load_s", 0) for r in ranks), default=0)})
    return out


def table(results: list[dict], config: dict, a) -> str:
    lines = [
        "## Per-rank memory while loading under tensor parallelism (benchmarks/bench_tp_memory.py)",
        "",
        f"GLM-130B's proportions scaled down: hidden {config['dim']}, {config['n_heads']} heads of 128, GeGLU inner "
        f"{config['inner_size']}, vocabulary {config['vocab_size']}, {config['n_layers']} layers; random fp16 "
        "weights, written as the N-rank SAT checkpoint and converted as a published one. Loaded with tp=N in N gloo "
        f"processes on the CPU ({os.cpu_count()} cores). Expected: the bytes one rank holds by zoo.memory_plan "
        "(the split tensors / N plus the replicated ones). Peak: the largest per-rank peak RSS growth while "
        "loading; peak - expected: what loading needs above the weights (read chunks, quantising temporaries: "
        "add it to `zoo info glm-130b`'s weights per GPU, scaling what grows with a tensor's size); resident: RSS "
        "growth once loaded." + (" Each row in its own processes." if a.isolate else ""),
        "",
        "| row | scheme | tp | expected per rank | peak per rank | peak - expected | resident per rank | load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["refused"]:
            lines.append(f"| {r['row']} | {r['scheme']} | {r['tp']} | {r['expected'] / MIB:.1f} MiB | "
                         f"refused: {r['refused']} | | | |")
            continue
        lines.append(f"| {r['row']} | {r['scheme']} | {r['tp']} | {r['expected'] / MIB:.1f} MiB | "
                     f"{r['peak'] / MIB:.1f} MiB | {(r['peak'] - r['expected']) / MIB:+.1f} MiB | "
                     f"{r['resident'] / MIB:.1f} MiB | "
                     f"{r['load_s']:.1f} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", default="4,8", help="tensor-parallel degrees, comma-separated (default 4,8)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=2048, help="hidden size, a multiple of 128 (heads of 128)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"which rows, comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--dir", type=Path, default=Path("/tmp/zoo-bench-tp-memory"))
    p.add_argument("--isolate", action="store_true", help="every row in its own processes (slower, no reuse)")
    p.add_argument("--quick", action="store_true", help="a tiny model at tp 2 (smoke run); implies --no-write")
    p.add_argument("--no-write", action="store_true", help="print the table instead of updating BENCHMARKS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--jobs", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    if a.quick:
        a.tp, a.layers, a.dim, a.no_write = "2", 2, 256, True
    try:
        a.degrees = [int(t) for t in a.tp.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tp {a.tp}: give whole numbers, comma-separated")
    if not a.degrees or min(a.degrees) < 1:
        p.error(f"--tp {a.tp}: each degree must be at least 1")
    a.row_list = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in a.row_list if r not in ROWS]
    if unknown or not a.row_list:
        p.error(f"--rows: unknown row(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}")
    if a.layers < 1:
        p.error("--layers must be at least 1")
    if a.dim < 128 or a.dim % 128:
        p.error(f"--dim {a.dim}: must be a positive multiple of 128 (heads of 128)")
    heads = a.dim // 128
    bad = [t for t in a.degrees if heads % t]
    if bad:
        p.error(f"--tp {','.join(map(str, bad))} does not divide the {heads} heads of --dim {a.dim}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.worker:
        return worker(a)
    config = glm_shape(a.dim, a.layers)
    a.out = a.dir / "results"
    a.out.mkdir(parents=True, exist_ok=True)
    for f in a.out.glob("*.json"):
        f.unlink()
    results = []
    for tp in a.degrees:
        jobs = prepare(a, config, tp, a.row_list)
        launch(a, tp, jobs)
        results += summarise(a, config, tp, jobs)
    section = table(results, config, a)
    print(section)
    if not a.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import update_section

        update_section("tp-memory", section)


if __name__ == "__main__":
    main()
