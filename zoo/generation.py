"""One decoding engine for every language model: prefill, then one token at a time.

It only talks to the model through the decoding protocol (architectures/state.py, `DecodingModel`):
`model.new_state(batch, max_len, pad)`, `model(ids, state=state, last_only=True)` and the state's own methods,
so attention models (a KV cache) and recurrent ones (a fixed-size memory) share it, with batching, sampling,
beam search and stopping.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from zoo.architectures.kernels.argmax import argmax_last
from zoo.checks import check_beam_search
from zoo.settings import SETTINGS


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Checked on creation: every entry point builds one."""

    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t!r}: must be a finite number >= 0 (0 picks the most likely token)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral)
                                       or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 1 (or None for no top-k cut)")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1):
            raise ValueError(f"top_p={p!r}: must be a number with 0 < top_p <= 1 (or None for no nucleus cut)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or self.seed < 0):
            raise ValueError(f"seed={self.seed!r}: must be an integer >= 0 (or None)")


def check_max_new_tokens(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"max_new_tokens={n!r}: must be an integer >= 0")
    return int(n)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V].

    A draw takes exactly one uniform number per row from the generator (inverse CDF in fp32), whatever the
    settings and whichever path computed the logits (eager or the compiled step), so the same seed draws the same
    numbers on both; README "Reproducible sampling" says what can still differ."""
    if not s.temperature:
        return argmax_last(logits)  # (torch.argmax's index; zoo's C++ op on CPU: ~1 ms less per token for 150K logits)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    cdf = logits.softmax(-1).cumsum(-1)
    u = 1.0 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)  # in (0, 1]: never a 0-mass token
    return (cdf < u * cdf[:, -1:]).sum(-1).clamp(max=cdf.shape[-1] - 1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack token lists into [B, T] with pad on the left; also the pad count per row (None if none)."""
    if not sequences or min(len(s) for s in sequences) == 0:
        raise ValueError("empty prompt: give at least one token (in every row of a batch)")
    longest = max(len(s) for s in sequences)
    pad = torch.tensor([longest - len(s) for s in sequences], device=device)
    ids = torch.tensor([[pad_id] * (longest - len(s)) + list(s) for s in sequences], device=device)
    return ids, (pad if bool(pad.any()) else None)


