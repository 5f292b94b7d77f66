"""ChatGLM-6B's published INT8 / INT4 checkpoints (THUDM/chatglm-6b-int8, -int4): they convert packed as published
(never re-quantised) and run like the published dequantisation (tests/vendor/chatglm6b, the model's own
quantization.py) in front of the literal ChatGLM-6B reference (tests/glm_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from zoo.architectures.glm import glm_positions
from zoo.architectures.quant import get_scheme
from zoo.weights.format import CheckpointError

import zoo
from tests import glm_reference as R
from tests.helpers import max_abs_diff
from tests.vendor.chatglm6b import quantization as Q
from zoo.settings import SETTINGS

LAYERS, HIDDEN, INNER, HEADS, VOCAB = 2, 64, 128, 4, 256
MASK, GMASK, SOP, EOP = 250, 251, 254, 255
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def _config(bits: int | None) -> dict:
    cfg = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
           "num_layers": LAYERS, "num_attention_heads": HEADS, "inner_hidden_size": INNER,
           "max_sequence_length": 512, "layernorm_epsilon": 1e-5, "position_encoding_2d": True,
           "bos_token_id": SOP, "eos_token_id": EOP, "mask_token_id": MASK, "gmask_token_id": GMASK,
           "pad_token_id": 3, "torch_dtype": "float16", "quantization_embeddings": False}
    if bits:
        cfg["quantization_bit"] = bits
    return cfg


def _published(path: Path, bits: int) -> dict[str, torch.Tensor]:
    """A tiny chatglm-6b-int<bits>: fp16 weights quantised by the published QuantizedLinear, saved as its
    state_dict (weight int8 codes, weight_scale fp16) in the sharded pytorch_model layout."""
    sd = R.random_chatglm_state(LAYERS, HIDDEN, INNER, VOCAB, HEADS, seed=bits, dtype=torch.float16, std=0.25)
    for i in range(LAYERS):
        for name in LINEARS:
            key = f"transformer.layers.{i}.{name}"
            sd[f"{key}.weight"], sd[f"{key}.weight_scale"] = Q.quantize_weight(sd[f"{key}.weight"], bits)
    R.write_chatglm_checkpoint(path, sd, _config(bits))
    return sd


def _dequantized(sd: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The published CPU model after .float(): every weight extracted by extract_weight_to_float."""
    out = {k: v.float() for k, v in sd.items() if not k.endswith(".weight_scale")}
    for i in range(LAYERS):
        for name in LINEARS:
            key = f"transformer.layers.{i}.{name}"
            out[f"{key}.weight"] = Q.extract_weight_to_float(sd[f"{key}.weight"], sd[f"{key}.weight_scale"].float(),
                                                             bits)
    return out


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist() + [GMASK, SOP]


@pytest.mark.parametrize("bits", [8, 4])
def test_published_chatglm_int_checkpoints_convert_packed_and_match_their_dequantisation(tmp_path, bits,
                                                                                         monkeypatch):
    """Weight-only (ZOO_QUANT_ACTIVATIONS=0): the published dequantised arithmetic, so its greedy tokens."""
    monkeypatch.setattr(SETTINGS, "quant_activations", False)
    sd = _published(tmp_path / "hf", bits)
    native = zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    record = json.loads((native / "config.json").read_text())["quantization"]
    assert record["scheme"] == f"int{bits}-row"
    assert len(record["modules"]) == 6 * LAYERS  # q, k, v, o, up, down of every layer
    stored = load_file(native / "model.safetensors")
    # the published codes and scales, as they are (rows of query_key_value regrouped per head into q/k/v)
    assert torch.equal(stored["layers.1.mlp.down_proj.weight"], sd["transformer.layers.1.mlp.dense_4h_to_h.weight"])
    assert torch.equal(stored["layers.1.mlp.down_proj.weight_scale"],
                       sd["transformer.layers.1.mlp.dense_4h_to_h.weight_scale"])
    qkv = sd["transformer.layers.0.attention.query_key_value.weight"].view(HEADS, 3, HIDDEN // HEADS, -1)
    assert torch.equal(stored["layers.0.attn.k_proj.weight"], qkv[:, 1].reshape(HIDDEN, -1))
    assert stored["layers.0.attn.q_proj.weight"].shape == (HIDDEN, HIDDEN * bits // 8)

    model = zoo.load(native, dtype=torch.float32)
    assert not any(isinstance(m, nn.Linear) for m in model.module.layers.modules())  # lm_head stays fp16
    reference = _dequantized(sd, bits)
    for seq in (_prompt(90), _prompt(40, seed=1)):
        x = torch.tensor([seq])
        mask, pos = R.chatglm_masks_and_positions(x, SOP, MASK, GMASK)
        logits = model(x, *glm_positions(x, model.config))
        assert logits.dtype == torch.float32
        assert max_abs_diff(logits, R.chatglm_forward(reference, LAYERS, HEADS, x, pos, mask)) < 1e-4
        expected = R.chatglm_greedy(reference, LAYERS, HEADS, seq, 12, SOP, MASK, GMASK)
        got = model.generate(seq, max_new_tokens=12, temperature=0.0)
        assert len(set(got)) > 4 and got == expected


def test_chatglm_int4_layer_matches_the_published_cpu_linear(monkeypatch):
    """Weight-only (ZOO_QUANT_ACTIVATIONS=0): ChatGLM's own CPU linear to fp32 rounding; activation-quantised
    (the default for a few rows): within 1% of it."""
    w = (torch.randn(24, 32, generator=torch.Generator().manual_seed(3)) * 0.3).half()
    q, scale = Q.quantize_weight(w, 4)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    t = {"weight": q, "weight_scale": scale.float()}
    assert torch.equal(get_scheme("int4-row").unpack(t, torch.float32), Q.extract_weight_to_float(q, scale.float(), 4))
    published = Q.w8a16_linear_cpu(x, q, scale.float(), 4)
    monkeypatch.setattr(SETTINGS, "quant_activations", False)
    assert max_abs_diff(get_scheme("int4-row").linear(x, t, None), published) < 1e-5
    monkeypatch.setattr(SETTINGS, "quant_activations", True)
    y = get_scheme("int4-row").linear(x, t, None)
    assert ((y - published).norm() / published.norm()) < 0.01


def test_chatglm_scales_keep_their_published_dtype_under_a_dtype_conversion(tmp_path):
    _published(tmp_path / "hf", 4)
    native = zoo.convert(tmp_path / "hf", tmp_path / "native", dtype="bfloat16", progress=False)
    stored = load_file(native / "model.safetensors")
    assert stored["layers.0.attn.o_proj.weight_scale"].dtype == torch.float16
    assert stored["layers.0.attn.o_proj.weight"].dtype == torch.int8
    assert stored["layers.0.attn.o_proj.bias"].dtype == torch.bfloat16


@pytest.mark.parametrize("change,message", [
    ({"quantization_bit": 2}, "quantization_bit=2"),
    ({"quantization_bit": "4"}, "quantization_bit='4'"),
    ({"quantization_embeddings": True}, "quantization_embeddings=true"),
])
def test_chatglm_quantisation_configs_zoo_cannot_run_are_refused_by_name(tmp_path, change, message):
    _published(tmp_path / "hf", 4)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message):
        zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)


