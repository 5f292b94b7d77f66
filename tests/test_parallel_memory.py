"""What each multi-GPU setup needs per GPU (zoo/memory_plan.py, `zoo info`), against hand arithmetic from the
published config, and the per-rank memory benchmark's arguments (issue 21, item 4)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from zoo.cli import main
from zoo.memory_plan import (
    GIB,
    KV_TOKENS,
    Setup,
    declared_setups,
    need,
    setup_rows,
    setups_with_needs,
    snapshot_setups,
)
from zoo.registry import SNAPSHOT, find_entry, get_entry, list_models

ROOT = Path(__file__).resolve().parents[1]
FP16 = 2


def glm_130b() -> dict:
    return find_entry("glm-130b").config


def by_hand(c: dict, tp: int, bits: int | None = None, groups: int = 1, pp: int = 1) -> int:
    """Bytes one GPU holds, from the config's numbers: the four matrices of each layer split over tp (packed:
    bits / 8 bytes per weight plus fp16 scales: colwise layers keep `groups` per row for their rows / tp, a
    rowwise layer's rank holds groups / tp per row of all its rows), the column-parallel biases split, the
    row-parallel biases and the LayerNorms whole, the vocabulary-split embedding (kept fp16: GLM-130B quantises
    only the layers' linears), the final LayerNorm whole; pp stages take the layers in equal runs."""
    H, inner, V, layers = c["dim"], c["inner_size"], c["vocab_size"], c["n_layers"] // pp
    colwise_rows = 3 * H + 2 * inner  # q, k, v; the GeGLU halves
    matrices = H * (4 * H + 3 * inner)  # q, k, v, dense [H, H]; up, gate [inner, H]; down [H, inner]
    if bits is None:
        weights = matrices // tp * FP16
    else:
        weights = matrices // tp * bits // 8 + colwise_rows // tp * groups * FP16 + 2 * H * (groups // tp) * FP16
    biases = colwise_rows // tp * FP16 + 2 * H * FP16
    norms = 4 * H * FP16
    return layers * (weights + biases + norms) + V // tp * H * FP16 + 2 * H * FP16


def test_glm_130b_fp16_tp8_holds_an_eighth_of_every_matrix_and_the_norms_whole():
    c = glm_130b()
    assert need("glm", c, "float16", None, tp=8).weights == by_hand(c, 8)
    # about 30 GiB: what the GLM-130B README runs on 8 x A100 40 GB
    assert 29 * GIB < by_hand(c, 8) < 31 * GIB


def test_glm_130b_int8_tp8_holds_bytes_per_weight_and_per_rank_scales():
    c = glm_130b()
    assert need("glm", c, "float16", "int8-row-g8", tp=8).weights == by_hand(c, 8, bits=8, groups=8)


def test_glm_130b_int4_tp4_holds_half_a_byte_per_weight_and_per_rank_scales():
    c = glm_130b()
    assert need("glm", c, "float16", "int4-row-g4", tp=4).weights == by_hand(c, 4, bits=4, groups=4)


def test_pipeline_stages_hold_their_run_of_layers_and_every_part_around_them():
    c = glm_130b()
    assert need("glm", c, "float16", None, tp=8, pp=2).weights == by_hand(c, 8, pp=2)


def test_the_kv_cache_per_gpu_is_keys_and_values_of_each_layer_for_its_heads():
    c = glm_130b()
    for tp, pp in ((8, 1), (4, 1), (8, 2)):
        expected = c["n_layers"] // pp * 2 * c["dim"] // tp * FP16 * KV_TOKENS
        assert need("glm", c, "float16", "int4-row-g4" if tp == 4 else None, tp=tp, pp=pp).kv_cache == expected


def test_a_tp_that_would_cut_the_published_per_rank_scales_is_refused_naming_the_tensor():
    with pytest.raises(ValueError, match=r"tp=8 would cut layers\.0\.attn\.o_proj\.weight_scale of int4-row-g4"):
        need("glm", glm_130b(), "float16", "int4-row-g4", tp=8)


def test_glm_130b_declares_the_published_setups_and_each_fits_its_gpus():
    setups = {s.name: s for s in declared_setups(get_entry("glm-130b"))}
    assert {"fp16, TP 8", "INT8, TP 8", "INT4, TP 4"} <= set(setups)
    assert (setups["INT4, TP 4"].gpus, setups["INT4, TP 4"].gpu_memory_gib, setups["INT4, TP 4"].quantize) == \
        (4, 24, "int4-row-g4")  # the paper's 4 x RTX 3090, the published INT4 ranks' MP 4
    for setup, n in setups_with_needs(get_entry("glm-130b")):
        assert n.weights < setup.gpu_memory_gib * GIB, setup.name
    with pytest.raises(ValueError, match="3 GPUs but tp 4 x pp 1"):
        Setup(name="x", gpus=3, gpu="A100", gpu_memory_gib=40, tp=4)


def test_the_snapshot_holds_what_the_setups_need_now():
    """`zoo info` reads these numbers without torch: they must be what counting on the model gives."""
    shipped = json.loads(SNAPSHOT.read_text()).get("setups", {})
    with_setups = [n for n in list_models() if declared_setups(get_entry(n))]
    assert "glm-130b" in with_setups
    assert shipped == snapshot_setups() and sorted(shipped) == sorted(with_setups), \
        "stale setups in zoo/data/registry.json: run `python scripts/write_registry_snapshot.py`"
    assert shipped["glm-130b"] == setup_rows(get_entry("glm-130b"))


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_zoo_info_glm_130b_prints_each_setup_with_its_bytes_per_gpu_and_whether_it_fits():
    code, out, _ = run("info", "glm-130b")
    assert code == 0
    rows = {line.split("  ")[2].strip(): line for line in out.splitlines() if "GiB" in line and " x " in line}
    c = glm_130b()
    for name, gpus, expected in (("fp16, TP 8", "8 x A100 40 GiB", by_hand(c, 8)),
                                 ("INT8, TP 8", "8 x RTX 3090 24 GiB", by_hand(c, 8, bits=8, groups=8)),
                                 ("INT4, TP 4", "4 x RTX 3090 24 GiB", by_hand(c, 4, bits=4, groups=4))):
        line = rows[name]
        cells = [x.strip() for x in line.strip().split("  ") if x.strip()]
        assert cells[:4] == [name, gpus, f"{expected / GIB:.1f} GiB", "yes"], line
        left = float(gpus.split()[-2]) * GIB - expected
        assert cells[4].startswith(f"{left / GIB:.1f} GiB (KV cache for "), line
    assert "int4-row-g4 packed, the rest float16" in out


def test_zoo_info_of_an_entry_without_setups_prints_no_setup_table():
    code, out, _ = run("info", "qwen2-7b")
    assert code == 0 and "what each setup needs" not in out


def test_zoo_info_computes_an_asked_setup_and_refuses_one_the_model_cannot_take():
    qwen = find_entry("qwen2-7b")
    code, out, _ = run("info", "qwen2-7b", "--tp", "2", "--quantize", "int8", "--gpu-memory", "24")
    n = need("qwen2", qwen.config, "float16", "int8", tp=2)
    line = next(x for x in out.splitlines() if x.strip().startswith("int8, TP 2"))
    assert f"{n.weights / GIB:.1f} GiB" in line and " yes " in line
    code, out, err = run("info", "qwen2-7b", "--tp", "3")
    assert code != 0 and "--tp 3 does not divide" in err and "Degrees that work" in err
    assert out == ""  # refused before anything is printed
    code, _, err = run("info", "qwen2-7b", "--quantize", "int8")
    assert code != 0 and "give --tp (or --pp)" in err


def test_zoo_info_glm_130b_imports_no_torch():
    code = ("import sys\nfrom zoo.cli import main\nmain(['info', 'glm-130b'])\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "INT4, TP 4" in out.stdout and out.stdout.strip().endswith("TORCH False")


# -- the benchmark: arguments only (nothing is timed or measured here) ----------------------------------------------


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tp_memory.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_memory_benchmark_lists_its_options():
    done = bench("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--tp", "--rows", "--isolate", "--no-write", "--dim", "--layers"):
        assert option in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--rows", "fp16,fp8"], "unknown row(s) fp8"),
    (["--tp", "3", "--dim", "512"], "--tp 3 does not divide the 4 heads"),
    (["--dim", "100"], "multiple of 128"),
    (["--tp", "x"], "whole numbers"),
])
def test_memory_benchmark_refuses_bad_arguments_by_name_before_writing_anything(tmp_path, args, message):
    done = bench(*args, "--dir", str(tmp_path / "work"))
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "work").exists()


