"""The command line as a person uses it: start-up time of `zoo --help`, `zoo list` and `zoo info NAME`, against a
bare `python -c pass` and `python -c "import torch"`, each a fresh process (best of --repeat runs, wall clock).

    python benchmarks/bench_cli.py [--repeat 10] [--model qwen2-7b]

Prints a markdown table for BENCHMARKS.md ("CLI as a person"). Run it on an idle machine: a start-up time is
mostly waiting for the disk and the interpreter, so a busy machine measures the other jobs. The `zoo` commands run
as `python -m zoo` so that every row pays for the same interpreter start; the console script adds only its own
few-line launcher.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def best_of(argv: list[str], repeat: int) -> float:
    """The fastest of `repeat` runs of argv, in seconds (the first run also warms the file cache)."""
    subprocess.run(argv, capture_output=True, check=True)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--model", default="qwen2-7b", help="the registry name `zoo info` shows")
    a = p.parse_args()
    py = sys.executable
    rows = [
        ("python -c pass", [py, "-c", "pass"]),
        ('python -c "import torch"', [py, "-c", "import torch"]),
        ("zoo --help", [py, "-m", "zoo", "--help"]),
        ("zoo list", [py, "-m", "zoo", "list"]),
        (f"zoo info {a.model}", [py, "-m", "zoo", "info", a.model]),
    ]
    results = [(label, best_of(argv, a.repeat)) for label, argv in rows]
    bare, torch_import = results[0][1], results[1][1]
    print(f"| command | seconds (best of {a.repeat}) | over `python -c pass` | against `import torch` |")
    print("|---|---:|---:|---:|")
    for label, seconds in results:
        print(f"| `{label}` | {seconds:.3f} | {seconds - bare:+.3f} | {seconds / torch_import:.2f}x |")


if __name__ == "__main__":
    main()
