"""Packed weights (zoo.architectures.quant): the schemes, and quantising while converting or loading."""

import pytest
import torch
from zoo.architectures.quant import ALIASES, SCHEMES, PackedLinear, get_scheme, nibbles, unnibble

import zoo
from tests.helpers import converted_tiny_qwen2, max_abs_diff, tiny_qwen2_moe
from zoo.checks import check_quantize


def test_int4_packs_two_signed_nibbles_per_byte_high_nibble_first():
    # GLM-130B's order (cuda/quantization.cu): byte j = (q[2j] << 4) | (q[2j+1] & 0xF)
    q = torch.tensor([[-7, 7, 3, -1, -8, 0]], dtype=torch.int8)
    packed = nibbles(q)
    assert packed.view(torch.uint8).tolist() == [[0x97, 0x3F, 0x80]]
    assert torch.equal(unnibble(packed), q)


def test_rowwise_int8_scale_is_row_max_over_127_and_the_max_maps_to_127():
    w = torch.tensor([[0.5, -1.27, 0.01], [2.0, 0.0, -0.5]])
    t = get_scheme("int8").pack(w)
    assert torch.allclose(t["weight_scale"], torch.tensor([0.01, 2.0 / 127]))
    assert t["weight"].tolist() == [[50, -127, 1], [127, 0, -32]]  # round(-0.5 * 127 / 2) = round(-31.75)


@pytest.mark.parametrize("scheme,bound", [("int8", 0.5 / 127), ("int4", 0.5 / 7)])
def test_packed_linear_is_the_linear_of_its_dequantised_weight(scheme, bound):
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 16), torch.randn(24), torch.randn(3, 16)
    layer = PackedLinear(16, 24, True, scheme)
    for name, t in layer.scheme.pack(w).items():
        setattr(layer, name, t)
    layer.bias = torch.nn.Parameter(b)
    deq = layer.dequantized(torch.float32)
    assert (deq - w).abs().max() <= bound * w.abs().amax(1, keepdim=True).max() + 1e-6  # half a step per row
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, deq, b), atol=1e-6)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return converted_tiny_qwen2(tmp_path_factory.mktemp("quant"), tie=False)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_stored_quantized_equals_quantized_while_loading(qwen, scheme):
    out = qwen / f"native-{scheme}"
    zoo.convert(qwen / "hf", out, quantize=scheme, progress=False)
    stored = zoo.load(out)
    assert stored.native.quantization["scheme"] == get_scheme(scheme).name  # int8-row, int4-group128
    assert "layers.0.attn.q_proj" in stored.native.quantization["modules"]
    assert isinstance(stored.module.layers[0].mlp.down_proj, PackedLinear)
    on_load = zoo.load(qwen / "native", quantize=scheme)
    full = zoo.load(qwen / "native")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(stored(ids), on_load(ids))
    # exactly the float model run on the dequantised weights, and close to the float model itself
    for name, sub in stored.module.named_modules():
        if isinstance(sub, PackedLinear):
            full.module.get_submodule(name).weight.data = sub.dequantized(torch.float32)
    dequantised = full(ids)
    assert max_abs_diff(stored(ids), dequantised) < 1e-5
    err = max_abs_diff(stored(ids), zoo.load(qwen / "native")(ids)) / dequantised.abs().max().item()
    assert 0 < err < (0.05 if scheme == "int8" else 1.0)
    assert stored.generate([5, 6, 7], max_new_tokens=4) == on_load.generate([5, 6, 7], max_new_tokens=4)


def test_quantized_checkpoint_is_smaller_and_refuses_what_needs_float_weights(qwen, tmp_path):
    zoo.convert(qwen / "hf", tmp_path / "q8", quantize="int8", progress=False)
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))
    linear = sum(p.numel() for n, p in zoo.load(qwen / "native").module.named_parameters()
                 if n.endswith("proj.weight") or n == "lm_head.weight")
    assert size(qwen / "native") - size(tmp_path / "q8") > 0.7 * linear * 3  # fp32 -> int8 + a scale per row
    with pytest.raises(ValueError, match="already stored quantized"):
        zoo.load(tmp_path / "q8", quantize="int4")
    with pytest.raises(ValueError, match="export needs the float weights"):
        zoo.export(tmp_path / "q8", tmp_path / "back")
    with pytest.raises(ValueError, match="quantize='int3': unknown scheme"):
        zoo.load(qwen / "native", quantize="int3")


@pytest.mark.parametrize("name", ["int8-row", "int4-row", "int4-group128", "int4-row-g8", "ternary"])
def test_packing_a_block_of_rows_at_a_time_stores_the_same_tensors(name):
    """Loading and conversion pack in row blocks (bounded fp32 temporaries for a large embedding table);
    ternary's one scale per matrix is packed whole."""
    scheme = get_scheme(name)
    weight = torch.randn(21, 256, dtype=torch.bfloat16)
    whole, blocks = scheme.pack(weight), scheme.pack_rows(weight, rows=4)
    assert whole.keys() == blocks.keys()
    for k in whole:
        assert torch.equal(whole[k], blocks[k]), k


def test_int4_nibbles_round_trip_every_value_in_both_halves():
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(unnibble(nibbles(every)), every)


