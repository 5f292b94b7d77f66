"""MatMul-free LM against the published code itself (tests/vendor/matmulfreellm, ridgerchu/matmulfreellm @ a016f72,
run on CPU: its Triton kernels under TRITON_INTERPRET=1, see tests/mmfree_published.py): the whole
HGRNBitForCausalLM in fp32, fp16 (generate.py runs it .half()) and bf16, and the three places where its arithmetic
is easy to get subtly wrong: activations rounded with halves away from zero (the fused kernel's tl.math.round),
weights ternarised in their own dtype (weight_quant), and the recurrent state handed back in the activation dtype
at every call (fused_recurrent_hgrn's final_state)."""

from __future__ import annotations

import json

import pytest
import torch
from zoo.architectures.kernels.bitlinear import quantize_activations, rms_norm
from zoo.architectures.kernels.hgrn import hgrn_recurrent, hgrn_scan
from zoo.architectures.quant import pack_ternary, ternarize

import zoo
from tests import mmfree_published as P
from tests.helpers import max_abs_diff
from tests.mmfree_reference import save_published

V, D, L, HIDDEN = 256, 64, 2, 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmfree_published")
    sd = save_published(root / "hf", V, D, L, HIDDEN, seed=7)
    config = json.loads((root / "hf" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype",
                                                           "transformers_version")}
    return sd, config, zoo.convert(root / "hf", root / "native", progress=False)


def ids(batch: int, steps: int, seed: int) -> torch.Tensor:
    return torch.randint(3, V, (batch, steps), generator=torch.Generator().manual_seed(seed))


def test_fp32_logits_and_greedy_tokens_match_the_published_model(checkpoint):
    sd, config, native = checkpoint
    published = P.published_model(sd, config, torch.float32)
    model = zoo.load(native, dtype=torch.float32)
    x = ids(2, 24, 1)
    with torch.no_grad(), P.cpu():
        expected = published(x, use_cache=False).logits
    with torch.no_grad():
        assert max_abs_diff(model(x), expected) < 1e-4
    prompt = [1, 5, 17, 42, 99]
    tokens, _ = P.greedy(published, prompt, 16)
    assert len(set(tokens)) > 4 and model.generate(prompt, max_new_tokens=16) == tokens


def assert_same_roundings(ours: torch.Tensor, theirs: torch.Tensor, step: float) -> None:
    """16-bit results of the same operations in the same order: bit-identical, but for what an fp32 sum taken in
    another order can do (numpy's in the interpreter, torch's here): an element one fp32 ulp from a rounding
    boundary of an int8 code or of the 16-bit result lands one step apart and moves its row a little."""
    same = (ours.float() == theirs.float()).float().mean().item()
    assert same > 0.9 and max_abs_diff(ours, theirs) <= step, (same, max_abs_diff(ours, theirs))


HALF = {torch.float16: 2e-3, torch.bfloat16: 2e-2}  # a couple of 16-bit ulps of logits of order 1


@pytest.mark.parametrize("dtype", list(HALF))
def test_half_model_is_the_published_half_model_step_for_step(checkpoint, dtype):
    sd, config, native = checkpoint
    published = P.published_model(sd, config, dtype)  # generate.py: .half()
    model = zoo.load(native, dtype=dtype)
    x = ids(2, 24, 2)
    with torch.no_grad(), P.cpu():
        expected = published(x, use_cache=False).logits
    with torch.no_grad():
        got = model(x)
    assert got.dtype == dtype
    assert_same_roundings(got, expected, HALF[dtype])
    prompt = [1, 9, 33, 71, 120, 4]
    tokens, steps = P.greedy(published, prompt, 16)
    assert len(set(tokens)) > 4 and model.generate(prompt, max_new_tokens=16) == tokens
    # the same steps through zoo's recurrent state: prompt once, then one token a call
    state = model.module.new_state(1, len(prompt) + 16)
    with torch.no_grad():
        ours = [model(torch.tensor([prompt]), state)[0, -1]]
        ours += [model(torch.tensor([[t]]), state)[0, -1] for t in tokens[:-1]]
    assert_same_roundings(torch.stack(ours), steps, HALF[dtype])


