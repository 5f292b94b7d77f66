"""GLM-130B's INT8/INT4 weight-only quantisation: the published quantised rank files convert packed, quantising
fp16 weights reproduces the published bytes, and packed models (fp32 compute) match the reference run on the
dequantised weights within 1e-3."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from zoo.architectures.quant import PackedLinear, get_scheme
from zoo.conversion.megatron import merge_ranks

import zoo
from tests import glm_reference as R
from tests.helpers import max_abs_diff
from zoo.settings import SETTINGS

L, H, INNER, HEADS, VOCAB = 2, 64, 96, 4, 256
ARGS = {"num_layers": L, "hidden_size": H, "inner_hidden_size": INNER, "num_attention_heads": HEADS,
        "vocab_size": VOCAB, "max_sequence_length": 512, "mask_token_id": 250, "gmask_token_id": 251,
        "smask_token_id": 252, "sop_token_id": 254}
GMASK, SOP = 251, 254


def _shards(tp: int) -> list[dict[str, torch.Tensor]]:
    return R.random_sat_shards(L, H, INNER, HEADS, VOCAB, tp, std=0.25, embed_std=0.1, dtype=torch.float16, seed=5)


def _causal(n: int) -> torch.Tensor:
    return ~torch.ones(n, n, dtype=torch.bool).tril()[None, None]


@pytest.mark.parametrize("bits,tp", [(8, 2), (4, 2), (8, 1)])
def test_published_quantised_ranks_convert_packed_and_match_the_reference(tmp_path, bits, tp, monkeypatch):
    """Weight-only (ZOO_QUANT_ACTIVATIONS=0): the reference's dequantised arithmetic, so its logits and greedy
    tokens; activation-quantised (the default): logits within 1% of it."""
    monkeypatch.setattr(SETTINGS, "quant_activations", False)
    shards = R.quantize_sat_shards(_shards(tp), bits)  # what convert_tp.py --quantization-bit-width writes
    R.write_sat_checkpoint(tmp_path / "sat", shards, model_config=ARGS)
    native = zoo.convert(tmp_path / "sat", tmp_path / "native", progress=False)
    record = json.loads((native / "config.json").read_text())["quantization"]
    assert record["scheme"] == f"int{bits}-row" + (f"-g{tp}" if tp > 1 else "")  # one scale per row per rank
    assert len(record["modules"]) == 7 * L
    stored = load_file(native / "model.safetensors")
    assert stored["layers.0.attn.q_proj.weight"].dtype == torch.int8
    assert stored["layers.0.mlp.down_proj.weight"].shape == (H, INNER if bits == 8 else INNER // 2)
    assert stored["layers.0.mlp.down_proj.weight_scale"].dtype == torch.float16

    model = zoo.load(native, dtype=torch.float32)  # fp32 compute, weights stay packed
    assert all(not isinstance(m, nn.Linear) for m in model.module.modules())
    reference = R.dequantize_sat_shards(shards, bits)
    ids = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    assert logits.dtype == torch.float32
    expected = R.sat_glm130b_forward(reference, L, HEADS, ids, torch.arange(48)[None].expand(2, 48), _causal(48))
    assert max_abs_diff(logits, expected) < 1e-3
    monkeypatch.setattr(SETTINGS, "quant_activations", True)
    assert ((model(ids) - expected).norm() / expected.norm()) < 0.01
    monkeypatch.setattr(SETTINGS, "quant_activations", False)

    seq = ids[0, :20].tolist() + [GMASK, SOP]
    greedy = model.generate(seq, max_new_tokens=12, temperature=0.0)
    assert len(set(greedy)) > 4
    assert greedy == R.sat_greedy(reference, L, HEADS, seq, 20, True, 12)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantising_fp16_weights_gives_the_published_bytes(bits):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(bits)).half() * 0.05
    packed = get_scheme(f"int{bits}-row").pack(w)
    q, scale = R.published_quantize(w, bits)
    assert torch.equal(packed["weight"], q) and torch.equal(packed["weight_scale"], scale)
    assert torch.equal(get_scheme(f"int{bits}-row").unpack(packed, torch.float32),
                       R.published_dequantize(q, scale, bits))


def test_int4_nibble_order_is_the_published_one():
    # row [0.7, -0.2]: scale 0.1, integers [7, -2] -> one byte, high nibble the even column: 0x7E
    packed = get_scheme("int4-row").pack(torch.tensor([[0.7, -0.2]], dtype=torch.float16))
    assert packed["weight"].tolist() == [[0x7E]]
    q, _ = R.published_quantize(torch.tensor([[0.7, -0.2]], dtype=torch.float16), 4)
    assert q.tolist() == [[0x7E]]


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    base = tmp_path_factory.mktemp("glmq")
    shards = _shards(2)
    R.write_sat_checkpoint(base / "sat", shards, model_config=ARGS)
    return {"base": base, "shards": shards, "native": zoo.convert(base / "sat", base / "native", progress=False)}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantising_at_conversion_and_at_load_time_agree_and_match_the_reference(fp16, bits):
    converted = zoo.convert(fp16["base"] / "sat", fp16["base"] / f"int{bits}", quantize=f"int{bits}-row",
                            progress=False)
    a = zoo.load(converted, dtype=torch.float32)
    b = zoo.load(fp16["native"], dtype=torch.float16, quantize=f"int{bits}-row")  # packed layer by layer on loading
    for (name, x), (_, y) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert torch.equal(x.to(y.dtype), y), name  # the same packed bytes and scales
    # "int<bits>-row" without groups: one scale per full output row, the published scheme at MP 1
    merged = {k: merge_ranks(k, [sd[k] for sd in fp16["shards"]]) for k in fp16["shards"][0]}
    reference = R.dequantize_sat_shards(R.quantize_sat_shards([merged], bits), bits)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(2))
    expected = R.sat_glm130b_forward(reference, L, HEADS, ids, torch.arange(40)[None], _causal(40))
    assert max_abs_diff(a(ids), expected) < 1e-3


# GLM-130B as released: 8 fp16 SAT ranks; INT8 is published at MP 8 and INT4 at MP 4 (convert_tp.py --target-tp).
MP_HEADS, MP_INNER = 8, 128
MP_ARGS = {**ARGS, "num_attention_heads": MP_HEADS, "inner_hidden_size": MP_INNER}


@pytest.fixture(scope="module")
def mp8(tmp_path_factory):
    base = tmp_path_factory.mktemp("glm_mp8")
    shards = R.random_sat_shards(L, H, MP_INNER, MP_HEADS, VOCAB, 8, std=0.25, embed_std=0.1, dtype=torch.float16,
                                 seed=11)
    R.write_sat_checkpoint(base / "sat", shards, model_config=MP_ARGS)
    return {"base": base, "shards": shards, "native": zoo.convert(base / "sat", base / "native", progress=False)}


@pytest.mark.parametrize("bits,mp", [(8, 8), (4, 4)])
def test_zoo_quantised_glm_130b_equals_the_published_convert_tp_bit_for_bit(mp8, bits, mp):
    from tests import glm_convert_tp_reference as convert_tp
    from zoo.registry import get_entry

    scheme = get_entry(f"glm-130b-int{bits}").extra["quantize"]
    assert scheme == f"int{bits}-row-g{mp}"  # the registry's quantisation is the published MP degree's
    published = convert_tp.main(mp8["shards"], target_tp=mp, quantization_bit_width=bits)
    R.write_sat_checkpoint(mp8["base"] / f"pub{bits}", published, model_config=MP_ARGS)
    from_published = zoo.convert(mp8["base"] / f"pub{bits}", mp8["base"] / f"pub{bits}-native", progress=False)
    by_zoo = zoo.convert(mp8["base"] / "sat", mp8["base"] / f"zoo{bits}", quantize=scheme, progress=False)

    records = [json.loads((d / "config.json").read_text())["quantization"] for d in (from_published, by_zoo)]
    assert records[0] == records[1] and records[0]["scheme"] == scheme  # the per-rank grouping is recorded
    a, b = load_file(from_published / "model.safetensors"), load_file(by_zoo / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    scale = a["layers.0.mlp.down_proj.weight_scale"]
    assert scale.shape == (H, mp) and not torch.equal(scale[:, 0], scale[:, 1])  # one scale per row per rank
    assert torch.equal(a["layers.0.attn.q_proj.weight_scale"][:, :1].expand(-1, mp),
                       a["layers.0.attn.q_proj.weight_scale"])  # column-parallel: one scale per whole row

    loaded = zoo.load(mp8["native"], dtype=torch.float16, quantize=scheme)  # quantised while loading: same bytes
    for name, t in loaded.module.state_dict().items():
        assert torch.equal(t, b[name].to(t.dtype) if t.is_floating_point() else b[name]), name

    model = zoo.load(by_zoo, dtype=torch.float32)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(3))
    reference = R.dequantize_sat_shards(published, bits)  # the published ranks as they compute, rank by rank
    expected = R.sat_glm130b_forward(reference, L, MP_HEADS, ids, torch.arange(40)[None], _causal(40))
    assert max_abs_diff(model(ids), expected) < 1e-3


def test_packed_models_hold_a_fraction_of_the_fp16_bytes(fp16):
    def linear_bytes(model) -> int:
        return sum(t.numel() * t.element_size() for m in model.module.modules()
                   if isinstance(m, (nn.Linear, PackedLinear)) for t in (*m.parameters(), *m.buffers()))

    full = linear_bytes(zoo.load(fp16["native"]))
    int8 = linear_bytes(zoo.load(fp16["native"], quantize="int8-row"))
    int4 = linear_bytes(zoo.load(fp16["native"], quantize="int4-row"))
    assert 0.5 < int8 / full < 0.6 and 0.25 < int4 / full < 0.35  # weights 1 byte / half a byte, fp16 scales+bias
