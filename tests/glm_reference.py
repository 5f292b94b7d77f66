"""A plain, literal PyTorch reference of the published GLM code, for the tests.

There is no installable oracle (SAT 0.2.x needs CUDA, apex and an initialised model-parallel group; the
ChatGLM-6B remote code targets an old transformers), so this file follows the published code statement by
statement, in its own words, with the same tensor layouts:

- `sat_glm130b_forward`: SwissArmyTransformer 0.2.x `GLM130B` (model/official/glm130B_model.py with
  transformer.py and mpu/layers.py) run AS ITS TENSOR-PARALLEL RANKS RUN IT: it takes the per-rank state dicts
  of a checkpoint (the published `mp_rank_XX_model_states.pt` "module" dicts) and simulates the ranks:
  vocab-parallel embedding (each rank embeds the ids in its vocabulary range), column-parallel fused
  query_key_value viewed per local head as [q, k, v], rotary with fp16 angles, fp32 softmax with query-key
  layer scaling and -10000 fill, row-parallel dense with the partial outputs summed, the GeGLU applied to each
  rank's LOCAL dense_h_to_4h output (x1 * gelu(x2) of its own two halves), DeepNorm residuals, final
  LayerNorm, logits against each rank's embedding slice, gathered. Everything sequence-first, as SAT is.
  It never merges a tensor, so it checks the converter's merge rules independently.
- `sat_generate_masks_and_positions`: GLM-130B generate.py's get_masks_and_position_ids.
- `chatglm_forward` / `chatglm_masks_and_positions`: ChatGLM-6B modeling_chatglm.py (final revision) on the
  published transformers state dict: 2-D rotary, tanh-GELU MLP, lm_head, alpha = sqrt(2 * 28) (GLMBlock's
  default num_layers, which ChatGLMModel does not pass).

Differences from the published code, all for running on CPU in fp32: no CUDA kernels or apex (their math is
written out), and attention probabilities are cast back to the compute dtype (SAT casts to .half(), which is
the compute dtype of every published run).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rotary_tables(dim: int, seq_len: int, fp16: bool = True, compute=torch.float32):
    """SAT 0.2.x RotaryEmbedding: inv_freq rounded to half, positions as a half arange, the product in half,
    cos/sin taken on the half angles ([seq, 1, dim])."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    if fp16:
        inv_freq = inv_freq.half()
    t = torch.arange(seq_len, dtype=inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    if compute == torch.bfloat16:
        emb = emb.float()
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    if compute == torch.bfloat16:
        cos, sin = cos.bfloat16(), sin.bfloat16()
    return cos, sin


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


def _apply_rotary_index(q, k, cos, sin, position_id):
    """position_id [sq, b]; q, k [sq, b, np, hn]; cos [seq, 1, hn] gathered per token."""
    cos = F.embedding(position_id, cos.squeeze(1)).unsqueeze(2)
    sin = F.embedding(position_id, sin.squeeze(1)).unsqueeze(2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _attention_fn(q, k, v, mask, layer_id, hn):
    """SelfAttentionWithFP32SoftmaxMixin.attention_fn without mems: [sq, b, np, hn] -> [sq, b, np * hn]."""
    coeff = float(layer_id + 1)
    q = q / (math.sqrt(hn) * coeff)
    sq, b, np_, _ = q.shape
    sk = k.shape[0]
    scores = torch.bmm(q.reshape(sq, b * np_, hn).transpose(0, 1),
                       k.reshape(sk, b * np_, hn).transpose(0, 1).transpose(1, 2)).view(b, np_, sq, sk)
    scores = scores.masked_fill(mask, -10000.0)
    probs = F.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
    ctx = torch.bmm(probs.view(b * np_, sq, sk), v.reshape(sk, b * np_, hn).transpose(0, 1))
    return ctx.view(b, np_, sq, hn).permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def sat_glm130b_forward(shards: list[dict[str, torch.Tensor]], num_layers: int, num_heads: int,
                        tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                        fp16_rotary: bool = True, position_encoding_2d: bool = False) -> torch.Tensor:
    """Logits [b, s, V] of GLM130B for tokens [b, s], position_ids [b, s] and the boolean attention_mask
    [b or 1, 1, s, s] (True = masked), computed rank by rank from the TP shards' state dicts."""
    tp = len(shards)
    dtype = shards[0]["transformer.word_embeddings.weight"].dtype
    hidden = shards[0]["transformer.word_embeddings.weight"].shape[1]
    hn = hidden // num_heads
    np_ = num_heads // tp  # heads per partition

    def ln(x, prefix, r=0):
        return F.layer_norm(x, (hidden,), shards[r][prefix + ".weight"], shards[r][prefix + ".bias"], 1e-5)

    # VocabParallelEmbedding: rank r owns rows [r * per, (r + 1) * per); the others' ids give zeros; all-reduce
    per = shards[0]["transformer.word_embeddings.weight"].shape[0]
    h = 0
    for r in range(tp):
        local = tokens - r * per
        outside = (local < 0) | (local >= per)
        e = F.embedding(local.masked_fill(outside, 0), shards[r]["transformer.word_embeddings.weight"])
        h = h + e.masked_fill(outside[..., None], 0.0)
    h = h.transpose(0, 1)  # WordEmbedding mixin: [s, b, hidden]

    rot_dim = hn // 2 if position_encoding_2d else hn
    cos, sin = _rotary_tables(rot_dim, int(position_ids.max()) + 1, fp16_rotary, dtype)
    alpha = (2 * num_layers) ** 0.5
    for i in range(num_layers):
        p = f"transformer.layers.{i}"
        attention_input = ln(h, p + ".input_layernorm")
        attn_out = 0
        for sd in shards:  # column-parallel qkv -> local heads -> row-parallel dense
            mixed = F.linear(attention_input, sd[p + ".attention.query_key_value.weight"],
                             sd[p + ".attention.query_key_value.bias"])
            mixed = mixed.view(*mixed.shape[:-1], np_, 3 * hn)
            q, k, v = torch.split(mixed, hn, dim=-1)
            if position_encoding_2d:
                q1, q2 = q.chunk(2, dim=q.ndim - 1)
                k1, k2 = k.chunk(2, dim=k.ndim - 1)
                pos, block = position_ids[:, 0, :].transpose(0, 1), position_ids[:, 1, :].transpose(0, 1)
                q1, k1 = _apply_rotary_index(q1, k1, cos, sin, pos)
                q2, k2 = _apply_rotary_index(q2, k2, cos, sin, block)
                q, k = torch.cat([q1, q2], dim=q1.ndim - 1), torch.cat([k1, k2], dim=k1.ndim - 1)
            else:
                q, k = _apply_rotary_index(q, k, cos, sin, position_ids.transpose(0, 1))
            ctx = _attention_fn(q, k, v, attention_mask, i, hn)
            attn_out = attn_out + F.linear(ctx, sd[p + ".attention.dense.weight"])  # partial sums
        attn_out = attn_out + shards[0][p + ".attention.dense.bias"]  # RowParallelLinear adds the bias once
        h = attention_input * alpha + attn_out
        mlp_input = ln(h, p + ".post_attention_layernorm")
        mlp_out = 0
        for sd in shards:
            inter = F.linear(mlp_input, sd[p + ".mlp.dense_h_to_4h.weight"], sd[p + ".mlp.dense_h_to_4h.bias"])
            x1, x2 = inter.chunk(2, dim=inter.ndim - 1)  # GEGLU on this rank's local output
            mlp_out = mlp_out + F.linear(x1 * F.gelu(x2), sd[p + ".mlp.dense_4h_to_h.weight"])
        mlp_out = mlp_out + shards[0][p + ".mlp.dense_4h_to_h.bias"]
        h = mlp_input * alpha + mlp_out
    h = ln(h, "transformer.final_layernorm")
    logits = torch.cat([F.linear(h, sd["transformer.word_embeddings.weight"]) for sd in shards], dim=-1)
    return logits.transpose(0, 1)


def sat_generate_masks_and_positions(seq: list[int], mask_position: int, max_gen_length: int, gmask: bool):
    """GLM-130B generate.py get_masks_and_position_ids for one context `seq` (ending with <sop>):
    (attention_mask [1, 1, n, n] True = masked, position_ids [1, n]) for n = len(seq) + max_gen_length."""
    context_length = len(seq)
    n = context_length + max_gen_length
    attention_mask = torch.ones((1, n, n)).tril()
    attention_mask[..., : context_length - 1] = 1
    attention_mask = (attention_mask.unsqueeze(1) < 0.5).bool()
    position_ids = torch.arange(n, dtype=torch.long)
    if not gmask:
        position_ids[context_length - 1:] = mask_position
    return attention_mask, position_ids.unsqueeze(0)


def sat_greedy(shards, num_layers, num_heads, seq: list[int], mask_position: int, gmask: bool, steps: int,
               end_tokens: tuple[int, ...] = (), fp16_rotary: bool = True) -> list[int]:
    """Greedy decoding as batch_filling_sequence does it, recomputing the full sequence each step (the same
    logits as SAT's cached steps, which feed the same masks and positions)."""
    mask, pos = sat_generate_masks_and_positions(seq, mask_position, steps, gmask)
    out = list(seq)
    new = []
    for _ in range(steps):
        n = len(out)
        logits = sat_glm130b_forward(shards, num_layers, num_heads, torch.tensor([out]), pos[:, :n],
                                     mask[..., :n, :n], fp16_rotary)
        t = int(logits[0, -1].argmax())
        new.append(t)
        out.append(t)
        if t in end_tokens:
            break
    return new


# -- ChatGLM-6B (transformers remote code, final revision) ----------------------------------------------


def chatglm_masks_and_positions(input_ids: torch.Tensor, bos: int, mask: int, gmask: int):
    """get_masks / get_position_ids of ChatGLMForConditionalGeneration (2-D positions): the context is
    everything before <sop> (bos); channel 0 holds the mask's position from <sop> on ([gMASK] preferred),
    channel 1 counts 1, 2, ... from <sop> on."""
    batch, seq_length = input_ids.shape
    seqs = input_ids.tolist()
    context_lengths = [s.index(bos) for s in seqs]
    attention_mask = torch.ones((batch, seq_length, seq_length)).tril()
    for i, c in enumerate(context_lengths):
        attention_mask[i, :, :c] = 1
    attention_mask = (attention_mask.unsqueeze(1) < 0.5).bool()
    mask_positions = [s.index(gmask if gmask in s else mask) for s in seqs]
    position_ids = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).repeat(batch, 1)
    for i, c in enumerate(context_lengths):
        position_ids[i, c:] = mask_positions[i]
    block = torch.stack([torch.cat((torch.zeros(c, dtype=torch.long), torch.arange(seq_length - c) + 1))
                         for c in context_lengths])
    return attention_mask, torch.stack((position_ids, block), dim=1)


def _gelu_impl(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def chatglm_forward(sd: dict[str, torch.Tensor], num_layers: int, num_heads: int, input_ids: torch.Tensor,
                    position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ChatGLMForConditionalGeneration.forward (no cache) on the published state dict: logits [b, s, V]."""
    emb = sd["transformer.word_embeddings.weight"]
    hidden = emb.shape[1]
    hn = hidden // num_heads
    eps = 1e-5
    h = F.embedding(input_ids, emb).transpose(0, 1)
    cos, sin = _rotary_tables(hn // 2, int(position_ids.max()) + 1, fp16=True)  # precision=torch.half
    alpha = (2 * 28) ** 0.5  # GLMBlock(num_layers=28) default; ChatGLMModel does not pass its own
    pos, block = position_ids[:, 0, :].transpose(0, 1), position_ids[:, 1, :].transpose(0, 1)
    for i in range(num_layers):
        p = f"transformer.layers.{i}"

        def ln(x, name, p=p):
            return F.layer_norm(x, (hidden,), sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"], eps)

        attention_input = ln(h, "input_layernorm")
        mixed = F.linear(attention_input, sd[p + ".attention.query_key_value.weight"],
                         sd[p + ".attention.query_key_value.bias"])
        mixed = mixed.view(*mixed.shape[:-1], num_heads, 3 * hn)
        q, k, v = torch.split(mixed, hn, dim=-1)
        q1, q2 = q.chunk(2, dim=q.ndim - 1)
        k1, k2 = k.chunk(2, dim=k.ndim - 1)
        q1, k1 = _apply_rotary_index(q1, k1, cos, sin, pos)
        q2, k2 = _apply_rotary_index(q2, k2, cos, sin, block)
        q, k = torch.cat([q1, q2], dim=q1.ndim - 1), torch.cat([k1, k2], dim=k1.ndim - 1)
        ctx = _attention_fn(q, k, v, attention_mask, i, hn)
        attn = F.linear(ctx, sd[p + ".attention.dense.weight"], sd[p + ".attention.dense.bias"])
        h = attention_input * alpha + attn
        mlp_input = ln(h, "post_attention_layernorm")
        inter = _gelu_impl(F.linear(mlp_input, sd[p + ".mlp.dense_h_to_4h.weight"],
                                    sd[p + ".mlp.dense_h_to_4h.bias"]))
        h = mlp_input * alpha + F.linear(inter, sd[p + ".mlp.dense_4h_to_h.weight"],
                                         sd[p + ".mlp.dense_4h_to_h.bias"])
    final = "transformer.final_layernorm"
    h = F.layer_norm(h, (hidden,), sd[final + ".weight"], sd[final + ".bias"], eps)
    return F.linear(h, sd["lm_head.weight"]).permute(1, 0, 2)


def chatglm_greedy(sd, num_layers, num_heads, ids: list[int], steps: int, bos: int, mask: int, gmask: int,
                   eos: int | None = None) -> list[int]:
    """Greedy generation as prepare_inputs_for_generation feeds it (full recomputation each step)."""
    out = list(ids)
    new = []
    for _ in range(steps):
        x = torch.tensor([out])
        m, pos = chatglm_masks_and_positions(x, bos, mask, gmask)
        t = int(chatglm_forward(sd, num_layers, num_heads, x, pos, m)[0, -1].argmax())
        new.append(t)
        out.append(t)
        if t == eos:
            break
    return new


# -- published checkpoint writers (tiny random weights) ----------------------------------------------------


def random_sat_shards(num_layers: int, hidden: int, inner: int, num_heads: int, vocab: int, tp: int,
                      seed: int = 0, dtype=torch.float32, std: float = 0.08,
                      embed_std: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """Per-rank state dicts in the released GLM-130B layout (names, per-rank shapes, rank-local GLU halves),
    including the per-layer rotary inv_freq buffer the release may carry."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=std):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    hn = hidden // num_heads
    inv_freq = (1.0 / (10000 ** (torch.arange(0, hn, 2).float() / hn))).half()
    for r in range(tp):
        shards[r]["transformer.word_embeddings.weight"] = rnd(vocab // tp, hidden, s=embed_std)
    for name in ("final_layernorm",):
        w, b = (1 + rnd(hidden, s=0.1)), rnd(hidden, s=0.1)
        for sd in shards:
            sd[f"transformer.{name}.weight"], sd[f"transformer.{name}.bias"] = w, b
    for i in range(num_layers):
        p = f"transformer.layers.{i}"
        replicated = {
            p + ".input_layernorm.weight": 1 + rnd(hidden, s=0.1), p + ".input_layernorm.bias": rnd(hidden, s=0.1),
            p + ".post_attention_layernorm.weight": 1 + rnd(hidden, s=0.1),
            p + ".post_attention_layernorm.bias": rnd(hidden, s=0.1),
            p + ".attention.dense.bias": rnd(hidden), p + ".mlp.dense_4h_to_h.bias": rnd(hidden),
            p + ".attention.rotary_emb.inv_freq": inv_freq,
        }
        for sd in shards:
            sd.update(replicated)
            sd[p + ".attention.query_key_value.weight"] = rnd(3 * hidden // tp, hidden)
            sd[p + ".attention.query_key_value.bias"] = rnd(3 * hidden // tp)
            sd[p + ".attention.dense.weight"] = rnd(hidden, hidden // tp)
            sd[p + ".mlp.dense_h_to_4h.weight"] = rnd(2 * inner // tp, hidden)
            sd[p + ".mlp.dense_h_to_4h.bias"] = rnd(2 * inner // tp)
            sd[p + ".mlp.dense_4h_to_h.weight"] = rnd(hidden, inner // tp)
    return shards


def random_chatglm_state(num_layers: int, hidden: int, inner: int, vocab: int, num_heads: int, seed: int = 0,
                         dtype=torch.float32, std: float = 0.08) -> dict[str, torch.Tensor]:
    """A ChatGLM-6B transformers state dict (as save_pretrained writes it, rotary buffers included)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=std):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    quarter = hidden // num_heads // 2  # 2-D rotary: each half of a head has its own rotary of this size
    inv_freq = (1.0 / (10000 ** (torch.arange(0, quarter, 2).float() / quarter))).half()
    sd = {"transformer.word_embeddings.weight": rnd(vocab, hidden, s=0.5)}
    for i in range(num_layers):
        p = f"transformer.layers.{i}"
        sd.update({
            p + ".input_layernorm.weight": 1 + rnd(hidden, s=0.1), p + ".input_layernorm.bias": rnd(hidden, s=0.1),
            p + ".attention.query_key_value.weight": rnd(3 * hidden, hidden),
            p + ".attention.query_key_value.bias": rnd(3 * hidden),
            p + ".attention.dense.weight": rnd(hidden, hidden), p + ".attention.dense.bias": rnd(hidden),
            p + ".attention.rotary_emb.inv_freq": inv_freq,
            p + ".post_attention_layernorm.weight": 1 + rnd(hidden, s=0.1),
            p + ".post_attention_layernorm.bias": rnd(hidden, s=0.1),
            p + ".mlp.dense_h_to_4h.weight": rnd(inner, hidden), p + ".mlp.dense_h_to_4h.bias": rnd(inner),
            p + ".mlp.dense_4h_to_h.weight": rnd(hidden, inner), p + ".mlp.dense_4h_to_h.bias": rnd(hidden),
        })
    sd["transformer.final_layernorm.weight"] = 1 + rnd(hidden, s=0.1)
    sd["transformer.final_layernorm.bias"] = rnd(hidden, s=0.1)
    sd["lm_head.weight"] = rnd(vocab, hidden, s=0.5)
    return sd


def write_sat_checkpoint(directory, shards: list[dict[str, torch.Tensor]], iteration: str = "49300",
                         model_config: dict | None = None) -> None:
    """The released layout: DIR/latest, DIR/<iteration>/mp_rank_XX_model_states.pt holding {"module": sd}
    (optionally DIR/model_config.json with SAT argument names, as newer SAT versions save it)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    (directory / iteration).mkdir(parents=True, exist_ok=True)
    (directory / "latest").write_text(iteration)
    for r, sd in enumerate(shards):
        torch.save({"module": sd}, directory / iteration / f"mp_rank_{r:02d}_model_states.pt")
    if model_config is not None:
        (directory / "model_config.json").write_text(json.dumps(model_config))


def write_chatglm_checkpoint(directory, sd: dict[str, torch.Tensor], config: dict, shards: int = 2) -> None:
    """The transformers layout of THUDM/chatglm-6b: config.json and pytorch_model-0000i-of-0000n.bin with
    pytorch_model.bin.index.json."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))


# -- SAT 0.2.x GLM130BTokenizer text handling (icetk_glm_130B/ice_tokenizer.py) ------------------------------


def sat_preprocess(text: str, max_len: int = 80) -> str:
    """_preprocess: newline -> <n>, then _encode_whitespaces: tab -> <|tab|>, runs of max_len..2 spaces ->
    <|blank_k|> (longest first)."""
    text = text.replace("\n", "<n>")
    text = text.replace("\t", "<|tab|>")
    for i in range(max_len, 1, -1):
        text = text.replace(" " * i, f"<|blank_{i}|>")
    return text


def sat_postprocess(text: str, max_len: int = 80) -> str:
    """decode's replacements after SentencePiece."""
    text = text.replace("<n>", "\n")
    text = text.replace("<|tab|>", "\t")
    for i in range(2, max_len + 1):
        text = text.replace(f"<|blank_{i}|>", " " * i)
    return text


def sat_generation_context(tokenize, command, raw_text: str) -> tuple[list[int], str, bool]:
    """generate.py fill_blanks up to the first model call: (seq without <sop>, the mask kind, use_gmask)."""
    import re

    generation_mask = "[gMASK]"
    if "[MASK]" in raw_text:
        generation_mask = "[MASK]"
    elif "[sMASK]" in raw_text:
        generation_mask = "[sMASK]"
    use_gmask = "[MASK]" not in raw_text and "[sMASK]" not in raw_text
    mask_pattern = r"\[[sg]?MASK\]"
    text_list = re.split(mask_pattern, raw_text)
    pattern_list = re.compile(mask_pattern).findall(raw_text)
    seq = []
    for i in range(len(pattern_list)):
        seq.extend(tokenize(text_list[i]))
        seq.append(command(pattern_list[i]))
    seq.extend(tokenize(text_list[-1]))
    if "MASK]" not in raw_text:
        seq += [command(generation_mask)]
        raw_text += " " + generation_mask
    if not raw_text.endswith("MASK]"):
        seq = seq + [command("eos")]
    return seq, generation_mask, use_gmask


# -- GLM-130B weight-only quantisation (tools/convert_tp.py, quantization/layers.py, cuda/quantization.cu) -------

QUANTIZED_LAYERS = ("attention.dense.weight", "attention.query_key_value.weight", "mlp.dense_h_to_4h.weight",
                    "mlp.dense_4h_to_h.weight")


def published_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_weights' quantisation of one (fp16) rank tensor: (int8 weight, possibly int4-compressed; fp16 scale)."""
    weight_scale = (weight.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)).half()
    q = torch.round(weight / weight_scale[:, None]).to(torch.int8)
    if bits == 4:  # int4WeightCompression: output[i] = (input[2i] << 4) | (input[2i+1] & 0b1111)
        q = (q[:, 0::2] << 4) | (q[:, 1::2] & 0b00001111)
    return q, weight_scale


def published_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    """int8/int4WeightExtraction: high = byte >> 4, low = (byte << 4) >> 4 (arithmetic shifts), each times the
    row's scale; here in `dtype` (the kernel multiplies in the activation type)."""
    if bits == 4:
        high = q >> 4
        low = (q << 4) >> 4
        q = torch.stack([high, low], dim=-1).reshape(q.shape[0], -1)
    return q.to(dtype) * scale.to(dtype)[:, None]


def quantize_sat_shards(shards: list[dict[str, torch.Tensor]], bits: int) -> list[dict[str, torch.Tensor]]:
    """The rank files convert_tp.py --quantization-bit-width writes: each rank's four linear weights quantised
    per output row of that rank, `<key>_scale` beside each."""
    out = []
    for sd in shards:
        q = {}
        for key, t in sd.items():
            if key.split(".", 3)[-1] in QUANTIZED_LAYERS:
                q[key], q[key + "_scale"] = published_quantize(t.half(), bits)
            else:
                q[key] = t
        out.append(q)
    return out


def dequantize_sat_shards(shards: list[dict[str, torch.Tensor]], bits: int, dtype=torch.float32):
    """What the quantised ranks compute with: every packed weight dequantised, everything else as stored."""
    out = []
    for sd in shards:
        d = {}
        for key, t in sd.items():
            if key.endswith("_scale"):
                continue
            d[key] = published_dequantize(t, sd[key + "_scale"], bits, dtype) if key + "_scale" in sd else t.to(dtype)
        out.append(d)
    return out


# -- GLM-130B beam search and blank filling (THUDM/GLM-130B @ 212215c, Apache-2.0) ---------------------------
#
# generation/strategies.py `BeamSearchStrategy`, evaluation/model.py `batch_filling_sequence` and generate.py
# `fill_blanks`, statement by statement (numpy's np.bool swapped for Python lists, CUDA tensors for CPU ones; the
# model call is `sat_glm130b_forward` over the whole sequence each step, which gives the cached call's logits:
# the same masks and positions). GLM-130B is licensed under the Apache License 2.0
# (https://github.com/THUDM/GLM-130B/blob/212215c/LICENSE); these are tests-only oracles derived from it.


class Glm130bBeamSearchStrategy:
    def __init__(self, batch_size, num_beams, length_penalty=1.0, consider_end=False, end_tokens=(),
                 invalid_slices=(), no_repeat_ngram_size=0, min_gen_length=0, deterministic=False):
        self.batch_size = batch_size
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.end_tokens = list(end_tokens)
        self.ngram = no_repeat_ngram_size
        self.min_gen_length = min_gen_length
        self.invalid_slices = list(invalid_slices)
        self.consider_end = consider_end
        self.deterministic = deterministic
        self._init_cache()

    def _init_cache(self):
        self.end_beams = [[] for _ in range(self.batch_size)]
        self.end_beams_penalized_scores = [[] for _ in range(self.batch_size)]
        self.cached_beam_scores = 0
        self.cached_beam_ngram_bans = [[{} for _ in range(self.num_beams)] for _ in range(self.batch_size)]
        self.length_generated = 0
        self._is_done = [False] * self.batch_size

    def _add_end_beams(self, score, beam, batch_idx):
        score = score / ((5.0 + len(beam)) / 6) ** self.length_penalty
        for i in range(len(self.end_beams[batch_idx]), -1, -1):
            if i == 0 or score < self.end_beams_penalized_scores[batch_idx][i - 1]:
                break
        self.end_beams[batch_idx].insert(i, beam)
        self.end_beams_penalized_scores[batch_idx].insert(i, score)
        self.end_beams[batch_idx] = self.end_beams[batch_idx][: self.num_beams]
        self.end_beams_penalized_scores[batch_idx] = self.end_beams_penalized_scores[batch_idx][: self.num_beams]

    @property
    def is_done(self) -> bool:
        return all(self._is_done)

    def forward(self, logits, tokens, mems):
        batch_size, num_beams, vocab_size = logits.shape
        seq_len = tokens.shape[-1]
        logits = logits.float()
        for invalid_slice in self.invalid_slices:
            logits[..., invalid_slice] = -65504
        if self.min_gen_length > self.length_generated:
            for end_token in self.end_tokens:
                logits[..., end_token] = -65504
        if self.ngram > 0 and seq_len > self.ngram:
            for batch_idx in range(batch_size):
                for i in range(num_beams):
                    ngram_prefix = tokens[batch_idx, i, -(self.ngram - 1):].tolist()
                    for banned_index in self.cached_beam_ngram_bans[batch_idx][i].get(tuple(ngram_prefix), []):
                        logits[batch_idx, i, banned_index] = -65504
        next_token_scores = F.log_softmax(logits, dim=-1)
        prev_scores = self.cached_beam_scores
        if isinstance(prev_scores, torch.Tensor):
            prev_scores = prev_scores[..., None].expand_as(next_token_scores)
        next_token_scores = next_token_scores + prev_scores
        next_token_scores = next_token_scores.view(batch_size, num_beams * vocab_size)
        probs = F.softmax(next_token_scores, dim=-1)
        if num_beams < self.num_beams:  # first token
            probs = probs[..., :vocab_size]
        if self.deterministic:
            next_tokens = torch.topk(probs, k=(max(1, len(self.end_tokens)) + 1) * self.num_beams).indices
        else:
            next_tokens = torch.multinomial(probs, num_samples=(max(1, len(self.end_tokens)) + 1) * self.num_beams)
        next_token_scores = next_token_scores[torch.arange(batch_size).unsqueeze(1), next_tokens]
        next_token_scores, _indices = torch.sort(next_token_scores, descending=True, dim=1)
        next_tokens = next_tokens[torch.arange(batch_size).unsqueeze(1), _indices]
        next_indices = torch.div(next_tokens, vocab_size, rounding_mode="trunc")
        next_tokens = next_tokens % vocab_size
        beam_continue_batch, score_continue_batch, mems_continue_batch = [], [], []
        for batch_idx in range(batch_size):
            beam_continue = []
            scores_continue = []
            bans_continue = []
            mems_contiue = []
            for i in range(len(next_tokens[batch_idx])):
                beam = torch.cat((tokens[batch_idx, next_indices[batch_idx, i]], next_tokens[batch_idx, i: i + 1]))
                if not self._is_done[batch_idx] and int(next_tokens[batch_idx, i]) in self.end_tokens:
                    self._add_end_beams(next_token_scores[batch_idx, i], beam, batch_idx)
                elif len(beam_continue) < self.num_beams:
                    beam_continue.append(beam)
                    mems_contiue.append(mems[:, batch_idx, next_indices[batch_idx, i]])
                    scores_continue.append(next_token_scores[batch_idx, i])
                    if self.ngram > 0:
                        bans = self.cached_beam_ngram_bans[batch_idx][next_indices[batch_idx, i]].copy()
                        ngram_prefix = tuple(tokens[batch_idx, next_indices[batch_idx, i], -(self.ngram - 1):].tolist())
                        bans[ngram_prefix] = bans.get(ngram_prefix, tuple()) + (next_tokens[batch_idx, i],)
                        bans_continue.append(bans)
                else:
                    break
            beam_continue_batch.append(torch.stack(beam_continue))
            mems_continue_batch.append(torch.stack(mems_contiue, dim=1))
            score_continue_batch.append(scores_continue)
            self.cached_beam_ngram_bans[batch_idx] = bans_continue
        tokens = torch.stack(beam_continue_batch)
        mems = torch.stack(mems_continue_batch, dim=1)
        self.cached_beam_scores = torch.tensor(score_continue_batch, device=logits.device)
        self.length_generated += 1
        for batch_idx in range(self.batch_size):
            if batch_idx >= batch_size:
                self._is_done[batch_idx] = True
            elif (
                len(self.end_beams[batch_idx]) == self.num_beams
                and self.end_beams_penalized_scores[batch_idx][-1]
                >= self.cached_beam_scores[batch_idx].max() / ((5.0 + (seq_len + 1)) / 6) ** self.length_penalty
            ):
                self._is_done[batch_idx] = True
        return tokens, mems

    def finalize(self, tokens, mems):
        if self.consider_end:
            batch_size, num_beams = tokens.shape[:2]
            for batch_idx in range(batch_size):
                if not self._is_done[batch_idx]:
                    for i in range(num_beams):
                        self._add_end_beams(self.cached_beam_scores[batch_idx, i], tokens[batch_idx, i], batch_idx)
            mems = None
            ret = self.end_beams[:batch_size]
        else:
            ret = tokens
        self._init_cache()
        return ret, mems


class Glm130bGreedy:
    """generation/strategies.py `BaseStrategy` at temperature -> 0 (top_k=1): argmax, stopping per row at an end
    token (the tokens after it -1), so the filling loop can run greedily too."""

    def __init__(self, end_tokens=()):
        self.end_tokens = list(end_tokens)
        self._is_done = [False]

    @property
    def is_done(self) -> bool:
        return all(self._is_done)

    def forward(self, logits, tokens, mems):
        logits = logits.view(-1, logits.size(-1))
        pred = logits.float().argmax(-1, keepdim=True)
        if self._is_done[0]:
            pred[0] = -1
        elif pred[0].item() in self.end_tokens:
            self._is_done[0] = True
        return torch.cat((tokens, pred.view(tokens.shape[:-1] + (1,))), dim=-1), mems

    def finalize(self, tokens, mems):
        self._is_done = [False]
        return tokens, mems


def glm130b_batch_filling_sequence(shards, num_layers, num_heads, seqs, context_lengths, strategy,
                                   get_masks_and_position_ids):
    """evaluation/model.py batch_filling_sequence with the model call replaced by a full forward (no mems)."""
    batch_size, context_length = seqs.shape
    seqs, attention_mask, position_ids = get_masks_and_position_ids(seqs)
    tokens = seqs[..., :context_length]
    counter = context_length - 1
    num_beams = 1
    mems = torch.zeros(1, batch_size, 1, 1)  # (stands for the cache; the strategy reorders it per beam)
    while counter < seqs.shape[1] - 1:
        tokens = tokens.reshape(batch_size * num_beams, -1)
        mems = mems.reshape(mems.shape[0], batch_size * num_beams, mems.shape[-2], mems.shape[-1])
        logits = sat_glm130b_forward(shards, num_layers, num_heads, tokens,
                                     position_ids[..., : counter + 1].expand(tokens.shape[0], -1),
                                     attention_mask[..., : counter + 1, : counter + 1])
        if counter == context_length - 1:
            logits = logits[torch.arange(batch_size), context_lengths - 1]
        else:
            logits = logits[:, -1]
        counter += 1
        logits = logits.reshape(batch_size, num_beams, -1)
        tokens = tokens.reshape(batch_size, num_beams, -1)
        mems = mems.reshape(mems.shape[0], batch_size, num_beams, mems.shape[-2], mems.shape[-1])
        tokens, mems = strategy.forward(logits, tokens, mems)
        if len(tokens.shape) == 3 and num_beams == 1:
            num_beams = tokens.shape[1]
            position_ids = position_ids.unsqueeze(1).expand(batch_size, num_beams, -1).reshape(
                batch_size * num_beams, -1)
        if strategy.is_done:
            break
    return strategy.finalize(tokens, mems)


def glm130b_get_masks_and_position_ids(seq, mask_position, max_gen_length, gmask=False):
    """generate.py get_masks_and_position_ids."""
    context_length = seq.shape[1]
    tokens = torch.nn.functional.pad(seq, (0, max_gen_length), mode="constant", value=-1)
    attention_mask = torch.ones((1, tokens.shape[-1], tokens.shape[-1]), device=tokens.device)
    attention_mask.tril_()
    attention_mask[..., : context_length - 1] = 1
    attention_mask.unsqueeze_(1)
    attention_mask = (attention_mask < 0.5).bool()
    position_ids = torch.arange(tokens.shape[-1], dtype=torch.long, device=tokens.device)
    if not gmask:
        position_ids[context_length - 1:] = mask_position
    position_ids = position_ids.unsqueeze(0)
    return tokens, attention_mask, position_ids


def glm130b_fill_blanks(shards, num_layers, num_heads, seq: list[int], generation_mask: int, use_gmask: bool,
                        strategy, sop: int, max_gen_length: int) -> list[list[int]]:
    """generate.py fill_blanks from the tokenized context `seq` on (sat_generation_context gives it): every blank
    of the chosen kind, one after another, each round from the best output of the last. Returns the final
    outputs (token ids, `answers` before detokenization; the trailing eos is the caller's to drop). One change:
    each round may generate `max_gen_length` tokens (zoo's max_new_tokens), where generate.py allows
    args.out_seq_length minus the round's input length."""
    from functools import partial

    output_list = [seq]
    while True:
        seq = output_list[0]
        mask_token = generation_mask
        if mask_token not in seq:
            break
        mask_position = seq.index(mask_token)
        output_list = []
        input_seq = torch.tensor([seq + [sop]])
        output, _ = glm130b_batch_filling_sequence(
            shards, num_layers, num_heads, input_seq, torch.tensor([input_seq.shape[-1]]), strategy,
            partial(glm130b_get_masks_and_position_ids, mask_position=mask_position,
                    max_gen_length=max_gen_length, gmask=use_gmask))
        if isinstance(output, torch.Tensor):
            output = output.tolist()
        output = output[0]
        output_list.extend(output)
        for i in range(len(output_list)):
            output = output_list[i].tolist() if isinstance(output_list[i], torch.Tensor) else output_list[i]
            try:
                unfinished = output.index(-1)
            except ValueError:
                unfinished = len(output)
            if output[unfinished - 1] in strategy.end_tokens:
                unfinished -= 1
            bog = output.index(sop)
            output_list[i] = output[:mask_position] + output[bog + 1: unfinished] + output[mask_position + 1: bog]
    return output_list
