"""Every user-facing argument is checked where it enters, Python API and CLI alike: the error names the argument
and its value and says what is allowed; the CLI prints it on one line and exits non-zero, without a traceback.
Images in any common mode work (converted correctly); junk, empty files and decompression bombs are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from zoo.weights.format import CheckpointError

import zoo
from zoo.cli import main
from zoo.testing.corpus import png_bytes, write_frameless_video

ROOT = Path(__file__).resolve().parents[1]
TINY = "qwen2-tiny-stdlib"


@pytest.fixture(scope="module")
def text_model():
    return zoo.load(TINY)


# ------------------------------------------------------------------------------------ zoo.load arguments


@pytest.mark.parametrize("kwargs,words", [
    (dict(dtype="float8"), ["dtype='float8'", "bfloat16"]),
    (dict(dtype="int8"), ["dtype='int8'"]),
    (dict(dtype=torch.int64), ["dtype=torch.int64", "floating"]),
    (dict(dtype=16), ["dtype=16"]),
    (dict(device="gpu"), ["device='gpu'", "'cpu'"]),
    (dict(device="cuda:99"), ["device='cuda:99'"]),
    (dict(device="meta"), ["device='meta'", "no data"]),
    (dict(device=-1), ["device=-1"]),
    (dict(tp=0), ["tp=0", ">= 1"]),
    (dict(tp=-2), ["tp=-2"]),
    (dict(tp="2"), ["tp='2'", "integer"]),
    (dict(tp=1.5), ["tp=1.5"]),
    (dict(tp=True), ["tp=True"]),
    (dict(quantize="int3"), ["quantize='int3'", "int8"]),
    (dict(quantize=8), ["quantize=8"]),
    (dict(device_map="balanced"), ["device_map='balanced'", "'auto'"]),
    (dict(device_map={}), ["device_map={}"]),
    (dict(device_map={0: "cpu"}), ["device_map key 0"]),
    (dict(max_memory={"cpu": "1GiB"}), ["max_memory", "device_map='auto'"]),
    (dict(device_map="auto", max_memory=["1GiB"]), ["max_memory=['1GiB']"]),
    (dict(revision="v1"), ["revision='v1'", "hf://"]),
    (dict(verify="yes"), ["verify='yes'", "True or False"]),
    (dict(device="cuda:0", device_map="auto"), ["device='cuda:0'", "device_map"]),
])
def test_load_refuses_a_bad_argument_by_name_before_reading_anything(kwargs, words, monkeypatch):
    import zoo.api

    monkeypatch.setattr(zoo.api, "resolve", lambda *a: pytest.fail("resolved the name before checking arguments"))
    with pytest.raises(ValueError) as e:
        zoo.load(TINY, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("name,error,words", [
    ("", ValueError, ["name_or_path=''", "registry name"]),
    (None, ValueError, ["name_or_path=None"]),
    (42, ValueError, ["name_or_path=42"]),
    ("./no/such/dir", FileNotFoundError, ["no/such/dir"]),
])
def test_load_refuses_a_bad_name_by_name(name, error, words):
    with pytest.raises(error) as e:
        zoo.load(name)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_file_given_to_load_says_to_convert_it(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: is a file.*zoo convert"):
        zoo.load(tmp_path / "model.safetensors")


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), (" BFloat16 ", torch.bfloat16),
                                            ("torch.float16", torch.float16), ("fp32", torch.float32),
                                            (torch.float64, torch.float64)])
def test_dtype_names_are_read_in_their_usual_spellings(dtype, expected):
    assert zoo.load(TINY, dtype=dtype).dtype == expected


def test_device_names_that_exist_are_accepted_and_others_say_what_this_machine_has():
    from zoo.checks import check_device

    assert check_device("cpu") == check_device(" CPU ") == check_device(torch.device("cpu")) == torch.device("cpu")
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"device='cuda:{n}'") as e:
        check_device(f"cuda:{n}")
    assert ("no CUDA device" if n == 0 else f"cuda:0..cuda:{n - 1}") in str(e.value)
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device='mps': MPS"):
            check_device("mps")
    with pytest.raises(ValueError, match=r"device='tpu:0'.*does not exist|device='tpu:0'"):
        zoo.load(TINY, device="tpu:0")


def test_tp_of_one_is_a_plain_load(text_model):
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(zoo.load(TINY, tp=1)(ids), text_model(ids))


def test_quantize_by_name_loads_and_a_wrong_name_lists_the_schemes():
    assert zoo.load(TINY, quantize="int8").generate([1, 2, 3], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"quantize='int5': unknown scheme; use one of .*'int4'.*'int8'"):
        zoo.load(TINY, quantize="int5")


# ----------------------------------------------------------------------------- repo ids and revisions


@pytest.mark.parametrize("call", [
    lambda: zoo.load("hf://acme/x y"),
    lambda: zoo.load("hf://acme/x@a..b"),
    lambda: zoo.load("hf://acme/x", revision="-rf"),
    lambda: zoo.load("hf://acme/x@"),
    lambda: __import__("zoo.hub").hub.pull("a/b/c"),
    lambda: __import__("zoo.hub").hub.pull("acme/x", revision="my branch"),
    lambda: __import__("zoo.hub").hub.push("/nonexistent", "bad id"),
    lambda: __import__("zoo.hub").hub.push("/nonexistent", "acme/x", revision="v1.lock"),
])
def test_every_hub_entry_point_checks_repo_ids_and_revisions_before_any_request(call, monkeypatch):
    from zoo.testing.olah_server import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # a request would be a ConnectionError
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ValueError, match="not a valid"):
        call()


def test_a_registry_entry_with_a_bad_source_repo_is_refused_before_downloading(monkeypatch):
    from zoo.registry import _ENTRIES, Source, get_entry

    entry = replace(get_entry("qwen2-0.5b"), name="qwen2-bad-source", source=Source(repo="Qwen/Qwen2 0.5B",
                                                                                     layout="hf-qwen2"))
    monkeypatch.setitem(_ENTRIES, entry.name, entry)
    with pytest.raises(ValueError, match=r"'Qwen/Qwen2 0.5B' is not a valid Hub repository id"):
        zoo.load("qwen2-bad-source")


# ---------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("argv,words", [
    (["generate", TINY, "x", "--device", "gpu"], ["zoo generate: error:", "--device gpu"]),
    (["generate", TINY, "x", "--dtype", "int8"], ["--dtype int8"]),
    (["generate", TINY, "x", "--tp", "0"], ["--tp 0"]),
    (["generate", TINY, "x", "--quantize", "int3"], ["--quantize int3"]),
    (["generate", TINY, "x", "--max-new-tokens", "abc"], ["zoo generate: error:", "--max-new-tokens", "'abc'"]),
    (["generate", TINY, "x", "--top-p", "2", "--temperature", "1"], ["--top-p 2.0"]),
    (["convert", "a", "b", "--max-shard-size", "0"], ["--max-shard-size 0.0"]),
    (["convert", "--to", "hf", "--dtype", "bf16", "a", "b"], ["--dtype"]),
    (["predict", TINY, "x.png", "--top-k", "0"], ["--top-k 0"]),
    (["pull", "acme/x@"], ["'acme/x@'"]),
    (["frobnicate"], ["zoo: error:", "'frobnicate'"]),
    ([], ["zoo: error:", "command"]),
])
def test_cli_errors_are_one_line_naming_the_argument_with_exit_status_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_cli_in_a_real_process_exits_2_with_one_line_and_no_traceback():
    for argv in (["generate", TINY, "x", "--device", "gpu"], ["generate", TINY, "x", "--max-new-tokens", "-3"]):
        r = subprocess.run([sys.executable, "-m", "zoo", *argv], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("zoo generate: error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("error,words", [
    (ImportError("No module named 'av'", name="av"), ["No module named 'av'", "pip install av"]),
    (MemoryError("out of memory"), ["out of memory"]),
    (OSError(28, "No space left on device"), ["No space left on device"]),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), ["CUDA out of memory", "more"]),
])
def test_cli_reports_each_expected_kind_of_error_on_one_line(error, words, monkeypatch, capsys):
    import zoo.cli

    def fail(args):
        raise error

    monkeypatch.setattr(zoo.cli, "_cmd_list", fail)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoo list: error:") and all(w in err for w in words), err


def test_cli_interrupt_exits_130(monkeypatch, capsys):
    import zoo.cli

    monkeypatch.setattr(zoo.cli, "_cmd_list", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["list"]) == 130 and "interrupted" in capsys.readouterr().err


def test_zoo_list_columns_line_up_with_names_longer_than_32_characters(monkeypatch, capsys):
    from zoo.registry import _ENTRIES, get_entry

    long = replace(get_entry("qwen2-0.5b"), name="qwen2-0.5b-with-a-name-much-longer-than-thirty-two-characters")
    monkeypatch.setitem(_ENTRIES, long.name, long)
    assert main(["list", "qwen2-0.5b"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["NAME", "FAMILY", "TASK"]
    assert len(lines) >= 3 and any(line.startswith(long.name + " ") for line in lines)
    columns = {line.index(" qwen2 ") for line in lines}  # the family column starts at the same place on every line
    repos = {line.index("Qwen/") for line in lines}
    assert len(columns) == 1 and len(repos) == 1, "\n".join(lines)


# -------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    from tests.test_swinv2 import save_timm, tiny_timm

    d = tmp_path_factory.mktemp("swin")
    save_timm(tiny_timm(), d / "timm")
    return zoo.load(zoo.convert(d / "timm", d / "native", progress=False))


def pixels(h=70, w=90, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.linspace(0, 255, h * w * 3).reshape(h, w, 3) * 0.6 + rng.integers(0, 100, (h, w, 3))).astype(np.uint8)


def same(a, b) -> bool:
    return all(la == lb and abs(sa - sb) < 1e-6 for (la, sa), (lb, sb) in zip(a, b))


def test_grayscale_rgba_palette_cmyk_and_one_bit_images_are_converted_to_rgb(swin, tmp_path):
    rgb = pixels()
    gray = rgb[..., 0]
    cases = {  # file written in that mode -> the RGB pixels it stands for
        "gray.png": (Image.fromarray(gray), np.stack([gray] * 3, -1)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full(gray.shape, 128, np.uint8)])), rgb),
        "la.png": (Image.fromarray(np.dstack([gray, gray])), np.stack([gray] * 3, -1)),
        "bits.png": (Image.fromarray(gray > 128), np.stack([(gray > 128) * np.uint8(255)] * 3, -1)),
    }
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 0
    cases["palette.png"] = (palette, np.asarray(palette.convert("RGBA").convert("RGB")))
    cases["cmyk.jpg"] = (Image.fromarray(rgb).convert("CMYK"), None)
    for name, (img, expected) in cases.items():
        img.save(tmp_path / name, **({"quality": 100} if name.endswith(".jpg") else {}))
        from_file = expected if expected is not None else np.asarray(Image.open(tmp_path / name).convert("RGB"))
        in_memory = expected if expected is not None else np.asarray(img.convert("RGB"))  # JPEG is lossy
        assert same(swin.predict(tmp_path / name, top_k=3), swin.predict(from_file, top_k=3)), name
        assert same(swin.predict(img, top_k=3), swin.predict(in_memory, top_k=3)), name  # a PIL image in memory


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(swin, tmp_path):
    wide = (pixels()[..., 0].astype(np.uint16) * 257)  # 0..65535
    Image.fromarray(wide).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    eight = np.stack([(wide.astype(np.int64) * 255 + 32767) // 65535] * 3, -1).astype(np.uint8)
    assert same(swin.predict(tmp_path / "gray16.png"), swin.predict(eight))
    assert not same(swin.predict(tmp_path / "gray16.png"), swin.predict(np.full_like(eight, 255)))  # not clipped
    assert same(swin.predict(wide), swin.predict(eight))  # a uint16 array, too

    rgb = pixels(20, 24)  # a 16-bit RGB PNG (PIL reads its high bytes)
    rows = b"".join(b"\x00" + (row.astype(">u2") * 257).tobytes() for row in rgb)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(24, 20, bit_depth=16, color_type=2, rows=rows))
    assert same(swin.predict(tmp_path / "rgb16.png"), swin.predict(rgb))


@pytest.mark.parametrize("name,data,words", [
    ("empty.png", b"", ["empty.png", "the file is empty"]),
    ("junk.png", b"not an image" * 10, ["junk.png", "not a readable image"]),
    ("bomb.png", png_bytes(30_000, 30_000, bit_depth=1, color_type=0), ["bomb.png", "decompression", "MAX_IMAGE"]),
    ("big.png", png_bytes(10_000, 10_000, bit_depth=1, color_type=0), ["big.png", "decompression", "100000000"]),
])
def test_unreadable_empty_and_oversized_images_are_refused_by_name(swin, tmp_path, name, data, words, capsys):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError) as e:
        swin.predict(tmp_path / name)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert main(["predict", str(swin.directory), str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err


def test_float_images_directories_and_bad_arrays_are_refused_by_name(swin, tmp_path):
    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"f\.tiff.*32-bit floats"):
        swin.predict(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"is a directory"):
        swin.predict(tmp_path)
    for array, words in [(np.zeros((8, 8, 3)), "float64"), (np.full((8, 8), 300), "300"), ([], "empty"),
                         (np.zeros((0, 5), np.uint8), "empty"), (np.zeros((8, 8, 2), np.uint8), "2 channels")]:
        with pytest.raises(ValueError, match=words):
            swin.predict(array)
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"top_k={k}"):
            swin.predict(pixels(), top_k=k)
    with pytest.raises(ValueError, match=r"model\(x\).*uint8"):
        swin(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_arrays_in_every_layout_and_integer_type_are_accepted(swin):
    rgb = pixels()
    gray = rgb[..., 1]
    base = swin.predict(np.stack([gray] * 3, -1))
    assert same(swin.predict(gray), base) and same(swin.predict(gray[..., None]), base)
    assert same(swin.predict(gray.astype(np.int64)), base)  # integers in 0..255
    assert same(swin.predict(torch.from_numpy(rgb).permute(2, 0, 1)), swin.predict(rgb))  # a CHW uint8 tensor


# -------------------------------------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    from tests.test_videomae2 import tiny_hf

    d = tmp_path_factory.mktemp("video")
    tiny_hf().save_pretrained(d / "hf")
    return zoo.load(zoo.convert(d / "hf", d / "native", progress=False))


def decoded(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_a_video_shorter_than_the_clip_spreads_its_frames_over_it(video_model, tmp_path):
    from tests.test_vision_predict import write_video
    from zoo.tasks.vision import sample_indices

    clip = video_model.native.extra["num_frames"]
    path = write_video(tmp_path / "short.mp4", n=clip - 1)
    frames = decoded(path)
    assert len(frames) == clip - 1
    indices = sample_indices(len(frames), clip, 1)
    assert indices == sorted(indices) and len(indices) == clip and set(indices) == set(range(clip - 1))
    assert same(video_model.predict(path), video_model.predict([frames[i] for i in indices]))


def test_a_long_video_keeps_only_the_frames_of_its_clip(video_model, tmp_path, monkeypatch):
    import zoo.tasks.vision as vision
    from tests.test_vision_predict import write_video

    path = write_video(tmp_path / "long.mp4", n=40)
    kept = []
    real = vision.to_rgb
    monkeypatch.setattr(vision, "to_rgb", lambda img, what="": kept.append(what) or real(img, what))
    video_model.predict(path)
    frames, stride = video_model._frames_needed()
    assert len(kept) == len(set(vision.sample_indices(40, frames, stride))) == frames


def test_videos_without_frames_are_refused_by_name(video_model, tmp_path):
    write_frameless_video(tmp_path / "frameless.avi")
    with pytest.raises(ValueError, match=r"frameless\.avi: the video has no frames"):
        video_model.predict(tmp_path / "frameless.avi")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.mp4: not a readable video \(the file is empty\)"):
        video_model.predict(tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match="the video has no frames"):
        video_model.predict([])
    with pytest.raises(ValueError, match=r"\[frames, height, width, 3\]"):
        video_model.predict(torch.zeros(8, 8, 3, dtype=torch.uint8))


# ------------------------------------------------------------------------------------ convert and export


@pytest.fixture
def published(tmp_path):
    from tests.helpers import tiny_qwen2

    tiny_qwen2(tmp_path / "hf", tie=False)
    return tmp_path / "hf"


def test_convert_refuses_an_output_that_would_replace_its_source(published, tmp_path):
    before = sorted(p.name for p in published.iterdir())
    with pytest.raises(ValueError, match=r"out=.*would replace the source"):
        zoo.convert(published, published, overwrite=True, progress=False)
    with pytest.raises(ValueError, match=r"would replace the source"):
        zoo.convert(published, tmp_path, overwrite=True, progress=False)  # OUT holds the source
    assert sorted(p.name for p in published.iterdir()) == before
    with pytest.raises(ValueError, match=r"src='': expected a path"):
        zoo.convert("", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"max_shard_bytes=0"):
        zoo.convert(published, tmp_path / "out", max_shard_bytes=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_nan_in_a_config_is_refused_at_convert_and_at_load(published, tmp_path):
    native = zoo.convert(published, tmp_path / "native", progress=False)
    cfg = json.loads((published / "config.json").read_text())
    (published / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": float("nan")}))
    with pytest.raises(CheckpointError, match=r"config value .* is NaN"):
        zoo.convert(published, tmp_path / "out", progress=False)
    cfg = json.loads((native / "config.json").read_text())
    cfg["config"]["norm_eps"] = float("nan")
    (native / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: config value norm_eps is NaN"):
        zoo.load(native)


def test_a_safetensors_header_entry_that_lies_is_refused_naming_the_tensor(published, tmp_path):
    import struct

    path = published / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s * 2 for s in header[key]["shape"]]  # more elements than its offsets hold
    raw = json.dumps(header).encode().ljust(n)
    path.write_bytes(data[:8] + raw[:n] + data[8 + n:] if len(raw) == n else struct.pack("<Q", len(raw)) + raw
                     + data[8 + n:])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {key}: offsets"):
        zoo.convert(published, tmp_path / "out", progress=False)


def test_export_verifies_the_checkpoint_before_writing(published, tmp_path):
    native = zoo.convert(published, tmp_path / "native", progress=False)
    shard = native / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        zoo.export(native, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()