class Runner:
    """The model over one generation state: the prompt once (an eager pass scoring only its last position), then
    one token per row at a time, through the compiled step on the state's static form when compiling
    (`compile_wanted`: True, False, or None for the default), else eagerly. Only the decoding protocol is used
    (architectures/state.py)."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, pad: torch.Tensor | None, max_new_tokens: int,
                 compile: bool | None):
        self.model = model
        self.state = model.new_state(ids.shape[0], ids.shape[1] + max_new_tokens, pad)
        self.prompt = ids
        wanted = max_new_tokens > 1 and compile_wanted(compile, model, ids.shape[0], max_new_tokens)
        self.compiled = compiled_step(model) if wanted else None

    def prefill(self) -> torch.Tensor:
        """Last-position logits of the prompt, [B, V]."""
        logits = self.model(self.prompt, state=self.state, last_only=True)[:, -1]
        if self.compiled is not None:
            self.state.make_static(logits.device)
            self.compiled.mark_dynamic_length(self.state)
        return logits

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, V] after one more token per row ([B]), and their argmax when the compiled graph computed it
        (greedy decoding's next token), else None."""
        state = self.state
        if self.compiled is not None and state.static_step(1):
            out = self.compiled(self.model, state, tokens[:, None])
            if out is not None:
                state.counted_in_graph(1)
                return out
            self.compiled = None  # it could not be compiled: said once (compiled_step); eager from here
        state.make_dynamic()  # (a step the family runs in the dynamic form, e.g. a rebuild of its state)
        logits = self.model(tokens[:, None], state=state, last_only=True)[:, -1]
        if self.compiled is not None:
            state.make_static(logits.device)
        return logits, None


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: set[int],
    pad_id: int = 0,
    compile: bool | None = None,
    min_gen_length: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], until all rows stopped or max_new_tokens.

    Rows that stopped keep going until all have; callers cut each row at its first stop token. The model runs
    through a `Runner` (eager prefill, then eager or compiled steps). Per token the host waits only for the stop
    check; sampling stays on the device. min_gen_length: no stop token among the first that many.
    """
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    ids, pad = left_pad(sequences, pad_id, device)
    run = Runner(model, ids, pad, max_new_tokens, compile)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    logits = run.prefill()
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    best = None  # the compiled step's argmax of its logits: greedy decoding's next token, computed in the graph
    for n in range(max_new_tokens):
        if n < min_gen_length and len(stops):
            logits, best = logits.index_fill(-1, stops, float("-inf")), None
        nxt = best if best is not None and not sampling.temperature else sample(logits, sampling, generator)
        yield nxt
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or n == max_new_tokens - 1:
            return
        logits, best = run.step(nxt)


# -- beam search ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Beams:
    """Beam-search settings, with transformers' names (and GLM-130B's min_gen_length). Checked on creation."""

    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    num_return_sequences: int = 1
    min_gen_length: int = 0

    def __post_init__(self):
        check_beam_search(self.num_beams, self.length_penalty, self.no_repeat_ngram_size, self.early_stopping,
                          self.num_return_sequences, self.min_gen_length)

    @property
    def on(self) -> bool:
        return self.num_beams > 1

    def describe(self) -> str:
        parts = [f"num_beams={self.num_beams}", f"length_penalty={self.length_penalty:g}"]
        if self.no_repeat_ngram_size:
            parts.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size}")
        if self.early_stopping is not False:
            parts.append(f"early_stopping={self.early_stopping!r}")
        if self.num_return_sequences > 1:
            parts.append(f"num_return_sequences={self.num_return_sequences}")
        if self.min_gen_length:
            parts.append(f"min_gen_length={self.min_gen_length}")
        return "beam search (" + ", ".join(parts) + ")"


def describe_strategy(sampling: Sampling, beams: Beams | None = None) -> str:
    """Which strategy a generation runs, with its numbers: greedy, sampling (...) or beam search (...)."""
    if beams is not None and beams.on:
        return beams.describe()
    extra = f", min_gen_length={beams.min_gen_length}" if beams is not None and beams.min_gen_length else ""
    if not sampling.temperature:
        return f"greedy{' (' + extra[2:] + ')' if extra else ''}"
    parts = [f"temperature={sampling.temperature:g}"]
    parts += [f"{k}={getattr(sampling, k)}" for k in ("top_k", "top_p", "seed") if getattr(sampling, k) is not None]
    return "sampling (" + ", ".join(parts) + extra + ")"


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in `tokens` (transformers' NoRepeatNGramLogitsProcessor)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]


class BeamSearch:
    """transformers' beam search (GenerationMixin._beam_search, 5.x): per prompt, the best `beams_to_keep`
    continuations of all beams by summed log-probability; those ending in a stop token (or reaching
    max_new_tokens) compete, length-penalised (score / new_tokens ** length_penalty), for the num_beams finished
    slots; the best num_beams unfinished ones run on. Stops per transformers' early-stopping heuristic.

    The rule interface (a family may bring its own, `beam_rule`, architectures/state.py): constructed with
    (beams, prompts, stop_ids, max_new_tokens, device); `step(logits [B*K, V], n)` -> (source row of each new
    row [B*K], its token [B*K]); `done`; `finish()` -> per prompt the best num_return_sequences token lists."""

    def __init__(self, beams: Beams, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int,
                 device: torch.device):
        self.b, self.k, self.max_new = len(prompts), beams.num_beams, max_new_tokens
        self.beams, self.prompts, self.device = beams, prompts, device
        self.stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.keep = max(2, 1 + len(stop_ids)) * self.k
        B, K = self.b, self.k
        self.running = torch.zeros(B, K, max_new_tokens, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(B, K, device=device)
        self.running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first token
        self.sequences = torch.zeros(B, K, max_new_tokens, dtype=torch.long, device=device)
        self.lengths = torch.zeros(B, K, dtype=torch.long, device=device)
        self.scores = torch.full((B, K), -1e9, device=device)
        self.finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        self.done = False

    def _process(self, log_probs: torch.Tensor, n: int) -> torch.Tensor:
        if n < self.beams.min_gen_length and len(self.stops):
            log_probs = log_probs.index_fill(-1, self.stops, float("-inf"))
        ngram = self.beams.no_repeat_ngram_size
        if ngram:
            history = self.running[:, :, :n].reshape(self.b * self.k, n).tolist()
            for row, generated in enumerate(history):
                banned = banned_ngram_tokens(self.prompts[row // self.k] + generated, ngram)
                if banned:
                    log_probs[row, banned] = float("-inf")
        return log_probs

    def step(self, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, K, lp = self.b, self.k, self.beams.length_penalty
        log_probs = self._process(torch.log_softmax(logits.float(), dim=-1), n)
        V = log_probs.shape[-1]
        flat = (log_probs.view(B, K, V) + self.running_scores[:, :, None]).view(B, K * V)
        top_scores, top = torch.topk(flat, self.keep)
        source, tokens = top // V, top % V
        cand = self.running.gather(1, source[:, :, None].expand(B, self.keep, self.max_new)).clone()
        cand[:, :, n] = tokens
        hits = torch.isin(tokens, self.stops) | (n + 1 >= self.max_new)
        # the best num_beams unfinished candidates run on
        alive_scores = top_scores + hits.float() * -1e9
        pick = torch.topk(alive_scores, K).indices
        self.running = cand.gather(1, pick[:, :, None].expand(B, K, self.max_new))
        self.running_scores = alive_scores.gather(1, pick)
        rows = (source.gather(1, pick) + torch.arange(B, device=self.device)[:, None] * K).view(-1)
        # finished candidates among the top num_beams compete for the finished slots
        first = torch.zeros(self.keep, dtype=torch.bool, device=self.device)
        first[:K] = True
        just = hits & first[None]
        penalised = top_scores / float(n + 1) ** lp
        full = self.finished.all(-1, keepdim=True) & (self.beams.early_stopping is True)
        penalised = penalised + full.float() * -1e9 + (~self.improvable).float() * -1e9 + (~just).float() * -1e9
        scores = torch.cat([self.scores, penalised], 1)
        best = torch.topk(scores, K).indices
        self.sequences = torch.cat([self.sequences, cand], 1).gather(1, best[:, :, None].expand(B, K, self.max_new))
        self.lengths = torch.cat([self.lengths, torch.full_like(top, n + 1)], 1).gather(1, best)
        self.finished = torch.cat([self.finished, just], 1).gather(1, best)
        self.scores = scores.gather(1, best)
        # can a running beam still beat the worst finished one? (transformers' heuristic)
        length = self.max_new if self.beams.early_stopping == "never" and lp > 0 else n + 1
        best_possible = self.running_scores[:, :1] / float(length) ** lp
        worst = torch.where(self.finished, self.scores.min(1, keepdim=True).values, -1e9)
        self.improvable = self.improvable & (best_possible > worst).any(-1, keepdim=True)
        all_full = bool(self.finished.all()) and self.beams.early_stopping is True
        self.done = not bool(self.improvable.any()) or all_full or bool(hits.all())
        return rows, self.running[:, :, n].reshape(-1)

    def finish(self) -> list[list[list[int]]]:
        r = self.beams.num_return_sequences
        return [[self.sequences[b, j, : int(self.lengths[b, j])].tolist() for j in range(r)] for b in range(self.b)]


@torch.inference_mode()
def beam_search(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    max_new_tokens: int,
    beams: Beams,
    stop_ids: set[int],
    pad_id: int = 0,
    compile: bool | None = None,
) -> list[list[list[int]]]:
    """Per prompt, its best `beams.num_return_sequences` continuations (new token ids, a stop token ending a
    finished one), best first. Every prompt gets num_beams rows of one state (prompt repeated, left padded); after
    each token the state reorders its rows to the surviving beams (`State.reorder`). The scoring rule is the
    model's `beam_rule` if it has one (architectures/state.py), else transformers' (`BeamSearch`)."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if max_new_tokens == 0:
        return [[[] for _ in range(beams.num_return_sequences)] for _ in sequences]
    device = next(model.parameters()).device
    prompts = [list(s) for s in sequences]
    ids, pad = left_pad([p for p in prompts for _ in range(beams.num_beams)], pad_id, device)
    run = Runner(model, ids, pad, max_new_tokens, compile)
    rule = (getattr(model, "beam_rule", None) or BeamSearch)(beams, prompts, stop_ids, max_new_tokens, device)
    logits = run.prefill()
    for n in range(max_new_tokens):
        rows, tokens = rule.step(logits, n)
        if rule.done or n == max_new_tokens - 1:
            break
        run.state.reorder(rows)
        logits, _ = run.step(tokens)
    return rule.finish()