def test_chatglm_int8_codes_under_an_int4_config_are_refused(tmp_path):
    _published(tmp_path / "hf", 8)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "quantization_bit": 4}))
    wrong = r"tensor transformer\.layers\.0\..* has shape \(\d+, 64\), the config needs \(\d+, 32\)"
    with pytest.raises(CheckpointError, match=wrong):
        zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)


def _published_cpu_kernels(tmp_path: Path):
    """quantization_kernels.c, compiled as quantization.py's CPUKernel compiles it (gcc -O3 -fPIC -std=c99 -shared;
    -fsigned-char: the code assumes x86's signed char), loaded with ctypes."""
    import ctypes
    import shutil
    import subprocess

    compiler = shutil.which("gcc") or shutil.which("cc")
    assert compiler, "a C compiler is needed (the test suite's torch.compile needs one too)"
    source = Path(__file__).parent / "vendor" / "chatglm6b" / "quantization_kernels.c"
    library = tmp_path / "quantization_kernels.so"
    subprocess.run([compiler, "-O3", "-fPIC", "-std=c99", "-fsigned-char", "-x", "c", str(source), "-shared",
                    "-o", str(library)], check=True)
    return ctypes.cdll.LoadLibrary(str(library))


@pytest.mark.parametrize("bits", [8, 4])
def test_the_published_c_kernels_compress_and_extract_as_zoo_reads_the_codes(tmp_path, bits):
    import ctypes

    kernels = _published_cpu_kernels(tmp_path)
    w = (torch.randn(24, 32, generator=torch.Generator().manual_seed(bits)) * 0.3).half()
    codes = torch.round(w / (w.abs().amax(-1) / (2 ** (bits - 1) - 1)).half()[:, None]).to(torch.int8)
    if bits == 4:  # compress_int4_weight: the published packing of the codes
        packed = torch.empty(24, 16, dtype=torch.int8)
        kernels.compress_int4_weight(ctypes.c_void_p(codes.data_ptr()), ctypes.c_void_p(packed.data_ptr()),
                                     ctypes.c_int32(24), ctypes.c_int32(16))
        assert torch.equal(packed, Q.compress_int4_weight(codes))
        q, scale = Q.quantize_weight(w, 4)
    else:
        q, scale = Q.quantize_weight(w, 8)
    scale = scale.float()
    out = torch.empty(24, 32, dtype=torch.float32)
    extract = kernels.extract_int4_weight_to_float if bits == 4 else kernels.extract_int8_weight_to_float
    extract(ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(scale.data_ptr()), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_int32(24), ctypes.c_int32(q.shape[1]))
    assert torch.equal(out, Q.extract_weight_to_float(q, scale, bits))
    assert torch.equal(out, get_scheme(f"int{bits}-row").unpack({"weight": q, "weight_scale": scale}, torch.float32))
