"""The pre-norm decoder-only transformer shared by Qwen2 and Phi-4 (and any Llama-style family).

    h = embed(tokens)
    for each block:  h = h + Attn(RMSNorm(h)),  h = h + MLP(RMSNorm(h))
    logits = lm_head(RMSNorm(h))          (lm_head = embed when the embeddings are tied)

Families differ in their rotary embedding, biases and feed-forward (dense or mixture of experts);
they pass those in rather than copying the skeleton.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module
from zoo.architectures.kernels.linear import dense, dense_weight
from zoo.architectures.kernels.rmsnorm import add_rms_norm
from zoo.architectures.layers import Attention, RMSNorm, Rotary
from zoo.architectures.quant import PackedEmbedding
from zoo.architectures.state import KVCache, State


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: nn.Module, dim: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = attn
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = mlp

    def forward(self, h, cos, sin, cache, mask):
        h = h + self.attn(self.attn_norm(h), cos, sin, cache, mask)
        return h + self.mlp(self.mlp_norm(h))

    def fused(self, h: torch.Tensor, x: torch.Tensor, cos, sin, cache, mask,
              after: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for h with x = attn_norm(h) already computed, each residual add fused with the norm after it
        (`after`: the next block's attn_norm, or the final norm): (the block's output, after(output)). The same
        numbers as forward then after; one C++ call per add and norm on CPU (kernels/rmsnorm.py add_rms_norm).
        Only for plain blocks (`_plain`)."""
        h, x = add_rms_norm(h, self.attn(x, cos, sin, cache, mask), self.mlp_norm.weight, self.mlp_norm.eps)
        return add_rms_norm(h, self.mlp(x), after.weight, after.eps)


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _plain(blocks: nn.ModuleList, norm: nn.Module) -> bool:
    """Whether the blocks and the final norm may run `Block.fused`: this module's Block and RMSNorm exactly, with no
    hook (fused calls neither the blocks nor the norms as modules)."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks or type(norm) is not RMSNorm:
        return False
    if not _no_hooks(norm):
        return False
    for b in blocks._modules.values():  # (_modules: no Module.__getattr__ per lookup; this runs every token)
        if type(b) is not Block or not _no_hooks(b):
            return False
        sub = b._modules
        a, m = sub["attn_norm"], sub["mlp_norm"]
        if type(a) is not RMSNorm or type(m) is not RMSNorm or not _no_hooks(a) or not _no_hooks(m):
            return False
    return True


class DecoderLM(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        eps: float,
        rotary: Rotary,
        mlp: Callable[[int], nn.Module],
        qkv_bias: bool = False,
        tie_embeddings: bool = False,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.rotary = rotary
        self.layers = nn.ModuleList(
            Block(Attention(dim, n_heads, n_kv_heads, head_dim, qkv_bias, i), mlp(i), dim, eps)
            for i in range(n_layers)
        )
        self.norm = RMSNorm(dim, eps)
        self.lm_head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)
        self.tied_embedding = "embed" if tie_embeddings else None  # the head reads it (quantisation packs it too)

    def new_state(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """The generation state for this model: a KV cache."""
        return KVCache(batch, max_len, pad)

    def forward(self, input_ids: torch.Tensor, state: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T]; with a state, continues from what it holds.
        last_only: score only the last position ([B, 1, vocab]), all a decoding step needs."""
        B, T = input_ids.shape
        book = state if state is not None else State(B, T)  # positions and masks of a stateless call
        positions = book.positions(T, input_ids.device)
        mask = book.attention_mask(T, input_ids.device)
        h = self.embed(input_ids)
        cos, sin = self.rotary(positions, h.dtype, book.seen(T))
        blocks = self.layers
        if len(blocks) and _plain(blocks, self.norm):  # each residual add fused with the norm after it
            seq = list(blocks._modules.values())
            afters = [b._modules["attn_norm"] for b in seq[1:]] + [self.norm]
            x = seq[0]._modules["attn_norm"](h)
            for block, after in zip(seq, afters):
                h, x = block.fused(h, x, cos, sin, state, mask, after)
            h = x[:, -1:] if last_only else x  # (the norm is per position: the last one's is the same alone)
        else:
            for block in blocks:
                h = block(h, cos, sin, state, mask)
            h = self.norm(h[:, -1:] if last_only else h)
        if state is not None:
            state.advance(T)
        return dense(self.lm_head, h) if self.lm_head is not None else tied_head(h, self.embed)


def tied_head(h: torch.Tensor, embed: nn.Module) -> torch.Tensor:
    """Logits against the embedding matrix. Under tensor parallelism the embedding is split by vocabulary
    (a DTensor): each rank scores its slice of the vocabulary and the slices are gathered. A packed table
    (weight-only quantisation) scores with its scheme's kernel."""
    if isinstance(embed, PackedEmbedding):
        return embed.as_head(h)
    weight = embed.weight
    # A DTensor exists only once torch.distributed.tensor is imported (0.5 s): never import it just to ask.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(weight, dtensor.DTensor):
        from torch.distributed.tensor import DTensor, Replicate

        h = DTensor.from_local(h, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim, run_check=False)
        return F.linear(h, weight).full_tensor()
    return dense_weight(h, weight)


# Megatron-style tensor-parallel plan of this skeleton: column-parallel in, row-parallel out (one all-reduce
# after attention, one after the MLP); the embedding and the output head are split by vocabulary, which
# benchmarks/bench_tp.py measured faster and leaner than keeping them whole on every rank (BENCHMARKS.md).
# A tied head reuses the vocab-split embedding (tied_head). Words: zoo/tensor_parallel.py.
TP_PLAN = {
    "embed": "vocab",
    "layers.*.attn.q_proj": "colwise",
    "layers.*.attn.k_proj": "colwise",
    "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_rep",
}