# -- the compiled decoding step -----------------------------------------------------------------------------------


# Whether the default (compile=None, no ZOO_COMPILE) decodes through the compiled step: ONE table of measured
# speed-ups, one pure decision over facts (`compile_pays`, walked by tests/test_fast_decode.py), as
# kernels/dispatch.choose is for kernels. (The table lives here, beside the step it is about; it could move next to
# the kernel dispatch.) A compiled step is not faster everywhere: while it multiplied by Inductor's own code, on AVX2
# the compiled int8 step decoded 6x slower than the eager one (Inductor's widen-then-multiply against zoo's CPU
# kernels); it now calls the eager step's C++ kernels (kernels/dispatch.py) and saves the Python between them, but
# the default stays eager wherever no measurement says the compiled step is faster.
#
# (device type, CPU instruction set as ATen names it ("*" off the CPU), weights) -> the compiled step's decode rate
# over the eager one's, Qwen2-0.5B shape, batch 1 (benchmarks/bench_matrix.py prints these ratios per machine;
# BENCHMARKS.md keeps the runs). Weights: the float dtype ("float32", "bfloat16") or the quantisation ("int8", "int4").
# A missing entry, or a ratio <= 1, keeps that corner eager by default; compile=True still compiles.
COMPILED_SPEEDUP: dict[tuple[str, str, str], float] = {
    # BENCHMARKS.md "matrix-avx512" (Intel Xeon, AVX-512 BF16/AMX), measured before the compiled step called zoo's
    # C++ kernels (on AVX2 that change lifted every ratio above 1); where the fp32 and bf16 activations differ, the
    # lower of the two
    ("cpu", "AVX512", "float32"): 1.04,  # 9.7 / 9.3 tok/s
    ("cpu", "AVX512", "bfloat16"): 0.84,  # 14.3 / 17.0
    ("cpu", "AVX512", "int8"): 1.13,  # 20.8 / 18.4 (bf16); 21.8 / 18.2 (fp32)
    ("cpu", "AVX512", "int4"): 1.05,  # 19.0 / 18.0 (fp32); 23.6 / 20.7 (bf16)
    # BENCHMARKS.md "matrix-avx2" (AMD EPYC, AVX2 only, 2026-12-03, two rounds): compile on against compile off,
    # the compiled step on zoo's C++ kernels; the lower of the fp32 and bf16 activations
    ("cpu", "AVX2", "float32"): 1.04,  # 16.8 / 16.3
    ("cpu", "AVX2", "bfloat16"): 1.17,  # 29.7 / 25.4
    ("cpu", "AVX2", "int8"): 1.19,  # 40.5 / 34.0 (bf16); 51.8 / 37.5 (fp32)
    ("cpu", "AVX2", "int4"): 1.13,  # 47.3 / 41.8 (bf16); 48.0 / 40.5 (fp32)
}
# Compiling costs ~20 s with a warm Inductor cache (under $ZOO_HOME: `inductor_cache`; 18-23 s for the 0.5B shape
# on the AVX2 EPYC: the first call of a compile-on cell) and about a minute the first time on a machine. A token's
# time is about its weights' bytes over the memory bandwidth, and the compiled step saves (1 - 1/speed-up) of it, so
# compiling pays from this many weight bytes saved over a generation (weights x new tokens x (1 - 1/speed-up);
# ~20 s of a 30 GB/s read): Qwen2-0.5B bf16 (1 GB a token) at 1.17x from ~4100 new tokens, a 7B model int8 (7.6 GB) from
# ~500; the 24 MB embedded model practically never.
COMPILE_PAYS = 600 * 10**9


