"""GLM-130B (Zeng et al., "GLM-130B: An Open Bilingual Pre-trained Model", arXiv 2210.02414) and ChatGLM-6B.

The layer, as the released weights were trained (SwissArmyTransformer 0.2.x, `glm130B_model.py`):

    a   = LayerNorm(h)                        LayerNorm with bias, eps 1e-5
    h'  = a * alpha + Attention(a)            DeepNorm: the residual is the NORMALISED input scaled by
    b   = LayerNorm(h')                         alpha = sqrt(2 * layers) (GLM-130B: sqrt(140))
    out = b * alpha + MLP(b)
    logits = final LayerNorm, then the embedding matrix (tied)     ChatGLM-6B: its own lm_head

    Attention: rotary over the whole head, base 10000, with the angles computed in fp16 as SAT 0.2.x does
        (an fp32 option); scores (q / (sqrt(hd) * (layer + 1))) k^T, masked entries set to -10000, multiplied
        back by (layer + 1) and softmaxed in fp32; prefix-bidirectional: the tokens before <sop> see each
        other, everything from <sop> on is causal.
    MLP (GLM-130B): GeGLU  down(x1 * gelu(x2)), x1 = the FIRST half of dense_h_to_4h (here `up_proj`),
        the GELU (exact, erf) on the SECOND half (here `gate_proj`).
    MLP (ChatGLM-6B): down(gelu_tanh(up(x))), 4x wide; 2-D rotary: the first half of each head turns with
        the position, the second half with the block position.

Published checkpoints fuse q, k, v per head ([q, k, v] of head 0, then of head 1, ...) and the GeGLU halves;
the converters (conversion/sat_glm.py, conversion/hf_chatglm.py) split them into the named projections here,
so tensor parallelism cuts whole heads and whole GeGLU columns like any other decoder.

Position ids and the bidirectional prefix follow the GLM blank-infilling rules (`glm_positions`): the tokens
before <sop> are the context; with [MASK] / [sMASK] every position from <sop> on is the mask's position,
with [gMASK] positions continue (1-D); ChatGLM's 2-D positions put the mask's position in channel 0 and
1, 2, 3, ... from <sop> on in channel 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.architectures.decoder import tied_head
from zoo.architectures.glm_tokenizer import GLMPrompt, GLMTokenizer
from zoo.architectures.layers import rotate_half
from zoo.architectures.state import KVCache, State

from zoo.family import Family
from zoo.registry import Entry, Source

MASK_FILL = -10000.0  # what SAT writes into masked attention scores (not -inf)


@dataclass
class GLMConfig:
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    inner_size: int  # inner_hidden_size: width of each GeGLU half, or of the plain GELU layer
    mlp: str = "geglu"  # "geglu" (GLM-130B) or "gelu_tanh" (ChatGLM-6B)
    position_2d: bool = False  # ChatGLM-6B: 2-D rotary positions
    tie_embeddings: bool = True  # GLM-130B: logits against the embedding; ChatGLM-6B has an lm_head
    rope_fp16_angles: bool = True  # compute rotary angles in fp16 like SAT 0.2.x (what the weights saw)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    deepnorm_alpha: float = 0.0  # 0: sqrt(2 * n_layers)
    max_seq_len: int = 2048
    head_dim: int = 0  # 0: dim // n_heads
    # special tokens whose positions define the mask and position-id rules (published ids)
    mask_token_id: int = 150000  # [MASK]: short blank
    gmask_token_id: int = 150001  # [gMASK]: generation to the end
    smask_token_id: int = 150002  # [sMASK]: sentence blank
    sop_token_id: int = 150004  # <sop>: start of the generated piece

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if not self.deepnorm_alpha:
            self.deepnorm_alpha = math.sqrt(2 * self.n_layers)
        if self.mlp not in ("geglu", "gelu_tanh"):
            raise ValueError(f"mlp must be 'geglu' or 'gelu_tanh', got {self.mlp!r}")
        if self.position_2d and self.head_dim % 4:
            raise ValueError(f"2-D rotary needs a head_dim divisible by 4, got {self.head_dim}")


# -- rotary -----------------------------------------------------------------------------------------------


class GLMRotary(nn.Module):
    """cos/sin of the rotary angles for integer positions, half-split pairs (j, j + d/2).

    fp16_angles reproduces SAT 0.2.x: inv_freq rounded to fp16, position x inv_freq multiplied in fp16,
    cos/sin taken in fp16 (in fp32 for bf16 compute, as SAT's bf16 branch does). From a few hundred
    positions on these angles differ visibly from fp32 ones; the released weights were trained with them.
    """

    def __init__(self, rot_dim: int, base: float, fp16_angles: bool):
        super().__init__()
        self.rot_dim = rot_dim
        self.base = base
        self.fp16_angles = fp16_angles

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., rot_dim] in `dtype` for integer positions [...]."""
        exponent = torch.arange(0, self.rot_dim, 2, device=positions.device).float() / self.rot_dim
        inv_freq = 1.0 / (self.base**exponent)
        if self.fp16_angles:
            freqs = positions.half()[..., None] * inv_freq.half()[None]
        else:
            freqs = positions.float()[..., None] * inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)
        if self.fp16_angles and dtype == torch.bfloat16:
            angles = angles.float()
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d] turned by cos/sin [B, T, d]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


