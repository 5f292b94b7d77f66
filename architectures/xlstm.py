"""xLSTM 7B: Beck, Pöppel, Lippe et al., "xLSTM 7B: A Recurrent LLM for Fast and Efficient Inference",
arXiv 2503.13427 (the mLSTM cell: Beck et al., "xLSTM: Extended Long Short-Term Memory", arXiv 2405.04517).

A stack of pre-norm residual blocks with no attention and no positions. Each block is

    x = x + out_proj( sigmoid(W_o x~) * MultiHeadLayerNorm( mLSTM(q, k, v, i~, f~) ) ),   x~ = RMSNorm(x)
    x = x + down( silu(gate(RMSNorm(x))) * up(RMSNorm(x)) )

with q, k, v = W_q x~, W_k x~, W_v x~ split into heads, and per-head gate pre-activations
i~ = 15 tanh((W_i x~ + b_i) / 15), f~ likewise (soft-capped). The mLSTM cell keeps a fixed-size matrix memory
per head (architectures/kernels/mlstm.py): a prompt goes through its chunkwise-parallel form, each generated
token through its one-step recurrence. Logits are soft-capped too: 30 tanh(logits / 30).

Generation keeps that memory in an `XLSTMState`: allocated once, updated in place, the same size after ten
tokens or ten thousand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.kernels.mlstm import CellState, mlstm_chunkwise, mlstm_step, new_cell_state
from zoo.architectures.layers import GatedMLP, RMSNorm
from zoo.architectures.state import State

from zoo.family import Family
from zoo.registry import Entry, Source


def round_up(x: float, multiple: int) -> int:
    return int(-(-x // multiple) * multiple)


@dataclass
class XLSTMConfig:
    """The published xLSTM 7B numbers (NX-AI/xLSTM-7b config.json) are the defaults."""

    vocab_size: int = 50304
    dim: int = 4096  # embedding_dim
    n_layers: int = 32  # num_blocks
    n_heads: int = 8
    qk_dim_factor: float = 0.5  # q and k have dim * 0.5 features: 256 per head
    v_dim_factor: float = 1.0  # v (and the cell's output) dim * 1.0: 512 per head
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64  # so the feed-forward is 10944 wide
    mlstm_round_up_to_multiple_of: int = 64  # published config field; the layer itself uses int(dim * factor)
    gate_soft_cap: float = 15.0
    output_logit_soft_cap: float = 30.0
    norm_eps: float = 1e-6  # RMSNorms and the multi-head LayerNorm
    cell_eps: float = 1e-6  # added to the mLSTM normaliser ("eps" in the published config)
    chunk_size: int = 64  # tokens per chunk of the chunkwise-parallel form

    def __post_init__(self):
        for what, size in (("q/k", self.qk_dim), ("v", self.v_dim)):
            if size % self.n_heads:
                raise ValueError(f"{what} dim {size} is not a multiple of n_heads {self.n_heads}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def qk_dim(self) -> int:
        return int(self.dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.dim * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.dim * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): close to x for small values, never beyond +-cap."""
    return cap * torch.tanh(x / cap)


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)) = -softplus(-x). (F.logsigmoid starts the thread pool even for the few gates of one
    decoding step, which costs milliseconds per call on a busy machine.)"""
    return -F.softplus(-x)


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's features (centred, biased variance, fp32 reductions, no bias), then one
    learned scale over the heads' features side by side."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, heads, head_dim] -> [B, T, heads * head_dim]."""
        x = h.float()
        x = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + self.eps)
        return self.weight * x.to(h.dtype).flatten(-2)


class XLSTMState(State):
    """The generation state of xLSTM: every layer's mLSTM memory (C, n, m), float32, allocated once.

    Per layer C [B, heads, dqk, dv], n [B, heads, dqk], m [B, heads]; the layer updates them in place, so the size
    never changes (no per-token growth, unlike a KV cache)."""

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None, c: XLSTMConfig,
                 device: torch.device | str | None = None):
        super().__init__(batch, max_len, pad)
        dqk, dv = c.qk_dim // c.n_heads, c.v_dim // c.n_heads
        cells = [new_cell_state(batch, c.n_heads, dqk, dv, device) for _ in range(c.n_layers)]
        self.c, self.n, self.m = (list(t) for t in zip(*cells))  # stabilisers m start at 0

    def memory(self, layer: int, device: torch.device) -> CellState:
        """This layer's memory on `device`. A layer placed on another device than the embedding (a device map) gets
        its memory moved there once, at its first call, and updated there in place from then on."""
        if self.c[layer].device != device:
            self.c[layer], self.n[layer], self.m[layer] = (t[layer].to(device) for t in (self.c, self.n, self.m))
        return self.c[layer], self.n[layer], self.m[layer]

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + self.c + self.n + self.m

    def batch_dims(self) -> list[tuple[torch.Tensor, int]]:
        return super().batch_dims() + [(t, 0) for t in (*self.c, *self.n, *self.m)]


