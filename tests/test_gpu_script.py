"""benchmarks/gpu.py, the one command for a lent GPU: it imports, explains itself, refuses bad arguments by name
before touching a GPU, and on a machine without one says so and exits cleanly (its measurements need a GPU: this
is all that can be checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_gpu_script_imports_and_lists_what_it_runs():
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu

    assert set(gpu.PARTS) == {"kernels", "decode", "tp"} and set(gpu.SHAPES) == {"0.5b", "7b"}
    args = gpu.parse(["--shapes", "7b", "--weights", "int8,int4", "--no-compile"])
    assert args.shapes == ["7b"] and args.weights == ["int8", "int4"] and args.no_compile
    done = gpu_script("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--out", "--parts", "--shapes", "--weights", "--new-tokens", "--budget-s", "--dry-run"):
        assert option in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--shapes", "13b"], "unknown shape ['13b']"),
    (["--parts", "kernels,flops"], "unknown part ['flops']"),
    (["--weights", "fp8"], "unknown weights ['fp8']"),
    (["--new-tokens", "0"], "--new-tokens: must be at least 1"),
    (["--out", "/no/such/dir/gpu.json"], "directory /no/such/dir does not exist"),
])
def test_gpu_script_refuses_bad_arguments_by_name(args, message):
    done = gpu_script(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_gpu_script_dry_run_says_what_it_would_run(tmp_path):
    done = gpu_script("--dry-run", "--parts", "decode", "--shapes", "0.5b", "--out", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert "dry run" in done.stdout and "decode 0.5b" in done.stdout
    assert not (tmp_path / "r.json").exists()


def test_gpu_script_without_a_gpu_says_so_and_exits_cleanly(tmp_path):
    done = gpu_script("--out", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU available" in done.stdout
    assert not (tmp_path / "r.json").exists()