@pytest.mark.parametrize("dtype", list(HALF))
def test_the_state_carried_between_calls_is_the_published_cache_in_the_activation_dtype(checkpoint, dtype):
    sd, config, native = checkpoint
    published = P.published_model(sd, config, dtype)
    model = zoo.load(native, dtype=dtype)
    x = ids(1, 12, 3)
    with torch.no_grad(), P.cpu():
        cache = published(x, use_cache=True).past_key_values
    state = model.module.new_state(1, 12)
    with torch.no_grad():
        model(x, state)
    for layer in range(L):
        theirs = cache[layer][-1]  # [batch, heads = 1, dim], in the activation dtype
        assert theirs.dtype == dtype
        assert torch.equal(state.h[layer], state.h[layer].to(dtype).float())  # rounded as the published one is
        assert_same_roundings(state.h[layer], theirs[:, 0], 4 * HALF[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_weights_are_ternarised_as_the_published_weight_quant_does_in_their_own_dtype(dtype):
    differs_from_fp32 = 0
    for seed in range(40):
        w = (torch.randn(48, 64, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)
        codes, scale = ternarize(w, dtype)
        assert scale.dtype == dtype
        assert torch.equal(codes * scale, P.fusedbitnet.weight_quant(w.clone()))
        codes32, _ = ternarize(w.float(), torch.float32)
        differs_from_fp32 += not torch.equal(codes.float(), codes32)
    if dtype != torch.float32:  # ternarising the same values in fp32 would give other codes now and then
        assert differs_from_fp32 > 0


def test_activations_round_halves_away_from_zero_as_the_published_fused_kernel_does():
    from zoo.architectures.kernels.bitlinear_triton import bitlinear_triton

    # a row of ones has rms 1 (eps 0), so the normalised row is the norm weight; its absmax 127 makes the int8
    # scale 1, and every other element sits exactly on a half
    norm_weight = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -2.5, 126.5])
    x = torch.ones(1, 8)
    with P.cpu():
        published, *_ = P.fusedbitnet._layer_norm_fwd_quant(x, norm_weight, None, 0.0, is_rms_norm=True)
    q, s = quantize_activations(rms_norm(x, norm_weight, 0.0))
    assert torch.equal(q / s, published)
    assert not torch.equal(torch.round(norm_weight), published)  # halves to even would differ
    identity = pack_ternary(torch.eye(8, dtype=torch.int8))  # the fused zoo kernel on the same row
    assert torch.equal(bitlinear_triton(x, norm_weight, 0.0, identity, torch.ones(1)), published)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_recurrence_matches_the_published_triton_kernel_and_its_loop(dtype):
    g = torch.Generator().manual_seed(4)
    f = torch.rand(2, 1, 33, 40, generator=g).to(dtype)
    i = (torch.randn(2, 1, 33, 40, generator=g) * (1 - f.float())).to(dtype)
    h0 = torch.randn(2, 1, 40, generator=g).to(dtype)
    with P.cpu():
        fused, fused_last = P.fused_recurrent_hgrn(i, f, initial_state=h0, output_final_state=True)
    loop, loop_last = P.naive_recurrent_hgrn(i, f, initial_state=h0.float(), output_final_state=True)
    assert fused_last.dtype == dtype  # the state comes back in the activation dtype
    for ours, last in (hgrn_recurrent(i[:, 0], f[:, 0], h0[:, 0].float()), hgrn_scan(i[:, 0], f[:, 0],
                                                                                      h0[:, 0].float())):
        assert max_abs_diff(ours, fused[:, 0]) <= (1e-6 if dtype == torch.float32 else 2e-3)
        assert max_abs_diff(ours, loop[:, 0]) <= (1e-6 if dtype == torch.float32 else 2e-3)
        assert max_abs_diff(last, loop_last[:, 0]) < 1e-5
        assert torch.equal(last.to(dtype), fused_last[:, 0]) or max_abs_diff(last.to(dtype), fused_last[:, 0]) < 2e-3
