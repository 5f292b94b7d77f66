"""Packed weights split over tensor-parallel ranks (zoo.tensor_parallel) and placed by device maps (zoo.device_map).

One torchrun launch (2 CPU ranks, gloo, tests/tp_worker.py) loads tiny Qwen2, Qwen2-MoE (experts packed) and
GLM-130B in its SAT layout with tp=2: checkpoints stored packed by `zoo convert --quantize` and float ones
quantised while loading, int8 and int4; and GLM's published per-rank INT8/INT4 ranks. TP=1 is the ordinary
in-process zoo.load of the same checkpoint with the same scheme.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from zoo.architectures.quant import PACKED, PackedLinear

import zoo
from tests import glm_reference as R
from tests import helpers
from tests.helpers import max_abs_diff
from zoo.loading import DistributedConfigError
from zoo.settings import SETTINGS
from zoo.tensor_parallel import TORCHRUN_ENV

ROOT = Path(__file__).resolve().parents[1]

# int4 schemes whose scale groups the tiny models' row-parallel inputs split into whole groups at tp=2
# (quantize="int4", groups of 128, would cut them: test_int4_groups_cut_by_tp_are_refused_naming_the_layer)
FAMILIES = {
    "qwen2": (lambda p: helpers.tiny_qwen2(p), "int4-group32"),
    "qwen2_moe": (lambda p: helpers.tiny_qwen2_moe(p), "int4-group8"),
    "glm": (lambda p: helpers.tiny_glm(p), "int4-row"),
}


def _cases() -> list[tuple[str, str, str]]:
    """(case name, family, scheme, how): every family x int8/int4 x stored packed / packed while loading."""
    out = []
    for family, (_, int4) in FAMILIES.items():
        for bits, scheme in (("int8", "int8"), ("int4", int4)):
            for how in ("stored", "loading"):
                out.append((f"{family}-{bits}-{how}", family, scheme, how))
    # GLM's per-rank scale groups packed while loading: each rank reads and packs only its own columns
    return [*out, ("glm-int4g2-loading", "glm", "int4-row-g2", "loading")]


CASES = _cases()
COMPILED = "qwen2-int8-stored"  # also decoded through the compiled step (funcol collectives inside the graph)


def torchrun(*args: str, nproc: int = 2, timeout: int = 400) -> None:
    # weight-only (ZOO_QUANT_ACTIVATIONS=0): a row-parallel rank's slice of x is its own run of activation blocks,
    # so activation-quantised ranks would round x differently from the whole layer where blocks straddle the cut;
    # the ranks are held to the whole model exactly in the weight-only arithmetic
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ZOO_QUANT_ACTIVATIONS": "0"}
    for var in TORCHRUN_ENV:
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture
def weight_only(monkeypatch):
    """A whole model compared with the ranks decodes weight-only too, as the ranks do (torchrun above)."""
    monkeypatch.setattr(SETTINGS, "quant_activations", False)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Convert the tiny models (float and stored packed), write GLM's published g2 ranks, run the 2-rank job."""
    base = tmp_path_factory.mktemp("tpq")
    floats, dirs, specs = {}, {}, []
    for family, (build, _) in FAMILIES.items():
        build(base / f"{family}-src")
        floats[family] = zoo.convert(base / f"{family}-src", base / family, progress=False)
    for name, family, scheme, how in CASES:
        if how == "stored":
            dirs[name] = zoo.convert(base / f"{family}-src", base / name, quantize=scheme, progress=False)
            specs.append(f"{name}={dirs[name]}")
        else:
            dirs[name] = floats[family]
            specs.append(f"{name}={floats[family]}@{scheme}")
    published = {}
    for bits in (8, 4):  # what convert_tp.py --quantization-bit-width writes at MP 2: one scale per row per rank
        shards = R.quantize_sat_shards(helpers.tiny_glm(base / f"glm-pub{bits}-fp"), bits)
        R.write_sat_checkpoint(base / f"glm-pub{bits}", shards, model_config=json.loads(
            (base / f"glm-pub{bits}-fp" / "model_config.json").read_text()))
        name = f"glm-published-int{bits}"
        dirs[name] = zoo.convert(base / f"glm-pub{bits}", base / name, progress=False)
        published[bits] = shards
        specs.append(f"{name}={dirs[name]}")
    torchrun(str(ROOT / "tests" / "tp_worker.py"), "--compiled", COMPILED, "--", str(base / "out"), *specs)
    return {"out": base / "out", "dirs": dirs, "published": published}


def _ranks(job, name: str) -> list[dict]:
    return [json.loads((job["out"] / f"{name}.rank{r}.json").read_text()) for r in range(2)]


def _packed(job, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(job["out"] / f"{name}.rank{r}.packed.pt", weights_only=True) for r in range(2)]


def _whole(job, name: str):
    _, family, scheme, how = next(c for c in CASES if c[0] == name)
    return zoo.load(job["dirs"][name], dtype=torch.float32, quantize=scheme if how == "loading" else None)


