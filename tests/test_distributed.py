"""Running one model over several devices: tensor parallel (DTensor over torchrun + gloo) and device maps.

The tensor-parallel job is one torchrun launch (2 CPU ranks, gloo) shared by the tests below: it loads every
tiny language-model checkpoint with tp=2 and a wide checkpoint for the per-rank memory check. TP=1 is the
ordinary in-process zoo.load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from tests import helpers
from tests.helpers import max_abs_diff
from zoo.device_map import check_device, memory_limits, parse_size, plan_device_map
from zoo.family import families
from zoo.loading import DistributedConfigError
from zoo.tensor_parallel import TORCHRUN_ENV
from zoo.testing.native import write_random_native

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

# Wide and shallow, so one rank's share is clearly smaller than the whole (~380 MB of fp32 weights).
WIDE = dict(vocab_size=8192, dim=1024, n_layers=5, n_heads=8, n_kv_heads=4, intermediate_size=4096,
            rope_theta=10000.0, tie_embeddings=False)


# Tiny-checkpoint builder (tests/helpers.py) of every language-model family; a family that lands without one
# fails test_every_language_model_family_is_checked_under_tensor_parallelism.
BUILDERS = {"qwen2": "tiny_qwen2", "phi4": "tiny_phi3", "qwen2_moe": "tiny_qwen2_moe"}


def lm_builders() -> dict:
    """Builders of the registered language-model families whose builder has landed, plus Qwen2 with an untied
    output head (the tied and untied heads take different vocab-parallel paths)."""
    out = {}
    for name, fam in sorted(families().items()):
        builder = getattr(helpers, BUILDERS.get(name, f"tiny_{name}"), None)
        if fam.task == "text-generation" and builder is not None:
            out[name] = builder
    if "qwen2" in out:
        out["qwen2-untied"] = lambda path: helpers.tiny_qwen2(path, tie=False)
    return out


def test_every_language_model_family_is_checked_under_tensor_parallelism():
    lms = {name for name, fam in families().items() if fam.task == "text-generation" and fam.tp_plan}
    assert lms and lms <= set(lm_builders()), f"no tiny builder for {sorted(lms - set(lm_builders()))}"


def test_a_family_without_a_tp_plan_is_refused_by_name_before_anything_is_read(tmp_path):
    """Recurrent families (xLSTM, MatMul-free) declare no plan: tp is refused at once, not deep in torchrun."""
    from zoo.weights.format import NativeConfig, write_config

    unsplittable = [fam for fam in families().values() if fam.task == "text-generation" and not fam.tp_plan]
    assert unsplittable
    for fam in unsplittable:
        directory = tmp_path / fam.name
        directory.mkdir()
        write_config(directory, NativeConfig(family=fam.name, config=fam.entries[0].config))
        with pytest.raises(DistributedConfigError, match=f"the {fam.name} family declares no tensor-parallel plan"):
            zoo.load(directory, tp=2)


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    # glibc hands blocks over 128 KiB back to the system when freed, so peak RSS counts what the loader holds,
    # not temporaries the heap kept (which made the memory bounds below depend on the allocator's history)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    for var in TORCHRUN_ENV:
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def tp_job(tmp_path_factory):
    """Convert every tiny LM, write the wide checkpoint, run the 2-rank job once."""
    base = tmp_path_factory.mktemp("tp")
    models = {}
    for name, build in lm_builders().items():
        build(base / f"{name}-hf")
        models[name] = zoo.convert(base / f"{name}-hf", base / name, progress=False)
    wide_bytes = write_random_native(base / "wide", "qwen2", WIDE)
    corrupt = base / "corrupt"
    shutil.copytree(models["qwen2"], corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:  # flip one byte of weight data, keep the size
        f.seek(-4, 2)
        last = f.read(1)
        f.seek(-4, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    torchrun(str(ROOT / "tests" / "tp_worker.py"), "--rss", str(base / "wide"), "--rss-quantize", "int8",
             "--corrupt", str(corrupt),
             str(base / "out"),
             *(f"{n}={d}" for n, d in models.items()))
    return {"out": base / "out", "models": models, "wide_bytes": wide_bytes}


def _rank_results(tp_job, name: str) -> list[dict]:
    return [json.loads((tp_job["out"] / f"{name}.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", sorted(lm_builders()))
def test_tp2_logits_and_greedy_tokens_equal_tp1(tp_job, name):
    model = zoo.load(tp_job["models"][name], dtype=torch.float32)
    helpers.assert_ranks_equal_whole(model, tp_job["out"] / f"{name}.logits.pt", _rank_results(tp_job, name), 1e-5,
                                     distinct=5)


def test_tp2_decodes_through_the_compiled_step_with_the_same_tokens(tp_job):
    """The compiled decoding step traces the sharded weights (their linears keep their sharding rules; the
    single-row multiply-and-reduce rewrite is for plain tensors): one graph, the eager path's greedy tokens."""
    for r in _rank_results(tp_job, "qwen2"):
        assert r["compiled"] == {"greedy": r["greedy"], "graphs": 1, "failed": False}


