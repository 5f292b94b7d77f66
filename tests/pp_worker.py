"""One rank of the pipeline-parallel test job (tests/test_pipeline.py launches it with torchrun).

    python -m torch.distributed.run --standalone --nproc-per-node N tests/pp_worker.py [--tp T] OUT NAME=DIR ...

Every NAME=DIR is loaded with tp=T, pp=N/T in fp32 and run: logits of fixed ids, greedy tokens, unseeded
sampled tokens, a padded batch; the tensors this rank read from the checkpoint are recorded.
Each rank writes OUT/NAME.rank{R}.json and OUT/NAME.rank{R}.logits.pt.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def run_model(name: str, directory: str, out: Path, rank: int, tp: int, quantize: str | None = None) -> None:
    from zoo.weights.reader import Checkpoint

    import zoo

    read: list[str] = []
    get, get_slice = Checkpoint.get, Checkpoint.get_slice

    def recording_get(self, key):
        read.append(key)
        return get(self, key)

    def recording_get_slice(self, key, *args):
        read.append(key)
        return get_slice(self, key, *args)

    Checkpoint.get, Checkpoint.get_slice = recording_get, recording_get_slice
    try:
        model = zoo.load(directory, pp=int(os.environ["WORLD_SIZE"]) // tp, tp=tp, dtype=torch.float32,
                          quantize=quantize)
    finally:
        Checkpoint.get, Checkpoint.get_slice = get, get_slice
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
    prompt = ids[0, :8].tolist()
    if name.startswith("glm"):
        prompt += [model.config.gmask_token_id, model.config.sop_token_id]  # blank filling at the end
    result = {
        "greedy": model.generate(prompt, max_new_tokens=16, temperature=0.0),
        "sampled": model.generate(prompt, max_new_tokens=8, temperature=1.0),  # unseeded: ranks must agree
        "batch": model.generate([prompt, prompt[:5]], max_new_tokens=6, temperature=0.0),
        "read": sorted(set(read)),
        "stage": model.pipeline_stage,
    }
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    torch.save(logits, out / f"{name}.rank{rank}.logits.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("models", nargs="*", help="NAME=DIR")
    p.add_argument("--tp", type=int, default=1)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for spec in a.models:
        name, _, path = spec.partition("=")
        directory, _, quantize = path.partition("@")  # NAME=DIR@SCHEME: quantised with SCHEME while loading
        run_model(name, directory, out, int(os.environ["RANK"]), a.tp, quantize or None)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
