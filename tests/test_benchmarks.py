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
    ("bench_kernels.py", ["--device", "--layers", "--repeats", "--no-write"]),
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
