"""Shared bits of the benchmarks: machine description, BENCHMARKS.md section updates, the timers."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # the instruction set ATen dispatches to (ATEN_CPU_CAPABILITY may force a lower one): a CPU speed means nothing
    # without it (AVX-512 with BF16/VNNI and AVX2-only machines differ by 2x on bf16 and int8)
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu} ({isa}), {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{gpu}, Python {platform.python_version()}")


def vm(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes: "VmHWM" (peak RSS) or "VmRSS" (now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def update_section(key: str, body: str) -> None:
    """Replace the text between <!-- key --> and <!-- /key --> in BENCHMARKS.md (append if absent)."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"<!-- {key} -->\n{body.rstrip()}\n<!-- /{key} -->"
    pattern = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def cuda_ms(fn, repeats: int = 10, calls: int = 1) -> float:
    """Median milliseconds per call of fn() on the GPU (CUDA events; one call first, to warm up). Each of the
    `repeats` measurements times `calls` calls back to back, for kernels too short to time one at a time."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def sync(device: str | torch.device) -> None:
    """Wait for the work queued on a GPU (nothing to wait for on CPU), so that a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: str | torch.device = "cpu") -> float:
    """Wall-clock seconds of one fn() call; on a GPU, from an idle queue to the end of the work it queued."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def random_model(build, config, dtype: torch.dtype, device: str, init=None) -> torch.nn.Module:
    """Built on meta, then random weights in `dtype` on `device`, one tensor at a time: norm weights 1, the rest
    N(0, 0.02). init(name, parameter), when given, sets a family's own parameters first (True: it set this one)."""
    with torch.device("meta"):
        model = build(config)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if init is not None and init(name, p):
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.to(dtype).eval()
