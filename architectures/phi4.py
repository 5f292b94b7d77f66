"""Phi-4: Microsoft, "Phi-4 Technical Report", arXiv 2412.08905; Phi-4-mini: arXiv 2503.01743.

The shared pre-norm decoder (architectures/decoder.py): grouped-query attention without biases, RMSNorm,
SwiGLU. The published checkpoints fuse q/k/v and gate/up into one matrix each; the converter splits
them, so the native model is the plain decoder and shards like it. Phi-4 (14B) rotates the whole head
with theta 250000; Phi-4-mini rotates only the first 3/4 of each head and uses LongRoPE (Ding et al.,
arXiv 2402.13753): per-frequency rescale factors, a "short" set while the sequence fits the pretraining
length and a "long" set beyond it, with cos and sin scaled by sqrt(1 + ln(s) / ln(L_orig)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from zoo.architectures.decoder import TP_PLAN, DecoderLM
from zoo.architectures.layers import GatedMLP, Rotary
from zoo.architectures.state import KVCache

from zoo.family import Family
from zoo.registry import Entry, Source


@dataclass
class Phi4Config:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0  # fraction of each head that is rotated
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    # LongRoPE ("longrope"); "default" is plain RoPE and ignores the fields below
    rope_type: str = "default"
    original_max_seq_len: int = 0  # pretraining length; 0: max_seq_len
    short_factor: list[float] = field(default_factory=list)
    long_factor: list[float] = field(default_factory=list)
    rope_factor: float | None = None  # None: max_seq_len / original_max_seq_len
    rope_attention_factor: float | None = None  # None: sqrt(1 + ln(factor) / ln(original_max_seq_len))
    sliding_window: int | None = None  # published for metadata only; must not cut into the context

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if not self.original_max_seq_len:
            self.original_max_seq_len = self.max_seq_len
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_type not in ("default", "longrope"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (default, longrope)")
        if self.rot_dim % 2:
            raise ValueError(f"rotary dim {self.rot_dim} (head_dim x partial_rotary_factor) must be even")
        if self.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(self, name)) != self.rot_dim // 2:
                    raise ValueError(f"{name} has {len(getattr(self, name))} values; "
                                     f"the rotary dim {self.rot_dim} needs {self.rot_dim // 2}")
        if self.sliding_window is not None and self.sliding_window < self.max_seq_len:
            raise ValueError(f"sliding_window {self.sliding_window} < max_seq_len {self.max_seq_len}: "
                             "windowed attention is not implemented")

    @property
    def rot_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class LongRoPE(Rotary):
    """RoPE with LongRoPE rescaled frequencies: inv_freq_j = 1 / (factor_j * theta^(2j/d)).

    Like transformers, the factor set is chosen from the current length max(position)+1 (short while it
    is <= the pretraining length, long beyond), once per forward call for all positions. What that means
    for cached keys is handled by Phi4LM below.
    """

    def __init__(self, rot_dim: int, theta: float, short_factor: list[float], long_factor: list[float],
                 original_max_len: int, attention_factor: float):
        super().__init__(rot_dim, theta)
        self.short_factor = list(short_factor)
        self.long_factor = list(long_factor)
        self.original_max_len = original_max_len
        self.scale = attention_factor

    def _inv_freq(self, factors: list[float], device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.rot_dim, 2, dtype=torch.int64, device=device).float() / self.rot_dim
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * self.theta**exponent)

    def inv_freq(self, seq_len: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        long = torch.as_tensor(seq_len, device=device) > self.original_max_len  # no host sync on tensors
        return torch.where(long, self._inv_freq(self.long_factor, device), self._inv_freq(self.short_factor, device))

    def attention_factor(self, seq_len: int | torch.Tensor) -> float:
        return self.scale  # the same in both regimes

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, seq_len: int) -> tuple[torch.Tensor, ...]:
        # as transformers: the set follows max(position_ids)+1 (pads excluded), not the call's seq_len
        return super().forward(positions, dtype, positions.max() + 1)


class TokenKVCache(KVCache):
    """A KV cache that also keeps the token ids it holds, so the model can rebuild it from scratch."""

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None = None, original_max_len: int = 0):
        super().__init__(batch, max_len, pad)
        self.ids: torch.Tensor | None = None  # [B, max_len], filled up to `length`
        self.original_max_len = original_max_len

    def rebuilds(self, steps: int) -> bool:
        """Whether the next `steps` tokens take the sequence past the pretraining length (the rebuild, Phi4LM)."""
        return 0 < self.length <= self.original_max_len < self.length + steps

    def static_step(self, steps: int) -> bool:
        return not self.rebuilds(steps)  # the rebuild runs eagerly; every other step may run compiled

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([self.ids] if self.ids is not None else [])

    def length_dims(self) -> list[tuple[torch.Tensor, int]]:
        return super().length_dims() + ([(self.ids, 1)] if self.ids is not None else [])

    def batch_dims(self) -> list[tuple[torch.Tensor, int]]:
        return super().batch_dims() + ([(self.ids, 0)] if self.ids is not None else [])


class Phi4LM(DecoderLM):
    """The decoder, plus transformers' LongRoPE cache rule for generation.

    When a cached step first takes the sequence past the pretraining length, every cached key was rotated
    with the short factors. transformers' Phi3 `generate` then drops its cache and recomputes the whole
    sequence with the long factors (Phi3ForCausalLM.prepare_inputs_for_generation); we do the same, so
    cached greedy decoding across the boundary equals transformers' and equals an uncached forward.
    """

    def __init__(self, *args, original_max_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.original_max_len = original_max_len

    def new_state(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> TokenKVCache:
        return TokenKVCache(batch, max_len, pad, self.original_max_len)

    def forward(self, input_ids: torch.Tensor, state: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        if not isinstance(state, TokenKVCache):
            return super().forward(input_ids, state, last_only)
        B, T = input_ids.shape
        if state.ids is None:
            state.ids = torch.zeros(B, state.max_len, dtype=input_ids.dtype, device=input_ids.device)
        if state.static:  # (the engine runs a rebuilding step in the dynamic form: TokenKVCache.static_step)
            state.ids.index_copy_(1, state.steps_ahead(T, input_ids.device), input_ids)
            return super().forward(input_ids, state, last_only)
        past = state.length
        state.ids[:, past : past + T] = input_ids
        if state.rebuilds(T):  # the cached keys carry the short rotation: rebuild
            state.restart()
            return super().forward(state.ids[:, : past + T], state, last_only)[:, -(1 if last_only else T):]
        return super().forward(input_ids, state, last_only)


def longrope_attention_factor(c: Phi4Config) -> float:
    if c.rope_attention_factor is not None:
        return c.rope_attention_factor
    factor = c.rope_factor if c.rope_factor is not None else c.max_seq_len / c.original_max_seq_len
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(c.original_max_seq_len))


def rotary(c: Phi4Config) -> Rotary:
    if c.rope_type == "longrope":
        return LongRoPE(c.rot_dim, c.rope_theta, c.short_factor, c.long_factor, c.original_max_seq_len,
                        longrope_attention_factor(c))
    return Rotary(c.rot_dim, c.rope_theta)


def build(c: Phi4Config) -> DecoderLM:
    args = (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps)
    kwargs = dict(rotary=rotary(c), mlp=lambda i: GatedMLP(c.dim, c.intermediate_size), qkv_bias=False,
                  tie_embeddings=c.tie_embeddings)
    if c.rope_type == "longrope":
        return Phi4LM(*args, **kwargs, original_max_len=c.original_max_seq_len)
    return DecoderLM(*args, **kwargs)


def count_params(c: Phi4Config) -> int:
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    block = c.dim * (q + 2 * kv) + q * c.dim + 3 * c.dim * c.intermediate_size + 2 * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + c.n_layers * block + c.dim + head


# Phi-4-mini's LongRoPE factors (config.json of microsoft/Phi-4-mini-instruct; 48 = rotary dim 96 / 2).
MINI_LONG_FACTOR = [
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533,
    5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651,
    14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03,
    32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]
MINI_SHORT_FACTOR = [1.0] * 48

PHI4 = Phi4Config(100352, 5120, 40, 40, 10, 17920, rope_theta=250_000.0, max_seq_len=16384)
PHI4_REASONING = Phi4Config(100352, 5120, 40, 40, 10, 17920, rope_theta=500_000.0, max_seq_len=32768)
PHI4_MINI = Phi4Config(
    200064, 3072, 32, 24, 8, 8192, rope_theta=10_000.0, partial_rotary_factor=0.75, tie_embeddings=True,
    max_seq_len=131072, rope_type="longrope", original_max_seq_len=4096,
    short_factor=MINI_SHORT_FACTOR, long_factor=MINI_LONG_FACTOR, sliding_window=262144,
)

# What was checked against a copy of each repo's config.json, and what comes from secondary sources only.
UNVERIFIED = {
    "phi-4-reasoning": "rope_theta 500000 and max_seq_len 32768 are from litgpt's config table, not config.json",
    "phi-4-reasoning-plus": "rope_theta 500000 and max_seq_len 32768 are from litgpt's config table, not config.json",
    "phi-4-mini-reasoning": "shapes match litgpt's table; LongRoPE factors assumed equal to Phi-4-mini-instruct's",
}

# name -> (config, Hub repo, paper, description)
PUBLISHED = {
    "phi-4": (PHI4, "microsoft/phi-4", "https://arxiv.org/abs/2412.08905",
              "Phi-4 14B chat model (ChatML-style <|im_start|>/<|im_sep|>/<|im_end|> chat)"),
    "phi-4-reasoning": (PHI4_REASONING, "microsoft/Phi-4-reasoning", "https://arxiv.org/abs/2504.21318",
                        "Phi-4-reasoning 14B: Phi-4 fine-tuned on reasoning traces (<think> ... </think>)"),
    "phi-4-reasoning-plus": (PHI4_REASONING, "microsoft/Phi-4-reasoning-plus", "https://arxiv.org/abs/2504.21318",
                             "Phi-4-reasoning-plus 14B: Phi-4-reasoning with further reinforcement learning"),
    "phi-4-mini-instruct": (PHI4_MINI, "microsoft/Phi-4-mini-instruct", "https://arxiv.org/abs/2503.01743",
                            "Phi-4-mini 3.8B instruct model, 200K vocabulary, 128K context (LongRoPE)"),
    "phi-4-mini-reasoning": (PHI4_MINI, "microsoft/Phi-4-mini-reasoning", "https://arxiv.org/abs/2504.21233",
                             "Phi-4-mini-reasoning 3.8B: Phi-4-mini trained for math reasoning"),
}


def _entries() -> list[Entry]:
    return [
        Entry(
            name=name,
            family="phi4",
            config=asdict(cfg),
            source=Source(repo=repo, layout="hf-phi3"),
            license="mit",
            paper=paper,
            task="text-generation",
            params=count_params(cfg),
            description=desc,
            tags=("llm", "phi4", "chat") + (("reasoning",) if "reasoning" in name else ()),
            extra={"unverified": UNVERIFIED[name]} if name in UNVERIFIED else {},
        )
        for name, (cfg, repo, paper, desc) in PUBLISHED.items()
    ]


FAMILY = Family(
    name="phi4",
    config_cls=Phi4Config,
    build=build,
    task="text-generation",
    entries=tuple(_entries()),
    tp_plan=TP_PLAN,  # q/k/v and gate/up are split at conversion, so the plain column/row plan applies
    card_template="phi4.md",
    # Phi-4-mini ends a turn with <|end|>, Phi-4 (14B) with <|im_end|>; whichever the tokenizer has
    stop_tokens=("<|end|>", "<|im_end|>", "<|endoftext|>"),
    extrapolates=True,
)
