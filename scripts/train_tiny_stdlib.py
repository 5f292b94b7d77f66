"""Train the embedded default, qwen2-tiny-stdlib: a ~6M-parameter Qwen2 on Python's standard library.

    python scripts/train_tiny_stdlib.py --minutes 20

1. Corpus: the *.py files of the running Python's standard library (tests excluded); 5% of the files,
   chosen by a hash of their path, are held out.
2. Tokenizer: byte-level BPE (4096 tokens) trained with `tokenizers`, with Qwen2's pre-tokenizer split
   and control tokens, saved in Qwen2's published tokenizer file layout.
3. Model: zoo's own Qwen2 (architectures/qwen2.py, TINY_STDLIB config), trained with AdamW for a wall-
   clock budget on the CPU, then written in zoo's native format (bf16) with its card into zoo/data/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sysconfig
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from zoo.architectures.qwen2 import TINY_STDLIB, TINY_STDLIB_NAME, build, count_params
from zoo.conversion.engine import AtomicDirectory
from zoo.weights import NativeConfig, write_config
from zoo.weights.writer import write_state_dict

from zoo.cards import write_card

OUT = Path(__file__).resolve().parents[1] / "zoo" / "data" / TINY_STDLIB_NAME
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer pattern (tokenizer.json of Qwen/Qwen2-*): digits split one by one.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def stdlib_files() -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not any(part in {"test", "tests", "site-packages", "idle_test", "__pycache__"} for part in p.parts)
    )
    held = [p for p in files if hashlib.sha1(str(p.relative_to(root)).encode()).digest()[0] < 13]  # ~5%
    held_set = set(held)
    return [p for p in files if p not in held_set], held


def read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="ignore")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[], show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIALS)  # appended after the regular tokens, as in Qwen2
    return tok


def save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    with tempfile.TemporaryDirectory() as tmp:  # vocab.json + merges.txt, Qwen2's slow-tokenizer files
        tok.model.save(tmp)
        for name in ("vocab.json", "merges.txt"):
            (out / name).write_bytes((Path(tmp) / name).read_bytes())
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False} for t in SPECIALS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": SPECIALS[1:], "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": TINY_STDLIB.max_seq_len,
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
        "chat_template": CHATML,
    }, indent=2) + "\n")
    eos = tok.token_to_id("<|endoftext|>")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
        "do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "max_new_tokens": 128,
    }, indent=2) + "\n")


def encode_all(tok, texts: list[str], eos: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def init_weights(model: torch.nn.Module, n_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), zero biases, residual output projections scaled by 1/sqrt(2 * layers)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.normal_(0.0, std)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, batches: int = 24, bs: int = 16) -> float:
    model.eval()
    starts = torch.linspace(0, len(data) - seq - 2, batches * bs).long()
    total = 0.0
    for b in range(batches):
        idx = starts[b * bs : (b + 1) * bs]
        x = torch.stack([data[i : i + seq] for i in idx])
        y = torch.stack([data[i + 1 : i + seq + 1] for i in idx])
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train()
    return total / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:  # fail now, not after training, if the card cannot be written
        write_card(tmp, NativeConfig(family="qwen2", config=asdict(TINY_STDLIB), name=TINY_STDLIB_NAME))

    train_files, held_files = stdlib_files()
    train_texts, held_texts = [read(p) for p in train_files], [read(p) for p in held_files]
    tok = train_tokenizer(train_texts, TINY_STDLIB.vocab_size)
    eos = tok.token_to_id("<|endoftext|>")
    train, held = encode_all(tok, train_texts, eos), encode_all(tok, held_texts, eos)
    print(f"corpus: {len(train_files)} train files ({len(train):,} tokens), {len(held_files)} held out "
          f"({len(held):,} tokens); tokenizer {time.time() - t0:.0f}s", flush=True)

    model = build(TINY_STDLIB)
    init_weights(model, TINY_STDLIB.n_layers)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    start, step, warmup = time.time(), 0, 50
    while (elapsed := time.time() - start) < budget:
        frac = elapsed / budget  # cosine schedule over wall-clock time, since the step count is unknown
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(train) - args.seq - 1, (args.batch,))
        x = torch.stack([train[i : i + args.seq] for i in idx])
        y = torch.stack([train[i + 1 : i + args.seq + 1] for i in idx])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  {elapsed / 60:.1f} min", flush=True)

    held_loss = evaluate(model, held, args.seq)
    tokens_seen = step * args.batch * args.seq
    print(f"held-out loss {held_loss:.3f} nats/token after {step} steps ({tokens_seen:,} tokens)", flush=True)

    native = NativeConfig(
        family="qwen2", config=asdict(TINY_STDLIB), name=TINY_STDLIB_NAME, task="text-generation",
        dtype="bfloat16",
        source={"layout": "native", "license": "apache-2.0",
                "description": "trained by zoo's scripts/train_tiny_stdlib.py"},
        extra={"bos_token_id": eos, "eos_token_id": [eos],
               "generation": {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95},
               "training": {"held_out_loss": round(held_loss, 4), "steps": step, "tokens": tokens_seen,
                            "seq_len": args.seq, "batch": args.batch, "minutes": round(args.minutes, 1),
                            "train_files": len(train_files), "held_out_files": len(held_files)}},
    )
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    with AtomicDirectory(args.out, overwrite=True) as tmp:
        write_state_dict(tmp, state, progress=False)
        write_config(tmp, native)
        save_tokenizer(tok, tmp)
        card = write_card(tmp, native, command=f"python scripts/train_tiny_stdlib.py --minutes {args.minutes:g}",
                          params=count_params(TINY_STDLIB))
        card.write_text(card.read_text() + TRAINING_NOTE.format(
            files=len(train_files), held=len(held_files), tokens=tokens_seen, steps=step, loss=held_loss,
            ppl=math.exp(held_loss), minutes=args.minutes))
    print(f"wrote {args.out} in {(time.time() - t0) / 60:.1f} min", flush=True)


TRAINING_NOTE = """
## What this model really is

Not a published model: zoo's embedded default, so that a fresh install has something real to run.
It is a Qwen2-architecture model of about 6M parameters trained from scratch on the CPU by
`scripts/train_tiny_stdlib.py` on {files} Python standard-library source files ({held} more held out),
{steps} steps, {tokens:,} tokens, {minutes:g} minutes on 2 CPU cores. Its tokenizer is a 4,096-token byte-level BPE
trained on the same files and saved in Qwen2's published tokenizer layout.

Held-out loss: **{loss:.3f} nats/token** (perplexity {ppl:.1f}) on the held-out files.

It writes text that looks like Python (indentation, `def`, `self.`, docstrings) and means nothing. Use it to
smoke-test the zoo, never for anything that matters. The parity statement above is about the Qwen2
implementation it runs on, not about this model.
"""

if __name__ == "__main__":
    main()