@pytest.mark.usefixtures("weight_only")
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_tp2_packed_logits_and_greedy_tokens_equal_tp1(job, name):
    model = _whole(job, name)
    assert any(isinstance(m, PackedLinear) for m in model.module.modules())
    helpers.assert_ranks_equal_whole(model, job["out"] / f"{name}.logits.pt", _ranks(job, name), 1e-4, distinct=4)


@pytest.mark.usefixtures("weight_only")
def test_tp2_packed_decodes_through_the_compiled_step_with_the_same_tokens(job):
    for r in _ranks(job, COMPILED):
        assert r["compiled"] == {"greedy": r["greedy"], "graphs": 1, "failed": False}


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_each_rank_holds_only_its_slice_of_the_packed_weights_and_scales(job, name):
    """Every packed tensor a rank holds is either the whole model's (replicated: the routed experts, the
    router) or one half of it, the two ranks' halves side by side giving the TP=1 tensor bit for bit."""
    whole = {f"{path}.{k}": t for path, sub in _whole(job, name).module.named_modules() if isinstance(sub, PACKED)
             for k, t in sub.packed().items()}
    ranks = _packed(job, name)
    assert ranks[0].keys() == ranks[1].keys() == whole.keys()
    halves = 0
    for key, t in whole.items():
        a, b = (r[key] for r in ranks)
        if a.shape == t.shape:
            assert torch.equal(a, t) and torch.equal(b, t), key
            continue
        assert a.numel() * 2 == t.numel() == b.numel() * 2, key
        halved = [[*t.shape[:d], t.shape[d] // 2, *t.shape[d + 1:]] for d in range(t.dim())]  # (a rank's 1 of 2
        assert any(torch.equal(torch.cat([a.reshape(h), b.reshape(h)], d), t)  # scale groups is stored as 1)
                   for d, h in enumerate(halved)), key
        halves += 1
    assert halves > 0
    q, o = ranks[0]["layers.0.attn.q_proj.weight"], ranks[0]["layers.0.attn.o_proj.weight"]
    assert q.shape[0] * 2 == whole["layers.0.attn.q_proj.weight"].shape[0]  # column-parallel: half the rows
    assert o.shape[1] * 2 == whole["layers.0.attn.o_proj.weight"].shape[1]  # row-parallel: half the columns
    if name.startswith("qwen2_moe"):
        stacks = [k for k in whole if ".experts." in k]
        assert stacks and all(ranks[0][k].shape == whole[k].shape for k in stacks)  # experts stay whole


@pytest.mark.usefixtures("weight_only")
@pytest.mark.parametrize("bits", [8, 4])
def test_glm_published_rank_slices_land_on_their_ranks_unchanged(job, bits):
    """GLM-130B's INT8/INT4 as published at MP 2 (one scale per row per rank), loaded with tp=2: rank r holds
    exactly published rank r's row-parallel codes and scales, and computes what TP=1 computes."""
    name = f"glm-published-int{bits}"
    config = json.loads((job["dirs"][name] / "config.json").read_text())
    assert config["quantization"]["scheme"] == f"int{bits}-row-g2"
    ranks = _packed(job, name)
    for r, shard in enumerate(job["published"][bits]):
        for ours, theirs in (("attn.o_proj", "attention.dense"), ("mlp.down_proj", "mlp.dense_4h_to_h")):
            for layer in range(2):
                key = f"transformer.layers.{layer}.{theirs}.weight"
                assert torch.equal(ranks[r][f"layers.{layer}.{ours}.weight"], shard[key])
                assert torch.equal(ranks[r][f"layers.{layer}.{ours}.weight_scale"], shard[key + "_scale"])
    whole = zoo.load(job["dirs"][name], dtype=torch.float32)
    ids = torch.randint(0, whole.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_abs_diff(torch.load(job["out"] / f"{name}.logits.pt"), whole(ids)) < 1e-4
    r0, r1 = _ranks(job, name)
    assert r0["greedy"] == r1["greedy"] == whole.generate(ids[0, :8].tolist(), max_new_tokens=24)


# -- refusals before any weight is read ----------------------------------------------------------------------


def _weightless(directory: Path) -> Path:
    for f in directory.glob("*.safetensors"):
        f.unlink()
    return directory


def test_int4_groups_cut_by_tp_are_refused_naming_the_layer(tmp_path, monkeypatch):
    helpers.tiny_qwen2(tmp_path / "hf")
    native = _weightless(zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False))
    helpers.torchrun_env(monkeypatch, world=2)
    # o_proj has 64 inputs: one group of 64 (int4-group128's largest that fits), which two ranks would cut
    with pytest.raises(DistributedConfigError, match=r"tp=2 cannot split the packed weight of layers.0.attn.o_proj "
                                                     r"\(rowwise\).*would cut tensor 'weight_scale'"):
        zoo.load(native, tp=2, quantize="int4")
    assert not torch.distributed.is_initialized()


def test_published_scale_groups_not_divided_by_tp_are_refused(tmp_path, monkeypatch):
    """GLM's INT4 published at MP 2 keeps 2 scale groups per row-parallel row: tp=4 divides the heads, not them."""
    shards = R.quantize_sat_shards(helpers.tiny_glm(tmp_path / "fp"), 4)
    R.write_sat_checkpoint(tmp_path / "sat", shards, model_config=json.loads(
        (tmp_path / "fp" / "model_config.json").read_text()))
    native = _weightless(zoo.convert(tmp_path / "sat", tmp_path / "native", progress=False))
    helpers.torchrun_env(monkeypatch, world=4)
    with pytest.raises(DistributedConfigError, match=r"tp=4 cannot split the packed weight of layers.0.attn.o_proj.*"
                                                     r"int4-row-g2: 2 scale groups per row do not split into 4"):
        zoo.load(native, tp=4)
    assert not torch.distributed.is_initialized()


def test_a_scheme_that_cannot_pack_a_layer_is_refused_naming_it(tmp_path):
    helpers.tiny_qwen2(tmp_path / "hf")
    native = _weightless(zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False))
    with pytest.raises(ValueError, match=r"'int8-row-g3' cannot pack layers.0.attn.q_proj \(weight \[64, 64\]\): "
                                         r".*64 is not a multiple of 3 groups"):
        zoo.load(native, quantize="int8-row-g3")


# -- device maps --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    base = tmp_path_factory.mktemp("dmq")
    helpers.tiny_qwen2(base / "hf", tie=False)
    return base, zoo.convert(base / "hf", base / "native", progress=False)


def _mapped_file(t: torch.Tensor) -> str:
    """The file whose memory mapping holds t's data ('' if none)."""
    address = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


MAP = {"embed": "cpu", "norm": "cpu", "lm_head": "cpu", "layers.0": "cpu", "layers.1": "disk"}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_disk_block_quantised_while_loading_streams_packed_and_matches(untied, scheme):
    _, native = untied
    ref = zoo.load(native, quantize=scheme)
    model = zoo.load(native, quantize=scheme, device_map=MAP)
    streamed = model.module.layers[1].mlp.up_proj
    assert isinstance(streamed, PackedLinear) and streamed.weight.dtype == torch.int8
    assert "/spill/" in _mapped_file(streamed.weight)  # mapped from the spill file: off memory, packed
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_abs_diff(model(ids), ref(ids)) == 0.0
    assert model.module.layers[1].mlp.up_proj.weight is streamed.weight  # put back after the pass
    prompt = ids[0, :6].tolist()
    assert model.generate(prompt, max_new_tokens=12) == ref.generate(prompt, max_new_tokens=12)


def test_a_stored_packed_checkpoint_streams_its_packed_tensors_from_disk(untied):
    base, _ = untied
    packed = zoo.convert(base / "hf", base / "int4", quantize="int4-group32", progress=False)
    ref = zoo.load(packed)
    model = zoo.load(packed, device_map={"": "disk", "layers.0": "cpu"})
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_abs_diff(model(ids), ref(ids)) == 0.0
    streamed = model.module.layers[1].attn.q_proj
    assert streamed.kernel == () and streamed.weight.dtype == torch.int8  # the stored form, as mapped
    assert _mapped_file(streamed.weight).endswith("model.safetensors")


def test_a_packed_tied_head_streamed_from_disk_matches(tmp_path):
    """A tied embedding packed while loading (quantize packs the table the head reads) on "disk" with the
    head: streamed around the blocks, packed."""
    helpers.tiny_qwen2(tmp_path / "hf", tie=True)
    native = zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    ref = zoo.load(native, quantize="int8", dtype=torch.float64)
    model = zoo.load(native, quantize="int8", dtype=torch.float64, device_map={"": "disk", "layers.0": "cpu"})
    assert model.device_map["embed"] == "disk" and model.module.embed.weight.dtype == torch.int8
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_abs_diff(model(ids), ref(ids)) == 0.0
    prompt = ids[0, :5].tolist()
    assert model.generate(prompt, max_new_tokens=10) == ref.generate(prompt, max_new_tokens=10)


def test_auto_map_counts_packed_bytes(untied):
    _, native = untied
    floating = zoo.load(native)
    packed = zoo.load(native, quantize="int8")

    def size(m: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))

    head = sum(size(getattr(packed.module, n)) for n in ("embed", "norm", "lm_head"))
    block = size(packed.module.layers[0])
    assert block < size(floating.module.layers[0]) / 2
    # room for the head and both packed blocks (float blocks would not fit): nothing is streamed
    model = zoo.load(native, quantize="int8", device_map="auto", max_memory={"cpu": head + 2 * block + 64})
    assert set(model.device_map.values()) == {"cpu"}
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_abs_diff(model(ids), packed(ids)) == 0.0
