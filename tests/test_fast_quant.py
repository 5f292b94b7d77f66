"""Weight-only int8 / int4 for every language model: torchao's int4 arithmetic, aten's CPU int4 kernel on its own
arrangement of the codes (made once, replacing the stored tensors, never stored), the tied output embedding packed
int8, quantised checkpoints equal to quantising while loading, and compiled quantised decoding equal to eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.architectures.quant import (
    PackedEmbedding,
    PackedLinear,
    dequantize,
    get_scheme,
    quantize_affine_int4,
    unnibble,
)

import zoo
from tests.helpers import converted_tiny_qwen2
from zoo.generation import Sampling, compiled_step, decode
from zoo.settings import SETTINGS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_groups_quantise_with_torchaos_arithmetic(dtype, group):
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    w = (torch.randn(48, 256, generator=torch.Generator().manual_seed(group)) * 0.05).to(dtype)
    q, scale, zero = quantize_affine_int4(w, group)
    block = (1, group)
    ref_scale, ref_zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6,
                                                          None, dtype)
    ref_codes = _quantize_affine_tinygemm(w, block, ref_scale, ref_zero, torch.int32, 0, 15)
    assert torch.equal(scale, ref_scale.reshape(48, -1)) and torch.equal(zero, ref_zero.reshape(48, -1))
    assert torch.equal(unnibble(q).to(torch.int32) + 8, ref_codes)  # stored as signed nibbles: code - 8
    error = (dequantize(unnibble(q), scale, torch.float32, zero) - w.float()).abs().view(48, -1, group)
    # half a step in fp32; bf16 rounds the scale, the zero point and w / scale on the way (as torchao does)
    steps = 0.5 if dtype == torch.float32 else 1.0
    assert (error <= scale.float()[..., None] * steps + 1e-7).all()


def test_int4_layer_runs_atens_kernel_on_its_own_packing_and_keeps_one_copy(monkeypatch):
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")  # aten's kernel: the fallback where zoo's C++ kernels are unavailable
    torch.manual_seed(0)
    w, b, x = torch.randn(64, 256) * 0.05, torch.randn(64), torch.randn(3, 256)
    layer = PackedLinear(256, 64, True, "int4-group32", torch.bfloat16)
    for name, t in layer.scheme.pack(w.bfloat16()).items():
        setattr(layer, name, t)
    layer.bias = torch.nn.Parameter(b.bfloat16())
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    expected = F.linear(x, layer.dequantized(torch.float32), b)
    y = layer(x.bfloat16())
    assert layer.kernel == ("int4pack", "int4pack_scales_zeros")
    assert {n for n, _ in layer.named_buffers()} == set(layer.kernel)  # the stored tensors were replaced
    assert sum(t.nbytes for t in layer.buffers()) == sum(stored[k].nbytes for k in ("weight", "weight_scale",
                                                                                      "weight_zero"))
    assert ((y.float() - expected).norm() / expected.norm()) < 0.01  # bf16 rounding of the activations
    assert all(torch.equal(stored[k], v) for k, v in layer.state_dict().items())  # reported in the stored form
    assert list(layer.state_dict()) == list(stored)
    assert torch.equal(layer(x[:1].bfloat16()), y[:1])  # one row: the same kernel


def test_fp32_int4_keeps_the_stored_form_and_is_the_dequantised_linear(monkeypatch):
    """Weight-only (ZOO_QUANT_ACTIVATIONS=0): the dequantised linear to fp32 rounding; with activations quantised
    (the default, for up to 8 rows on CPU) within Q8_0's error of it."""
    torch.manual_seed(1)
    w, x = torch.randn(64, 96) * 0.05, torch.randn(2, 96)
    layer = PackedLinear(96, 64, False, "int4", torch.float32)  # 96 inputs: groups of 32 (128 does not divide)
    for name, t in layer.scheme.pack(w).items():
        setattr(layer, name, t)
    assert layer.weight_scale.shape == (64, 3)
    expected = F.linear(x, layer.dequantized())
    monkeypatch.setattr(SETTINGS, "quant_activations", False)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    monkeypatch.setattr(SETTINGS, "quant_activations", True)
    assert ((layer(x) - expected).norm() / expected.norm()) < 0.01
    assert layer.kernel == ()  # in fp32 aten's int4 kernel is slower than dequantising (measured)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return converted_tiny_qwen2(tmp_path_factory.mktemp("tied"), tie=True)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_tied_output_embedding_is_packed_int8_for_lookups_and_the_head(tied, scheme):
    out = tied / f"q-{scheme}"
    zoo.convert(tied / "hf", out, quantize=scheme, progress=False)
    stored = zoo.load(out)
    assert "embed" in stored.native.quantization["modules"]
    embed = stored.module.embed
    assert isinstance(embed, PackedEmbedding) and embed.scheme.name == "int8-row"
    on_load = zoo.load(tied / "native", quantize=scheme)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(stored(ids), on_load(ids))
    rows = zoo.load(out, dtype=torch.bfloat16).module.embed  # the looked-up rows are the dequantised table's
    assert torch.equal(rows(ids), rows.dequantized(torch.bfloat16)[ids])
    full = zoo.load(tied / "native", dtype=torch.float32)
    err = ((stored(ids) - full(ids)).norm() / full(ids).norm()).item()
    assert 0 < err < (0.05 if scheme == "int8" else 0.5), err  # random weights, 2 layers: loose bounds


def test_embedded_model_quantised_keeps_its_greedy_text_close():
    """The trained default model: int8 and int4 logits stay close to bf16's and the greedy continuation mostly
    agrees (benchmarks/bench_decode.py --quality measures the same on more prompts)."""
    prompt = zoo.load("qwen2-tiny-stdlib").tokenizer.encode("import os\nimport sys\n\n\ndef main(")
    ids = torch.tensor([prompt])
    base = zoo.load("qwen2-tiny-stdlib", dtype=torch.bfloat16)
    ref_logits = base(ids).float()
    ref_tokens = base.generate(prompt, max_new_tokens=16, temperature=0)
    for scheme, bound, agree in (("int8", 0.05, 16), ("int4", 0.35, 4)):
        q = zoo.load("qwen2-tiny-stdlib", dtype=torch.bfloat16, quantize=scheme)
        rel = ((q(ids).float() - ref_logits).norm() / ref_logits.norm()).item()
        assert rel < bound, (scheme, rel)
        tokens = q.generate(prompt, max_new_tokens=16, temperature=0)
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        assert same >= agree, (scheme, same)


def test_compiled_int4_decoding_gives_the_eager_tokens():
    """aten's int4 kernel and the int8 head inside the compiled step: the eager path's greedy tokens."""
    model = zoo.load("qwen2-tiny-stdlib", dtype=torch.bfloat16, quantize="int4")
    rows = [model.tokenizer.encode("class Node:\n    def __init__(self")]
    eager = [int(t) for t in decode(model.module, rows, 24, Sampling(), set(), compile=False)]
    compiled = [int(t) for t in decode(model.module, rows, 24, Sampling(), set(), compile=True)]
    assert compiled == eager and len(set(eager)) > 4
    step = compiled_step(model.module)
    assert step.graphs == 1 and not step.failed
    assert get_scheme("int4").name == "int4-group128"
