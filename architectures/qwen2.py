"""Qwen2 (dense): Qwen Team, "Qwen2 Technical Report", arXiv 2407.10671.

A pre-norm decoder (architectures/decoder.py) with grouped-query attention whose q/k/v projections
carry biases, RoPE with theta 1e6 over the full head, RMSNorm and SwiGLU; the small models tie the
output head to the embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zoo.architectures.decoder import TP_PLAN, DecoderLM
from zoo.architectures.layers import GatedMLP, Rotary

from zoo.family import Family
from zoo.registry import Entry, Source


@dataclass
class Qwen2Config:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_seq_len: int = 32768

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")


def build(c: Qwen2Config) -> DecoderLM:
    return DecoderLM(
        c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps,
        rotary=Rotary(c.head_dim, c.rope_theta),
        mlp=lambda i: GatedMLP(c.dim, c.intermediate_size),
        qkv_bias=True,
        tie_embeddings=c.tie_embeddings,
    )


def count_params(c: Qwen2Config) -> int:
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attn = c.dim * (q + 2 * kv) + (q + 2 * kv) + q * c.dim
    block = attn + 3 * c.dim * c.intermediate_size + 2 * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + c.n_layers * block + c.dim + head


# Published sizes (technical report, Table 1; config.json of each repo).
PUBLISHED = {
    "0.5b": Qwen2Config(151936, 896, 24, 14, 2, 4864, tie_embeddings=True),
    "1.5b": Qwen2Config(151936, 1536, 28, 12, 2, 8960, tie_embeddings=True),
    "7b": Qwen2Config(152064, 3584, 28, 28, 4, 18944),
    "72b": Qwen2Config(152064, 8192, 80, 64, 8, 29568, norm_eps=1e-5),
}
# 72B-Instruct's config says 1e-6 where the base says 1e-5; every instruct config is 32K.
INSTRUCT_OVERRIDES = {"72b": {"norm_eps": 1e-6}}
LICENSES = {"0.5b": "apache-2.0", "1.5b": "apache-2.0", "7b": "apache-2.0", "72b": "tongyi-qianwen"}

# The embedded default: trained by benchmarks/../scripts/train_tiny_stdlib.py, shipped in zoo/data.
TINY_STDLIB = Qwen2Config(4096, 256, 6, 4, 2, 768, rope_theta=10_000.0, tie_embeddings=True, max_seq_len=1024)
TINY_STDLIB_NAME = "qwen2-tiny-stdlib"


def _entries() -> list[Entry]:
    out = []
    for size, cfg in PUBLISHED.items():
        for instruct in (False, True):
            c = Qwen2Config(**{**asdict(cfg), **(INSTRUCT_OVERRIDES.get(size, {}) if instruct else {}),
                               "max_seq_len": 32768 if instruct else 131072})
            repo = f"Qwen/Qwen2-{size.upper()}" + ("-Instruct" if instruct else "")
            out.append(Entry(
                name=f"qwen2-{size}" + ("-instruct" if instruct else ""),
                family="qwen2",
                config=asdict(c),
                source=Source(repo=repo, layout="hf-qwen2"),
                license=LICENSES[size],
                paper="https://arxiv.org/abs/2407.10671",
                task="text-generation",
                params=count_params(c),
                description=f"Qwen2 {size.upper()} {'instruct (ChatML chat)' if instruct else 'base'} model",
                tags=("llm", "qwen2") + (("chat",) if instruct else ()),
            ))
    out.append(Entry(
        name=TINY_STDLIB_NAME,
        family="qwen2",
        config=asdict(TINY_STDLIB),
        source=Source(repo=TINY_STDLIB_NAME, layout="native", host="package"),
        license="apache-2.0",
        paper="https://arxiv.org/abs/2407.10671",
        task="text-generation",
        params=count_params(TINY_STDLIB),
        description="A 5.8M-parameter Qwen2-architecture model trained by zoo on Python's standard library sources; "
        "it writes Python-looking code. A smoke-test default, not a useful model.",
        tags=("llm", "qwen2", "tiny", "embedded"),
    ))
    return out


FAMILY = Family(
    name="qwen2",
    config_cls=Qwen2Config,
    build=build,
    task="text-generation",
    entries=tuple(_entries()),
    tp_plan=TP_PLAN,
    card_template="qwen2.md",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    extrapolates=True,
)
