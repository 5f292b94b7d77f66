"""One decoding engine for every language model: prefill, then one token at a time.

It only talks to the model through `model(ids, state)` and `model.new_state(batch, max_len, pad)`,
so attention models (KV cache) and recurrent ones (a recurrent state) share it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


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
    longest = max(len(s) for s in sequences)
    if longest == 0:
        raise ValueError("empty prompt: give at least one token")
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
    device = next(model.parameters()).device
    ids, pad = left_pad(sequences, pad_id, device)
    state = model.new_state(ids.shape[0], ids.shape[1] + max_new_tokens, pad)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    logits = model(ids, state)[:, -1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    for step in range(max_new_tokens):
        nxt = sample(logits, sampling, generator)
        yield nxt
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = model(nxt[:, None], state)[:, -1]