# -- positions and masks: the GLM blank-infilling rules -------------------------------------------------------


def _rule_positions(j: torch.Tensor, sop: torch.Tensor, mask_pos: torch.Tensor, gmask: torch.Tensor,
                    two_d: bool) -> torch.Tensor:
    """Positions of in-row token indices j [B, T] for rows whose <sop> is at `sop` [B] and whose mask token is
    at `mask_pos` [B] (-1 when absent), `gmask` [B] True for [gMASK] rows."""
    sop, mask_pos, gmask = sop[:, None], mask_pos[:, None], gmask[:, None]
    generated = (sop >= 0) & (j >= sop)
    has_mask = mask_pos >= 0
    if not two_d:
        # [MASK]/[sMASK]: the generated piece stands at the mask's position; [gMASK]: positions continue
        return torch.where(generated & has_mask & ~gmask, mask_pos, j)
    # ChatGLM-6B (final revision): channel 0 holds the mask's position for every mask kind,
    # channel 1 counts 1, 2, 3, ... from <sop> on (0 over the context)
    first = torch.where(generated & has_mask, mask_pos, j)
    block = torch.where(generated, j - sop + 1, torch.zeros_like(j))
    return torch.stack([first, block], dim=1)


def read_prompt(input_ids: torch.Tensor, config: GLMConfig, pad: torch.Tensor | None = None):
    """The GLM facts of each row of a prompt: (sop index, mask position, is gMASK), all [B], in-row indices
    (after `pad` left pads); -1 where a row has no <sop> (it is then plain causal, positions 0, 1, 2, ...) or
    no mask token. Which mask a row fills: the first [MASK], else [sMASK], else [gMASK] (GLM-130B's
    generate.py); ChatGLM-6B's code prefers [gMASK] over [MASK]."""
    B, T = input_ids.shape
    dev = input_ids.device
    pad = torch.zeros(B, dtype=torch.long, device=dev) if pad is None else pad.to(dev)
    idx = torch.arange(T, device=dev)[None].expand(B, T)
    real = idx >= pad[:, None]

    def first(token: int) -> torch.Tensor:
        hit = (input_ids == token) & real
        return torch.where(hit.any(1), hit.int().argmax(1), torch.full((B,), -1, device=dev)).long()

    sop = first(config.sop_token_id)
    sop = torch.where(sop >= 0, sop - pad, sop)
    order = ((config.gmask_token_id, True), (config.mask_token_id, False)) if config.position_2d else \
        ((config.mask_token_id, False), (config.smask_token_id, False), (config.gmask_token_id, True))
    mask_pos = torch.full((B,), -1, dtype=torch.long, device=dev)
    gmask = torch.zeros(B, dtype=torch.bool, device=dev)
    for token, is_gmask in reversed(order):  # earlier entries of `order` win
        at = first(token)
        found = at >= 0
        mask_pos = torch.where(found, at - pad, mask_pos)
        gmask = torch.where(found, torch.tensor(is_gmask, device=dev), gmask)
    return sop, mask_pos, gmask


