"""The decoding protocol: what a language model offers the one decoding engine (zoo/generation.py), and the
generation state the engine keeps for it between two calls. Written once, here; the engine uses nothing else.

    state = model.new_state(batch, max_len, pad)                # once, before the prompt
    logits = model(ids, state=state, last_only=True)            # the prompt, then one token at a time

`DecodingModel` below is the contract (a `typing.Protocol`: families implement it, nothing inherits it), with
every optional hook the core looks for on a model and what each means.

A `State` carries the bookkeeping every family shares: how many tokens it has consumed (`length`), the
left-pad count of each row of a batch (`pad`), the length of a bidirectional prefix (`prefix`, for
prefix-LM families), and from these the per-row positions and the validity and attention masks. What a
family remembers of the past is its own subclass: keys and values (`KVCache`), or a fixed-size
recurrent memory. Either way every tensor is allocated once at its full size and updated in place, so
memory does not grow with the sequence and one compiled decode step can serve every family.

Two forms of the same arithmetic (zoo/generation.py picks one per generation; the state switches itself,
`make_static` / `make_dynamic`):

    dynamic  (eager; the default)  positions from the Python count `length`, keys and values read up to the
             last written position, masks only where they are needed;
    static   (`make_static`, for a compiled decoding step)  positions from `position`, the same count kept as
             a device tensor, cache writes with index_copy_ at that position, attention over all `max_len`
             slots with a mask. Every shape is fixed and no Python number changes from token to token, so one
             graph serves every step. Inside a compiled graph only `position` advances (a Python count there
             would be frozen into the graph): the graph's caller then tells the state (`counted_in_graph`).

Beam search keeps one row per beam and, after each token, `reorder`s the state's rows (every tensor with a
batch dimension, named by `batch_dims`), so the engine never reaches inside a state.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class State:
    """Bookkeeping shared by every generation state (see the module docstring)."""

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None = None):
        self.batch = batch
        self.max_len = max_len  # positions the state can hold; recurrent states only use it for checks
        self.length = 0  # tokens consumed so far, left pads included
        self.pad = pad  # [B] number of left-pad tokens per row, or None
        self.prefix: torch.Tensor | None = None  # [B] tokens after the pads that see each other both ways
        self.static = False  # the static form (module docstring): set by make_static
        self.position: torch.Tensor | None = None  # `length` as a 0-d device tensor, in the static form
        self.slots: torch.Tensor | None = None  # 0, 1, ..., max_len - 1 on the device, in the static form

    def make_static(self, device: torch.device | str) -> None:
        """Switch to the static form (module docstring): from now on positions, masks and cache writes come from
        the device-side count `position`, which starts at `length`. Made once; switching back after a dynamic
        step keeps the same tensors (a compiled graph was traced on them) and only re-reads the count."""
        if self.position is None:
            self.position = torch.tensor(self.length, device=device)
            self.slots = torch.arange(self.max_len, device=device)  # (a tensor: a graph may keep its size symbolic)
        else:
            self.position.fill_(self.length)
        self.static = True

    def make_dynamic(self) -> None:
        """Switch to the dynamic form (a step the family runs eagerly, e.g. a rebuild of its state). The device
        count keeps moving with `advance`, so `make_static` can switch back at any token."""
        self.static = False

    def counted_in_graph(self, steps: int) -> None:
        """A compiled step consumed `steps` tokens: inside the graph only the device count moved (module
        docstring); bring the host count along."""
        self.length += steps

    def steps_ahead(self, steps: int, device: torch.device) -> torch.Tensor:
        """Indices (counting left pads) of the next `steps` tokens, [steps]."""
        if self.static:
            return self.position.to(device) + torch.arange(steps, device=device)
        return torch.arange(self.length, self.length + steps, device=device)

    def seen(self, steps: int) -> int | torch.Tensor:
        """Tokens consumed once the next `steps` are in: an int, or a 0-d device tensor in the static form."""
        return self.position + steps if self.static else self.length + steps

    def positions(self, steps: int, device: torch.device) -> torch.Tensor:
        """Position of each of the next `steps` tokens in its own row, [B, steps] (pads sit at 0)."""
        pos = self.steps_ahead(steps, device)[None].expand(self.batch, steps)
        if self.pad is not None:
            pos = (pos - self.pad.to(device)[:, None]).clamp(min=0)
        return pos

    def valid(self, steps: int, device: torch.device) -> torch.Tensor | None:
        """True where the next `steps` tokens are real, False on left pads, [B, steps]; None if nothing is padded.

        A recurrent family uses it to leave its memory untouched by pads (input gate 0, forget gate 1)."""
        if self.pad is None or (not self.static and self.length >= int(self.pad.max())):
            return None  # (the static form never asks the host: its mask is all True past the pads)
        return self.steps_ahead(steps, device)[None] >= self.pad.to(device)[:, None]

    def attention_mask(self, steps: int, device: torch.device) -> torch.Tensor | None:
        """Which keys each of the next `steps` queries may see: bool [B, 1, steps, length+steps] (True = attend),
        or None when plain causal attention is right.

        Causal, minus left pads, plus the bidirectional prefix: tokens of a row's prefix see the whole prefix.
        Pad queries see only themselves, so no softmax row is empty.
        The static form always gives a mask, over all max_len cache slots (those not written yet are masked)."""
        if not self.static and self.pad is None and self.prefix is None and (self.length == 0 or steps == 1):
            return None  # plain causal prefill, or one new token that sees everything before it
        k = self.slots.to(device) if self.static else torch.arange(self.length + steps, device=device)
        keys = k.shape[0]
        q = self.steps_ahead(steps, device)[None, :, None]
        k = k[None, None, :]
        pad = self.pad.to(device)[:, None, None] if self.pad is not None else torch.zeros((), device=device)
        allowed = k <= q
        if self.prefix is not None:
            end = pad + self.prefix.to(device)[:, None, None]
            allowed = allowed | ((q >= pad) & (q < end) & (k < end))
        if self.pad is not None:
            allowed = (allowed & (k >= pad)) | (k == q)
        return allowed.expand(self.batch, steps, keys)[:, None]

    def check_room(self, steps: int) -> None:
        if torch.compiler.is_compiling():
            return  # the graph's caller checks (zoo.generation sizes the state for the whole generation)
        if self.length + steps > self.max_len:
            raise ValueError(f"the generation state holds {self.max_len} positions; "
                             f"{self.length} are used and {steps} more were given")

    def static_step(self, steps: int) -> bool:
        """Whether the next `steps` tokens may run in the static form (a compiled step). A family returns False
        for a step that must rebuild its state eagerly; the engine then runs that one step in the dynamic form."""
        return True

    def advance(self, steps: int) -> None:
        if self.position is not None:
            self.position.add_(steps)
        if not torch.compiler.is_compiling():  # in a graph only the device count moves (module docstring)
            self.length += steps

    def restart(self) -> None:
        """Count from zero again (a family that recomputes its state from the start of the sequence)."""
        self.length = 0
        if self.position is not None:
            self.position.zero_()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (a subclass lists its own)."""
        return [t for t in (self.pad, self.prefix, self.position, self.slots) if t is not None]

    def nbytes(self) -> int:
        """Bytes held: constant over a generation (the state is allocated once, at full size)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def length_dims(self) -> list[tuple[torch.Tensor, int]]:
        """(tensor, dim) of every dimension sized by max_len: a compiled step keeps them symbolic, so one graph
        serves every generation length (a subclass adds its own)."""
        return [(self.slots, 0)] if self.slots is not None else []

    def batch_dims(self) -> list[tuple[torch.Tensor, int]]:
        """(tensor, dim) of every dimension sized by the batch (one row per sequence or beam): what `reorder`
        moves. A subclass adds every batch-sized tensor it holds (`reorder` refuses a state that forgets one)."""
        return [(t, 0) for t in (self.pad, self.prefix) if t is not None]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes what row rows[i] was ([batch] indices; beam search keeps the chosen beams), in place:
        the tensors stay the same objects, so a compiled step traced on them keeps serving."""
        held = self.batch_dims()
        moved = {id(t) for t, _ in held}
        fixed = {id(t) for t in (self.position, self.slots) if t is not None}
        missing = [tuple(t.shape) for t in self.tensors() if id(t) not in moved | fixed]
        if missing:
            raise TypeError(f"{type(self).__name__}.batch_dims does not name every tensor it holds (shapes "
                            f"{missing}); a state must say where its batch dimension is to be reordered")
        for t, dim in held:
            self._reorder_tensor(t, dim, rows)

    def _reorder_tensor(self, t: torch.Tensor, dim: int, rows: torch.Tensor) -> None:
        t.copy_(t.index_select(dim, rows.to(t.device)))