@pytest.mark.parametrize("name", sorted(lm_builders()))
def test_tp2_shards_attention_heads_mlp_and_vocabulary(tp_job, name):
    placements = _rank_results(tp_job, name)[0]["placements"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert placements[f"layers.0.attn.{proj}.weight"] == "Shard(0)"
    assert placements["layers.0.attn.o_proj.weight"] == "Shard(1)"
    assert placements["embed.weight"] == "Shard(0)"  # vocab-parallel (see BENCHMARKS.md for why)
    if not name.endswith("tied") and "lm_head.weight" in placements:
        assert placements["lm_head.weight"] == "Shard(0)"


def test_each_rank_reads_only_its_share_of_the_weights(tp_job):
    full = tp_job["wide_bytes"]
    for r in range(2):
        m = json.loads((tp_job["out"] / f"rss.rank{r}.json").read_text())
        assert m["local_bytes"] < 0.51 * full  # half of every matrix; only the norms are whole
        grew = m["loaded"] - m["baseline"]
        assert grew < 0.65 * full, f"rank {r}: peak RSS grew {grew / MiB:.0f} MiB for a {full / MiB:.0f} MiB model"


def test_each_rank_packs_only_its_share_while_loading(tp_job):
    """quantize="int8" with tp=2: a rank keeps its half of the packed weights (int8: a quarter of the float bytes
    in all) and never holds the float model: the float rows are packed a block at a time (the job runs with
    MALLOC_MMAP_THRESHOLD_=131072, so freed temporaries leave the peak: see torchrun)."""
    full = tp_job["wide_bytes"]
    for r in range(2):
        m = json.loads((tp_job["out"] / f"rss_quantized.rank{r}.json").read_text())
        assert m["packed_bytes"] < 0.15 * full
        grew = m["loaded"] - m["baseline"]
        assert grew < 0.65 * full, f"rank {r}: peak RSS grew {grew / MiB:.0f} MiB for a {full / MiB:.0f} MiB model"


def test_tp_refuses_a_damaged_checkpoint_on_every_rank(tp_job):
    # the ranks share the hashing (file i is checked by rank i % tp); every rank must still refuse
    for r in range(2):
        error = json.loads((tp_job["out"] / f"corrupt.rank{r}.json").read_text())["error"]
        assert error and "model.safetensors: sha256 mismatch" in error


def _tiny_tokenizer(directory: Path) -> None:
    """A small BPE tokenizer (ids < 256, the tiny model's vocabulary) with a Metaspace round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = ["the quick brown fox jumps over the lazy dog", "a model zoo loads models on many devices",
            "tensor parallel splits heads and columns", "def fibonacci(n): return n if n < 2 else n"]
    tok.train_from_iterator(text * 4, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def test_cli_generate_with_tp2_prints_once_what_one_process_generates(tmp_path):
    helpers.tiny_qwen2(tmp_path / "hf")
    _tiny_tokenizer(tmp_path / "hf")
    native = zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    prompt = "the quick brown fox"
    expected = prompt + zoo.load(native).generate(prompt, max_new_tokens=12, temperature=0.0) + "\n"
    assert len(expected) > len(prompt) + 4
    proc = torchrun("-m", "zoo", "generate", str(native), prompt, "--tp", "2", "--max-new-tokens", "12",
                    "--temperature", "0")
    assert proc.stdout == expected


# -- errors before loading ---------------------------------------------------------------------------------


@pytest.fixture
def weightless(tmp_path):
    """A converted tiny Qwen2 (4 heads, 2 key/value heads) whose weight files are then deleted: an error
    raised on it was raised before any weight was read."""
    helpers.tiny_qwen2(tmp_path / "hf")
    native = zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    for f in native.glob("*.safetensors"):
        f.unlink()
    return native


def test_tp_outside_torchrun_says_how_to_launch(weightless, monkeypatch):
    for var in TORCHRUN_ENV:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedConfigError, match=r"torchrun --nproc-per-node 2"):
        zoo.load(weightless, tp=2)


def test_tp_different_from_world_size_is_refused(weightless, monkeypatch):
    helpers.torchrun_env(monkeypatch, world=1)
    with pytest.raises(DistributedConfigError, match=r"tp=2 but this job has 1 processes"):
        zoo.load(weightless, tp=2)


def test_tp_not_dividing_key_value_heads_is_refused_naming_the_degrees_that_work(weightless, monkeypatch):
    helpers.torchrun_env(monkeypatch, world=4)
    with pytest.raises(DistributedConfigError, match=r"2 key/value heads of layers.0.attn.k_proj.*not supported.*"
                                                      r"\[1, 2\]"):
        zoo.load(weightless, tp=4)
    assert not torch.distributed.is_initialized()


def test_tp_not_dividing_query_heads_is_refused(weightless, monkeypatch):
    helpers.torchrun_env(monkeypatch, world=3)
    with pytest.raises(DistributedConfigError, match=r"tp=3 does not divide the 4 heads of layers.0.attn.q_proj"):
        zoo.load(weightless, tp=3)


@pytest.mark.parametrize("device", ["tpu:0", "cuda:3", "gpu"])
def test_device_map_naming_a_missing_device_is_refused(weightless, device):
    if device == "cuda:3" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    for kw in ({"device_map": {"": device}}, {"device_map": "auto", "max_memory": {device: "1GiB"}}):
        with pytest.raises(DistributedConfigError, match=r"device '\w+(:\d)?' does not exist|unknown device") as e:
            zoo.load(weightless, **kw)
        assert repr(device) in str(e.value)


def test_max_memory_smaller_than_one_block_is_refused(weightless):
    with pytest.raises(DistributedConfigError, match=r"too small for even one block \(layers.0: 0.1 MiB\)"):
        zoo.load(weightless, device_map="auto", max_memory={"cpu": "20KiB"})


def test_device_map_missing_a_block_is_refused(weightless):
    with pytest.raises(DistributedConfigError, match="does not place layers.1"):
        zoo.load(weightless, device_map={"embed": "cpu", "norm": "cpu", "layers.0": "cpu"})


# -- device maps -------------------------------------------------------------------------------------------


def test_parse_size_reads_bytes_and_units():
    assert parse_size(1234) == 1234
    assert parse_size("500MiB") == 500 * MiB
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("64kB") == 64_000
    for bad in ("lots", "-1GiB", -5, True):
        with pytest.raises(DistributedConfigError):
            parse_size(bad)


def test_memory_limits_put_accelerators_first_and_default_cpu_to_available_ram():
    limits = memory_limits({"cpu": "1GiB"})
    assert limits == {"cpu": 2**30}
    assert memory_limits({})["cpu"] > 0


def test_planner_fills_devices_in_order_then_disk():
    blocks = [(f"layers.{i}", 100) for i in range(6)]
    head, placed = plan_device_map(50, blocks, {"cuda:0": 260, "cpu": 200})
    assert head == "cuda:0"
    # with disk in play, cuda:0 keeps room for one streamed block: 260 - 100 - 50 = 110 -> one block
    assert list(placed.values()) == ["cuda:0", "cpu", "cpu", "disk", "disk", "disk"]


def test_planner_keeps_pipeline_order_and_places_everything_when_it_fits():
    blocks = [("a", 100), ("b", 100), ("c", 5)]
    head, placed = plan_device_map(0, blocks, {"cuda:0": 105, "cuda:1": 1000, "cpu": 0})
    # "c" would fit in what "a" left on cuda:0, but blocks never go back to an earlier device
    assert head == "cuda:0" and placed == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:1"}
    head, placed = plan_device_map(30, [("x", 10)], {"cpu": 1000})
    assert head == "cpu" and placed == {"x": "cpu"}


def test_planner_puts_a_head_too_big_for_the_first_device_on_the_next():
    head, placed = plan_device_map(500, [("l0", 100), ("l1", 100)], {"cuda:0": 250, "cpu": 600})
    assert head == "cpu" and placed == {"l0": "cuda:0", "l1": "cuda:0"}


def test_planner_refuses_a_first_device_smaller_than_one_block():
    with pytest.raises(DistributedConfigError, match=r"cuda:0 .* too small for even one block \(l1"):
        plan_device_map(0, [("l0", 10), ("l1", 300)], {"cuda:0": 200, "cpu": 10**9})


def test_check_device_accepts_cpu_and_disk():
    assert check_device("cpu") == "cpu" and check_device("disk") == "disk"


@pytest.fixture
def tiny(tmp_path):
    helpers.tiny_qwen2(tmp_path / "hf", tie=False)
    return zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_blocks_streamed_from_disk_give_the_in_memory_logits(tiny, dtype):
    ref = zoo.load(tiny, dtype=dtype)
    model = zoo.load(tiny, dtype=dtype, device_map={"embed": "cpu", "norm": "cpu", "lm_head": "cpu",
                                                     "layers.0": "cpu", "layers.1": "disk"})
    assert model.device_map["layers.1"] == "disk"
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_abs_diff(model(ids), ref(ids)) == 0.0
    streamed = model.module.layers[1].mlp.up_proj.weight
    # between passes the streamed block is the memory-mapped file as stored (fp32), not a converted copy
    assert streamed.dtype == torch.float32
    assert model.module.layers[0].mlp.up_proj.weight.dtype == (dtype or torch.float32)
    prompt = ids[0, :6].tolist()
    assert model.generate(prompt, max_new_tokens=16) == ref.generate(prompt, max_new_tokens=16)
    assert model.module.layers[1].mlp.up_proj.weight is streamed  # put back after every pass


def test_auto_map_with_little_memory_streams_the_rest_and_matches(tiny):
    ref = zoo.load(tiny)
    block = sum(p.numel() * 4 for p in ref.module.layers[0].parameters())
    head = sum(p.numel() * 4 for n, p in ref.module.named_parameters() if not n.startswith("layers."))
    # room for the head and one and a half blocks: a block streams through the slot kept for it, so none stays
    model = zoo.load(tiny, device_map="auto", max_memory={"cpu": head + block * 3 // 2})
    assert model.device_map == {"embed": "cpu", "norm": "cpu", "lm_head": "cpu", "layers.0": "disk",
                                "layers.1": "disk"}
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_abs_diff(model(ids), ref(ids)) == 0.0
    assert zoo.load(tiny, device_map="auto", max_memory={"cpu": head + 2 * block}).device_map["layers.1"] == "cpu"


def test_a_streamed_tied_head_matches(tmp_path):
    helpers.tiny_qwen2(tmp_path / "hf", tie=True)
    native = zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    ref = zoo.load(native, dtype=torch.float64)
    model = zoo.load(native, dtype=torch.float64, device_map={"": "disk", "layers.0": "cpu"})
    assert model.device_map == {"embed": "disk", "norm": "disk", "layers.0": "cpu", "layers.1": "disk"}
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_abs_diff(model(ids), ref(ids)) == 0.0
    assert model.generate(ids[0, :5].tolist(), max_new_tokens=10) == ref.generate(ids[0, :5].tolist(),
                                                                                  max_new_tokens=10)