def glm_positions(input_ids: torch.Tensor, config: GLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, context_length) of unpadded prompt rows by the published rules: position_ids [B, T]
    ([B, 2, T] for 2-D), context_length [B] = the number of tokens before <sop> (0 for rows without one)."""
    B, T = input_ids.shape
    sop, mask_pos, gmask = read_prompt(input_ids, config)
    j = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    positions = _rule_positions(j, sop, mask_pos, gmask, config.position_2d)
    return positions, sop.clamp(min=0)


def prefix_mask(q_pos: torch.Tensor, k_len: int, context_length: torch.Tensor | None) -> torch.Tensor:
    """bool [B or 1, 1, Tq, Tk], True = attend: causal, plus both directions inside the first
    context_length tokens of each row."""
    k = torch.arange(k_len, device=q_pos.device)[None, None, :]
    q = q_pos[None, :, None]
    allowed = k <= q
    if context_length is not None:
        ctx = context_length.to(q_pos.device).reshape(-1, 1, 1)
        allowed = allowed | ((q < ctx) & (k < ctx))
    return allowed[:, None]


class GLMState(KVCache):
    """The KV cache plus what the prompt said: where each row's <sop> and mask token are. The bidirectional
    prefix (`prefix`, the generic mechanism) is each row's tokens before <sop>."""

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None, two_d: bool):
        super().__init__(batch, max_len, pad)
        self.two_d = two_d
        self.sop: torch.Tensor | None = None
        self.mask_pos: torch.Tensor | None = None
        self.gmask: torch.Tensor | None = None

    def read(self, input_ids: torch.Tensor, config: GLMConfig) -> None:
        """Take the GLM facts from the prompt (the first call)."""
        self.sop, self.mask_pos, self.gmask = read_prompt(input_ids, config, self.pad)
        self.prefix = self.sop.clamp(min=0)

    def glm_positions(self, steps: int, device: torch.device) -> torch.Tensor:
        j = self.steps_ahead(steps, device)[None].expand(self.batch, steps)
        if self.pad is not None:
            j = (j - self.pad.to(device)[:, None]).clamp(min=0)
        return _rule_positions(j, self.sop.to(device), self.mask_pos.to(device), self.gmask.to(device), self.two_d)

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + [t for t in (self.sop, self.mask_pos, self.gmask) if t is not None]

    def batch_dims(self) -> list[tuple[torch.Tensor, int]]:
        return super().batch_dims() + [(t, 0) for t in (self.sop, self.mask_pos, self.gmask) if t is not None]


# -- beam search: GLM-130B's rule ------------------------------------------------------------------------------


