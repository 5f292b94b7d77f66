"""Everything there is to measure when a CUDA GPU is lent, in one command that finishes within 8 minutes on one GPU.

    python -m benchmarks.gpu --out gpu.json              # on a machine with a CUDA GPU
    python -m benchmarks.gpu --dry-run                   # checks the arguments, says what it would run, exits 0

1. kernels: every Triton kernel (architectures/kernels/*_triton.py) on CUDA tensors against its PyTorch reference,
   the largest difference against a bound per dtype, and both timed (CUDA events);
2. decode: greedy decoding at batch 1 of a Qwen2-0.5B shape and a Qwen2-7B shape (random weights, built in memory)
   in bf16, int8 and int4 (zoo's packed layers), eager and through the compiled step: tokens/s timed apart from
   the prefill, and the HBM roofline: bytes of weights read a token x tokens/s over the bandwidth of a plain read
   (torch.sum over 4 GiB) measured here. The compiled-over-eager ratios are printed in the form of
   zoo.generation.COMPILED_SPEEDUP (the default compile decision's table);
3. tp: with two GPUs or more, tensor parallel over NCCL (tp=2, processes made by torch.multiprocessing.spawn, no
   torchrun) decoding the 0.5B shape from a checkpoint written once, next to one GPU.

Each part stops starting new work once --budget-s is spent (what was skipped is listed). Prints a summary and
writes every number to --out (JSON). Without a CUDA GPU it says so and exits 0 after checking the arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, as the other scripts import it

SHAPES = {  # Qwen2 configs (zoo's qwen2 family), batch 1
    "0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, intermediate_size=4864,
                 rope_theta=1e6, tie_embeddings=True, max_seq_len=4096),
    "7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944,
               rope_theta=1e6, tie_embeddings=False, max_seq_len=4096),
}
WEIGHTS = ("bf16", "int8", "int4")
PARTS = ("kernels", "decode", "tp")


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def listed(choices: tuple[str, ...] | dict, what: str):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(choices)}")
        return items
    return parse


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu-benchmark.json"), help="JSON results (default: %(default)s)")
    ap.add_argument("--parts", type=listed(PARTS, "part"), default=list(PARTS),
                    help=f"comma-separated, out of {', '.join(PARTS)} (default: all)")
    ap.add_argument("--shapes", type=listed(SHAPES, "shape"), default=list(SHAPES),
                    help=f"decode shapes, out of {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--weights", type=listed(WEIGHTS, "weights"), default=list(WEIGHTS),
                    help=f"out of {', '.join(WEIGHTS)} (default: all)")
    ap.add_argument("--new-tokens", type=positive, default=64)
    ap.add_argument("--prompt-tokens", type=positive, default=64)
    ap.add_argument("--no-compile", action="store_true", help="eager decoding only (the compiled step costs a compile "
                                                              "per shape and weights)")
    ap.add_argument("--budget-s", type=positive, default=390,
                    help="stop starting new work after this many seconds (default %(default)s: a compile started "
                         "just before still ends within 8 minutes)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments, say what would run, exit")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a developer's run of the code paths
    ap.add_argument("--layers", type=positive, help=argparse.SUPPRESS)  # fewer layers (a developer's run)
    args = ap.parse_args(argv)
    if args.out.exists() and args.out.is_dir():
        ap.error(f"--out {args.out} is a directory; give a file name")
    if not args.out.resolve().parent.is_dir():
        ap.error(f"--out {args.out}: directory {args.out.resolve().parent} does not exist")
    return args


class Clock:
    """The time budget: parts ask before starting each piece of work."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.perf_counter(), budget_s
        self.skipped: list[str] = []

    def left(self, what: str) -> bool:
        if time.perf_counter() - self.start < self.budget:
            return True
        self.skipped.append(what)
        print(f"  skipped (time budget spent): {what}", flush=True)
        return False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# -- 1. Triton kernels against their references ------------------------------------------------------------------


