"""A plain PyTorch composition of the MatMul-free LM (HGRN-Bit) for the tests, built on the published code's own
PyTorch functions (tests/vendor/matmulfreellm, ridgerchu/matmulfreellm @ a016f72: ops/fusedbitnet.py
`activation_quant` and `weight_quant`) and, for greedy tokens, on the published HGRNBitForCausalLM itself run on
CPU (tests/mmfree_published.py). What is still written here: the composition in `reference_logits` (the published
model's forward read statement by statement: models/hgrn_bit/modeling_hgrn_bit.py, layers/hgrn_bit.py), so that
it runs in fp64 too, where the published kernels (fp32 inside) cannot, and the time loop (the published
`naive_recurrent_hgrn` widens to fp32 only). Both are checked against the published model in
tests/test_mmfree_published.py, which also covers what fp64 cannot show: the fused kernel rounds activations
halves away from zero, where `activation_quant` (the training path) rounds them to even.

    activation_quant(x) = round(x * s).clamp(-128, 127) / s,  s = 127 / max|x|.clamp(min=1e-5)   per token
    weight_quant(W)     = round(W * s).clamp(-1, 1) / s,      s = 1 / mean|W|.clamp(min=1e-5)    per tensor
"""

from __future__ import annotations

import torch

from tests import mmfree_published as published


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


activation_quant = published.fusedbitnet.activation_quant
weight_quant = published.fusedbitnet.weight_quant


def bit_linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, eps: float = 1e-6) -> torch.Tensor:
    """FusedBitLinear: RMSNorm with `name.norm.weight` (eps 1e-6, the fused kernel's default), then quantise."""
    x = rms_norm(x, sd[f"{name}.norm.weight"], eps)
    return activation_quant(x) @ weight_quant(sd[f"{name}.weight"]).T


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def hgrn_loop(i: torch.Tensor, f: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """naive_recurrent_hgrn: h_t = f_t * h_{t-1} + i_t, one step at a time. i, f [B, T, D]; h [B, D]."""
    out = []
    for t in range(i.shape[1]):
        h = f[:, t] * h + i[:, t]
        out.append(h)
    return torch.stack(out, 1), h


def reference_logits(sd: dict[str, torch.Tensor], n_layers: int, ids: torch.Tensor, eps: float = 1e-6,
                     mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [B, T, V] of HGRNBitForCausalLM for token ids [B, T] from a published state dict, in fp32
    (or fp64, where rounding-boundary flips become vanishingly rare).

    mask: the published attention_mask [B, T] (1 = token, 0 = left pad); a pad's input is zeroed."""
    sd = {k: v.to(dtype) for k, v in sd.items()}
    h = sd["model.embeddings.weight"][ids]
    B, T, D = h.shape
    lb = sd["model.lower_bounds"].softmax(0)
    lb = lb.cumsum(0) - lb[0]
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        x = rms_norm(h, sd[p + "attn_norm.weight"], eps)
        i = bit_linear(x, sd, p + "attn.i_proj")
        f = torch.sigmoid(bit_linear(x, sd, p + "attn.f_proj"))
        if layer > 0:
            f = lb[layer] + (1 - lb[layer]) * f
        i = silu(i) * (1 - f)
        if mask is not None:
            i = i * mask[..., None]
        o, _ = hgrn_loop(i, f, torch.zeros(B, D, dtype=dtype))
        g = bit_linear(x, sd, p + "attn.g_proj")
        o = rms_norm(g, sd[p + "attn.g_norm.weight"], eps) * silu(o)  # g_norm(g_proj(x), o): normalise g
        h = h + bit_linear(o, sd, p + "attn.o_proj")
        x = rms_norm(h, sd[p + "mlp_norm.weight"], eps)
        gate, up = bit_linear(x, sd, p + "mlp.gate_proj").chunk(2, -1)
        h = h + bit_linear(silu(gate) * up, sd, p + "mlp.down_proj")
    h = rms_norm(h, sd["model.norm.weight"], eps)
    return bit_linear(h, sd, "lm_head")


def reference_greedy(sd: dict[str, torch.Tensor], n_layers: int, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens of the published HGRNBitForCausalLM (fp32, run on CPU) on a published state dict."""
    vocab, dim = sd["model.embeddings.weight"].shape
    config = dict(vocab_size=vocab, hidden_size=dim, num_hidden_layers=n_layers,
                  intermediate_size=sd["model.layers.0.mlp.down_proj.weight"].shape[1])
    return published.greedy(published.published_model(sd, config, torch.float32), prompt, n)[0]


def published_state_dict(vocab: int, dim: int, n_layers: int, intermediate: int, seed: int = 0,
                         dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random weights under the published HGRNBitForCausalLM names and shapes (as safetensors holds them).

    Norm weights and lower bounds are random too, so every one of them is really tested."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=1.0, mean=0.0: (torch.randn(*shape, generator=g) * std + mean).to(dtype)
    sd = {"model.embeddings.weight": rnd(vocab, dim), "model.lower_bounds": rnd(n_layers, dim),
          "model.norm.weight": rnd(dim, std=0.2, mean=1.0)}

    def bit(name, out_f, in_f):
        sd[f"{name}.weight"] = rnd(out_f, in_f, std=0.05)
        sd[f"{name}.norm.weight"] = rnd(in_f, std=0.2, mean=1.0)

    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        sd[p + "attn_norm.weight"] = rnd(dim, std=0.2, mean=1.0)
        for proj in ("i_proj", "f_proj", "g_proj", "o_proj"):
            bit(p + f"attn.{proj}", dim, dim)
        sd[p + "attn.g_norm.weight"] = rnd(dim, std=0.2, mean=1.0)
        sd[p + "mlp_norm.weight"] = rnd(dim, std=0.2, mean=1.0)
        bit(p + "mlp.gate_proj", 2 * intermediate, dim)
        bit(p + "mlp.down_proj", dim, intermediate)
    bit("lm_head", vocab, dim)
    return sd


def save_published(directory, vocab: int = 256, dim: int = 64, n_layers: int = 3, intermediate: int = 128,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a random checkpoint in the published layout (config.json model_type "hgrn_bit" with the published
    fields, model.safetensors in fp16 under the published names); return its state dict."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = published_state_dict(vocab, dim, n_layers, intermediate, seed)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["HGRNBitForCausalLM"], "model_type": "hgrn_bit", "attn_mode": "fused_recurrent",
        "vocab_size": vocab, "hidden_size": dim, "num_hidden_layers": n_layers, "num_heads": 1, "expand_ratio": 1,
        "use_short_conv": False, "conv_size": 4, "share_conv_kernel": True, "use_lower_bound": True,
        "hidden_ratio": 4, "intermediate_size": intermediate, "hidden_act": "swish", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "initializer_range": 0.02, "fuse_cross_entropy": True, "torch_dtype": "float16",
        "transformers_version": "4.40.2",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return sd