class GLMBeamSearch:
    """GLM-130B's beam search (generation/strategies.py `BeamSearchStrategy`, as generate.py runs it:
    consider_end=True, end tokens <eop> and eos), with its `deterministic=True` candidate choice (the top
    candidates; the published default draws them, which beam search with sampling settings is refused for).

    Per prompt: every beam's log-probabilities (end tokens at -65504 before min_gen_length tokens, and tokens that
    would repeat an n-gram this beam made at -65504) plus the beam's score; the (max(1, end tokens) + 1) *
    num_beams best candidates, best first: one ending in an end token joins the finished beams (length-penalised
    the OpenNMT way, score / ((5 + tokens) / 6) ** length_penalty, tokens counted from the prompt's start), the
    first num_beams others run on. A prompt is done once num_beams beams finished and none running can beat the
    worst of them; at the end the running beams of prompts not done join the finished ones. The engine's rule
    interface: zoo/generation.py `BeamSearch`."""

    def __init__(self, beams, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int,
                 device: torch.device):
        if beams.early_stopping is not False:
            raise ValueError(f"early_stopping={beams.early_stopping!r}: GLM-130B's beam search stops by its own rule "
                             "(a prompt is done once num_beams beams finished and no running one can beat them)")
        self.k, self.n_prompts, self.device = beams.num_beams, len(prompts), device
        self.length_penalty, self.ngram = beams.length_penalty, beams.no_repeat_ngram_size
        self.min_gen_length, self.returned = beams.min_gen_length, beams.num_return_sequences
        self.end_tokens = sorted(stop_ids)
        self.prompt_lengths = [len(p) for p in prompts]
        self.tokens = [[list(p) for _ in range(self.k)] for p in prompts]  # every beam, from the prompt's start
        self.scores: torch.Tensor | None = None  # [prompts, beams]; None before the first token (scores 0)
        self.bans = [[{} for _ in range(self.k)] for _ in prompts]  # n-gram prefix -> tokens this beam made after it
        self.end_beams: list[list[list[int]]] = [[] for _ in prompts]
        self.end_scores: list[list[torch.Tensor]] = [[] for _ in prompts]
        self.prompt_done = [False] * len(prompts)
        self.generated = 0
        self.done = False

    def _add_end_beam(self, b: int, score: torch.Tensor, beam: list[int]) -> None:
        score = score / ((5.0 + len(beam)) / 6) ** self.length_penalty  # (OpenNMT's length penalty)
        i = len(self.end_beams[b])
        while i > 0 and not score < self.end_scores[b][i - 1]:
            i -= 1
        self.end_beams[b].insert(i, beam)
        self.end_scores[b].insert(i, score)
        del self.end_beams[b][self.k:], self.end_scores[b][self.k:]

    def step(self, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, K = self.n_prompts, self.k
        logits = logits.float().view(B, K, -1)
        if self.scores is None:  # the first token: every beam is the prompt; one counts
            logits = logits[:, :1]
        logits = logits.clone()
        V, beams_now = logits.shape[-1], logits.shape[1]
        if self.min_gen_length > self.generated:
            logits[..., self.end_tokens] = -65504
        if self.ngram > 0:
            for b in range(B):
                if len(self.tokens[b][0]) > self.ngram:
                    for i in range(beams_now):
                        prefix = tuple(self.tokens[b][i][-(self.ngram - 1):])
                        for banned in self.bans[b][i].get(prefix, ()):
                            logits[b, i, banned] = -65504
        scores = torch.log_softmax(logits, dim=-1)
        if self.scores is not None:
            scores = scores + self.scores[..., None]
        scores = scores.reshape(B, beams_now * V)
        probs = torch.softmax(scores, dim=-1)
        candidates = torch.topk(probs, k=(max(1, len(self.end_tokens)) + 1) * K).indices
        cand_scores, order = torch.sort(scores.gather(1, candidates), descending=True, dim=1)
        candidates = candidates.gather(1, order)
        sources, cand_tokens = (candidates // V).tolist(), (candidates % V).tolist()
        rows, kept, new_scores, new_tokens, new_bans = [], [], [], [], []
        for b in range(B):
            seq_len = len(self.tokens[b][0])
            beams, scores_b, bans_b = [], [], []
            for i, (src, tok) in enumerate(zip(sources[b], cand_tokens[b])):
                beam = self.tokens[b][src] + [tok]
                if not self.prompt_done[b] and tok in self.end_tokens:
                    self._add_end_beam(b, cand_scores[b, i], beam)
                elif len(beams) < K:
                    beams.append(beam)
                    rows.append(b * K + src)
                    kept.append(tok)
                    scores_b.append(cand_scores[b, i])
                    if self.ngram > 0:
                        bans = dict(self.bans[b][src])
                        prefix = tuple(self.tokens[b][src][-(self.ngram - 1):])
                        bans[prefix] = bans.get(prefix, ()) + (tok,)
                        bans_b.append(bans)
                else:
                    break
            new_tokens.append(beams)
            new_scores.append(torch.stack(scores_b))
            new_bans.append(bans_b if self.ngram > 0 else self.bans[b])
            if not self.prompt_done[b] and len(self.end_beams[b]) == K:
                best = torch.stack(scores_b).max() / ((5.0 + (seq_len + 1)) / 6) ** self.length_penalty
                self.prompt_done[b] = bool(self.end_scores[b][-1] >= best)  # none running can do better
        self.tokens, self.bans, self.scores = new_tokens, new_bans, torch.stack(new_scores)
        self.generated += 1
        self.done = all(self.prompt_done)
        return torch.tensor(rows, device=self.device), torch.tensor(kept, device=self.device)

    def finish(self) -> list[list[list[int]]]:
        for b in range(self.n_prompts):
            if not self.prompt_done[b]:
                for i in range(self.k):
                    self._add_end_beam(b, self.scores[b, i], self.tokens[b][i])
        return [[beam[start:] for beam in ends[: self.returned]]
                for start, ends in zip(self.prompt_lengths, self.end_beams)]


# -- layers -----------------------------------------------------------------------------------------------


class GLMAttention(nn.Module):
    """Multi-head attention with biased projections, rotary (1-D or 2-D) and SAT's fp32 softmax."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, layer: int):
        super().__init__()
        self.head_dim = head_dim
        self.layer = layer
        self.q_proj = nn.Linear(dim, n_heads * head_dim)
        self.k_proj = nn.Linear(dim, n_heads * head_dim)
        self.v_proj = nn.Linear(dim, n_heads * head_dim)
        self.o_proj = nn.Linear(n_heads * head_dim, dim)

    def forward(self, x: torch.Tensor, rope: list[tuple[torch.Tensor, torch.Tensor]], allowed: torch.Tensor,
                state: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if len(rope) == 1:  # 1-D: the whole head
            (cos, sin), = rope
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        else:  # 2-D: first half by position, second half by block position
            q = torch.cat([rotate(part, c, s) for part, (c, s) in zip(q.chunk(2, -1), rope)], dim=-1)
            k = torch.cat([rotate(part, c, s) for part, (c, s) in zip(k.chunk(2, -1), rope)], dim=-1)
        if state is not None:
            k, v = state.update(self.layer, k, v)
        # query-key layer scaling (Megatron): divide early against fp16 overflow, multiply back in fp32
        coeff = float(self.layer + 1)
        scores = (q / (math.sqrt(self.head_dim) * coeff)) @ k.transpose(-1, -2)
        scores = scores.masked_fill(~allowed, MASK_FILL)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
        y = probs @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class GeGLU(nn.Module):
    """down(x1 * gelu(x2)): x1 = up_proj(x), the linear branch; x2 = gate_proj(x), through exact GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, inner)
        self.gate_proj = nn.Linear(dim, inner)
        self.down_proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x) * F.gelu(self.gate_proj(x)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's tanh approximation of GELU, written as ChatGLM-6B writes it."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class GeluMLP(nn.Module):
    """down(gelu_tanh(up(x))) (ChatGLM-6B)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, inner)
        self.down_proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.up_proj(x)))


class GLMBlock(nn.Module):
    """DeepNorm: each sublayer adds its output to its normalised input scaled by alpha."""

    def __init__(self, c: GLMConfig, layer: int):
        super().__init__()
        self.alpha = c.deepnorm_alpha
        self.attn_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = GLMAttention(c.dim, c.n_heads, c.head_dim, layer)
        self.mlp_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlp = GeGLU(c.dim, c.inner_size) if c.mlp == "geglu" else GeluMLP(c.dim, c.inner_size)

    def forward(self, h, rope, allowed, state):
        a = self.attn_norm(h)
        h = a * self.alpha + self.attn(a, rope, allowed, state)
        b = self.mlp_norm(h)
        return b * self.alpha + self.mlp(b)


class GLM(nn.Module):
    """GLM-130B / ChatGLM-6B. `model(input_ids, position_ids=None, context_length=None)` -> logits [B, T, V].

    context_length: the number of leading tokens of each row that attend to each other in both directions
    (the GLM context, the tokens before <sop>); int or [B]; None = fully causal.
    position_ids: [B, T] ([B, 2, T] for 2-D positions); None = 0..T-1 (2-D: block positions 0).
    `glm_positions(input_ids, config)` computes both from a prompt by the published rules.
    Generation (zoo.generation) passes a state (by keyword, architectures/state.py): the rules are then read
    from the prompt's tokens.
    """

    def __init__(self, c: GLMConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        rot = c.head_dim // 2 if c.position_2d else c.head_dim
        self.rotary = GLMRotary(rot, c.rope_base, c.rope_fp16_angles)
        self.layers = nn.ModuleList(GLMBlock(c, i) for i in range(c.n_layers))
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        # (no `tied_embedding`: GLM-130B's INT8/INT4, as published, quantise the layers' linears, not the table)

    @property
    def beam_rule(self) -> type | None:
        """The decoding protocol's hook (architectures/state.py): GLM-130B decodes beams by its own rule;
        ChatGLM-6B (2-D positions) runs through transformers' generate, so transformers' rule (None)."""
        return None if self.config.position_2d else GLMBeamSearch

    def new_state(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> GLMState:
        return GLMState(batch, max_len, pad, self.config.position_2d)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                context_length: int | torch.Tensor | None = None, *, state: State | None = None,
                last_only: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        dev = input_ids.device
        if state is not None:
            if not state.static and state.length == 0 and isinstance(state, GLMState):
                state.read(input_ids, self.config)
            if context_length is not None:
                state.prefix = torch.as_tensor(context_length, device=dev).long().expand(B).clone()
            if position_ids is None:
                position_ids = state.glm_positions(T, dev) if isinstance(state, GLMState) else state.positions(T, dev)
            allowed = state.attention_mask(T, dev)
            if allowed is None:
                allowed = prefix_mask(torch.arange(state.length, state.length + T, device=dev),
                                      state.length + T, None)
        else:
            if position_ids is None:
                position_ids = torch.arange(T, device=dev)[None].expand(B, T)
                if self.config.position_2d:
                    position_ids = torch.stack([position_ids, torch.zeros_like(position_ids)], dim=1)
            ctx = None if context_length is None else torch.as_tensor(context_length, device=dev).long()
            allowed = prefix_mask(torch.arange(T, device=dev), T, ctx)
        position_ids = position_ids.to(dev)
        if position_ids.dim() == (2 if self.config.position_2d else 1):
            position_ids = position_ids[None].expand(B, *position_ids.shape)
        h = self.embed(input_ids)
        if self.config.position_2d:
            rope = [self.rotary(position_ids[:, 0], h.dtype), self.rotary(position_ids[:, 1], h.dtype)]
        else:
            rope = [self.rotary(position_ids, h.dtype)]
        for block in self.layers:
            h = block(h, rope, allowed, state)
        if state is not None:
            state.advance(T)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return self.lm_head(h) if self.lm_head is not None else tied_head(h, self.embed)


def build(c: GLMConfig) -> GLM:
    return GLM(c)


def count_params(c: GLMConfig) -> int:
    attn = 4 * c.dim * c.n_heads * c.head_dim + 3 * c.n_heads * c.head_dim + c.dim  # q, k, v, o; their biases
    halves = 2 if c.mlp == "geglu" else 1
    mlp = halves * (c.dim * c.inner_size + c.inner_size) + c.inner_size * c.dim + c.dim
    block = attn + mlp + 4 * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + c.n_layers * block + 2 * c.dim + head


# Megatron-style plan, as for the other decoders: q/k/v and both MLP input projections by output columns
# (whole heads, whole GeGLU columns), o_proj and down_proj by input rows, the embedding by vocabulary.
TP_PLAN = {
    "embed": "vocab",
    "layers.*.attn.q_proj": "colwise",
    "layers.*.attn.k_proj": "colwise",
    "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_rep",
}

# Published configs: GLM-130B configs/model_glm_130b.sh (SAT arguments); ChatGLM-6B config.json (final revision).
GLM_130B = GLMConfig(vocab_size=150528, dim=12288, n_layers=70, n_heads=96, inner_size=32768)
CHATGLM_6B = GLMConfig(vocab_size=130528, dim=4096, n_layers=28, n_heads=32, inner_size=16384, mlp="gelu_tanh",
                       position_2d=True, tie_embeddings=False, mask_token_id=130000, gmask_token_id=130001,
                       smask_token_id=130002, sop_token_id=130004)

GLM_130B_LICENSE = "glm-130b"  # "The GLM-130B License": non-commercial research use (MODEL_LICENSE)
GLM_130B_LICENSE_URL = "https://github.com/THUDM/GLM-130B/blob/main/MODEL_LICENSE"
PAPER = "https://arxiv.org/abs/2210.02414"
GLM_130B_DOWNLOAD = ("https://docs.google.com/forms/d/e/1FAIpQLSehr5Dh_i3TwACmFFi8QEgIVNYGmSPwV0GueIcsUev0NEfUug/"
                     "viewform")


# The setups GLM-130B runs on (zoo.memory_plan: `zoo info` shows what each needs per GPU), as its README's hardware
# table and its paper (arXiv 2210.02414) state them: fp16 on 8 x A100 40 GB, INT8 on 8 x RTX 3090 or 4 x A100,
# INT4 on 4 x RTX 3090 or 8 x RTX 2080 Ti. The published INT8 ranks are MP 8 and the INT4 ranks MP 4
# (their per-rank scales: "-g8" / "-g4"); 8 x 2080 Ti takes INT4 at TP 8, whose per-rank scales convert_tp.py
# --target-tp 8 makes (zoo: --quantize int4-row-g8 from the fp16 release).
_PUBLISHED = "GLM-130B README / paper"
GLM_130B_SETUPS = {
    "fp16": [dict(name="fp16, TP 8", gpus=8, gpu="A100", gpu_memory_gib=40, tp=8, source=_PUBLISHED),
             dict(name="fp16, TP 8 x PP 2", gpus=16, gpu="V100", gpu_memory_gib=32, tp=8, pp=2,
                  source="zoo (pipeline stages)", note="two 8-GPU machines")],
    "int8": [dict(name="INT8, TP 8", gpus=8, gpu="RTX 3090", gpu_memory_gib=24, quantize="int8-row-g8", tp=8,
                  source=_PUBLISHED),
             dict(name="INT8, TP 4", gpus=4, gpu="A100", gpu_memory_gib=40, quantize="int8-row-g8", tp=4,
                  source=_PUBLISHED)],
    "int4": [dict(name="INT4, TP 4", gpus=4, gpu="RTX 3090", gpu_memory_gib=24, quantize="int4-row-g4", tp=4,
                  source=_PUBLISHED)],
    "int4-tp8": [dict(name="INT4, TP 8", gpus=8, gpu="RTX 2080 Ti", gpu_memory_gib=11, quantize="int4-row-g8", tp=8,
                      source=_PUBLISHED, note="scales per rank at TP 8: zoo convert --quantize int4-row-g8")],
}


def _entries() -> list[Entry]:
    base = dict(family="glm", license=GLM_130B_LICENSE, paper=PAPER, task="text-generation")
    sat = Source(repo="THUDM/GLM-130B", layout="sat-glm", host="manual", file_format="pt")
    glm = asdict(GLM_130B)
    extra = {"license_url": GLM_130B_LICENSE_URL, "download": GLM_130B_DOWNLOAD}
    every = [s for setups in GLM_130B_SETUPS.values() for s in setups]
    out = [
        Entry(name="glm-130b", config=glm, source=sat, params=count_params(GLM_130B), **base,
              description="GLM-130B, 130B-parameter bilingual (English/Chinese) GLM; fp16, 8 tensor-parallel shards",
              tags=("llm", "glm", "bilingual"), extra={**extra, "setups": every}),
    ]
    # The published INT8 runs at MP 8 and INT4 at MP 4 (configs/model_glm_130b_int8/_int4.sh); convert_tp.py quantises
    # each rank's slice, so the row-parallel weights carry one scale per row per rank: "-g<MP>" (quant.module_scheme)
    for bits, mp in ((8, 8), (4, 4)):
        out.append(Entry(
            name=f"glm-130b-int{bits}", config=glm, source=sat, params=count_params(GLM_130B), **base,
            description=f"GLM-130B with INT{bits} weight-only quantisation of the four linear weights of every "
                        f"layer (per-row symmetric scales per rank at MP {mp}, as the GLM-130B repository does it)",
            tags=("llm", "glm", "bilingual", f"int{bits}"),
            extra={**extra, "quantize": f"int{bits}-row-g{mp}", "convert_args": f"--quantize int{bits}-row-g{mp}",
                   "setups": GLM_130B_SETUPS[f"int{bits}"]}))
    out.append(Entry(
        name="chatglm-6b", family="glm", config=asdict(CHATGLM_6B),
        source=Source(repo="THUDM/chatglm-6b", layout="hf-chatglm", file_format="bin"),
        license="chatglm-6b", paper=PAPER, task="text-generation", params=count_params(CHATGLM_6B),
        description="ChatGLM-6B (first generation): a 6.2B bilingual chat model of the GLM family "
                    "(2-D rotary positions, GELU MLP, separate output head)",
        tags=("llm", "glm", "bilingual", "chat"),
        extra={"license_url": "https://huggingface.co/THUDM/chatglm-6b/blob/main/MODEL_LICENSE"}))
    return out


FAMILY = Family(
    name="glm",
    config_cls=GLMConfig,
    build=build,
    task="text-generation",
    entries=tuple(_entries()),
    tp_plan=TP_PLAN,
    card_template="glm.md",
    stop_tokens=("<eop>",),  # and the tokenizer's eos (</s>, 20002 for GLM-130B)
    tokenizer=GLMTokenizer,
    prompt=GLMPrompt(),
    extrapolates=True,  # rotary positions: past 2048 it runs (fp16 angles grow coarse), with a warning
)