def kernel_cases(device: str):
    """(name, triton call, reference call, bound) for every Triton kernel. The bound is on the largest relative
    difference |kernel - reference| / (1 + |reference|): fp32 within rounding, bf16 within a couple of steps."""
    import torch
    import torch.nn.functional as F
    from zoo.architectures.kernels.bitlinear import bitlinear_reference
    from zoo.architectures.kernels.bitlinear_triton import bitlinear_triton
    from zoo.architectures.kernels.dequant_matmul_triton import dequant_matmul_triton
    from zoo.architectures.kernels.hgrn import hgrn_recurrent
    from zoo.architectures.kernels.hgrn_triton import hgrn_triton
    from zoo.architectures.kernels.mlstm import mlstm_chunkwise_reference, new_cell_state
    from zoo.architectures.kernels.mlstm_triton import mlstm_chunkwise_triton
    from zoo.architectures.kernels.rmsnorm import rms_norm_reference
    from zoo.architectures.kernels.rmsnorm_triton import rms_norm_triton
    from zoo.architectures.kernels.rotary import apply_rotary_reference
    from zoo.architectures.kernels.rotary_triton import apply_rotary_triton
    from zoo.architectures.kernels.swiglu import silu_mul_reference
    from zoo.architectures.kernels.swiglu_triton import silu_mul_triton
    from zoo.architectures.quant import get_scheme, pack_ternary, ternarize

    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    cases = []
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):  # bf16: a few bf16 steps (2^-8)
        tag = "fp32" if dtype == torch.float32 else "bf16"
        x, w = rand(64, 4096, dtype=dtype), rand(4096, dtype=dtype) + 1
        cases.append((f"rmsnorm {tag} [64, 4096]", lambda x=x, w=w: rms_norm_triton(x, w, 1e-6),
                      lambda x=x, w=w: rms_norm_reference(x, w, 1e-6), bound))
        q = rand(1, 28, 64, 128, dtype=dtype)
        ang = torch.arange(64, device=device)[None, :, None].float() * (
            1e-4 ** (torch.arange(0, 128, 2, device=device).float() / 128))
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        cases.append((f"rotary {tag} [1, 28, 64, 128]", lambda q=q, c=cos, s=sin: apply_rotary_triton(q, c, s),
                      lambda q=q, c=cos, s=sin: apply_rotary_reference(q, c, s), bound))
        gate, up = rand(64, 18944, dtype=dtype), rand(64, 18944, dtype=dtype)
        cases.append((f"silu_mul {tag} [64, 18944]", lambda a=gate, b=up: silu_mul_triton(a, b),
                      lambda a=gate, b=up: silu_mul_reference(a, b), bound))
    for bits, scheme_name in ((8, "int8-row"), (4, "int4-group128")):
        scheme = get_scheme(scheme_name)
        t = {k: v.to(device) for k, v in scheme.pack(rand(4864, 896, scale=0.05).cpu()).items()}
        for rows in (1, 64):
            for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
                tag = "fp32" if dtype == torch.float32 else "bf16"
                x = rand(rows, 896, dtype=dtype)
                tt = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in t.items()}
                cases.append((f"dequant_matmul int{bits} {tag} [{rows}, 896] x [4864, 896]",
                              lambda x=x, t=tt, b=bits: dequant_matmul_triton(x, t["weight"], t["weight_scale"], b,
                                                                              None, t.get("weight_zero")),
                              lambda x=x, t=tt, s=scheme: s.reference(x, t, None), bound))
    codes, scale = ternarize(torch.randn(1024, 1024, generator=g))
    xb, nw = rand(16, 1024, scale=3.0), (torch.rand(1024, generator=g) + 0.5).to(device)
    packed_codes, codes_d, scale_d = pack_ternary(codes).to(device), codes.to(device), scale.to(device)
    # a flipped activation code (a rounding tie) moves an output by one quantisation step: bound loosely
    cases.append(("bitlinear fp32 [16, 1024] x ternary [1024, 1024]",
                  lambda: bitlinear_triton(xb, nw, 1e-6, packed_codes, scale_d),
                  lambda: bitlinear_reference(xb, nw, 1e-6, codes_d, scale_d), 0.05))
    i, f, h0 = rand(2, 256, 1024), torch.rand(2, 256, 1024, generator=g).to(device), rand(2, 1024)
    cases.append(("hgrn fp32 [2, 256, 1024]", lambda: hgrn_triton(i, f, h0.clone()),
                  lambda: hgrn_recurrent(i, f, h0.clone())[0], 1e-5))
    B, NH, S, dqk, dv = 1, 4, 256, 64, 64
    qkv = [rand(B, NH, S, d) for d in (dqk, dqk, dv)]
    ig = 15 * torch.tanh((3 * rand(B, NH, S) - 1) / 15)
    log_f = F.logsigmoid(15 * torch.tanh((2 * rand(B, NH, S) + 4) / 15))

    def fresh():
        return [s.to(device) for s in new_cell_state(B, NH, dqk, dv)]

    cases.append(("mlstm chunkwise fp32 [1, 4, 256, 64]",
                  lambda: mlstm_chunkwise_triton(*qkv, ig, log_f, fresh(), chunk_size=64),
                  lambda: mlstm_chunkwise_reference(*qkv, ig, log_f, fresh(), chunk_size=64), 1e-4))
    return cases


