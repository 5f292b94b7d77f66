"""MatMul-free LM: Zhu et al., "Scalable MatMul-free Language Modeling", arXiv 2406.02528 (MMfreeLM, HGRN-Bit).

A pre-norm stack whose every projection is a ternary BitLinear (kernels/bitlinear.py) and whose token mixer
is the HGRN gated linear recurrence (kernels/hgrn.py) instead of attention, computed as the published code
(ridgerchu/matmulfreellm, `HGRNBitForCausalLM`) computes it:

    h = embed(tokens)
    lb = cumsum(softmax(lower_bounds, over layers)) - softmax(lower_bounds)[0]       per layer and channel
    for each block l:
        x = RMSNorm(h)                                        token mixer, HGRN-Bit
        f = sigmoid(f_proj(x));  f = lb_l + (1 - lb_l) f      (layer 0: no lower bound)
        i = silu(i_proj(x)) * (1 - f)
        o_t = f_t o_{t-1} + i_t                               elementwise, fp32
        h = h + o_proj(RMSNorm_g(g_proj(x)) * silu(o))        g_norm normalises g_proj's output, gates with o
        x = RMSNorm(h)                                        channel mixer, GLU
        gate, up = split(gate_up_proj(x))
        h = h + down_proj(silu(gate) * up)
    logits = lm_head(RMSNorm(h))                              the output head is a BitLinear too

There are no positions and no attention: the state a token leaves behind is one fp32 vector per layer, so
generation memory does not grow with length. A prompt runs the recurrence as a parallel scan, decoding as
one step; both give the same numbers (tests/test_mmfree.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from zoo.architectures.kernels.hgrn import hgrn
from zoo.architectures.kernels.precision import widen
from zoo.architectures.quant import PackedLinear, bitlinear_latent
from zoo.architectures.state import State

from zoo.family import Family
from zoo.registry import Entry, Source


@dataclass
class MMfreeConfig:
    vocab_size: int = 32000
    dim: int = 1024
    n_layers: int = 24
    intermediate_size: int = 0  # 0: HGRNBitMLP's rule, 256 * ceil(int(dim * hidden_ratio * 2 / 3) / 256)
    hidden_ratio: int = 4
    use_lower_bound: bool = True
    norm_eps: float = 1e-6  # the block RMSNorms and g_norm (rms_norm_eps)
    # The RMSNorm inside every BitLinear: the published fused kernel uses its own default 1e-6, not the
    # 1e-8 its module is constructed with (FusedBitLinear never passes norm.eps on).
    bitlinear_eps: float = 1e-6
    max_seq_len: int = 2048  # the trained context; the recurrence itself has no limit

    def __post_init__(self):
        if not self.intermediate_size:
            self.intermediate_size = 256 * math.ceil(int(self.dim * self.hidden_ratio * 2 / 3) / 256)


TERNARY = "ternary"  # the packed form of BitLinear weights (architectures/quant.py: Ternary)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as the published Triton norm), returned in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = widen(x)
        return (h * (1 / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)) * self.weight.to(h.dtype)).to(x.dtype)


class BitLinear(nn.Module):
    """RMSNorm (own weight) -> per-token int8 activations -> ternary weights (per-tensor absmean), no bias.

    `linear` holds the weight: an nn.Linear with the latent 16-bit matrix the model was trained with
    (ternarised on every call, as the published model does), or, in a checkpoint stored packed (or after
    `pack_`), a PackedLinear of the "ternary" scheme (architectures/quant.py): the codes 2 bits each, uint8
    [out, in / 4], and their scale. On a GPU the packed form runs the fused Triton kernel on the bytes.
    """

    def __init__(self, in_features: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.norm = RMSNorm(in_features, eps)  # only its weight is used: the BitLinear op normalises itself
        self.linear = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if isinstance(linear, PackedLinear):  # its scheme runs it (ternary: the fused kernel on the packed bytes)
            return linear.bitlinear(x, self.norm.weight, self.eps)
        return bitlinear_latent(x, self.norm.weight, self.eps, linear.weight)

    @torch.no_grad()
    def pack_(self) -> BitLinear:
        """Replace the latent weight by its packed ternary codes and scale (same outputs, 1/8 of 16 bits)."""
        if type(self.linear) is nn.Linear:
            w = self.linear.weight
            packed = PackedLinear(w.shape[1], w.shape[0], False, TERNARY, dtype=w.dtype).to(w.device)
            for name, t in packed.scheme.pack(w).items():
                setattr(packed, name, t)
            self.linear = packed
        return self


def swiglu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y / (1 + exp(-x)) in fp32, cast back: the published jiterator kernel's expression, in its order."""
    x32 = widen(x)
    return (x32 * widen(y) / (1.0 + torch.exp(-x32))).to(x.dtype)


