"""Decoding speed on one CPU: zoo (eager, compiled, int8, int4) next to transformers and llama.cpp, same weights.

    python benchmarks/bench_decode.py                       # everything, Qwen2-0.5B shape (about 15 minutes)
    python benchmarks/bench_decode.py --layers 2 --new-tokens 8 --only zoo-bf16,llama.cpp-bf16   # a quick try
    python benchmarks/bench_decode.py --device cuda         # zoo and transformers rows on a GPU (HBM roofline)

(The matrix-vector formulations and the Triton kernels alone: benchmarks/bench_kernels.py.)

One Qwen2-0.5B-shaped checkpoint (random bf16 weights, saved by transformers) is converted to zoo's native
format and written as GGUF with the `gguf` package (bf16; Q8_0 and Q4_K_M by llama.cpp's own quantizer through
llama-cpp-python). Every row runs in its own fresh process with the same thread count: greedy decoding of
--new-tokens tokens after a --prompt-tokens prompt, best of --repeats runs, in each of --rounds rounds over
all rows (a shared host drifts; each row keeps its best). Reported per row:

- tokens/s of decoding (the tokens after the first), and time to first token (prompt prefill + first token);
- peak RSS of the process (VmHWM) and its growth over the process after imports;
- bytes of weights read per token (every weight matrix once; the embedding table too when it is the tied
  output head; KV-cache reads, under 1% here, are left out) and the roofline fraction:
  bytes/token x tokens/s / the bandwidth of a plain read (torch.sum over 1 GiB) measured in the same run;
- how many of the greedy tokens equal transformers' at the same dtype (random weights make near-ties, so
  low-precision rows may part ways after a few tokens; that is what they are, not an error).

zoo rows take the options the installed zoo offers: compile= (ZOO_COMPILE for the eager row) and quantize=;
a row whose option does not exist yet says so. Writes the table into BENCHMARKS.md (section "decode").
Needs the `bench` extra (pip install -e '.[bench]': llama-cpp-python, gguf) for the llama.cpp rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, seconds, update_section, vm  # noqa: E402

GIB = 2**30
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                 max_position_embeddings=32768)
# row name -> (engine, options); "require": the zoo.load options the row is about (skipped without them), the
# others are taken when the installed zoo offers them
ROWS = {
    "transformers-fp32": ("transformers", {"dtype": "float32"}),
    "transformers-bf16": ("transformers", {"dtype": "bfloat16"}),
    "zoo-fp32": ("zoo", {"dtype": "float32", "compile": False}),
    "zoo-fp32-compiled": ("zoo", {"dtype": "float32", "compile": True, "require": ["compile"]}),
    "zoo-bf16": ("zoo", {"dtype": "bfloat16", "compile": False}),
    "zoo-bf16-compiled": ("zoo", {"dtype": "bfloat16", "compile": True, "require": ["compile"]}),
    # stored quantised by `zoo convert --quantize` (as llama.cpp's rows read files its quantizer wrote); quantising
    # while loading gives the same tensors but first reads the whole bf16 file (its pages stay in the RSS)
    "zoo-int8": ("zoo", {"dtype": "bfloat16", "compile": True, "stored": "int8"}),
    "zoo-int4": ("zoo", {"dtype": "bfloat16", "compile": True, "stored": "int4"}),
    "llama.cpp-bf16": ("llama.cpp", {"file": "model-bf16.gguf"}),
    "llama.cpp-Q8_0": ("llama.cpp", {"file": "model-q8_0.gguf"}),
    "llama.cpp-Q4_K_M": ("llama.cpp", {"file": "model-q4_k_m.gguf"}),
}
REFERENCE = {"float32": "transformers-fp32", "bfloat16": "transformers-bf16"}  # whose tokens a row is compared to
# the llama.cpp row storing as many bits a weight as a zoo row (the goals: bf16 >= 1x, int8 >= 0.9x Q8_0)
SAME_BITS = {"zoo-bf16": "llama.cpp-bf16", "zoo-bf16-compiled": "llama.cpp-bf16", "zoo-int8": "llama.cpp-Q8_0",
             "zoo-int4": "llama.cpp-Q4_K_M"}


# -- helpers that run inside a worker process ---------------------------------------------------------------------


def timed(run, prompt: list[int], n: int, repeats: int) -> dict:
    """run(prompt, n) yields n tokens; best time to first token and best decode rate over `repeats` runs."""
    best = {"ttft": float("inf"), "tok_s": 0.0}
    for _ in range(repeats):
        stamps, tokens = [], []
        start = time.perf_counter()
        for tok in run(prompt, n):
            stamps.append(time.perf_counter())
            tokens.append(int(tok))
        best["ttft"] = min(best["ttft"], stamps[0] - start)
        if len(stamps) > 1:
            best["tok_s"] = max(best["tok_s"], (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        best["tokens"] = tokens
    return best


def module_bytes_per_token(module, tied_embedding: bool) -> int:
    """Bytes of every parameter and buffer (packed weights included; a tensor shared by two modules, such as a
    tied head, once), less the embedding table unless it is also the output head (a lookup reads one row)."""
    import torch

    tensors = {}
    for t in [*module.parameters(), *module.buffers()]:
        tensors[t.data_ptr()] = t.numel() * t.element_size()
    total = sum(tensors.values())
    if tied_embedding:
        return total
    embeddings = {m.weight.data_ptr() for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return total - sum(tensors.get(p, 0) for p in embeddings)


def worker_zoo(args, opts: dict) -> dict:
    import inspect

    import torch

    import zoo

    torch.set_num_threads(args.threads)
    base = vm("VmRSS")
    params = inspect.signature(zoo.load).parameters
    kwargs = {"dtype": getattr(torch, opts["dtype"])}
    for key in ("compile", "quantize"):
        if key in opts and key in params:
            kwargs[key] = opts[key]
        elif key in opts.get("require", ()):  # the row is about this option, which this zoo does not offer
            return {"skipped": f"zoo.load has no {key}= yet"}
    if "compile" not in params:
        os.environ["ZOO_COMPILE"] = "1" if opts.get("compile") else "0"
    directory = args.paths[f"native-{opts['stored']}"] if "stored" in opts else args.model_dir
    t = time.perf_counter()
    model = zoo.load(directory, device=args.device, **kwargs)
    load_s = time.perf_counter() - t

    def run(prompt, n):
        return model.generate(prompt, max_new_tokens=n, temperature=0, stream=True)

    warm = time.perf_counter()
    list(run(args.prompt, min(4, args.new_tokens)))  # compiles here if it compiles
    warm_s = time.perf_counter() - warm
    out = timed(run, args.prompt, args.new_tokens, args.repeats)
    module = model.module
    tied = getattr(module, "lm_head", None) is None
    return {**out, "load_s": load_s, "warmup_s": warm_s, **peak_memory(args.device, base),
            "bytes_per_token": module_bytes_per_token(module, tied)}


def worker_transformers(args, opts: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    base = vm("VmRSS")
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=getattr(torch, opts["dtype"]))
    model = model.to(args.device).eval()
    load_s = time.perf_counter() - t

    class Stamps(BaseStreamer):
        """generate() is not a generator: the streamer timestamps each new token as it is produced."""

        def __init__(self):
            self.stamps, self.prompt_seen = [], False

        def put(self, value):
            if not self.prompt_seen:  # generate() hands over the prompt first
                self.prompt_seen = True
                return
            self.stamps.append((time.perf_counter(), int(value.reshape(-1)[0])))

        def end(self):
            pass

    def run(prompt, n):
        streamer = Stamps()
        with torch.inference_mode():
            model.generate(torch.tensor([prompt], device=args.device), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=streamer)
        return streamer.stamps

    def timed_hf(prompt, n, repeats):
        best = {"ttft": float("inf"), "tok_s": 0.0}
        for _ in range(repeats):
            start = time.perf_counter()
            stamps = run(prompt, n)
            best["ttft"] = min(best["ttft"], stamps[0][0] - start)
            if len(stamps) > 1:
                best["tok_s"] = max(best["tok_s"], (len(stamps) - 1) / (stamps[-1][0] - stamps[0][0]))
            best["tokens"] = [tok for _, tok in stamps]
        return best

    run(args.prompt, min(4, args.new_tokens))
    out = timed_hf(args.prompt, args.new_tokens, args.repeats)
    return {**out, "load_s": load_s, **peak_memory(args.device, base),
            "bytes_per_token": module_bytes_per_token(model, model.config.tie_word_embeddings)}


def worker_llama_cpp(args, opts: dict) -> dict:
    import ctypes

    import llama_cpp as L
    import numpy as np

    path = Path(args.gguf_dir) / opts["file"]
    if args.device != "cpu":
        return {"skipped": "llama-cpp-python from PyPI is built for the CPU here"}
    if not path.is_file():
        return {"skipped": f"{path.name} was not written (see the build step's message)"}
    base = vm("VmRSS")
    L.llama_backend_init()
    t = time.perf_counter()
    mp = L.llama_model_default_params()
    if os.environ.get("ZOO_BENCH_LLAMA_REPACK") == "0" and hasattr(mp, "use_extra_bufts"):
        mp.use_extra_bufts = False  # no repacked (e.g. AMX) weight layouts: llama.cpp's plain CPU kernels
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = len(args.prompt) + args.new_tokens + 8
    cp.n_batch = cp.n_ubatch = max(len(args.prompt), 1)
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cp)
    load_s = time.perf_counter() - t
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    def greedy() -> int:
        logits = L.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                                   shape=(n_vocab,))))

    def run(prompt, n):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        ids = (L.llama_token * len(prompt))(*prompt)
        if L.llama_decode(ctx, L.llama_batch_get_one(ids, len(prompt))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        tok = greedy()
        yield tok
        for _ in range(n - 1):
            one = (L.llama_token * 1)(tok)
            if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            tok = greedy()
            yield tok

    list(run(args.prompt, min(4, args.new_tokens)))
    out = timed(run, args.prompt, args.new_tokens, args.repeats)
    return {**out, "load_s": load_s, "peak_rss": vm("VmHWM"), "rss_growth": vm("VmHWM") - base,
            "bytes_per_token": gguf_bytes_per_token(path)}


def gguf_bytes_per_token(path: Path) -> int:
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    tied = "output.weight" not in tensors
    return sum(b for name, b in tensors.items() if tied or name != "token_embd.weight")


def peak_memory(device: str, rss_base: int) -> dict:
    """Peak RSS of the process; on a GPU also the peak of memory allocated there."""
    out = {"peak_rss": vm("VmHWM"), "rss_growth": vm("VmHWM") - rss_base}
    if device != "cpu":
        import torch

        out["peak_device"] = torch.cuda.max_memory_allocated()
    return out


def worker_bandwidth(args) -> dict:
    """GB/s of a plain read: torch.sum over 1 GiB of fp32 (4 GiB on a GPU), best of 5, on the benchmark's device."""
    import torch

    torch.set_num_threads(args.threads)
    size = GIB if args.device == "cpu" else 4 * GIB
    big = torch.ones(size // 4, device=args.device)
    big.sum()
    best = min(seconds(lambda: big.sum(), args.device) for _ in range(5))
    return {"read_gbs": size / best / 1e9}


# -- checkpoint preparation (parent process) ----------------------------------------------------------------------


def make_checkpoints(work: Path, layers: int, vocab: int | None = None) -> tuple[Path, Path, Path, list[str]]:
    """The Qwen2-0.5B-shaped checkpoint with `layers` layers (and `vocab` tokens, a quick run's smaller table)
    under `work`: transformers' (hf), zoo's (native, native-int8, native-int4) and GGUF files; each kept if there."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import zoo

    hf_dir, native_dir, gguf_dir = work / "hf", work / "native", work / "gguf"
    notes = []
    if not hf_dir.exists():
        torch.manual_seed(0)
        cfg = Qwen2Config(**{**QWEN2_05B, "vocab_size": vocab or QWEN2_05B["vocab_size"]}, num_hidden_layers=layers)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random biases, as a trained model has
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
        model.to(torch.bfloat16).save_pretrained(hf_dir)  # published checkpoints are bf16
    if not native_dir.exists():
        zoo.convert(hf_dir, native_dir, progress=False)
    for scheme in ("int8", "int4"):
        if not (work / f"native-{scheme}").exists():
            zoo.convert(hf_dir, work / f"native-{scheme}", quantize=scheme, progress=False)
    try:
        notes += write_ggufs(hf_dir, gguf_dir)
    except ImportError as e:
        notes.append(f"llama.cpp rows need the bench extra (pip install -e '.[bench]'): {e}")
    return hf_dir, native_dir, gguf_dir, notes


def write_ggufs(hf_dir: Path, gguf_dir: Path) -> list[str]:
    """The transformers checkpoint's tensors as GGUF for llama.cpp's qwen2 architecture: bf16 as stored, then
    Q8_0 and Q4_K_M through llama.cpp's quantizer. No tokenizer: the benchmark feeds token ids, so the vocabulary
    is llama.cpp's "none" model with the vocabulary size only."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    gguf_dir.mkdir(parents=True, exist_ok=True)
    bf16 = gguf_dir / "model-bf16.gguf"
    cfg = json.loads((hf_dir / "config.json").read_text())
    if not bf16.exists():
        names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
        per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                     "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                     "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
        for p, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            per_layer[f"self_attn.{p}.weight"], per_layer[f"self_attn.{p}.bias"] = f"{g}.weight", f"{g}.bias"
        w = gguf.GGUFWriter(str(bf16) + ".part", "qwen2")
        w.add_name("zoo bench Qwen2-0.5B shape (random weights)")
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])  # transformers 4 / 5
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
        w.add_tokenizer_model("none")
        w.add_vocab_size(cfg["vocab_size"])
        files = sorted(hf_dir.glob("*.safetensors"))
        for f in files:
            with safe_open(f, "pt") as st:
                for key in st.keys():
                    if key.startswith("model.layers."):
                        i, rest = key.removeprefix("model.layers.").split(".", 1)
                        name = f"blk.{i}.{per_layer[rest]}"
                    else:
                        name = names[key]
                    t = st.get_tensor(key)
                    if t.ndim == 1:  # norms and biases: llama.cpp keeps 1-d tensors in fp32
                        w.add_tensor(name, t.float().numpy())
                    else:  # the bf16 bits as stored
                        w.add_tensor(name, t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                     raw_dtype=gguf.GGMLQuantizationType.BF16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(str(bf16) + ".part", bf16)
    notes = []
    import llama_cpp as L

    if not hasattr(L, "llama_model_quantize"):
        return ["this llama-cpp-python exposes no llama_model_quantize: Q8_0 / Q4_K_M rows skipped"]
    for ftype, name in ((L.LLAMA_FTYPE_MOSTLY_Q8_0, "model-q8_0.gguf"), (L.LLAMA_FTYPE_MOSTLY_Q4_K_M,
                                                                           "model-q4_k_m.gguf")):
        out = gguf_dir / name
        if out.exists():
            continue
        params = L.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = os.cpu_count() or 1
        rc = L.llama_model_quantize(str(bf16).encode(), (str(out) + ".part").encode(), params)
        if rc != 0:
            notes.append(f"llama_model_quantize to {name} failed (code {rc})")
            continue
        os.replace(str(out) + ".part", out)
    return notes


# -- parent ------------------------------------------------------------------------------------------------------


def run_worker(kind: str, args, opts: dict | None = None, timeout: float = 3600) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--device", args.device,
           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
           "--opts", json.dumps(opts or {}), "--paths", json.dumps(args.paths)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def prompt_ids(n: int, vocab: int = 151643) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randrange(vocab) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="24 = the real Qwen2-0.5B depth")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: zoo and transformers rows on the GPU")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all rows; each row keeps its best")
    ap.add_argument("--dir", type=Path, help="keep the checkpoints here (default: a temp dir)")
    ap.add_argument("--only", help=f"comma-separated rows out of: {', '.join(ROWS)}")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        paths = json.loads(args.paths)
        args.model_dir, args.hf_dir, args.gguf_dir = paths["native"], paths["hf"], paths["gguf"]
        args.paths = paths
        args.prompt = prompt_ids(args.prompt_tokens)
        opts = json.loads(args.opts)
        fn = {"zoo": worker_zoo, "transformers": worker_transformers, "llama.cpp": worker_llama_cpp,
              "bandwidth": lambda a, o: worker_bandwidth(a)}[args.worker]
        print(json.dumps(fn(args, opts)), flush=True)
        return

    wanted = args.only.split(",") if args.only else list(ROWS)
    unknown = [w for w in wanted if w not in ROWS]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; rows are {list(ROWS)}")
    work = args.dir or Path(tempfile.mkdtemp(prefix="zoo-bench-decode-"))
    hf_dir, native_dir, gguf_dir, notes = make_checkpoints(work, args.layers)
    args.paths = {"native": str(native_dir), "hf": str(hf_dir), "gguf": str(gguf_dir),
                  **{f"native-{q}": str(work / f"native-{q}") for q in ("int8", "int4")}}
    before = run_worker("bandwidth", args)["read_gbs"]
    print(f"plain read bandwidth: {before:.1f} GB/s", flush=True)
    # Rounds over every row, each round starting one row later: a shared host's speed drifts over minutes, and
    # best-of-rounds gives every row the same chances at its quiet moments.
    results = {}
    for r in range(args.rounds):
        shift = r % len(wanted)
        for name in wanted[shift:] + wanted[:shift]:
            engine, opts = ROWS[name]
            got = run_worker(engine, args, opts)
            print(f"round {r + 1}", name, json.dumps({k: v for k, v in got.items() if k != "tokens"}), flush=True)
            if name not in results or got.get("tok_s", 0) > results[name].get("tok_s", 0):
                results[name] = got
    results = {name: results[name] for name in wanted}

    # measured again after the rows: a shared host's bandwidth drifts; the roofline divides by the higher one
    after = run_worker("bandwidth", args)["read_gbs"]
    bandwidth = max(before, after)

    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    hf = {d: results.get(n, {}).get("tok_s") for d, n in REFERENCE.items()}
    lcpp = results.get("llama.cpp-bf16", {}).get("tok_s")
    gpu = args.device != "cpu"
    read = "4 GiB fp32 on the GPU" if gpu else f"1 GiB fp32, {args.threads} threads"
    lines = [
        "## Decoding: zoo vs transformers vs llama.cpp (`benchmarks/bench_decode.py"
        f"{' --device ' + args.device if gpu else ''}`)",
        "",
        f"Machine: {machine()}; plain read bandwidth (torch.sum over {read}): {before:.1f} GB/s before the "
        f"rows, {after:.1f} after; the roofline divides by the higher.  ",
        f"Checkpoint: Qwen2-0.5B shape ({args.layers} layers, vocab 151936, tied head), random bf16 weights; "
        f"prompt {args.prompt_tokens} tokens, greedy, {args.new_tokens} new tokens, best of {args.repeats} runs in "
        f"each of {args.rounds} rounds over all rows (each row in a fresh process with {args.threads} threads).  ",
        f"Command: `python benchmarks/bench_decode.py{'' if args.layers == 24 else f' --layers {args.layers}'}"
        f"{' --device ' + args.device if gpu else ''}`",
        "",
        "| row | tokens/s | vs transformers | vs llama.cpp bf16 | vs llama.cpp, same bits | first token (s) | "
        f"weights read / token (MB) | roofline | peak {'GPU memory' if gpu else 'RSS'} (GiB) | "
        "same tokens as transformers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        if "tok_s" not in r:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} | | | | | | | | |")
            continue
        dtype = "bfloat16" if ("bf16" in name or "int" in name or "llama" in name) else "float32"
        ref = results.get(REFERENCE[dtype], {})
        same = "-"
        if "tokens" in ref and name != REFERENCE[dtype]:
            k = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"])) if a != b), len(r["tokens"]))
            same = f"{k}/{len(r['tokens'])}"
        ratio = f"{r['tok_s'] / hf[dtype]:.2f}x" if hf.get(dtype) else "-"
        vs_lcpp = f"{r['tok_s'] / lcpp:.2f}x" if lcpp else "-"
        twin = results.get(SAME_BITS.get(name, ""), {}).get("tok_s")
        vs_twin = f"{r['tok_s'] / twin:.2f}x ({SAME_BITS[name].split('-')[1]})" if twin else "-"
        roof = r["bytes_per_token"] * r["tok_s"] / (bandwidth * 1e9)
        lines.append(f"| {name} | {r['tok_s']:.1f} | {ratio} | {vs_lcpp} | {vs_twin} | {cell(r, 'ttft', '.3f')} | "
                     f"{r['bytes_per_token'] / 1e6:.0f} | {roof:.0%} | "
                     f"{r['peak_device' if gpu else 'peak_rss'] / GIB:.2f} | {same} |")
    notes = ["zoo-int8 and zoo-int4 load checkpoints stored quantised by `zoo convert --quantize` (int8 per "
             "output row; int4 in groups of 128 columns with a scale and an offset, the tied embedding int8), as the "
             "llama.cpp rows read files its quantizer wrote. `zoo.load(..., quantize=...)` from the bf16 checkpoint "
             "gives the same tensors; its peak RSS also counts the pages of the bf16 file it read.", *notes]
    lines += ["", *[f"Note: {n}" for n in notes]]
    text = "\n".join(lines)
    if not args.no_write:
        update_section("decode", text)
    print(text)


if __name__ == "__main__":
    main()
