"""Decoding speed and memory against generated length: recurrent models next to a transformer of similar size.

    python benchmarks/bench_recurrent.py --size 0.5b                        # CPU, 256 / 1024 / 4096 new tokens
    python benchmarks/bench_recurrent.py --size 7b --device cuda --dtype bfloat16 --kernels --write   # GPU
    python benchmarks/bench_recurrent.py --size tiny --lengths 16 64        # a smoke run in seconds

Random weights in the published shapes (nothing is downloaded), built for each model in MODELS (one table row per
model and length, all in the same run): xLSTM (7B, or a 0.5B-sized xLSTM with the published ratios) and the Qwen2
of similar size. Each decodes greedily, batch 1, through the generation protocol every zoo model shares
(`new_state`, the prompt, then one token at a time), N new tokens after a 16-token prompt, for each N in --lengths.
Columns: tokens/s over the N tokens; tokens/s over the last 32 of them (the cost of a step at that length: flat for
a recurrent model, falling for attention); the generation state held at the end (a recurrent memory of fixed size
against a KV cache that grows with the length); the peak memory of the run above what was held before it (CUDA
allocator on a GPU, resident set on CPU).
--kernels (CUDA only) times the fused Triton chunkwise mLSTM kernel against its PyTorch reference at xLSTM 7B's
head shapes. --write puts the tables into BENCHMARKS.md (section "recurrent").

MODELS is a table: another family adds an entry (its build function and a config per size), nothing else.
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_ms, machine, random_model, sync, update_section  # noqa: E402
from zoo.architectures import qwen2, xlstm  # noqa: E402


@dataclass(frozen=True)
class Spec:
    label: str
    build: Callable[[Any], torch.nn.Module]
    configs: dict[str, Any]  # size -> config (sizes a model lacks are skipped)
    params: Callable[[Any], int]


QWEN_LONG = {"max_seq_len": 1 << 20}  # no context check in the module itself; set high for clarity
MODELS = {
    "xlstm": Spec("xLSTM", xlstm.build, {
        "tiny": xlstm.XLSTMConfig(vocab_size=4096, dim=256, n_layers=6, n_heads=4),
        "0.5b": xlstm.XLSTMConfig(dim=1024, n_layers=24, n_heads=4),  # published ratios, ~0.41B parameters
        "7b": xlstm.XLSTM_7B,
    }, xlstm.count_params),
    "qwen2": Spec("Qwen2", qwen2.build, {
        "tiny": replace(qwen2.TINY_STDLIB, **QWEN_LONG),
        "0.5b": replace(qwen2.PUBLISHED["0.5b"], **QWEN_LONG),
        "7b": replace(qwen2.PUBLISHED["7b"], **QWEN_LONG),
    }, qwen2.count_params),
}


def norms_and_gates(name: str, p: torch.nn.Parameter) -> bool:
    """Every norm parameter 1 (weights and biases), and xLSTM's gate biases as its published initialisation:
    forget gates at 3..6, input gates at -10 (random_model draws the rest from N(0, 0.02))."""
    if "norm" in name:
        p.fill_(1.0)
    elif name.endswith("f_gate.bias"):
        p.copy_(torch.linspace(3.0, 6.0, p.numel()))
    elif name.endswith("i_gate.bias"):
        p.fill_(-10.0)
    else:
        return False
    return True


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, n_new: int, tail: int = 32) -> tuple[float, float, Any]:
    """Greedy decoding through the generation protocol: (tokens/s over all n_new, over the last `tail`, state)."""
    device = prompt.device
    sync(device)
    start = time.perf_counter()
    state = model.new_state(prompt.shape[0], prompt.shape[1] + n_new)
    nxt = model(prompt, state, last_only=True)[:, -1].argmax(-1)
    tail_start = start
    for step in range(n_new - 1):
        if step == n_new - 1 - tail:
            sync(device)
            tail_start = time.perf_counter()
        nxt = model(nxt[:, None], state, last_only=True)[:, -1].argmax(-1)
    sync(device)
    end = time.perf_counter()
    return n_new / (end - start), min(tail, n_new - 1) / (end - tail_start), state


class PeakMemory:
    """Peak memory of a block of code above what was held when it started: CUDA's allocator statistics on a GPU;
    on CPU the process's resident-set high-water mark (Linux: reset through /proc/self/clear_refs, read back from
    /proc/self/status), None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    @staticmethod
    def _status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
                self.base = self._status("VmRSS")
            except (OSError, AttributeError):
                self.base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.peak = self._status("VmHWM") - self.base