class MLSTMLayer(nn.Module):
    """The mLSTM token mixer: projections, soft-capped gates, the cell, the per-head norm, the output gate."""

    def __init__(self, c: XLSTMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = c.n_heads
        self.gate_soft_cap = c.gate_soft_cap
        self.cell_eps = c.cell_eps
        self.chunk_size = c.chunk_size
        self.q_proj = nn.Linear(c.dim, c.qk_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.qk_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.v_dim, bias=False)
        self.o_gate = nn.Linear(c.dim, c.v_dim, bias=False)  # output gate pre-activation, per feature
        self.i_gate = nn.Linear(c.dim, c.n_heads)  # input gate pre-activation, per head (exponential gate)
        self.f_gate = nn.Linear(c.dim, c.n_heads)  # forget gate pre-activation, per head (sigmoid gate)
        self.head_norm = MultiHeadLayerNorm(c.n_heads, c.v_dim // c.n_heads, c.norm_eps)
        self.out_proj = nn.Linear(c.v_dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor, state: XLSTMState | None, valid: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, dim]; state: holds this layer's memory (C, n, m), updated in place (None: start empty, keep
        nothing); valid: [B, T] False on left-pad tokens, which must leave the memory untouched."""
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        i = soft_cap(self.i_gate(x), self.gate_soft_cap).float().transpose(1, 2)  # [B, heads, T], log input gate
        log_f = log_sigmoid(soft_cap(self.f_gate(x), self.gate_soft_cap).float()).transpose(1, 2)
        if valid is not None:  # a pad token: input gate exp(-inf) = 0, forget gate exp(0) = 1
            i = i.masked_fill(~valid[:, None], float("-inf"))
            log_f = log_f.masked_fill(~valid[:, None], 0.0)
        if state is not None:
            memory = state.memory(self.layer, x.device)
        else:
            memory = new_cell_state(B, self.n_heads, q.shape[-1], v.shape[-1], x.device)
        if T == 1:
            h = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], log_f[..., 0], memory, self.cell_eps)
            h = h[:, :, None]
        else:
            h = mlstm_chunkwise(q, k, v, i, log_f, memory, self.chunk_size, self.cell_eps)
        h = self.head_norm(h.transpose(1, 2))  # [B, T, v_dim]
        return self.out_proj(torch.sigmoid(self.o_gate(x)) * h)


class XLSTMBlock(nn.Module):
    def __init__(self, c: XLSTMConfig, layer: int):
        super().__init__()
        self.mlstm_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlstm = MLSTMLayer(c, layer)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn = GatedMLP(c.dim, c.ffn_dim)  # down(silu(gate(x)) * up(x))

    def forward(self, x: torch.Tensor, state: XLSTMState | None, valid: torch.Tensor | None) -> torch.Tensor:
        x = x + self.mlstm(self.mlstm_norm(x), state, valid)
        return x + self.ffn(self.ffn_norm(x))


class XLSTM(nn.Module):
    def __init__(self, c: XLSTMConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(XLSTMBlock(c, n) for n in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)

    def new_state(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> XLSTMState:
        """The generation state: the recurrent memory of every layer (its size does not depend on max_len)."""
        return XLSTMState(batch, max_len, pad, self.config, self.embed.weight.device)

    def forward(self, input_ids: torch.Tensor, state: XLSTMState | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) for token ids [B, T]; with a state, continues from the memory it holds
        and leaves the memory after the last token there. last_only: logits of the last position only."""
        T = input_ids.shape[1]
        valid = state.valid(T, input_ids.device) if state is not None else None
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h, state, valid)
        if state is not None:
            state.advance(T)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(self.norm(h)).float()
        return soft_cap(logits, self.config.output_logit_soft_cap)


def build(c: XLSTMConfig) -> XLSTM:
    return XLSTM(c)


def count_params(c: XLSTMConfig) -> int:
    mlstm = c.dim * (2 * c.qk_dim + 2 * c.v_dim) + 2 * (c.dim + 1) * c.n_heads + c.v_dim + c.v_dim * c.dim
    ffn = 3 * c.dim * c.ffn_dim
    return 2 * c.vocab_size * c.dim + c.n_layers * (mlstm + ffn + 2 * c.dim) + c.dim


class BosPrompt:
    """Prompt rule of the published model (`force_bos_token_insert: true`): text prompts start with BOS."""

    def encode(self, tokenizer, text: str) -> list[int]:
        bos = tokenizer.token_id(tokenizer.special("bos_token"))
        ids = tokenizer.encode(text)
        return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]

    def decode(self, tokenizer, prompt: str, new_ids: list[int]) -> str:
        return tokenizer.decode(new_ids)


XLSTM_7B = XLSTMConfig()

FAMILY = Family(
    name="xlstm",
    config_cls=XLSTMConfig,
    build=build,
    task="text-generation",
    entries=(
        Entry(
            name="xlstm-7b",
            family="xlstm",
            config=asdict(XLSTM_7B),
            source=Source(repo="NX-AI/xLSTM-7b", layout="hf-xlstm"),
            # The NXAI Community License Agreement (based on Meta's Llama 3 license, with commercial terms of
            # its own); mlstm_kernels ships the same text, whose preamble names the xLSTM 7B model.
            license="nxai-community-license",
            paper="https://arxiv.org/abs/2503.13427",
            task="text-generation",
            params=count_params(XLSTM_7B),
            description="xLSTM 7B: a 7B recurrent (mLSTM) language model by NXAI, trained on 2.3T tokens; "
            "constant memory and time per generated token",
            tags=("llm", "xlstm", "recurrent"),
        ),
    ),
    card_template="xlstm.md",
    prompt=BosPrompt(),
)