ACCEPTED = sorted({*ALIASES, *SCHEMES, "int8-row-g2", "int4-row-g8", "int4-group16"})  # every kind of name


@pytest.mark.parametrize("scheme", ACCEPTED)
def test_every_accepted_scheme_converts_loads_and_generates(qwen, scheme):
    assert check_quantize(scheme) == scheme
    out = qwen / f"walk-{scheme}"
    zoo.convert(qwen / "hf", out, quantize=scheme, progress=False)
    stored = zoo.load(out)
    assert stored.native.quantization["scheme"] == get_scheme(scheme).name
    layer = stored.module.layers[0].mlp.down_proj
    assert isinstance(layer, PackedLinear) and layer.scheme is get_scheme(scheme)
    tokens = stored.generate([5, 6, 7], max_new_tokens=3, temperature=0)
    assert len(tokens) == 3 and all(0 <= t < 256 for t in tokens)
    on_load = zoo.load(qwen / "native", quantize=scheme)
    assert on_load.generate([5, 6, 7], max_new_tokens=3, temperature=0) == tokens


@pytest.mark.parametrize("name", ["int8-row", "int4-row-g4", "int4-group32", "ternary"])
def test_packed_tensors_round_trip_through_safetensors_into_the_kernels(tmp_path, name):
    """Packing, storage and the kernels agree: what a scheme packs is written as a native safetensors file, read
    back bit for bit, and the layer built on it multiplies (the dispatching kernel, and the Triton kernel under its
    interpreter where the scheme has one) to the scheme's reference on its unpacked weight."""
    from safetensors.torch import load_file, save_file
    from zoo.architectures.kernels.dequant_matmul_triton import dequant_matmul_triton

    scheme = get_scheme(name)
    w, x, b = torch.randn(48, 64) * 0.05, torch.randn(1, 64), torch.randn(48)
    save_file(scheme.pack(w), tmp_path / "packed.safetensors")
    back = load_file(tmp_path / "packed.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in back.items()} == {
        k: (plan.dtype or torch.float32, plan.shape) for k, plan in scheme.tensors(48, 64).items()}
    assert all(torch.equal(back[k], v) for k, v in scheme.pack(w).items())
    layer = PackedLinear(64, 48, True, scheme)
    layer.load_state_dict({**back, "bias": b})
    expected = torch.nn.functional.linear(x, scheme.unpack(back, torch.float32), b)
    assert max_abs_diff(layer(x), expected) < 1e-5
    assert max_abs_diff(layer(x.repeat(5, 1)), expected.repeat(5, 1)) < 1e-5
    if name != "ternary":
        bits = 8 if name.startswith("int8") else 4
        y = dequant_matmul_triton(x, back["weight"], back["weight_scale"], bits, b, back.get("weight_zero"))
        assert max_abs_diff(y, expected) < 1e-5


def test_quantize_packs_qwen2_moe_expert_stacks_measured_in_bytes(tmp_path):
    """The routed experts hold most of a mixture of experts' weights: int8 packs their stacks (one byte a weight
    and a scale per row), stored packed or packed while loading, the same tensors either way."""
    from zoo.architectures.quant import PackedStack

    tiny_qwen2_moe(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    zoo.convert(tmp_path / "hf", tmp_path / "q8", quantize="int8", progress=False)
    full = zoo.load(tmp_path / "native", dtype=torch.float32)
    stored, on_load = zoo.load(tmp_path / "q8"), zoo.load(tmp_path / "native", quantize="int8")
    assert "layers.0.mlp.experts.gate_proj" in stored.native.quantization["modules"]
    float_bytes = sum(p.nbytes for n, p in full.module.named_parameters() if ".experts." in n)
    for model in (stored, on_load):
        stacks = [m for m in model.module.modules() if isinstance(m, PackedStack)]
        assert len(stacks) == 6  # gate, up, down in each of the two layers
        packed_bytes = sum(t.nbytes for m in stacks for t in m.buffers())
        weights = float_bytes // 4  # fp32 -> one byte each, plus one fp32 scale per row of every expert
        assert packed_bytes == weights + sum(m.n * m.out_features * 4 for m in stacks)
        assert packed_bytes < 0.3 * float_bytes
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(stored(ids), on_load(ids))
    err = ((stored(ids) - full(ids)).norm() / full(ids).norm()).item()
    assert 0 < err < 0.05
    assert stored.generate([5, 6, 7], max_new_tokens=4, temperature=0) == \
        on_load.generate([5, 6, 7], max_new_tokens=4, temperature=0)


@pytest.mark.parametrize("name", ACCEPTED)
def test_a_schemes_plan_names_its_tensors_and_how_they_lie_along_rows_and_columns(name):
    """What conversion asks without a shape (`names`) is what the plan holds; each stored tensor's by_row /
    columns say how it splits with the weight (what a tensor-parallel split of a packed weight reads)."""
    scheme = get_scheme(name)
    plan = scheme.tensors(48, 128)
    assert tuple(plan) == scheme.names
    packed = scheme.pack(torch.randn(48, 128))
    for key, stored in plan.items():
        assert tuple(packed[key].shape) == stored.shape
        assert not stored.by_row or stored.shape[0] == 48
        assert not stored.columns or stored.shape[-1] * stored.columns == 128