class KVCache(State):
    """Keys and values of every attention layer, preallocated to `max_len` positions.

    A layer's buffers are allocated on its first update from the key's own shape (so a tensor-parallel rank
    stores only its local heads), at the full `max_len`, and written in place from then on.
    """

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None = None):
        super().__init__(batch, max_len, pad)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def buffers(self, layer: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value buffers [batch, heads, max_len, head_dim], allocated (zeros) on first use."""
        if layer not in self.k:
            shape = (batch, heads, self.max_len, head_dim)
            self.k[layer] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[layer] = torch.zeros(shape, dtype=dtype, device=device)
        return self.k[layer], self.v[layer]

    def writes_one_step_at_length(self) -> bool:
        """Whether a one-token step may write its keys and values itself at slot `length` of `buffers` (a fused
        decode op: layers.Attention) instead of calling `update`: the dynamic form of this class's own `update`
        (a subclass that stores differently overrides `update`, and is then always called)."""
        return not self.static and type(self).update is KVCache.update

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv_heads, T, hd] at the current position; return everything cached so far."""
        steps = k.shape[2]
        self.check_room(steps)
        self.buffers(layer, k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)
        if self.static:  # written at the device-side position; attention reads every slot (masked)
            at = self.steps_ahead(steps, k.device)
            self.k[layer].index_copy_(2, at, k)
            self.v[layer].index_copy_(2, at, v)
            return self.k[layer], self.v[layer]
        end = self.length + steps
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + list(self.k.values()) + list(self.v.values())

    def length_dims(self) -> list[tuple[torch.Tensor, int]]:
        return super().length_dims() + [(t, 2) for t in (*self.k.values(), *self.v.values())]

    def batch_dims(self) -> list[tuple[torch.Tensor, int]]:
        return super().batch_dims() + [(t, 0) for t in (*self.k.values(), *self.v.values())]

    def _reorder_tensor(self, t: torch.Tensor, dim: int, rows: torch.Tensor) -> None:
        if self.static or t.dim() != 4:
            return super()._reorder_tensor(t, dim, rows)
        used = t[:, :, : self.length]  # (dynamic form: only the written slots matter)
        used.copy_(used.index_select(dim, rows.to(t.device)))


# -- the contract between a language model and the decoding engine -------------------------------------------------


@runtime_checkable
class DecodingModel(Protocol):
    """What zoo/generation.py asks of a language model (an nn.Module). Required:

    new_state(batch, max_len, pad) -> State
        A fresh generation state for `batch` rows of at most `max_len` tokens (prompt included), `pad` [batch] the
        number of left-pad tokens of each row (None: no padding). Allocated at full size now; the model updates it
        in place. A KV-cache family returns a `KVCache` (or a subclass), a recurrent family its own `State`
        subclass; either way the subclass names its batch-sized tensors (`batch_dims`) so the engine can reorder
        beams, and its `max_len`-sized ones (`length_dims`) so one compiled graph serves every length.

    __call__(input_ids, *, state=None, last_only=False) -> logits
        input_ids [B, T]; the state BY KEYWORD (the engine never passes it by position, so a family is free to
        take other arguments, e.g. GLM's position_ids and context_length, in any order). With a state the call
        continues from what the state holds, takes every token's position from it (`State.positions`, or a
        family rule computed from the state: the engine never passes positions), writes what it must remember
        into it and advances it by T (`State.advance`). last_only: score only the last position, [B, 1, V]
        (all a decoding step needs); otherwise [B, T, V]. Without a state: a plain forward over positions 0..T-1.

    Optional hooks (looked up with getattr; absent means the default in brackets):

    tied_embedding: str | None   [None]  the name of the embedding module whose table the output head also
        reads (tied weights); weight-only quantisation packs that table once for both (architectures/quant.py).
    zoo_eager_only: str | None   [None]  a reason this model must decode eagerly (set by zoo/device_map.py when
        weights are streamed from disk, which no graph can trace); compile=True then warns with the reason.
    beam_rule: type | None       [None]  the family's own beam-search rule (a class with the engine's
        `BeamRule` methods, zoo/generation.py) in place of transformers' (GLM: GLM-130B's BeamSearchStrategy).
    init_buffers(device)         on any submodule holding non-persistent (derived) buffers: computes them on
        `device` after loading from the meta device (zoo/family.py `init_derived_buffers`). Not decoding-specific.
    input_multiple: int          [1]  (segmentation models, not language models) spatial sizes must be multiples
        of it (zoo/tasks/segmentation.py pads to it).

    The family's prompt rule (zoo/family.py `Family.prompt`) is the text-side counterpart: encode(tokenizer, text)
    -> ids and decode(tokenizer, prompt, new_ids) -> text, optionally complete(tokenizer, prompt, new_ids) -> the
    final text, echoes_prompt(tokenizer, prompt) -> bool, and refill(tokenizer, prompt, prompt_ids, new_ids) ->
    the next round's prompt ids or None (a rule that fills several blanks one after another, GLM); a rule with
    refill takes prompt_ids= (the round's prompt ids) in decode and complete.
    """

    def new_state(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> State: ...

    def __call__(self, input_ids: torch.Tensor, *, state: State | None = None,
                 last_only: bool = False) -> torch.Tensor: ...
