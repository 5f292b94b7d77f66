"""Generation state: what the decoding engine keeps for a model between two calls.

The engine (zoo/generation.py) knows only this protocol:

    state = model.new_state(batch, max_len, pad)      # once, before the prompt
    logits = model(ids, state, last_only=True)         # the prompt, then one token at a time

A `State` carries the bookkeeping every family shares: how many tokens it has consumed (`length`), the
left-pad count of each row of a batch (`pad`), the length of a bidirectional prefix (`prefix`, for
prefix-LM families), and from these the per-row positions and the validity and attention masks. What a
family remembers of the past is its own subclass: keys and values (`KVCache`), or a fixed-size
recurrent memory. Either way every tensor is allocated once at its full size and updated in place, so
memory does not grow with the sequence and one compiled decode step can serve every family.
"""

from __future__ import annotations

import torch


class State:
    """Bookkeeping shared by every generation state (see the module docstring)."""

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None = None):
        self.batch = batch
        self.max_len = max_len  # positions the state can hold; recurrent states only use it for checks
        self.length = 0  # tokens consumed so far, left pads included
        self.pad = pad  # [B] number of left-pad tokens per row, or None
        self.prefix: torch.Tensor | None = None  # [B] tokens after the pads that see each other both ways

    def positions(self, steps: int, device: torch.device) -> torch.Tensor:
        """Position of each of the next `steps` tokens in its own row, [B, steps] (pads sit at 0)."""
        pos = torch.arange(self.length, self.length + steps, device=device)[None].expand(self.batch, steps)
        if self.pad is not None:
            pos = (pos - self.pad.to(device)[:, None]).clamp(min=0)
        return pos

    def valid(self, steps: int, device: torch.device) -> torch.Tensor | None:
        """True where the next `steps` tokens are real, False on left pads, [B, steps]; None if nothing is padded.

        A recurrent family uses it to leave its memory untouched by pads (input gate 0, forget gate 1)."""
        if self.pad is None or self.length >= int(self.pad.max()):
            return None
        pos = torch.arange(self.length, self.length + steps, device=device)[None]
        return pos >= self.pad.to(device)[:, None]

    def attention_mask(self, steps: int, device: torch.device) -> torch.Tensor | None:
        """Which keys each of the next `steps` queries may see: bool [B, 1, steps, length+steps] (True = attend),
        or None when plain causal attention is right.

        Causal, minus left pads, plus the bidirectional prefix: tokens of a row's prefix see the whole prefix.
        Pad queries see only themselves, so no softmax row is empty."""
        if self.pad is None and self.prefix is None and (self.length == 0 or steps == 1):
            return None  # plain causal prefill, or one new token that sees everything before it
        q = torch.arange(self.length, self.length + steps, device=device)[None, :, None]
        k = torch.arange(self.length + steps, device=device)[None, None, :]
        pad = self.pad.to(device)[:, None, None] if self.pad is not None else torch.zeros((), device=device)
        allowed = k <= q
        if self.prefix is not None:
            end = pad + self.prefix.to(device)[:, None, None]
            allowed = allowed | ((q >= pad) & (q < end) & (k < end))
        if self.pad is not None:
            allowed = (allowed & (k >= pad)) | (k == q)
        return allowed.expand(self.batch, steps, self.length + steps)[:, None]

    def check_room(self, steps: int) -> None:
        if self.length + steps > self.max_len:
            raise ValueError(f"the generation state holds {self.max_len} positions; "
                             f"{self.length} are used and {steps} more were given")

    def advance(self, steps: int) -> None:
        self.length += steps

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (a subclass lists its own)."""
        return [t for t in (self.pad, self.prefix) if t is not None]

    def nbytes(self) -> int:
        """Bytes held: constant over a generation (the state is allocated once, at full size)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCache(State):
    """Keys and values of every attention layer, preallocated to `max_len` positions.

    A layer's buffers are allocated on its first update from the key's own shape (so a tensor-parallel rank
    stores only its local heads), at the full `max_len`, and written in place from then on.
    """

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None = None):
        super().__init__(batch, max_len, pad)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv_heads, T, hd] at the current position; return everything cached so far."""
        steps = k.shape[2]
        self.check_room(steps)
        end = self.length + steps
        if layer not in self.k:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + list(self.k.values()) + list(self.v.values())