def decode_rows(size: str, lengths: list[int], dtype: torch.dtype, device: str, models: list[str]) -> list[str]:
    dev = torch.device(device)
    prompt = torch.randint(3, 4000, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    rows = ["| model | params | N new tokens | tokens/s (all N) | tokens/s (last 32) | state at the end (MiB) | "
            f"peak memory of the run (MiB, {'CUDA allocated' if dev.type == 'cuda' else 'RSS'}) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for key in models:
        spec = MODELS[key]
        if size not in spec.configs:
            continue
        config = spec.configs[size]
        model = random_model(spec.build, config, dtype, device, norms_and_gates)
        decode(model, prompt, 8)  # warm-up
        for n in lengths:
            with PeakMemory(dev) as memory:
                speed, tail_speed, state = decode(model, prompt, n)
            peak = "-" if memory.peak is None else f"{memory.peak / 2**20:,.1f}"
            rows.append(f"| {spec.label} {size} | {spec.params(config) / 1e9:.2f}B | {n} | {speed:.1f} | "
                        f"{tail_speed:.1f} | {state.nbytes() / 2**20:,.2f} | {peak} |")
            print(rows[-1], flush=True)
            del state
        del model
    return rows



def time_kernel(s: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """(Triton ms, reference ms, max abs difference) for one xLSTM 7B layer's cell over an s-token prompt."""
    from zoo.architectures.kernels.mlstm import mlstm_chunkwise_reference, new_cell_state
    from zoo.architectures.kernels.mlstm_triton import mlstm_chunkwise_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8, s, d, device="cuda", generator=g).to(dtype) for d in (256, 256, 512))
    i = 15 * torch.tanh((3 * torch.randn(1, 8, s, device="cuda", generator=g) - 1) / 15)
    log_f = torch.nn.functional.logsigmoid(torch.randn(1, 8, s, device="cuda", generator=g) + 4)
    fused = lambda: mlstm_chunkwise_triton(q, k, v, i, log_f, new_cell_state(1, 8, 256, 512, "cuda"), 64)
    ref = lambda: mlstm_chunkwise_reference(q, k, v, i, log_f, new_cell_state(1, 8, 256, 512, "cuda"), 64)
    return cuda_ms(fused), cuda_ms(ref), (fused().float() - ref()).abs().max().item()


def kernel_rows(dtype: torch.dtype) -> list[str]:
    """The fused Triton chunkwise mLSTM against the PyTorch reference, xLSTM 7B heads (8 x 256 q/k, 512 v)."""
    rows = ["| prompt tokens (B=1, 8 heads, dqk 256, dv 512, chunk 64) | Triton (ms) | PyTorch reference (ms) | "
            "speed-up | max abs difference |", "|---|---:|---:|---:|---:|"]
    for s in (1024, 4096, 8192):
        fused, ref, diff = time_kernel(s, dtype)
        rows.append(f"| {s} | {fused:.2f} | {ref:.2f} | {ref / fused:.1f}x | {diff:.2e} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "0.5b", "7b"], default="0.5b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="new tokens per run")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--kernels", action="store_true", help="time the Triton mLSTM kernel too (CUDA only)")
    ap.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    text = [f"Machine: {machine()}. {args.dtype}, batch 1, greedy, 16-token prompt; `python "
            f"benchmarks/bench_recurrent.py --size {args.size} --device {args.device} --dtype {args.dtype} "
            f"--lengths {' '.join(map(str, args.lengths))}"
            + (f" --threads {args.threads}" if args.threads else "") + "`.", ""]
    text += decode_rows(args.size, args.lengths, dtype, args.device, args.models)
    if args.kernels:
        if not args.device.startswith("cuda"):
            raise SystemExit("--kernels needs --device cuda (the Triton kernel runs on GPU)")
        text += ["", *kernel_rows(dtype)]
    if args.write:
        update_section("recurrent", "## Recurrent decoding: memory and speed against length\n\n" + "\n".join(text))
    else:
        print("\n".join(text))


if __name__ == "__main__":
    main()
