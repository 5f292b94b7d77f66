"""Packed weights (zoo.architectures.quant): the schemes, and quantising while converting or loading."""

import pytest
import torch
from zoo.architectures.quant import PackedLinear, get_scheme, nibbles, unnibble

import zoo
from tests.helpers import converted_tiny_qwen2, max_abs_diff


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