def run_kernels(args, clock: Clock) -> list[dict]:
    import torch
    from common import cuda_ms

    out = []
    for name, kernel, reference, bound in kernel_cases(args.device):
        if not clock.left(f"kernel {name}"):
            continue
        row = {"kernel": name, "bound": bound}
        try:
            y, ref = kernel(), reference()
            diff = float(((y.float() - ref.float()).abs() / (1 + ref.float().abs())).max())
            row.update(max_rel_diff=diff, ok=bool(diff <= bound and y.shape == ref.shape))
            if args.device == "cuda":
                row.update(kernel_ms=cuda_ms(kernel), reference_ms=cuda_ms(reference))
        except Exception as e:  # noqa: BLE001 - one kernel's failure is a result, the others still run
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        out.append(row)
        timing = f"{row['kernel_ms']:.3f} ms vs reference {row['reference_ms']:.3f} ms" if "kernel_ms" in row else ""
        print(f"  {'ok  ' if row['ok'] else 'FAIL'} {name}: max rel diff {row.get('max_rel_diff', float('nan')):.2e} "
              f"(bound {bound:g}) {timing} {row.get('error', '')}", flush=True)
        del row
    torch.cuda.empty_cache() if args.device == "cuda" else None
    return out


# -- 2. decode with the HBM roofline -----------------------------------------------------------------------------


def random_qwen2(config: dict, weights: str, device: str):
    """zoo's qwen2 module, built on meta (packed layers for int8 / int4), random values made on `device`."""
    import torch
    from zoo.architectures.quant import pack_linears, packable_paths

    from zoo.family import get_family

    family = get_family("qwen2")
    module = family.build_meta(family.config_from_dict(config))
    if weights != "bf16":
        scheme = {"int8": "int8-row", "int4": "int4-group128"}[weights]
        pack_linears(module, scheme, packable_paths(module, scheme), family.tp_plan)
    module = module.to(torch.bfloat16)  # floating tensors only: packed codes keep their integer dtype
    module.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point():
                if name.endswith("norm.weight"):
                    t.fill_(1.0)
                elif "scale" in name:
                    t.fill_(0.02 / 8)  # a quantisation step: codes x step ~ the float weights' spread
                elif "zero" in name:
                    t.zero_()
                else:
                    t.normal_(0, 0.02, generator=g)
            else:  # packed codes: any bytes are valid codes
                t.copy_(torch.randint(-128, 128, t.shape, generator=g, device=device).to(t.dtype))
    return module.eval()