@dataclass(frozen=True)
class CompileFacts:
    """What the default compile decision depends on, gathered from a model and a generation (`compile_facts`)."""

    device: str  # "cpu", "cuda", ...
    isa: str  # the CPU's vector instruction set (dispatch.cpu_isa(): "AVX512", "AVX2", "DEFAULT", ...); "*" off CPU
    weights: str  # "float32", "bfloat16", "float16", "int8", "int4", "ternary", ...
    weight_bytes: int  # bytes of every parameter and buffer: what one token streams
    new_tokens: int
    compiled_already: bool  # a step of this model has already been compiled for this batch size


def compile_pays(facts: CompileFacts, table: dict[tuple[str, str, str], float] | None = None) -> bool:
    """The default decision: compiled where the table (COMPILED_SPEEDUP unless given) says the compiled step is
    faster on this machine for these weights, and either it is compiled already (nothing left to pay) or the
    generation is long enough for the time it saves to pay for compiling (COMPILE_PAYS)."""
    speedup = (COMPILED_SPEEDUP if table is None else table).get((facts.device, facts.isa, facts.weights), 0.0)
    if speedup <= 1.0:
        return False
    if facts.compiled_already:
        return True
    return facts.weight_bytes * facts.new_tokens * (1 - 1 / speedup) >= COMPILE_PAYS


