"""Qwen2-MoE: Qwen Team, "Qwen2 Technical Report", arXiv 2407.10671 (Qwen2-57B-A14B).

The Qwen2 decoder (architectures/decoder.py: GQA with biased q/k/v, RoPE, RMSNorm) whose feed-forward is
a mixture of experts:

    p        = softmax(router(x))                  (fp32, over all experts)
    w, e     = top_k(p)                            (renormalised to sum 1 only if norm_topk_prob)
    routed   = sum_j w_j * Expert_{e_j}(x)         (each expert a SwiGLU MLP)
    shared   = sigmoid(shared_expert_gate(x)) * SharedExpert(x)   (one wide SwiGLU MLP, a scalar gate per token)
    out      = routed + shared

Expert weights are stacked ([E, I, H]) and the routed experts run grouped by expert: token assignments
are sorted by expert and each expert multiplies its contiguous group in one matmul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.decoder import TP_PLAN, DecoderLM
from zoo.architectures.kernels.dispatch import COMPILED, backend
from zoo.architectures.layers import GatedMLP, Rotary
from zoo.architectures.quant import stack_linear

from zoo.family import Family
from zoo.registry import Entry, Source


@dataclass
class Qwen2MoeConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_experts: int
    n_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    intermediate_size: int = 0  # dense layers only (mlp_only_layers / decoder_sparse_step)
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 and i not in mlp_only_layers
    mlp_only_layers: list[int] = field(default_factory=list)
    head_dim: int = 0  # 0: dim // n_heads
    qkv_bias: bool = True
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_seq_len: int = 32768

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if not 0 < self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok {self.n_experts_per_tok} must be in 1..n_experts ({self.n_experts})")
        if any(not self.is_sparse(i) for i in range(self.n_layers)) and not self.intermediate_size:
            raise ValueError("dense layers (mlp_only_layers / decoder_sparse_step) need intermediate_size")

    def is_sparse(self, layer: int) -> bool:
        return (self.n_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: gate/up [E, I, H], down [E, H, I]. Weight-only quantisation packs
    each stack (`packable_stacks`: quant.PackedStack, which stands in for the parameter)."""

    packable_stacks = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; experts, weights [N, k] -> sum_j weights[:, j] * Expert_{experts[:, j]}(x), [N, H]."""
        if backend(x, has_kernel=False) == COMPILED:
            return self.per_token(x, experts, weights)
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # assignments grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        xs = x[token]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):  # one matmul per expert over its whole group
            if n:
                h = xs[start : start + n]
                h = F.silu(stack_linear(h, self.gate_proj, e)) * stack_linear(h, self.up_proj, e)
                out[start : start + n] = stack_linear(h, self.down_proj, e)
                start += n
        out = out * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, out)

    def per_token(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum for each token on its own, as multiply-and-reduce over the rows of its chosen experts:
        the form of a compiled decoding step (no data-dependent sizes; Inductor fuses the expert lookup into one
        pass over just those weights). Eager it would copy the chosen weights, so eager calls group by expert."""
        xe = x.float()[:, None, None, :]  # [N, 1, 1, H]
        gate = (self.gate_proj[experts].float() * xe).sum(-1)  # [N, k, I]
        up = (self.up_proj[experts].float() * xe).sum(-1)
        h = (F.silu(gate.to(x.dtype)) * up.to(x.dtype)).float()
        out = (self.down_proj[experts].float() * h[:, :, None, :]).sum(-1).to(x.dtype)  # [N, k, H]
        return (out * weights[..., None]).sum(1)


class SparseMoE(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, hidden: int, shared_hidden: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = Experts(n_experts, dim, hidden)
        self.shared_expert = GatedMLP(dim, shared_hidden)
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)  # routing decisions in fp32
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        routed = self.experts(x, experts, weights.to(x.dtype))
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).view(shape)


def build(c: Qwen2MoeConfig) -> DecoderLM:
    def mlp(i: int) -> nn.Module:
        if c.is_sparse(i):
            return SparseMoE(c.dim, c.n_experts, c.n_experts_per_tok, c.moe_intermediate_size,
                             c.shared_expert_intermediate_size, c.norm_topk_prob)
        return GatedMLP(c.dim, c.intermediate_size)

    return DecoderLM(
        c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps,
        rotary=Rotary(c.head_dim, c.rope_theta), mlp=mlp, qkv_bias=c.qkv_bias, tie_embeddings=c.tie_embeddings,
    )


def count_params(c: Qwen2MoeConfig, active: bool = False) -> int:
    """All parameters, or (active=True) those one token uses: top-k routed experts instead of all."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attn = c.dim * (q + 2 * kv) + (q * c.dim) + ((q + 2 * kv) if c.qkv_bias else 0)
    moe = (3 * c.dim * c.moe_intermediate_size * (c.n_experts_per_tok if active else c.n_experts)
           + 3 * c.dim * c.shared_expert_intermediate_size + c.dim * c.n_experts + c.dim)
    dense = 3 * c.dim * c.intermediate_size
    blocks = sum(attn + 2 * c.dim + (moe if c.is_sparse(i) else dense) for i in range(c.n_layers))
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + blocks + c.dim + head


# config.json of Qwen/Qwen2-57B-A14B: every layer sparse, 64 experts, top 8, no renormalisation.
QWEN2_57B_A14B = Qwen2MoeConfig(
    vocab_size=151936, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, n_experts=64, n_experts_per_tok=8,
    moe_intermediate_size=2560, shared_expert_intermediate_size=20480, intermediate_size=18944,
    norm_topk_prob=False, rope_theta=1_000_000.0, norm_eps=1e-6, max_seq_len=131072,
)


def _entries() -> list[Entry]:
    out = []
    for instruct in (False, True):
        c = Qwen2MoeConfig(**{**asdict(QWEN2_57B_A14B), **({"max_seq_len": 32768} if instruct else {})})
        out.append(Entry(
            name="qwen2-57b-a14b" + ("-instruct" if instruct else ""),
            family="qwen2_moe",
            config=asdict(c),
            source=Source(repo="Qwen/Qwen2-57B-A14B" + ("-Instruct" if instruct else ""), layout="hf-qwen2-moe"),
            license="apache-2.0",
            paper="https://arxiv.org/abs/2407.10671",
            task="text-generation",
            params=count_params(c),
            description="Qwen2 57B-A14B mixture of experts (64 routed experts, top 8, plus a shared expert; "
            f"{count_params(c, active=True) / 1e9:.1f}B active per token) "
            + ("instruct (ChatML chat)" if instruct else "base"),
            tags=("llm", "qwen2", "moe") + (("chat",) if instruct else ()),
            extra={"active_params": count_params(c, active=True)}
            | ({"unverified": "max_seq_len 32768 assumed like the other Qwen2 instruct configs"} if instruct else {}),
        ))
    return out


FAMILY = Family(
    name="qwen2_moe",
    config_cls=Qwen2MoeConfig,
    build=build,
    task="text-generation",
    entries=tuple(_entries()),
    # Attention and the shared expert shard like the dense decoder (the TP_PLAN mlp entries cover dense layers);
    # the routed experts and the router stay replicated (expert parallelism would be their natural split).
    tp_plan={
        **TP_PLAN,
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
    },
    card_template="qwen2_moe.md",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    extrapolates=True,
)
