"""zoo's C++ CPU kernel library: every architectures/kernels/csrc/*.cpp built into one shared library, once per
machine and instruction set, cached, and loaded as the torch ops `torch.ops.zoo_cpu.*`.

Why C++: decoding on CPU is a chain of matrix-vector products bound by memory bandwidth, and torch's eager
linear for a few rows of bf16 (oneDNN/BLAS without native bf16 instructions) stays far below a plain read of the
weights; a compiled step gets closer but costs a compile per process. Kernels written with ATen's vector types
(at::vec, the same per-ISA types ATen's own CPU kernels use) need no compile on the hot path, only one build per
machine, which the compiled CPU path already requires a C++ compiler for.

The instruction set is ATen's (CPU_ISA, dispatch.cpu_isa(): torch.backends.cpu.get_cpu_capability(), which honours
ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine), and the library is compiled for it:

    AVX512   -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma (+ functions with target attributes for avx512_bf16,
             chosen at run time by a cpuid check in C++)
    AVX2     -mavx2 -mfma -mf16c
    DEFAULT  scalar (at::vec's generic types)

Each .cpp registers its ops with TORCH_LIBRARY_FRAGMENT(zoo_cpu, m), so several files share the namespace; a Python
module that uses an op declares its fake (meta) implementation with `@fake("zoo_cpu::op")` so the op also works
inside torch.compile graphs; fakes are registered when the library loads (FAKE_MODULES lists those modules).

Cache: $ZOO_KERNELS_CACHE, else $ZOO_HOME/kernels (zoo.settings.zoo_home()), one directory per
<torch version>-<python tag>-<ISA>-<hash of sources and flags>. A cached library loads by
torch.ops.load_library alone (torch.utils.cpp_extension is imported only to build: start-up time matters). The
first build prints one line to stderr, happens under a lock between processes and lands by an atomic rename.
No compiler or a failed build: one warning, `library()` returns None and callers keep their PyTorch paths.

    ZOO_CPU_KERNELS=0   never build or load the library (callers take their PyTorch paths)
    ZOO_KERNELS_CACHE   where the built libraries live (default $ZOO_HOME/kernels)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

CPU_ISA = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY), once
CSRC = Path(__file__).with_name("csrc")
NAMESPACE = "zoo_cpu"
LIBRARY_NAME = "libzoo_cpu.so"

ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
COMMON_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fopenmp", "-DNDEBUG", "-w"]

# The modules that declare fake impls (@fake) of the library's ops: imported when it loads, so an op traces inside
# torch.compile whoever calls it first.
FAKE_MODULES = ("zoo.architectures.kernels.linear", "zoo.architectures.kernels.dequant_matmul")
_FAKES: dict[str, Callable] = {}
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # ISA -> torch.ops.zoo_cpu, or None when unavailable
_paths: dict[str, Path] = {}  # ISA -> the file loaded
_warned = False


def enabled() -> bool:
    """Whether the library may be used at all (ZOO_CPU_KERNELS=0 turns it off; read at each call)."""
    flag = os.environ.get("ZOO_CPU_KERNELS")
    return flag is None or flag.strip().lower() not in ("0", "off", "false", "no")


def build_isa(isa: str | None = None) -> str:
    """The flag set the library is built with for ATen's instruction set `isa` (default: this process's)."""
    isa = isa or CPU_ISA
    if isa.startswith("AVX512"):
        return "AVX512"
    return isa if isa in ISA_FLAGS else "DEFAULT"


def cache_root() -> Path:
    env = os.environ.get("ZOO_KERNELS_CACHE")
    if env:
        return Path(env)
    from zoo.settings import zoo_home

    return zoo_home() / "kernels"


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def build_key(isa: str) -> str:
    """<torch version>-<python tag>-<ISA>-<hash of every source, header and flag>: a directory name."""
    h = hashlib.sha256()
    for path in sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.h")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(COMMON_FLAGS + ISA_FLAGS[isa]).encode())
    version = torch.__version__.replace("+", "_")
    return f"{version}-{sys.implementation.cache_tag}-{isa}-{h.hexdigest()[:16]}"


def library_path(isa: str | None = None) -> Path:
    isa = build_isa(isa)
    return cache_root() / build_key(isa) / LIBRARY_NAME


def fake(qualname: str) -> Callable[[Callable], Callable]:
    """Declare the fake (meta) implementation of op `qualname` ("zoo_cpu::name"): registered with
    torch.library.register_fake when the library loads (at once if it already has)."""
    def record(fn: Callable) -> Callable:
        _FAKES[qualname] = fn
        if _loaded.get(build_isa()) is not None:
            _register_fake(qualname, fn)
        return fn
    return record


def _register_fake(qualname: str, fn: Callable) -> None:
    try:
        torch.library.register_fake(qualname, fn)
    except RuntimeError as err:  # registered already (a second load in one process)
        if "already" not in str(err):
            raise


def library():
    """torch.ops.zoo_cpu with this machine's kernels loaded (built on first use), or None where they are off or
    cannot be built (ZOO_CPU_KERNELS=0, no compiler, a failed build: warned once). Called by every kernel call of
    a decoding step (hundreds a token): once loaded, one environment lookup and one dict lookup."""
    if not enabled():
        return None
    isa = build_isa()
    if isa in _loaded:
        return _loaded[isa]
    with _lock:
        if isa not in _loaded:
            _loaded[isa] = _load(isa)
    return _loaded[isa]


def loaded_path() -> Path | None:
    """The file of the library this process loaded, None if it loaded none."""
    return _paths.get(build_isa()) if _loaded.get(build_isa()) is not None else None


def _load(isa: str):
    path = library_path(isa)
    try:
        if not path.exists():
            _build(isa, path)
        torch.ops.load_library(str(path))
        _paths[isa] = path
    except Exception as err:  # no compiler, a compile error, an unloadable file: PyTorch paths instead
        _warn(f"zoo: CPU kernels unavailable ({type(err).__name__}: {str(err).strip()[-2000:]}); "
              "using PyTorch's own paths (set ZOO_CPU_KERNELS=0 to silence this)")
        return None
    import importlib

    for module in FAKE_MODULES:
        importlib.import_module(module)
    for qualname, fn in _FAKES.items():
        _register_fake(qualname, fn)
    return getattr(torch.ops, NAMESPACE)


def _warn(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return cxx


def _build(isa: str, path: Path) -> None:
    """Compile every csrc/*.cpp for `isa` and link them into `path`: under a lock, into a temporary directory
    renamed into place, so a concurrent process either waits or finds the finished library."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from zoo.weights.locks import ProcessLock

    target = path.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with ProcessLock(target.parent / (target.name + ".lock")):
        if path.exists():  # built by another process while we waited
            return
        cpp_extension = _cpp_extension()

        cxx = _compiler()
        srcs = sources()
        if not srcs:
            raise RuntimeError(f"no C++ sources in {CSRC}")
        guess = 15 * len(srcs) // max(1, min(len(srcs), os.cpu_count() or 1)) + 5
        print(f"zoo: building CPU kernels for {isa} once (~{guess} s), cached in {target}", file=sys.stderr,
              flush=True)
        start = time.monotonic()
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        includes = [f"-I{p}" for p in cpp_extension.include_paths()]
        cflags = [*COMMON_FLAGS, *ISA_FLAGS[isa], f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=zoo_cpu",
                  f"-I{CSRC}", *includes]
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            def compile_one(src: Path) -> Path:
                obj = tmp / (src.stem + ".o")
                _run([cxx, *cflags, "-c", str(src), "-o", str(obj)])
                return obj

            with ThreadPoolExecutor(max_workers=max(1, min(len(srcs), os.cpu_count() or 1))) as pool:
                objects = list(pool.map(compile_one, srcs))
            libdirs = cpp_extension.library_paths()
            _run([cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(tmp / LIBRARY_NAME),
                  *[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs],
                  "-lc10", "-ltorch_cpu", "-ltorch"])
            for obj in objects:
                obj.unlink()
            try:
                os.rename(tmp, target)
            except OSError:  # a directory of that name exists (an interrupted earlier build): replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"zoo: CPU kernels built in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def _cpp_extension():
    """torch.utils.cpp_extension, imported only to build (it costs start-up time), without its warning that no
    CUDA runtime is found (we build for the CPU)."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _run(cmd: list[str]) -> None:
    import subprocess

    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1] + cmd[-3:])} failed:\n{result.stderr[-4000:]}")
