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
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{gpu}, Python {platform.python_version()}")


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


def seconds(fn, device: str = "cpu") -> float:
    """Wall-clock seconds of one fn() call; on a GPU, from an idle queue to the end of the work it queued."""
    cuda = device != "cpu"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start
