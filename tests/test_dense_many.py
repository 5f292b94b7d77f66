"""Projections that read the same x in one C++ call (kernels/linear.py dense_many: a decoder layer's q, k and v, its
gate and up; csrc/multi_linear.cpp): the outputs of the separate calls bit for bit, for plain float weights
(zoo_cpu::dense_rows_many) and packed int8 / int4 ones (zoo_cpu::quant_linear_many, quant.PackedLinear.forward_many),
with and without biases; one by one wherever a single call would not take the same kernel (hooks, autograd, mixed
layers, the library off, a compiled graph); and a decoder's greedy tokens and logits unchanged."""

import pytest
import torch
import torch.nn as nn
from zoo.architectures import layers as layers_module
from zoo.architectures.kernels import cpu_ext, linear
from zoo.architectures.quant import PackedEmbedding, PackedLinear, pack_linears, packable_paths

from tests.helpers import Spy
from tests.test_kernels_dispatch import greedy, tiny_decoder

SHAPES = [(1, 1, 64), (1, 64), (3, 2, 64)]  # one token, a 2-D row, 6 rows (still the row kernel's)
OUTS = (64, 32, 32)  # q, k, v of grouped-query attention


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def plain(dtype, bias):
    return [nn.Linear(64, n, bias=bias).to(dtype) for n in OUTS]


def packed(dtype, bias, scheme):
    made = []
    for i, n in enumerate(OUTS):
        layer = PackedLinear(64, n, bias, scheme, dtype)
        for name, t in layer.scheme.pack(rand(n, 64, dtype=dtype, seed=i)).items():
            setattr(layer, name, t)
        if bias:
            layer.bias = nn.Parameter(rand(n, dtype=dtype, seed=10 + i))
        made.append(layer)
    return made


@pytest.fixture
def spy(monkeypatch):
    lib = cpu_ext.library()
    assert lib is not None, "the CPU kernels did not build here (is a C++ compiler installed?)"
    s = Spy(lib)
    monkeypatch.setattr(cpu_ext, "library", lambda: s if cpu_ext.enabled() else None)  # (ZOO_CPU_KERNELS as read)
    return s


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp16", "int8-row", "int4-group32", "int4-row"])
def test_one_call_gives_the_separate_calls_outputs_bit_for_bit(kind, bias, shape, spy):
    dtype = torch.float32 if kind == "fp32" else torch.float16 if kind == "fp16" else torch.bfloat16
    layers = plain(dtype, bias) if kind in ("fp32", "bf16", "fp16") else packed(dtype, bias, kind)
    x = rand(*shape, dtype=dtype, seed=5)
    with torch.inference_mode():
        separate = [linear.dense(layer, x) for layer in layers]
        spy.calls.clear()
        together = linear.dense_many(layers, x)
    assert spy.calls == ["dense_rows_many" if kind in ("fp32", "bf16", "fp16") else "quant_linear_many"]
    assert [y.shape for y in together] == [(*shape[:-1], n) for n in OUTS]
    for a, b in zip(together, separate, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_many_rows_of_plain_weights_go_one_by_one(spy):
    layers, x = plain(torch.bfloat16, True), rand(3, 20, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        together = linear.dense_many(layers, x)
        separate = [linear.dense(layer, x) for layer in layers]
    assert "dense_rows_many" not in spy.calls  # (60 rows: not the row kernel's)
    assert all(torch.equal(a, b) for a, b in zip(together, separate, strict=True))


@pytest.mark.parametrize("kind", ["bf16", "int8-row"])
def test_hooks_autograd_mixed_layers_and_the_library_off_go_one_by_one(kind, spy, monkeypatch):
    make = (lambda: plain(torch.bfloat16, True)) if kind == "bf16" else (lambda: packed(torch.bfloat16, True, kind))
    many = "dense_rows_many" if kind == "bf16" else "quant_linear_many"
    x = rand(1, 1, 64, dtype=torch.bfloat16, seed=5)

    layers, seen = make(), []
    layers[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))  # (tensor parallelism's way)
    with torch.inference_mode():
        ys = linear.dense_many(layers, x)
    assert seen == [(1, 1, 32)] and many not in spy.calls
    with torch.inference_mode():
        assert all(torch.equal(a, layer(x)) for a, layer in zip(ys, layers, strict=True))

    layers = make()  # autograd: each layer's own path (the C++ ops have no backward)
    xg = x.clone().requires_grad_()
    ys = linear.dense_many(layers, xg)
    assert many not in spy.calls
    assert all(torch.equal(a, linear.dense(layer, xg)) for a, layer in zip(ys, layers, strict=True))
    if kind == "bf16":
        sum(y.float().sum() for y in ys).backward()
        assert xg.grad is not None

    mixed = [make()[0], nn.Linear(64, 8).to(torch.bfloat16) if kind != "bf16" else packed(torch.bfloat16, True,
                                                                                          "int8-row")[0]]
    with torch.inference_mode():
        ys = linear.dense_many(mixed, x)
        assert all(torch.equal(a, linear.dense(layer, x)) for a, layer in zip(ys, mixed, strict=True))
    assert many not in spy.calls

    layers = make()
    with torch.inference_mode():
        kernels = linear.dense_many(layers, x)
        monkeypatch.setenv("ZOO_CPU_KERNELS", "0")  # the library off: F.linear, the scheme's reference
        ys = linear.dense_many(layers, x)
        assert all(torch.equal(a, layer(x)) for a, layer in zip(ys, layers, strict=True))
    assert spy.calls.count(many) == 1  # only the call before the switch
    assert all(a.shape == b.shape for a, b in zip(kernels, ys, strict=True))


def quantized(model: nn.Module, scheme: str) -> nn.Module:
    """The model with every linear layer and the tied embedding packed by `scheme`, as zoo.load(quantize=) packs."""
    state = model.state_dict()
    pack_linears(model, scheme, packable_paths(model, scheme))
    for path, module in model.named_modules():
        if isinstance(module, PackedLinear | PackedEmbedding):
            for name, t in module.scheme.pack(state[f"{path}.weight"]).items():
                setattr(module, name, t)
            if getattr(module, "bias", None) is not None:
                module.bias = nn.Parameter(state[f"{path}.bias"])
    return model


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
def test_a_decoders_tokens_and_logits_are_those_of_the_separate_calls(kind, monkeypatch):
    """Greedy decoding of a small Qwen2 (q, k, v biases) with the grouped calls and with every projection called
    alone: the same tokens and bit-identical logits; after model.to(another dtype) as well (nothing is kept from
    the first dtype's calls)."""
    model = tiny_decoder(torch.float32 if kind == "fp32" else torch.bfloat16)
    if kind in ("int8", "int4"):
        model = quantized(model, kind)
    model = model.eval()
    for dtype in ((torch.float32, torch.bfloat16) if kind == "fp32" else (None,)):
        if dtype is not None:
            model = model.to(dtype)
        fused = greedy(model, list(range(3, 23)), 8)
        monkeypatch.setattr(layers_module, "dense_many", lambda ls, x: [linear.dense(layer, x) for layer in ls])
        alone = greedy(model, list(range(3, 23)), 8)
        monkeypatch.undo()
        assert fused[0] == alone[0]
        assert torch.equal(fused[1], alone[1])
