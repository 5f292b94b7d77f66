"""One decoding engine for every language model: prefill, then one token at a time.

It only talks to the model through the decoding protocol (architectures/state.py, `DecodingModel`):
`model.new_state(batch, max_len, pad)`, `model(ids, state=state, last_only=True)` and the state's own methods,
so attention models (a KV cache) and recurrent ones (a fixed-size memory) share it, with batching, sampling,
beam search and stopping.
"""

from __future__ import annotations

import math
import numbers
import os
import types
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


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
    """Next token ids [B] from last-position logits [B, V]."""
    if not s.temperature:
        return logits.argmax(-1)
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
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack token lists into [B, T] with pad on the left; also the pad count per row (None if none)."""
    if not sequences or min(len(s) for s in sequences) == 0:
        raise ValueError("empty prompt: give at least one token (in every row of a batch)")
    longest = max(len(s) for s in sequences)
    pad = torch.tensor([longest - len(s) for s in sequences], device=device)
    ids = torch.tensor([[pad_id] * (longest - len(s)) + list(s) for s in sequences], device=device)
    return ids, (pad if bool(pad.any()) else None)


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: set[int],
    pad_id: int = 0,
    compile: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], until all rows stopped or max_new_tokens.

    Rows that stopped keep going until all have; callers cut each row at its first stop token.
    The prompt runs as one eager pass that scores only its last position. When compiling (`compile_wanted`:
    True, False, or None for the default), every later token runs through one compiled graph (`compiled_step`)
    on the state in its static form; otherwise the same model call runs eagerly. Per token the host waits only
    for the stop check; sampling stays on the device.
    """
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    ids, pad = left_pad(sequences, pad_id, device)
    state = model.new_state(ids.shape[0], ids.shape[1] + max_new_tokens, pad)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    logits = model(ids, state=state, last_only=True)[:, -1]
    wanted = max_new_tokens > 1 and compile_wanted(compile, model, ids.shape[0], max_new_tokens)
    step = compiled_step(model) if wanted else None
    if step is not None:
        state.make_static(logits.device)
        step.mark_dynamic_length(state)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    best = None  # the compiled step's argmax of its logits: greedy decoding's next token, computed in the graph
    for n in range(max_new_tokens):
        nxt = best if best is not None and not sampling.temperature else sample(logits, sampling, generator)
        yield nxt
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or n == max_new_tokens - 1:
            return
        best = None
        if step is not None and state.static_step(1):
            out = step(model, state, nxt[:, None])
            if out is not None:
                logits, best = out
                state.counted_in_graph(1)
                continue
            step = None  # it could not be compiled: said once (compiled_step); eager from here
        state.make_dynamic()  # (a step the family runs in the dynamic form, e.g. a rebuild of its state)
        logits = model(nxt[:, None], state=state, last_only=True)[:, -1]
        if step is not None:
            state.make_static(logits.device)


# -- the compiled decoding step -----------------------------------------------------------------------------------


# Weights streamed by a generation (bytes x new tokens) from which compiling its decoding step pays on a CPU: a
# compiled step is about 1.4x faster than an eager one, and compiling costs seconds (warm Inductor cache) to a minute
# (first time on a machine) for a 0.5B model (BENCHMARKS.md). Qwen2-0.5B in bf16 (1 GB) compiles from ~500 new
# tokens, a 7B model in bf16 from ~40; the 24 MB embedded model practically never.
COMPILE_PAYS = 2**39


def compile_wanted(compile: bool | None, model: torch.nn.Module, batch: int, new_tokens: int) -> bool:
    """Whether a generation decodes through the compiled step. True / False: as asked (zoo.load(compile=...),
    `zoo generate --compile / --no-compile`). None, the default: ZOO_COMPILE=1 / 0 if set; otherwise where it
    pays: when this model already has a step compiled for this batch size (nothing left to pay), or when the
    generation streams at least COMPILE_PAYS bytes of weights. A model marked `zoo_eager_only` (a reason: weights
    streamed from disk by a device map, which no graph can trace) decodes eagerly; asked to compile, it says why."""
    eager_only = getattr(model, "zoo_eager_only", None)
    if eager_only:
        if compile:
            warnings.warn(f"compile=True: this model decodes eagerly, since {eager_only}", stacklevel=3)
        return False
    if compile is not None:
        return bool(compile)
    env = os.environ.get("ZOO_COMPILE", "").strip()
    if env:
        return env != "0"
    done = _STEPS.get(model)
    if done is not None and batch in done.batches:
        return True
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return weights * new_tokens >= COMPILE_PAYS


def _decode_step(model: torch.nn.Module, state, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(tok, state=state, last_only=True)[:, -1]
    return logits, logits.argmax(-1)


def _inductor(gm, example_inputs) -> tuple:
    """Inductor, after one graph pass: every linear layer applied to a single row becomes multiply-and-reduce
    (zoo.architectures.kernels.matvec: the form Inductor turns into one fast pass over the weight).
    Returns (compiled, how many linears were rewritten)."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    from zoo.architectures.kernels import matvec

    rewritten = matvec.rewrite_single_row_linears(gm)
    # Inductor's caches take only functions they know; ours is keyed by its own source, so an edited
    # matvec_linear is compiled afresh (warm-cache compilation is several times faster than a cold one).
    # Casts to lower precision round as they do eagerly (GLM's fp16 rotary angles; bf16 norms): the same numbers.
    cacheable = {**config.unsafe_marked_cacheable_functions, **matvec.cache_keys()}
    with config.patch(unsafe_marked_cacheable_functions=cacheable, emulate_precision_casts=True,
                      size_asserts=False):  # (the wrapper checking ~400 input shapes per token: 4 ms of 30)
        return compile_fx(gm, example_inputs), rewritten


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
        self.where: tuple | None = None  # (device, dtype) of the model's weights it was made for

    def _backend(self, gm, example_inputs):
        compiled, self.rewritten = _inductor(gm, example_inputs)
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
    first = next(model.parameters())
    where = (first.device, first.dtype)
    if model not in _STEPS or _STEPS[model].where != where:
        _STEPS[model] = CompiledStep()
        _STEPS[model].where = where
    return _STEPS[model]