def test_memory_benchmark_quick_is_a_tiny_model_at_tp_2_that_writes_nothing():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_tp_memory as b
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    a = b.parse(["--quick"])
    assert a.degrees == [2] and a.no_write and a.dim == 256 and a.layers == 2
    shape = b.glm_shape(a.dim, a.layers)
    assert shape["n_heads"] % 2 == 0 and shape["inner_size"] // 2 % 2 == 0  # whole heads, whole int4 bytes per rank


def test_the_readme_states_what_zoo_info_states_for_each_glm_130b_setup():
    readme = (ROOT / "README.md").read_text()
    for setup, n in setups_with_needs(get_entry("glm-130b")):
        scheme = f" (`{setup.quantize}`)" if setup.quantize else ""
        name = setup.name.replace(",", f"{scheme},", 1)
        row = next((line for line in readme.splitlines() if line.strip().startswith(f"| {name} |")), None)
        assert row is not None, f"README has no row for {name}"
        assert f"| {n.weights / GIB:.1f} GiB | yes |" in row, row


@pytest.mark.parametrize("name", ["glm-130b", "chatglm-6b"])
def test_glm_parameter_counts_are_the_built_models(name):
    """The count the sizes and `zoo info` start from: every parameter of the model built from the config (q, k, v
    biases of the heads' width, the output projection's of the hidden size)."""
    from zoo.registry import get_family

    entry = get_entry(name)
    family = get_family("glm")
    meta = family.build_meta(family.config_from_dict(entry.config))
    assert entry.params == sum(p.numel() for p in meta.parameters())
    assert need("glm", entry.config, "float32").weights == 4 * entry.params  # tp 1: the whole model


def test_zoo_info_of_a_directory_refuses_setup_options(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, out, err = run("info", str(tmp_path), "--tp", "2")
    assert code != 0 and "give its name" in err and out == ""
