"""zoo's C++ CPU kernel library (architectures/kernels/cpu_ext.py, csrc/): built once per instruction set into the
session's kernel cache (tests/conftest.py), loaded for the ISA ATen runs at (ATEN_CPU_CAPABILITY forces it), off
with ZOO_CPU_KERNELS=0, and a failed build falls back (None) with one warning."""

import os
import subprocess
import sys

import pytest
from zoo.architectures.kernels import cpu_ext, dispatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("from zoo.architectures.kernels import cpu_ext\n"
         "lib = cpu_ext.library()\n"
         "print(lib.build_isa(), cpu_ext.loaded_path())\n")


def library():
    lib = cpu_ext.library()
    assert lib is not None, "the CPU kernels did not build here (is a C++ compiler installed?)"
    return lib


def test_the_library_is_built_for_the_isa_aten_runs_at_and_cached_by_it():
    lib = library()
    isa = cpu_ext.build_isa(dispatch.cpu_isa())
    assert lib.build_isa() == isa
    path = cpu_ext.loaded_path()
    assert path.is_file() and path.parent.parent == cpu_ext.cache_root()
    assert f"-{isa}-" in path.parent.name


def probe(**env) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    isa, path = result.stdout.split()
    return isa, path


def test_a_process_forced_to_avx2_loads_the_avx2_build_and_a_native_one_reuses_the_cache():
    library()
    isa, path = probe(ATEN_CPU_CAPABILITY="avx2")
    assert isa == "AVX2" and "-AVX2-" in path
    native_isa, native_path = probe()
    assert native_isa == library().build_isa() and native_path == str(cpu_ext.loaded_path())


def test_zoo_cpu_kernels_0_turns_the_library_off(monkeypatch):
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    assert cpu_ext.library() is None


def test_a_failed_build_warns_once_and_gives_none(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_ext, "CSRC", tmp_path)
    monkeypatch.setattr(cpu_ext, "_loaded", {})
    monkeypatch.setattr(cpu_ext, "_warned", False)
    monkeypatch.setenv("ZOO_KERNELS_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="CPU kernels unavailable"):
        assert cpu_ext.library() is None
    assert cpu_ext.library() is None  # remembered: no second build, no second warning
    assert not list((tmp_path / "cache").glob("*/" + cpu_ext.LIBRARY_NAME))  # nothing half-built left as cached
