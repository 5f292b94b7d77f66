"""Conversion streams: peak memory is bounded by the tensors in flight, not by the model."""

import json
import subprocess
import sys

import torch
from zoo.weights.writer import TensorSpec, write_tensors

import zoo

DIM, INTER, LAYERS, VOCAB = 512, 2048, 8, 1024


def write_published_qwen2(path, DIM=DIM, INTER=INTER, LAYERS=LAYERS, VOCAB=VOCAB) -> tuple[int, int]:
    """A Qwen2 checkpoint in the published (transformers) layout, written tensor by tensor."""
    path.mkdir()
    specs = [TensorSpec("model.embed_tokens.weight", (VOCAB, DIM), torch.float32),
             TensorSpec("model.norm.weight", (DIM,), torch.float32),
             TensorSpec("lm_head.weight", (VOCAB, DIM), torch.float32)]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + "input_layernorm.weight", (DIM,), torch.float32),
                  TensorSpec(p + "post_attention_layernorm.weight", (DIM,), torch.float32),
                  TensorSpec(p + "self_attn.o_proj.weight", (DIM, DIM), torch.float32)]
        for name in ("q_proj", "k_proj", "v_proj"):
            specs += [TensorSpec(p + f"self_attn.{name}.weight", (DIM, DIM), torch.float32),
                      TensorSpec(p + f"self_attn.{name}.bias", (DIM,), torch.float32)]
        specs += [TensorSpec(p + "mlp.gate_proj.weight", (INTER, DIM), torch.float32),
                  TensorSpec(p + "mlp.up_proj.weight", (INTER, DIM), torch.float32),
                  TensorSpec(p + "mlp.down_proj.weight", (DIM, INTER), torch.float32)]
    write_tensors(path, specs, lambda s: torch.randn(s.shape), progress=False)
    (path / "model.safetensors.index.json").unlink()  # published single-file layout has no index
    (path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": VOCAB, "hidden_size": DIM,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 8,
        "num_key_value_heads": 8, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }))
    return sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


PEAK_SCRIPT = """
import resource, sys, tempfile, zoo
from zoo.conversion import convert
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
convert(sys.argv[1] + "-tiny", tempfile.mkdtemp() + "/warm", progress=False)  # imports and code paths
before = peak()
convert(sys.argv[1], sys.argv[2], progress=False, dtype=sys.argv[3] if len(sys.argv) > 3 else None)
print(before, peak())
"""


def test_conversion_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    total, largest = write_published_qwen2(tmp_path / "src")
    write_published_qwen2(tmp_path / "src-tiny", DIM=64, INTER=128, LAYERS=1, VOCAB=64)
    assert total > 25 * largest
    for dtype in ([], ["bfloat16"]):
        out = tmp_path / f"out{len(dtype)}"
        res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "src"), str(out), *dtype],
                             capture_output=True, text=True, check=True)
        before, after = map(int, res.stdout.split())
        growth = after - before
        # the model is 130 MB; in flight are one source tensor and its converted copy (a few MB)
        assert growth < 8 * largest, f"peak RSS grew {growth / 2**20:.0f} MiB converting {total / 2**20:.0f} MiB"
        assert (out / "model.safetensors").is_file()


LOAD_SCRIPT = """
import resource, sys, torch, zoo
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
zoo.load(sys.argv[1] + "-tiny")  # imports and code paths (the first meta build loads torch internals)
before = peak()
model = zoo.load(sys.argv[1])
loaded = peak()
ids = torch.tensor([[1, 2, 3]])
model(ids)
print(before, loaded, peak())
"""


def test_load_maps_the_weights_instead_of_copying_them(tmp_path):
    total, _ = write_published_qwen2(tmp_path / "src")
    write_published_qwen2(tmp_path / "src-tiny", DIM=64, INTER=128, LAYERS=1, VOCAB=64)
    subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "src"), str(tmp_path / "native")],
                   check=True, capture_output=True)
    zoo.convert(tmp_path / "src-tiny", tmp_path / "native-tiny", progress=False)
    res = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "native")],
                         capture_output=True, text=True, check=True)
    before, loaded, after_forward = map(int, res.stdout.split())
    # built on meta, tensors assigned from memory maps: loading itself touches almost nothing
    assert loaded - before < total / 10, f"load grew RSS by {(loaded - before) / 2**20:.0f} MiB"
    # running pages the weights in once (file-backed), never a second copy
    assert after_forward - before < 1.3 * total


def as_pickle(path) -> None:
    """The same published checkpoint as transformers' older layout: one pytorch_model.bin (torch.save)."""
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def test_pickled_checkpoint_conversion_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """A .bin / .pt goes through the one pickle reader (sources.PickleSource), which streams as safetensors do."""
    total, largest = write_published_qwen2(tmp_path / "src")
    write_published_qwen2(tmp_path / "src-tiny", DIM=64, INTER=128, LAYERS=1, VOCAB=64)
    as_pickle(tmp_path / "src")
    as_pickle(tmp_path / "src-tiny")
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "src"), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True)
    before, after = map(int, res.stdout.split())
    assert after - before < 8 * largest, f"peak RSS grew {(after - before) / 2**20:.0f} MiB for {total / 2**20:.0f} MiB"
    assert (tmp_path / "out" / "model.safetensors").is_file()
