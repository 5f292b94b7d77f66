"""Builders of tiny reference checkpoints (offline, random weights) and comparison helpers."""

from __future__ import annotations

from pathlib import Path

import torch


class Spy:
    """Stands for the CPU kernel library (torch.ops.zoo_cpu), recording which of its ops were looked up."""

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.lib, name)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tiny_qwen2(path: Path, tie: bool = True, seed: int = 0, shard: str | None = None, **overrides):
    """A random Qwen2ForCausalLM saved by transformers itself."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=tie,
        rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases, so the bias path is really tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return model


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def tiny_phi3(path: Path, longrope: bool = True, seed: int = 0, **overrides):
    """A random Phi3ForCausalLM saved by transformers. longrope=True: Phi-4-mini's shape (3/4 of each head
    rotated, LongRoPE switching at 32 tokens, tied embeddings); False: Phi-4's (full rotary, untied)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    if longrope:
        rope = dict(partial_rotary_factor=0.75, original_max_position_embeddings=32, max_position_embeddings=256,
                    tie_word_embeddings=True, rope_scaling={
                        "type": "longrope", "short_factor": [1.0, 1.05, 1.1, 1.0, 0.95, 1.2],
                        "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]})
    else:
        rope = dict(max_position_embeddings=128, original_max_position_embeddings=128, tie_word_embeddings=False,
                    rope_theta=250000.0)
    cfg = Phi3Config(**{
        **dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, sliding_window=None),
        **rope, **overrides})
    model = Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def converted_tiny_qwen2(root: Path, tie: bool) -> Path:
    """root/hf: a tiny Qwen2 saved by transformers; root/native: zoo's conversion of it. Returns root."""
    import zoo

    tiny_qwen2(root / "hf", tie=tie)
    zoo.convert(root / "hf", root / "native", progress=False)
    return root


def tiny_qwen2_moe(path: Path, norm_topk_prob: bool = False, seed: int = 0, shard: str | None = None, **overrides):
    """A random Qwen2MoeForCausalLM (4 experts, top 2, a shared expert) saved by transformers (per-expert files)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(**{
        **dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
               rms_norm_eps=1e-6, initializer_range=0.2, norm_topk_prob=norm_topk_prob, bos_token_id=1,
               eos_token_id=2, pad_token_id=0),
        **overrides})
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # random q/k/v biases, so the bias path is really tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model


def tiny_tokenizer(path: Path, specials: dict[str, int], chat_template: str, eos_token: str) -> None:
    """A word-level tokenizer.json (a few words and letters from id 3) with special tokens at the given ids,
    plus a tokenizer_config.json carrying the chat template, like a published checkpoint's."""
    import json

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "how", "are", "you", "?", "!", "user", "assistant", "system", *"abcdefghij"]
    reserved = ["<unk>", "<s>", "</s>"]  # ids 0-2: the tiny configs' pad, bos and eos
    vocab = {t: n for n, t in enumerate(reserved + words)}
    assert min(specials.values()) >= len(vocab), "put special tokens after the words"
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in [*reserved[1:], *specials]])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template, "eos_token": eos_token}))


def tiny_glm(path: Path, seed: int = 0):
    """A random GLM-130B in its released layout (SAT, 2 tensor-parallel rank files, with the model_config.json
    newer SAT versions save beside a checkpoint); see tests/glm_reference.py."""
    from tests import glm_reference

    shards = glm_reference.random_sat_shards(2, 64, 96, 4, 256, 2, seed=seed, std=0.25, embed_std=0.1)
    glm_reference.write_sat_checkpoint(path, shards, model_config={
        "num_layers": 2, "hidden_size": 64, "inner_hidden_size": 96, "num_attention_heads": 4, "vocab_size": 256,
        "max_sequence_length": 512, "mask_token_id": 250, "gmask_token_id": 251, "smask_token_id": 252,
        "sop_token_id": 254})
    return shards


def torchrun_env(monkeypatch, world: int) -> None:
    """The environment torchrun gives rank 0 of a `world`-process job, set in this process (refusals that come
    before any process group is made are tested this way)."""
    for var, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(var, value)


def assert_ranks_equal_whole(model, logits_path, ranks: tuple[dict, dict], tol: float, distinct: int) -> None:
    """Two tensor-parallel ranks' results (logits of fixed ids saved at `logits_path`; greedy, batched and unseeded
    sampled generations) equal the whole model's: logits within `tol`, the same tokens on both ranks and the model.
    `distinct`: fewest distinct greedy tokens for the continuation to be varied enough that equality means something."""
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
    assert max_abs_diff(torch.load(logits_path), expected) < tol
    r0, r1 = ranks
    prompt = ids[0, :8].tolist()
    greedy = model.generate(prompt, max_new_tokens=24)
    assert len(set(greedy)) >= distinct
    assert r0["greedy"] == r1["greedy"] == greedy
    assert r0["batch"] == r1["batch"] == model.generate([prompt, prompt[:3]], max_new_tokens=6)
    assert r0["sampled"] == r1["sampled"]  # unseeded sampling: both ranks drew the same tokens
