"""One decoding engine for every language model: prefill, then one token at a time.

It only talks to the model through `model.new_state(batch, max_len, pad)` and
`model(ids, state, last_only=True)` (architectures/state.py), so attention models (a KV cache) and
recurrent ones (a fixed-size memory) share it, with batching, sampling and stopping.
"""

from __future__ import annotations

import math
import numbers
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
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], until all rows stopped or max_new_tokens.

    Rows that stopped keep going until all have; callers cut each row at its first stop token.
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
    logits = model(ids, state, last_only=True)[:, -1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    for step in range(max_new_tokens):
        nxt = sample(logits, sampling, generator)
        yield nxt
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = model(nxt[:, None], state, last_only=True)[:, -1]