def weight_kind(model: torch.nn.Module) -> str:
    """What the model's weights are for the decision: a packed layer's scheme family ("int8" for "int8-row",
    "int4" for "int4-group128", "ternary"), else the dtype of its floating-point weights ("bfloat16", ...)."""
    for m in model.modules():
        name = getattr(getattr(m, "scheme", None), "name", None)
        if isinstance(name, str) and name:
            return name.split("-")[0]
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return str(first.dtype).removeprefix("torch.") if first is not None else "float32"


def compile_facts(model: torch.nn.Module, batch: int, new_tokens: int) -> CompileFacts:
    from zoo.architectures.kernels.dispatch import cpu_isa

    device = next((t.device.type for t in (*model.parameters(), *model.buffers())), "cpu")
    done = _STEPS.get(model)
    return CompileFacts(device=device, isa=cpu_isa() if device == "cpu" else "*", weights=weight_kind(model),
                        weight_bytes=sum(t.numel() * t.element_size() for t in (*model.parameters(),
                                                                                  *model.buffers())),
                        new_tokens=new_tokens, compiled_already=done is not None and batch in done.batches)


def compile_wanted(compile: bool | None, model: torch.nn.Module, batch: int, new_tokens: int) -> bool:
    """Whether a generation decodes through the compiled step. True / False: as asked (zoo.load(compile=...),
    `zoo generate --compile / --no-compile`). None, the default: ZOO_COMPILE=1 / 0 if set; otherwise
    `compile_pays` (eager unless measured faster on this machine for these weights, and worth its compile). A
    model marked `zoo_eager_only` (a reason: weights streamed from disk by a device map, which no graph can trace)
    decodes eagerly; asked to compile, it says why."""
    eager_only = getattr(model, "zoo_eager_only", None)
    if eager_only:
        if compile:
            warnings.warn(f"compile=True: this model decodes eagerly, since {eager_only}", stacklevel=3)
        return False
    if compile is not None:
        return bool(compile)
    if SETTINGS.compile is not None:  # ZOO_COMPILE, read once by zoo.settings
        return SETTINGS.compile
    return compile_pays(compile_facts(model, batch, new_tokens))


def inductor_cache() -> None:
    """Point Inductor's on-disk caches at $ZOO_HOME/inductor unless the user chose a place
    (TORCHINDUCTOR_CACHE_DIR): a compile warm from an earlier process is what users meet, and it stays with
    zoo's other per-machine files instead of the system's temp directory (which may be wiped at boot)."""
    import os

    from zoo.settings import zoo_home

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(zoo_home() / "inductor")


