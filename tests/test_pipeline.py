"""Pipeline parallelism (zoo.pipeline): consecutive blocks on stages, one torchrun process per stage (per
stage and shard with tp).

Two torchrun launches on CPU with gloo are shared by the job tests: pp=2 (2 ranks) and tp=2 x pp=2 (4 ranks).
Each loads a 4-layer Qwen2 (2 blocks per stage) and a tiny GLM-130B in the SAT layout (1 block per stage) and
runs them; pp=1 is the ordinary in-process zoo.load. The refusals need no processes: they come before any
weight is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from tests import helpers
from tests.helpers import max_abs_diff
from zoo.loading import DistributedConfigError
from zoo.pipeline import TORCHRUN_ENV, stage_bounds
from zoo.settings import SETTINGS
from zoo.testing.native import write_random_native

ROOT = Path(__file__).resolve().parents[1]
QWEN2 = dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=128,
             rope_theta=10000.0, tie_embeddings=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("pp")
    write_random_native(base / "qwen2", "qwen2", QWEN2)
    helpers.tiny_glm(base / "glm-sat")
    glm = zoo.convert(base / "glm-sat", base / "glm", progress=False)
    return {"qwen2": base / "qwen2", "glm": glm, "glm-int4": glm}


QUANTIZE = {"glm-int4": "int4-row"}  # packed while loading, by each stage (and tp rank) for its own blocks


@pytest.fixture(scope="module", params=[(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def pp_job(request, models, tmp_path_factory):
    tp, pp = request.param
    out = tmp_path_factory.mktemp(f"tp{tp}pp{pp}")
    # weight-only (ZOO_QUANT_ACTIVATIONS=0) for the packed model: a tensor-parallel rank quantises its own slice of x
    # in its own activation blocks, the whole model in others where blocks straddle the cut
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ZOO_QUANT_ACTIVATIONS": "0"}
    for var in TORCHRUN_ENV:
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}",
           str(ROOT / "tests" / "pp_worker.py"), "--tp", str(tp), str(out),
           *(f"{n}={d}" + (f"@{QUANTIZE[n]}" if n in QUANTIZE else "") for n, d in models.items())]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {"out": out, "models": models, "tp": tp, "pp": pp}


def _ranks(pp_job, name: str) -> list[dict]:
    return [json.loads((pp_job["out"] / f"{name}.rank{r}.json").read_text())
            for r in range(pp_job["tp"] * pp_job["pp"])]


@pytest.mark.parametrize("name", ["qwen2", "glm", "glm-int4"])
def test_pp2_logits_and_greedy_tokens_equal_pp1_on_every_rank(pp_job, name, monkeypatch):
    monkeypatch.setattr(SETTINGS, "quant_activations", False)  # as the ranks (pp_job)
    ranks = _ranks(pp_job, name)
    whole = zoo.load(pp_job["models"][name], dtype=torch.float32, quantize=QUANTIZE.get(name))
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1))  # the worker's ids
    with torch.no_grad():
        expected = whole(ids)
    for r in range(len(ranks)):
        logits = torch.load(pp_job["out"] / f"{name}.rank{r}.logits.pt")
        assert max_abs_diff(logits, expected) < 1e-4
    prompt = ids[0, :8].tolist()
    if name.startswith("glm"):
        prompt += [whole.config.gmask_token_id, whole.config.sop_token_id]
    greedy = whole.generate(prompt, max_new_tokens=16, temperature=0.0)
    assert len(set(greedy)) > 3
    batch = whole.generate([prompt, prompt[:5]], max_new_tokens=6, temperature=0.0)
    for result in ranks:
        assert result["greedy"] == greedy and result["batch"] == batch
        assert result["sampled"] == ranks[0]["sampled"]  # one random stream: every rank picks the same tokens


@pytest.mark.parametrize("name,n_layers", [("qwen2", 4), ("glm", 2), ("glm-int4", 2)])
def test_each_stage_reads_only_its_own_blocks(pp_job, name, n_layers):
    ranks = _ranks(pp_job, name)
    per = n_layers // pp_job["pp"]
    for r, result in enumerate(ranks):
        s = r // pp_job["tp"]  # ranks [s*tp, (s+1)*tp) form stage s
        assert result["stage"] == [s, [s * per, (s + 1) * per]]
        layers = {int(k.split(".")[1]) for k in result["read"] if k.startswith("layers.")}
        assert layers == set(range(s * per, (s + 1) * per))
    around = [{k for k in result["read"] if not k.startswith("layers.")} for result in ranks]
    assert all(a == around[0] for a in around) and "embed.weight" in around[0]  # embedding, norm, head: all


def test_stages_are_equal_runs_of_consecutive_blocks():
    assert stage_bounds(70, 2) == [(0, 35), (35, 70)]
    assert stage_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]


# -- refused before any weight is read ----------------------------------------------------------------------


@pytest.fixture
def weightless(tmp_path):
    """A 4-layer Qwen2 whose weight files are deleted: an error raised on it came before any weight was read."""
    write_random_native(tmp_path / "native", "qwen2", QWEN2)
    for f in (tmp_path / "native").glob("*.safetensors"):
        f.unlink()
    return tmp_path / "native"


def test_pp_not_dividing_the_blocks_is_refused_naming_the_degrees_that_work(weightless):
    with pytest.raises(DistributedConfigError, match=r"pp=3 does not divide the 4 blocks .*layers\.0 \.\. "
                                                      r"layers\.3.*\[1, 2, 4\]"):
        zoo.load(weightless, pp=3)
    assert not torch.distributed.is_initialized()


def test_pp_outside_torchrun_says_how_to_launch(weightless, monkeypatch):
    for var in TORCHRUN_ENV:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedConfigError, match=r"pp=2 runs one process per pipeline stage; launch with "
                                                      r"`torchrun --nproc-per-node 2"):
        zoo.load(weightless, pp=2)


def test_pp_different_from_world_size_is_refused(weightless, monkeypatch):
    for var, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(var, value)
    with pytest.raises(DistributedConfigError, match=r"pp=2 but this job has 4 processes"):
        zoo.load(weightless, pp=2)
    assert not torch.distributed.is_initialized()


def test_pp_with_a_device_map_is_refused_by_name(weightless):
    with pytest.raises(ValueError, match=r"pp=2 with device_map: pipeline stages and a device map are two ways"):
        zoo.load(weightless, pp=2, device_map="auto")


def test_pp_with_a_tp_not_dividing_the_heads_is_refused_before_any_process_is_asked(weightless):
    with pytest.raises(DistributedConfigError, match=r"tp=4 does not divide the 2 key/value heads.*\[1, 2\]"):
        zoo.load(weightless, pp=2, tp=4)
    assert not torch.distributed.is_initialized()


def test_tp_times_pp_outside_torchrun_asks_for_the_product(weightless, monkeypatch):
    for var in TORCHRUN_ENV:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedConfigError, match=r"pp=2 x tp=2 runs one process per pipeline stage and shard; "
                                                      r"launch with `torchrun --nproc-per-node 4"):
        zoo.load(weightless, pp=2, tp=2)
