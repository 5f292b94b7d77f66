"""The two reference implementations of xLSTM 7B, as test oracles, on tiny random checkpoints.

- transformers' `xLSTMForCausalLM`, running transformers' OWN mLSTM code. When the `xlstm` package is installed
  (it is, for the second oracle), transformers imports its blocks from there instead; `hf_classes` loads
  transformers' module a second time, privately, as if `xlstm` were absent, so the two oracles stay two
  independent implementations.
- the official `xlstm` package's `xLSTMLarge` (mode "inference", mlstm_kernels' native PyTorch kernels).
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import torch

# Published ratios at toy size: qk = dim * 0.5 = 64 (transformers' cache needs a multiple of 64), 2 heads,
# so heads of 32 (q, k) and 64 (v) features; feed-forward round_up(128 * 2.667, 64) = 384; chunks of 16 tokens.
TINY = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_heads=2, qk_dim_factor=0.5, v_dim_factor=1.0,
            ffn_proj_factor=2.667, ffn_round_up_to_multiple_of=64, mlstm_round_up_to_multiple_of=64,
            gate_soft_cap=15.0, output_logit_soft_cap=30.0, norm_eps=1e-6, eps=1e-6, chunk_size=16)
NATIVE_KERNELS = dict(chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
                      step_kernel="native", mode="inference", return_last_states=True)


@cache
def hf_classes():
    """(xLSTMConfig, xLSTMForCausalLM) of transformers, its xLSTMForCausalLM built from transformers' own mLSTM code."""
    import transformers.models.xlstm as package
    import transformers.utils
    from transformers import xLSTMConfig

    name = "transformers.models.xlstm._modeling_xlstm_own_kernels"
    spec = importlib.util.spec_from_file_location(name, Path(package.__file__).with_name("modeling_xlstm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with mock.patch.object(transformers.utils, "is_xlstm_available", lambda: False):
        spec.loader.exec_module(module)
    assert not module.external_xlstm
    return xLSTMConfig, module.xLSTMForCausalLM


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every part matter: transformers' init zeroes the gate weights and leaves the norms at 1.
    Input gate biases spread around 0 (the exponential gate then ranges over e^-4..e^4), forget gate biases near 3
    (sigmoid ~0.95, a memory of a few dozen tokens)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * randn(p.shape))
            elif name.endswith("igate_preact.bias"):
                p.copy_(2 * randn(p.shape))
            elif name.endswith("fgate_preact.bias"):
                p.copy_(3 + 0.5 * randn(p.shape))
            elif name.endswith("ifgate_preact.bias"):  # fused: [input gates; forget gates]
                half = p.shape[0] // 2
                p.copy_(torch.cat([2 * randn(half), 3 + 0.5 * randn(half)]))
            else:
                p.copy_(0.1 * randn(p.shape))


def tiny_hf_xlstm(path: Path | None, seed: int = 0, shard: str | None = None, **overrides):
    """A random xLSTMForCausalLM (transformers' own kernels), saved by transformers when `path` is given."""
    config_cls, model_cls = hf_classes()
    cfg = config_cls(**{**TINY, **NATIVE_KERNELS, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, **overrides})
    model = model_cls(cfg).eval()
    randomise(model, seed)
    if path is not None:
        model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model


def xlstm_large_like(hf_model, state: dict[str, torch.Tensor] | None = None,
                     weight_mode: str = "single") -> torch.nn.Module:
    """The official package's xLSTMLarge with the same config and weights as a transformers xLSTMForCausalLM
    (or with `state`, transformers-named tensors in `weight_mode`)."""
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    c = hf_model.config
    cfg = xLSTMLargeConfig(
        embedding_dim=c.hidden_size, num_heads=c.num_heads, num_blocks=c.num_hidden_layers, vocab_size=c.vocab_size,
        qk_dim_factor=c.qk_dim_factor, v_dim_factor=c.v_dim_factor, ffn_proj_factor=c.ffn_proj_factor,
        ffn_round_up_to_multiple_of=c.ffn_round_up_to_multiple_of, gate_soft_cap=c.gate_soft_cap,
        output_logit_soft_cap=c.output_logit_soft_cap, norm_eps=c.norm_eps, eps=c.eps, chunk_size=c.chunk_size,
        weight_mode=weight_mode, **NATIVE_KERNELS,
    )
    model = xLSTMLarge(cfg).eval()
    state = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v
             for k, v in (state or hf_model.state_dict()).items()}
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def xlstm_large_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens from xLSTMLarge: the prompt at once, then one token at a time with its recurrent state."""
    logits, state = model(ids)
    out = []
    for _ in range(n):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token[0, 0]))
        logits, state = model(token, state)
    return out