def _decode_step(model: torch.nn.Module, state, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(tok, state=state, last_only=True)[:, -1]
    return logits, argmax_last(logits)


def _inductor(gm, example_inputs) -> tuple:
    """Inductor, after one graph pass: every linear layer applied to a single row that is still an F.linear (zoo's C++
    kernels put their own ops in the graph instead: kernels/dispatch.py) becomes multiply-and-reduce
    (zoo.architectures.kernels.matvec: the form Inductor turns into one fast pass over the weight).
    Returns (compiled, how many linears were rewritten, {zoo_cpu op: calls in the graph})."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    from zoo.architectures.kernels import matvec

    rewritten = matvec.rewrite_single_row_linears(gm)
    cpu_ops = Counter(str(node.target).split(".")[1] for node in gm.graph.nodes  # ("zoo_cpu.dense_rows[.default]")
                      if node.op == "call_function" and str(node.target).startswith("zoo_cpu."))
    # Inductor's caches take only functions they know; ours is keyed by its own source, so an edited
    # matvec_linear is compiled afresh (warm-cache compilation is several times faster than a cold one).
    # Casts to lower precision round as they do eagerly (GLM's fp16 rotary angles; bf16 norms): the same numbers.
    cacheable = {**config.unsafe_marked_cacheable_functions, **matvec.cache_keys()}
    with config.patch(unsafe_marked_cacheable_functions=cacheable, emulate_precision_casts=True,
                      size_asserts=False):  # (the wrapper checking ~400 input shapes per token: 4 ms of 30)
        return compile_fx(gm, example_inputs), rewritten, dict(cpu_ops)


class CompiledStep:
    """`_decode_step` under torch.compile for one model: one graph for every token (the state's static form keeps
    every shape and every value the graph depends on fixed). Its own copy of the function's code under its own
    name, because Dynamo keeps compiled graphs, counts recompilations and remembers which sizes changed per code
    object: each model gets its own, untouched by the shapes of any other.

    Calling it returns (logits, their argmax), or None if compilation failed (said once in a warning; the caller
    goes on eagerly)."""

    made = 0

    def __init__(self):
        CompiledStep.made += 1
        name = f"_decode_step_{CompiledStep.made}"  # (Dynamo's size profiles go by file, line and name)
        code = _decode_step.__code__.replace(co_name=name)
        fn = types.FunctionType(code, _decode_step.__globals__, name)
        # The model's modules keep their weights and settings while it decodes (the step is this model's, and is
        # made again if the model moves to another device or dtype: compiled_step), so checking each of them before
        # every token (1-2 ms for 24 layers) is left out; the state's tensors and flags are still checked.
        skip = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        self.compiled = torch.compile(fn, backend=self._backend, fullgraph=True, options={"guard_filter_fn": skip})
        self.failed = False
        self.batches: set[int] = set()  # batch sizes it has run (compiled) for
        self.graphs = 0  # graphs compiled (one per batch size; more would mean a recompilation)
        self.rewritten = 0  # single-row linears turned into multiply-and-reduce in the last graph
        self.cpu_ops: dict[str, int] = {}  # zoo's C++ ops in the last graph ({op name: calls})
        self.where: tuple | None = None  # (device, dtype) of the model's weights it was made for

    def _backend(self, gm, example_inputs):
        compiled, self.rewritten, self.cpu_ops = _inductor(gm, example_inputs)
        self.graphs += 1
        return compiled

    @staticmethod
    def mark_dynamic_length(state) -> None:
        """Keep the state's length dimension (cache slots: max_len) symbolic in the graph, so one compilation serves
        generations of every length (every other size stays fixed, each specialised in the generated code)."""
        from torch._dynamo import maybe_mark_dynamic

        for t, dim in state.length_dims():
            maybe_mark_dynamic(t, dim)

    def __call__(self, model, state, tok):
        if self.failed:
            return None
        try:
            logits = self.compiled(model, state, tok)
            self.batches.add(tok.shape[0])
            return logits
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path computes the same
            self.failed = True
            first = " ".join(str(e).split())[:300]
            warnings.warn(f"torch.compile could not compile the decoding step ({type(e).__name__}: {first}); "
                          "decoding eagerly", stacklevel=2)
            return None


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_step(model: torch.nn.Module) -> CompiledStep | None:
    """The compiled decoding step of this model (made once, compiled at its first call), or None where
    torch.compile is unavailable."""
    if not hasattr(torch, "compile"):
        return None
    inductor_cache()
    first = next(model.parameters())
    where = (first.device, first.dtype)
    if model not in _STEPS or _STEPS[model].where != where:
        _STEPS[model] = CompiledStep()
        _STEPS[model].where = where
    return _STEPS[model]
