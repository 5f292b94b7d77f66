"""The benchmark scripts start and check their arguments (nothing is timed here: numbers on a shared test host
mean nothing; BENCHMARKS.md says how each was measured)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name, options", [
    ("bench_decode.py", ["--only", "--device", "--rounds", "--dir"]),
    ("bench_matrix.py", ["--cells", "--isa", "--llama-cpp-path", "--quick", "--new-tokens", "--layers", "--rounds"]),
    ("bench_kernels.py", ["--device", "--layers", "--repeats", "--no-write"]),
    ("bench_start.py", ["--isa", "--profile", "--prompt-tokens", "--no-05b"]),
    ("bench_tp.py", ["--new-tokens", "--layers", "--no-write"]),
    ("bench_mmfree.py", ["--size", "--kernels", "--memory"]),
    ("bench_recurrent.py", ["--lengths", "--models", "--kernels"]),
    ("reliability.py", ["--no-hub", "--verbose"]),
])
def test_benchmark_scripts_start_and_list_their_options(name, options):
    done = script(name, "--help")
    assert done.returncode == 0, done.stderr
    for option in options:
        assert option in done.stdout


def test_decode_benchmark_refuses_an_unknown_row_by_name_before_building_checkpoints(tmp_path):
    done = script("bench_decode.py", "--only", "zoo-bf16,no-such-row", "--dir", str(tmp_path / "work"))
    assert done.returncode != 0 and "no-such-row" in done.stderr
    assert not (tmp_path / "work").exists()


def test_kernel_benchmark_refuses_a_count_below_one_by_name():
    done = script("bench_kernels.py", "--layers", "0", "--no-write")
    assert done.returncode == 2 and "--layers must be at least 1" in done.stderr


def matrix_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_matrix", BENCHMARKS / "bench_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matrix_benchmark_refuses_an_unknown_cell_or_llama_cpp_path_by_name_before_building(tmp_path):
    done = script("bench_matrix.py", "--cells", "zoo-bf16-*,zoo-fp16-none-on", "--dir", str(tmp_path / "work"))
    assert done.returncode != 0 and "zoo-fp16-none-on" in done.stderr
    done = script("bench_matrix.py", "--llama-cpp-path", str(tmp_path / "nowhere"), "--dir", str(tmp_path / "work"))
    assert done.returncode == 2 and "no llama_cpp package" in done.stderr
    done = script("bench_matrix.py", "--isa", "sse2", "--dir", str(tmp_path / "work"))
    assert done.returncode == 2 and "--isa" in done.stderr
    assert not (tmp_path / "work").exists()


def test_matrix_has_every_dtype_weights_and_compile_cell_and_selects_by_pattern():
    m = matrix_module()
    zoo = [c for c in m.all_cells() if c.startswith("zoo-")]
    assert len(zoo) == 2 * 3 * 3 and "zoo-fp32-int4-on" in zoo and "zoo-bf16-none-default" in zoo
    assert m.select("zoo-bf16-int8-*,llama.cpp-Q8_0", m.all_cells()) == [
        "zoo-bf16-int8-default", "zoo-bf16-int8-on", "zoo-bf16-int8-off", "llama.cpp-Q8_0"]
    quick = m.parse(["--quick"])
    assert (quick.layers, quick.rounds, quick.vocab) == (2, 1, 32000)
    assert m.parse(["--quick", "--new-tokens", "5"]).new_tokens == 5  # an explicit option wins over --quick's


def test_matrix_verdict_names_each_goal_a_cell_misses():
    m = matrix_module()
    results = {"transformers-bf16": {"tok_s": 10.0, "ttft": 1.0}, "llama.cpp-Q8_0": {"tok_s": 20.0, "ttft": 0.5},
               "zoo-bf16-int8-off": {"tok_s": 19.0, "ttft": 0.6, "compiled": False}}
    assert m.verdict("zoo-bf16-int8-off", results["zoo-bf16-int8-off"], results) == "PASS"  # 0.95x: no llama goal
    slow = {"tok_s": 9.0, "ttft": 0.8, "compiled": True}  # compiled by default, slower than eager
    got = m.verdict("zoo-bf16-int8-default", slow, {**results, "zoo-bf16-int8-default": slow})
    assert got == ("MISS: < transformers; decode < 0.9x llama.cpp; prefill > 1.5x llama.cpp; "
                   "compiled by default, slower than eager")
    assert m.verdict("zoo-bf16-int8-default", {"tok_s": 18.0, "ttft": 0.7, "compiled": False}, results) == "PASS"
    assert m.verdict("zoo-fp32-none-on", {"tok_s": 5.0, "ttft": 0.1}, results) == "-"  # nothing to compare with
    assert m.verdict("transformers-bf16", results["transformers-bf16"], results) == "-"
