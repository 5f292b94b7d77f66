"""One rank of the tensor-parallel test job (tests/test_distributed.py launches it with torchrun).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py
        [--rss DIR] [--corrupt DIR] [--compiled NAME ...] OUT NAME=DIR ...

Every NAME=DIR (NAME=DIR@SCHEME: quantised with SCHEME while loading) is loaded with tp=WORLD_SIZE in fp32
and run: logits of fixed ids, greedy tokens, unseeded sampled tokens, a padded batch; for qwen2 (and --compiled
NAMEs) also greedy tokens through the compiled decoding step.
Then --rss DIR is loaded to measure this rank's peak RSS growth: peak RSS after loading it minus peak RSS
before (after imports, process group and the tiny models, so one-time costs such as code pages are not
counted as the model's); with --rss-quantize SCHEME, again packed while loading (OUT/rss_quantized.rank{R}.json).
--corrupt DIR must fail to load on every rank.
Each rank writes OUT/NAME.rank{R}.json; rank 0 also writes OUT/NAME.logits.pt. A model with packed weights also
writes OUT/NAME.rank{R}.packed.pt: the stored form of every packed tensor this rank holds.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def peak_rss() -> int:
    """Peak RSS of this process: VmHWM (ru_maxrss would start at the parent's RSS, which exec carries over)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Start VmHWM afresh at the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def compiled_greedy(model, prompt: list[int]) -> dict:
    """Greedy tokens through the compiled decoding step on sharded (DTensor) weights, and whether it compiled."""
    from zoo.generation import compiled_step

    model.compile = True
    try:
        tokens = model.generate(prompt, max_new_tokens=24)
    finally:
        model.compile = None
    step = compiled_step(model.module)
    return {"greedy": tokens, "graphs": step.graphs, "failed": step.failed}


COMPILED: list[str] = []  # --compiled NAME ...: also decode these through the compiled step


def run_model(name: str, directory: str, out: Path, rank: int, quantize: str | None = None) -> None:
    from torch.distributed.tensor import DTensor
    from zoo.architectures.quant import PACKED

    import zoo

    model = zoo.load(directory, tp=dist.get_world_size(), dtype=torch.float32, quantize=quantize)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids.to(model.device)).cpu()
    prompt = ids[0, :8].tolist()
    result = {
        "greedy": model.generate(prompt, max_new_tokens=24),
        "sampled": model.generate(prompt, max_new_tokens=8, temperature=1.0),  # unseeded: ranks must agree
        "batch": model.generate([prompt, prompt[:3]], max_new_tokens=6),
        "compiled": compiled_greedy(model, prompt) if name in ("qwen2", *COMPILED) else None,
        "placements": {n: f"Shard({p.placements[0].dim})" if p.placements[0].is_shard() else "Replicate"
                       for n, p in model.module.named_parameters() if isinstance(p, DTensor)},
    }
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    packed = {f"{path}.{k}": t for path, sub in model.module.named_modules() if isinstance(sub, PACKED)
              for k, t in sub.packed().items()}
    if packed:
        torch.save(packed, out / f"{name}.rank{rank}.packed.pt")
    if rank == 0:
        torch.save(logits, out / f"{name}.logits.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("models", nargs="*", help="NAME=DIR")
    p.add_argument("--rss", help="checkpoint to measure peak memory on")
    p.add_argument("--compiled", nargs="*", default=[], help="also decode these models through the compiled step")
    p.add_argument("--rss-quantize", help="also measure --rss DIR loaded with this quantize scheme")
    p.add_argument("--corrupt", help="a checkpoint with a damaged shard: record the error each rank raises")
    a = p.parse_args()
    COMPILED.extend(a.compiled)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    from torch.distributed.tensor import parallel  # noqa: F401  (imports and the process group are not the model)

    import zoo

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for item in a.models:
        name, _, spec = item.partition("=")
        directory, _, quantize = spec.partition("@")
        run_model(name, directory, out, rank, quantize or None)
    if a.corrupt:
        from zoo.weights.format import CheckpointError

        try:
            zoo.load(a.corrupt, tp=dist.get_world_size())
            message = None
        except CheckpointError as e:
            message = str(e)
        (out / f"corrupt.rank{rank}.json").write_text(json.dumps({"error": message}))
    if a.rss:  # after the tiny models: one-time costs (code pages, DTensor caches) are already paid
        from torch.distributed.tensor import DTensor

        gc.collect()
        baseline = peak_rss()
        model = zoo.load(a.rss, tp=dist.get_world_size(), dtype=torch.float32)
        loaded = peak_rss()
        local = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.module.parameters())
        stats = {"baseline": baseline, "loaded": loaded, "local_bytes": local}
        (out / f"rss.rank{rank}.json").write_text(json.dumps(stats))
        print(f"rank {rank}: {stats}", flush=True)
        if a.rss_quantize:  # the same checkpoint packed while loading: the peak measured afresh
            from zoo.architectures.quant import PACKED

            del model
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # the float model's freed pages back to the system
            reset_peak_rss()
            baseline = peak_rss()
            model = zoo.load(a.rss, tp=dist.get_world_size(), dtype=torch.float32, quantize=a.rss_quantize)
            loaded = peak_rss()
            local = sum(t.nbytes for m in model.module.modules() if isinstance(m, PACKED) for t in m.buffers())
            stats = {"baseline": baseline, "loaded": loaded, "packed_bytes": local}
            (out / f"rss_quantized.rank{rank}.json").write_text(json.dumps(stats))
            print(f"rank {rank} ({a.rss_quantize}): {stats}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