def bytes_per_token(module) -> int:
    import torch

    seen = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    total = sum(seen.values())
    if getattr(module, "lm_head", None) is None:  # tied: the table is read whole by the head
        return total
    embeddings = {m.weight.data_ptr() for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return total - sum(seen.get(p, 0) for p in embeddings)


def time_decode(module, prompt: list[int], new_tokens: int, compile: bool, sync, model=None) -> dict:
    """Best of two greedy generations after a warm-up one: tokens/s after the first token, time to the first
    token, and the warm-up's time (the compile, when compiling). Through `model.generate` when a ZooModel is given
    (tensor parallel: every rank decodes in step), else zoo.generation.decode on the module."""
    from zoo.generation import Sampling, decode

    def tokens(n: int):
        if model is not None:
            return model.generate(prompt, max_new_tokens=n, temperature=0, stream=True)
        return decode(module, [prompt], n, Sampling(), set(), compile=compile)

    def run(n: int) -> tuple[float, list[float]]:
        start, stamps = time.perf_counter(), []
        for tok in tokens(n):
            if hasattr(tok, "tolist"):
                tok.tolist()  # the host waits for the token, as a user's stream does
            stamps.append(time.perf_counter())
        sync()
        return start, stamps

    t = time.perf_counter()
    run(min(4, new_tokens))  # compiles here when compiling; kernels are JIT-built
    first_call = time.perf_counter() - t
    best = {"ttft_s": float("inf"), "tok_s": 0.0}
    for _ in range(2):
        start, stamps = run(new_tokens)
        best["ttft_s"] = min(best["ttft_s"], stamps[0] - start)
        if len(stamps) > 1:
            best["tok_s"] = max(best["tok_s"], (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {**best, "first_call_s": first_call}


def read_bandwidth(device: str) -> float:
    """GB/s of torch.sum over 4 GiB of fp32 (256 MiB off a GPU), best of 5."""
    import torch
    from common import seconds

    size = 4 * 2**30 if device == "cuda" else 2**28
    big = torch.ones(size // 4, device=device)
    big.sum()
    best = min(seconds(big.sum, device) for _ in range(5))
    return size / best / 1e9


def run_decode(args, clock: Clock, bandwidth: float) -> list[dict]:
    import torch
    from common import sync

    out = []
    modes = [False] if args.no_compile else [False, True]
    prompt = list(range(100, 100 + args.prompt_tokens))
    for shape in args.shapes:
        config = {**SHAPES[shape], **({"n_layers": args.layers} if args.layers else {})}
        for weights in args.weights:
            if not clock.left(f"decode {shape} {weights}"):
                continue
            try:
                module = random_qwen2(config, weights, args.device)
            except Exception as e:  # noqa: BLE001
                out.append({"shape": shape, "weights": weights, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"  {shape} {weights}: could not build: {out[-1]['error']}", flush=True)
                continue
            per_token = bytes_per_token(module)
            for compiled in modes:
                if compiled and not clock.left(f"decode {shape} {weights} compiled"):
                    continue
                row = {"shape": shape, "weights": weights, "compiled": compiled, "bytes_per_token": per_token}
                try:
                    row.update(time_decode(module, prompt, args.new_tokens, compiled, lambda: sync(args.device)))
                    row["roofline"] = per_token * row["tok_s"] / (bandwidth * 1e9)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    traceback.print_exc()
                out.append(row)
                if "tok_s" in row:
                    print(f"  {shape} {weights} {'compiled' if compiled else 'eager   '}: {row['tok_s']:.1f} tok/s, "
                          f"{per_token / 1e6:.0f} MB/token, roofline {row['roofline']:.0%}, first token "
                          f"{row['ttft_s'] * 1e3:.1f} ms, first call {row['first_call_s']:.1f} s", flush=True)
                else:
                    print(f"  {shape} {weights} compiled={compiled}: {row['error']}", flush=True)
            del module
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return out


def speedups(decode_rows: list[dict], device: str) -> list[str]:
    """compiled / eager per weights, in zoo.generation.COMPILED_SPEEDUP's form (the 0.5B shape decides)."""
    rate = {(r["shape"], r["weights"], r["compiled"]): r["tok_s"] for r in decode_rows if "tok_s" in r}
    lines = []
    for shape in SHAPES:
        for weights in WEIGHTS:
            eager, compiled = rate.get((shape, weights, False)), rate.get((shape, weights, True))
            if eager and compiled:
                kind = "bfloat16" if weights == "bf16" else weights
                lines.append(f'("{device}", "*", "{kind}"): {compiled / eager:.2f},  # {shape}: {compiled:.1f} / '
                             f'{eager:.1f} tok/s')
    return lines


# -- 3. tensor parallel over NCCL --------------------------------------------------------------------------------


def tp_rank(rank: int, world: int, directory: str, port: int, prompt: list[int], new_tokens: int, out: str) -> None:
    """One rank of the tp job (torch.multiprocessing.spawn calls it): the environment torchrun would give."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from common import sync

    import zoo

    model = zoo.load(directory, tp=world, dtype=torch.bfloat16, compile=False)
    result = {"rank": rank, "device": str(model.device)}
    try:
        result.update(time_decode(model.module, prompt, new_tokens, False, lambda: sync(model.device), model=model))
    finally:
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()
        dist.destroy_process_group()


def write_checkpoint(config: dict, directory: Path) -> None:
    """The bf16 0.5B shape as a native checkpoint (random weights), for zoo.load(tp=...)."""
    from zoo.weights.format import NativeConfig, write_config
    from zoo.weights.writer import write_state_dict

    module = random_qwen2(config, "bf16", "cpu")
    directory.mkdir(parents=True, exist_ok=True)
    write_state_dict(directory, module.state_dict(), progress=False)
    write_config(directory, NativeConfig(family="qwen2", config=config, name="qwen2-0.5b-shape",
                                         task="text-generation"))


def run_tp(args, clock: Clock, single: dict | None) -> dict:
    import socket

    import torch
    import torch.multiprocessing as mp

    gpus = torch.cuda.device_count() if args.device == "cuda" else 2  # (cpu: a developer's run over gloo)
    if gpus < 2:
        print(f"  tensor parallel: skipped, {gpus} GPU(s) visible (needs 2)", flush=True)
        return {"skipped": f"{gpus} GPU(s) visible; tensor parallel needs 2"}
    if not clock.left("tensor parallel"):
        return {"skipped": "time budget spent"}
    config = {**SHAPES["0.5b"], **({"n_layers": args.layers} if args.layers else {})}
    with tempfile.TemporaryDirectory(prefix="zoo-gpu-tp-") as work:
        directory = Path(work) / "ckpt"
        write_checkpoint(config, directory)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(work) / "rank0.json"
        prompt = list(range(100, 100 + args.prompt_tokens))
        mp.spawn(tp_rank, args=(2, str(directory), port, prompt, args.new_tokens, str(out)), nprocs=2, join=True)
        result = {"tp": 2, **json.loads(out.read_text())}
    if single and single.get("tok_s"):
        result["vs_one_gpu"] = result.get("tok_s", 0) / single["tok_s"]
    backend = "NCCL" if args.device == "cuda" else "gloo"
    print(f"  tp=2 over {backend}, 0.5b bf16 eager: {result.get('tok_s', 0):.1f} tok/s"
          + (f" ({result['vs_one_gpu']:.2f}x one GPU)" if "vs_one_gpu" in result else ""), flush=True)
    return result


# -- main --------------------------------------------------------------------------------------------------------


def plan(args) -> str:
    parts = []
    if "kernels" in args.parts:
        parts.append("every Triton kernel against its reference")
    if "decode" in args.parts:
        parts.append(f"decode {'/'.join(args.shapes)} x {'/'.join(args.weights)} "
                     f"{'eager' if args.no_compile else 'eager and compiled'}, {args.new_tokens} new tokens")
    if "tp" in args.parts:
        parts.append("tp=2 over NCCL (with 2 GPUs)")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.dry_run:
        print(f"dry run: would run {plan(args)}; results to {args.out}")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU available: nothing to measure (arguments checked). Run this on a machine with a CUDA GPU.")
        return 0
    from common import machine

    clock = Clock(args.budget_s)
    results: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"{results['machine']}\nplan: {plan(args)}", flush=True)
    if "kernels" in args.parts:
        print("kernels (Triton against the PyTorch reference):", flush=True)
        results["kernels"] = run_kernels(args, clock)
        args.out.write_text(json.dumps(results, indent=1))  # each part's numbers kept, whatever happens next
    bandwidth = read_bandwidth(args.device)
    results["read_gbs"] = bandwidth
    print(f"plain read: {bandwidth:.0f} GB/s", flush=True)
    if "decode" in args.parts:
        print("decode, batch 1:", flush=True)
        results["decode"] = run_decode(args, clock, bandwidth)
        results["compiled_speedup"] = speedups(results["decode"], args.device)
        args.out.write_text(json.dumps(results, indent=1))
    if "tp" in args.parts:
        print("tensor parallel:", flush=True)
        single = next((r for r in results.get("decode", []) if r.get("shape") == "0.5b" and r.get("weights") == "bf16"
                       and not r.get("compiled")), None)
        try:
            results["tp"] = run_tp(args, clock, single)
        except Exception as e:  # noqa: BLE001
            results["tp"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"  tensor parallel failed: {results['tp']['error']}", flush=True)
    results["skipped"], results["seconds"] = clock.skipped, clock.elapsed()
    failed = [k["kernel"] for k in results.get("kernels", []) if not k.get("ok")]
    print("\nsummary:")
    if "kernels" in results:
        print(f"  kernels: {len(results['kernels']) - len(failed)}/{len(results['kernels'])} within bounds"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    for row in results.get("decode", []):
        if "tok_s" in row:
            print(f"  decode {row['shape']} {row['weights']} {'compiled' if row['compiled'] else 'eager'}: "
                  f"{row['tok_s']:.1f} tok/s, roofline {row['roofline']:.0%}")
    tp = results.get("tp", {})
    if "tp" in results:
        print(f"  tp=2: {tp['tok_s']:.1f} tok/s" + (f" ({tp['vs_one_gpu']:.2f}x one GPU)" if "vs_one_gpu" in tp else "")
              if "tok_s" in tp else f"  tp: {tp.get('skipped') or tp.get('error')}")
    if results.get("compiled_speedup"):
        print("  compiled over eager (zoo.generation.COMPILED_SPEEDUP form):")
        for line in results["compiled_speedup"]:
            print(f"    {line}")
    if results["skipped"]:
        print(f"  skipped for time: {', '.join(results['skipped'])}")
    print(f"  {results['seconds']:.0f} s; results in {args.out}")
    args.out.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