class HGRNBitMixer(nn.Module):
    """The token mixer ("HGRNBitAttention" in the published code; there is no attention in it)."""

    def __init__(self, dim: int, eps: float, bitlinear_eps: float):
        super().__init__()
        self.i_proj = BitLinear(dim, dim, bitlinear_eps)
        self.f_proj = BitLinear(dim, dim, bitlinear_eps)
        self.g_proj = BitLinear(dim, dim, bitlinear_eps)
        self.g_norm = RMSNorm(dim, eps)
        self.o_proj = BitLinear(dim, dim, bitlinear_eps)

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor | None, h: torch.Tensor,
                valid: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, D]; h [B, D] fp32, the recurrent state, updated in place; valid [B, T] (False on pads)."""
        f = self.f_proj(x).sigmoid()
        if lower_bound is not None:  # the forget gate never drops below the layer's bound
            f = lower_bound + (1 - lower_bound) * f
        i = swiglu(self.i_proj(x), 1 - f)  # input and forget gates are tied: i scaled by (1 - f)
        if valid is not None:  # a pad token leaves the state as it was: input 0, forget 1
            i = i * valid[..., None]
            f = torch.where(valid[..., None], f, torch.ones_like(f))
        o = hgrn(i, f, h)
        if h.dtype != x.dtype:  # the published kernel hands its final state back in the activation dtype
            h.copy_(h.to(x.dtype))
        # Gotcha: the published g_norm(g, o) normalises the g_proj output and gates it with silu(o)
        g = widen(self.g_proj(x))
        g = g * (1 / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + self.g_norm.eps)) * self.g_norm.weight.to(g.dtype)
        o = widen(o)
        return self.o_proj((g * o * torch.sigmoid(o)).to(x.dtype))


class GLU(nn.Module):
    """The channel mixer: down(silu(gate) * up), gate and up from one fused BitLinear (first half = gate).

    They stay fused because the ternary scale is the absmean of the whole [2I, D] matrix."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.gate_up_proj = BitLinear(dim, 2 * hidden, eps)
        self.down_proj = BitLinear(hidden, dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, c: MMfreeConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = HGRNBitMixer(c.dim, c.norm_eps, c.bitlinear_eps)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = GLU(c.dim, c.intermediate_size, c.bitlinear_eps)

    def forward(self, h, lower_bound, state_h, valid):
        # the published mlp_norm adds the residual inside its kernel and normalises that fp32 sum; the stream
        # carries the sum rounded to the activation dtype
        s = widen(self.attn(self.attn_norm(h), lower_bound, state_h, valid)) + widen(h)
        h = s.to(h.dtype)
        return h + self.mlp(self.mlp_norm(s).to(h.dtype))


class HGRNState(State):
    """The generation state: one fp32 vector per layer and row, [n_layers, B, dim], allocated once and
    overwritten in place by every step, so its size is the same after 10 tokens or 10 000."""

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None, n_layers: int, dim: int,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__(batch, max_len, pad)
        self.h = torch.zeros(n_layers, batch, dim, dtype=dtype, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + [self.h]

    def batch_dims(self) -> list[tuple[torch.Tensor, int]]:
        return super().batch_dims() + [(self.h, 1)]  # [n_layers, B, dim]: beam search reorders the rows


class MMfreeLM(nn.Module):
    def __init__(self, c: MMfreeConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.lower_bounds = nn.Parameter(torch.zeros(c.n_layers, c.dim)) if c.use_lower_bound else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = BitLinear(c.dim, c.vocab_size, c.bitlinear_eps)

    def new_state(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> HGRNState:
        w = self.embed.weight
        return HGRNState(batch, max_len, pad, self.config.n_layers, self.config.dim, w.device, widen(w[:0]).dtype)

    def forget_lower_bounds(self, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Per layer: cumsum(softmax(lower_bounds over layers)) minus the first, so deeper layers forget
        less; layer 0 has none (published: "the lower bound for the first layer is zero")."""
        if self.lower_bounds is None:
            return [None] * self.config.n_layers
        p = self.lower_bounds.softmax(0)  # in the parameter's own dtype, as published
        bounds = (p.cumsum(0) - p[0]).to(dtype)
        return [None] + list(bounds[1:])

    def forward(self, input_ids: torch.Tensor, state: HGRNState | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] ([B, 1, vocab] with last_only); with a state, continues from what it holds."""
        B, T = input_ids.shape
        h = self.embed(input_ids)
        memory = state.h if state is not None else self.new_state(B, T).h
        valid = state.valid(T, h.device) if state is not None else None
        for block, bound, mem in zip(self.layers, self.forget_lower_bounds(h.dtype), memory):
            h = block(h, bound, mem, valid)
        if state is not None:
            state.advance(T)
        h = self.norm(h[:, -1:] if last_only else h)
        return self.lm_head(h)

    def pack_(self) -> MMfreeLM:
        """Every BitLinear to packed ternary weights, in place."""
        for m in self.modules():
            if isinstance(m, BitLinear):
                m.pack_()
        return self


class LlamaBosPrompt:
    """Prompt rule: the published checkpoints carry the Llama/Mistral SentencePiece tokenizer, which starts every
    text with BOS <s> (tokenizer_config.json `add_bos_token`, true unless it says otherwise), as the published
    generation example (`tokenizer(prompt)`) feeds the model."""

    def encode(self, tokenizer, text: str) -> list[int]:
        ids = tokenizer.encode(text)
        bos = tokenizer.token_id(tokenizer.special("bos_token") or "<s>")
        if not tokenizer.config.get("add_bos_token", True) or bos is None or (ids and ids[0] == bos):
            return ids
        return [bos, *ids]

    def decode(self, tokenizer, prompt: str, new_ids: list[int]) -> str:
        return tokenizer.decode(new_ids)


def build(c: MMfreeConfig) -> MMfreeLM:
    return MMfreeLM(c)


def count_params(c: MMfreeConfig) -> int:
    """Parameters of the published (latent) checkpoint, norm weights included."""
    d, hidden, vocab = c.dim, c.intermediate_size, c.vocab_size
    mixer = 4 * (d * d + d) + d  # i, f, g, o BitLinears (weight + norm) and g_norm
    glu = (2 * hidden * d + d) + (hidden * d + hidden)
    block = mixer + glu + 2 * d
    bounds = c.n_layers * d if c.use_lower_bound else 0
    return vocab * d + bounds + c.n_layers * block + d + (vocab * d + d)


# Published sizes (paper Table 1 / README; config.json of each repo: model_type "hgrn_bit", vocab 32000,
# num_heads 1, expand_ratio 1, hidden_ratio 4, no short convolution, lower bounds on, rms_norm_eps 1e-6).
PUBLISHED = {
    "370m": ("ridger/MMfreeLM-370M", MMfreeConfig(32000, 1024, 24)),
    "1.3b": ("ridger/MMfreeLM-1.3B", MMfreeConfig(32000, 2048, 24)),
    "2.7b": ("ridger/MMfreeLM-2.7B", MMfreeConfig(32000, 2560, 32)),
}
PAPER = "https://arxiv.org/abs/2406.02528"
LICENSE = "apache-2.0"


def _entries() -> list[Entry]:
    return [
        Entry(
            name=f"mmfree-{size}",
            family="mmfree",
            config=asdict(c),
            source=Source(repo=repo, layout="hf-mmfree"),
            license=LICENSE,
            paper=PAPER,
            task="text-generation",
            params=count_params(c),
            description=f"MatMul-free LM {size.upper()} (HGRN-Bit): ternary BitLinear projections and an HGRN "
            "gated linear recurrence, no attention; base model trained on SlimPajama",
            tags=("llm", "mmfree", "ternary", "recurrent"),
        )
        for size, (repo, c) in PUBLISHED.items()
    ]


FAMILY = Family(
    name="mmfree",
    config_cls=MMfreeConfig,
    build=build,
    task="text-generation",
    entries=tuple(_entries()),
    card_template="mmfree.md",
    prompt=LlamaBosPrompt(),
    extrapolates=True,  # a recurrence has no position limit: past the trained 2048 tokens, warn, not refuse
)
