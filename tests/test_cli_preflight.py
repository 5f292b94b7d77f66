"""Everything a command can check is checked before a model is loaded or downloaded (issue 24, items 1, 3, 4):
an output is never one of the inputs, inputs exist, outputs have a known format and can be written, extras are
installed, the task runs the command and takes every option given; `--out` works for every task that produces
something."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import zoo
from zoo.cli import main


def refused(capsys, *argv: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"zoo {argv[0]}: error:"), err
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """zoo.load (which downloads a registry model on first use) fails the test if it is reached."""
    def load(*args, **kwargs):
        raise AssertionError("zoo.load was called: the check came after the expensive work")

    monkeypatch.setattr(zoo, "load", load)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def png(path: Path, w: int = 64, h: int = 48) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def natives(tmp_path_factory):
    """Tiny converted checkpoints: an image classifier (Swin V2) and a backbone (DINOv3)."""
    from zoo.testing.corpus_seeds import _timm_dinov3, _timm_swinv2

    root = tmp_path_factory.mktemp("natives")
    out = {}
    for name, build in (("swin", _timm_swinv2), ("dino", _timm_dinov3)):
        out[name] = zoo.convert(build(root / f"{name}-src"), root / name, progress=False)
    return out


def fake_native(directory: Path, task: str) -> Path:
    """A directory whose config.json names a task: enough for every check before loading."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"task": task, "family": "x", "config": {}}))
    return directory


# -- item 1: an output is never an input ----------------------------------------------------------------------------


def test_the_readme_wala_command_with_the_preview_over_the_input_image_is_refused_and_the_image_kept(
        tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chair = png(tmp_path / "chair.png")
    before = digest(chair)
    err = refused(capsys, "generate", "wala-sv-1b", "chair.png", "--out", "chair.obj", "--preview", "chair.png")
    assert "--preview chair.png" in err and "input" in err
    assert digest(chair) == before


def test_a_shape_models_default_output_over_its_condition_file_is_refused(tmp_path, capsys, no_loading,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    cloud = tmp_path / "cloud.obj"  # a point cloud as a mesh file: the default output would be cloud.obj
    cloud.write_text("v 0 0 0\n")
    err = refused(capsys, "generate", "wala-pc-1b", "cloud.obj")
    assert "--out cloud.obj" in err and "input" in err and cloud.read_text() == "v 0 0 0\n"


def test_an_output_that_is_the_input_under_another_name_is_refused(natives, tmp_path, capsys, no_loading):
    img = png(tmp_path / "cat.png")
    os.link(img, tmp_path / "hard.json")  # the same inode, another name (and a suffix --out takes)
    (tmp_path / "sym.json").symlink_to(img)
    for out in (tmp_path / "hard.json", tmp_path / "sym.json", tmp_path / "." / "sub" / ".." / "hard.json"):
        err = refused(capsys, "predict", natives["swin"], img, "--out", out)
        assert "input" in err
    assert digest(img) == digest(tmp_path / "hard.json")


def test_an_output_over_a_file_of_the_model_directory_is_refused(natives, tmp_path, capsys, no_loading):
    config = natives["swin"] / "config.json"
    before = digest(config)
    img = png(tmp_path / "cat.png")
    refused(capsys, "predict", natives["swin"], img, "--out", config.with_suffix(".json"))
    assert digest(config) == before


def test_a_segmentation_overlay_over_the_input_is_refused(tmp_path, capsys, no_loading):
    seg = fake_native(tmp_path / "seg", "image-segmentation")
    scan = png(tmp_path / "mask_overlay.png")
    err = refused(capsys, "predict", seg, scan, "--out", tmp_path / "mask.png")
    assert "mask_overlay.png" in err


def test_two_outputs_with_one_name_are_refused(tmp_path, capsys, no_loading):
    chair = png(tmp_path / "chair.png")
    (tmp_path / "p.png").symlink_to(tmp_path / "s.obj")  # the preview's name leads to the mesh's file
    err = refused(capsys, "generate", "wala-sv-1b", chair, "--out", tmp_path / "s.obj", "--preview",
                  tmp_path / "p.png")
    assert "same file" in err


@pytest.mark.parametrize("argv", [["convert", "{d}", "{d}", "--overwrite"],
                                  ["convert", "{d}", "{d}/inside"],
                                  ["convert", "{d}/src.bin", "{d}", "--overwrite"],
                                  ["convert", "--to", "hf", "{d}", "{d}", "--overwrite"]])
def test_convert_never_writes_over_or_into_its_source(tmp_path, capsys, argv):
    (tmp_path / "src.bin").write_bytes(b"published weights")
    refused(capsys, *[a.format(d=tmp_path) for a in argv])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]
    assert (tmp_path / "src.bin").read_bytes() == b"published weights"


def test_readme_and_help_examples_name_different_files_for_inputs_and_outputs():
    from zoo.cli import _parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = [line for line in readme.splitlines() if line.startswith("zoo ")]
    examples += [line.strip() for p in _parser().commands.values() for line in (p.epilog or "").splitlines()
                 if line.strip().startswith("zoo ")]
    assert len(examples) > 10
    for line in examples:
        words = line.split("#")[0].split()
        positional = [w for w in words[3:] if not w.startswith("-")]
        outs = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--preview")]
        assert len(outs) == len(set(outs)) and not set(outs) & set(positional[:1]), line


# -- item 3: checks before the expensive work ----------------------------------------------------------------------


def test_predict_with_a_backbone_is_refused_before_any_download(tmp_path, capsys, no_loading):
    err = refused(capsys, "predict", "dinov3-vits16-lvd1689m", png(tmp_path / "cat.png"))
    assert "image-feature-extraction" in err and "zoo features" in err


def test_a_missing_input_is_refused_before_loading(natives, tmp_path, capsys, no_loading):
    png(tmp_path / "a.png")
    for argv in (["predict", natives["swin"], tmp_path / "none.jpg"],
                 ["features", "dinov3-vits16-lvd1689m", tmp_path / "none.jpg"],
                 ["generate", "wala-sv-1b", tmp_path / "none.png"],
                 ["generate", "wala-rgb4-1b", f"{tmp_path}/a.png,{tmp_path}/none.png"]):  # one view of a list
        assert "none" in refused(capsys, *argv)


@pytest.mark.parametrize("argv,words", [
    (["generate", "wala-sv-1b", "{img}", "--out", "{d}/x.xyz"], ["--out", "x.xyz", ".obj"]),
    (["generate", "wala-sv-1b", "{img}", "--preview", "{d}/x.gif"], ["--preview", "x.gif", ".png"]),
    (["predict", "swinv2-tiny-w8-256-in1k", "{img}", "--out", "{d}/labels.txt"], ["labels.txt", ".json"]),
    (["features", "dinov3-vits16-lvd1689m", "{img}", "--out", "{d}/f.npy"], ["f.npy", ".safetensors"]),
    (["predict", "swinv2-tiny-w8-256-in1k", "{img}", "--out", "{img}/labels.json"], ["is a file, not a directory"]),
    (["predict", "swinv2-tiny-w8-256-in1k", "{img}", "--out", "{d}"], ["is a directory"]),
])
def test_an_output_of_unknown_format_or_in_an_impossible_place_is_refused_before_loading(argv, words, tmp_path,
                                                                                         capsys, no_loading):
    img = png(tmp_path / "cat.png")
    err = refused(capsys, *[a.format(img=img, d=tmp_path) for a in argv])
    assert all(w in err for w in words), err


@pytest.mark.parametrize("module,argv,extra", [
    ("mcubes", ["generate", "wala-sv-1b", "{img}", "--out", "{d}/c.obj"], "shapes"),
    ("pywt", ["generate", "wala-sv-1b", "{img}"], "shapes"),
    ("av", ["predict", "videomae2-s-k710-distilled", "{img}"], "video"),
])
def test_a_missing_extra_is_refused_before_loading(module, argv, extra, tmp_path, capsys, no_loading, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, *[a.format(img=png(tmp_path / "chair.png"), d=tmp_path) for a in argv])
    assert module in err and f"pip install 'zoo[{extra}]'" in err


def test_an_hf_address_gets_the_same_checks_once_loaded(natives, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(zoo, "load", lambda ref, **kw: __import__("zoo.api").api.load(natives["dino"], **kw))
    err = refused(capsys, "predict", "hf://someone/dino", png(tmp_path / "cat.png"))
    assert "zoo features" in err


# -- item 4: no option ignored, --out for every task ----------------------------------------------------------------


@pytest.mark.parametrize("argv,flag", [
    (["generate", "qwen2-tiny-stdlib", "x", "--steps", "3"], "--steps"),
    (["generate", "qwen2-tiny-stdlib", "x", "--guidance", "2"], "--guidance"),
    (["generate", "qwen2-tiny-stdlib", "x", "--preview", "p.png"], "--preview"),
    (["generate", "wala-sv-1b", "{img}", "--max-new-tokens", "128"], "--max-new-tokens"),  # even at its default
    (["generate", "wala-sv-1b", "{img}", "--temperature", "0.7"], "--temperature"),
    (["generate", "wala-sv-1b", "{img}", "--no-compile"], "--no-compile"),
    (["predict", "{seg}", "{img}", "--top-k", "3"], "--top-k"),
    (["features", "dinov3-vits16-lvd1689m", "{img}", "--top-k", "3"], "--top-k"),
])
def test_an_option_the_task_does_not_take_is_refused_by_name(argv, flag, tmp_path, capsys, no_loading):
    img, seg = png(tmp_path / "cat.png"), fake_native(tmp_path / "seg", "image-segmentation")
    args = [a.format(img=img, seg=seg) for a in argv]
    if argv[0] == "features" and flag == "--top-k":  # not an option of the command at all: argparse says so
        assert main(args) == 2 and "--top-k" in capsys.readouterr().err
        return
    err = refused(capsys, *args)
    assert f"{flag}:" in err and "takes no" in err


def test_every_option_of_the_task_commands_is_taken_by_some_task():
    from zoo.cli import _parser
    from zoo.preflight import COMMON
    from zoo.tasks import TASKS, tasks_for

    parsers = _parser().commands
    for command in ("generate", "predict", "features"):
        taken = set(COMMON).union(*(TASKS[t].commands[command].options for t in tasks_for(command)))
        options = {a.dest for a in parsers[command]._actions if a.option_strings and a.dest != "help"}
        assert options <= taken, f"zoo {command}: no task takes {sorted(options - taken)}"


def test_text_out_writes_what_was_printed(tmp_path, capsys):
    out = tmp_path / "deep" / "fib.py"
    assert main(["generate", "qwen2-tiny-stdlib", "def fib(n):", "--max-new-tokens", "12", "--seed", "0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed and printed.startswith("def fib(n):")
    assert not [p for p in out.parent.iterdir() if p.name != "fib.py"]  # no temporary file left


def test_predict_out_writes_the_labels_as_json(natives, tmp_path, capsys):
    img = png(tmp_path / "cat.png")
    assert main(["predict", str(natives["swin"]), str(img), "--top-k", "3", "--out", str(tmp_path / "l.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    data = json.loads((tmp_path / "l.json").read_text())
    assert [d["label"] for d in data["top_k"]] == [line.split(None, 1)[1] for line in printed]
    assert len(data["top_k"]) == 3 and data["input"] == str(img)


def test_outputs_go_into_directories_made_for_them(natives, tmp_path, capsys):
    from zoo.testing.corpus_seeds import _nnunet_dinounet

    img = png(tmp_path / "cat.png")
    assert main(["predict", str(natives["swin"]), str(img), "--out", str(tmp_path / "a" / "b" / "l.json")]) == 0
    assert json.loads((tmp_path / "a" / "b" / "l.json").read_text())["top_k"]
    seg = zoo.convert(_nnunet_dinounet(tmp_path / "nnunet"), tmp_path / "seg", progress=False)
    assert main(["predict", str(seg), str(img), "--out", str(tmp_path / "masks" / "m.png")]) == 0
    assert {p.name for p in (tmp_path / "masks").iterdir()} == {"m.png", "m_overlay.png"}


def test_predict_without_top_k_uses_the_default_of_five(natives, tmp_path, capsys):
    assert main(["predict", str(natives["swin"]), str(png(tmp_path / "cat.png"))]) == 0
    assert len(capsys.readouterr().out.splitlines()) == min(5, zoo.load(natives["swin"]).config.num_classes)


# -- item 5: backbones on the command line ---------------------------------------------------------------------------


def test_zoo_features_writes_the_backbones_features_as_safetensors(natives, tmp_path, capsys):
    from safetensors.torch import load_file

    model = zoo.load(natives["dino"])
    img = png(tmp_path / "cat.png", 40, 36)
    assert main(["features", str(natives["dino"]), str(img), "--out", str(tmp_path / "f.safetensors")]) == 0
    pooled = load_file(tmp_path / "f.safetensors")
    assert set(pooled) == {"features"}
    assert np.allclose(pooled["features"].numpy(), model.features(str(img)).numpy(), atol=1e-5)
    assert main(["features", str(natives["dino"]), str(img), "--dense", "--out", str(tmp_path / "d.safetensors")]) == 0
    dense = load_file(tmp_path / "d.safetensors")
    feats = model.features(str(img), pooled=False)
    assert set(dense) == {"cls_token", "patch_tokens", "register_tokens"}
    assert dense["patch_tokens"].shape == feats.patch_tokens.shape
    assert "patch_tokens" in capsys.readouterr().out


def test_a_classifier_gives_its_pooled_features_too(natives, tmp_path, capsys):
    assert main(["features", str(natives["swin"]), str(png(tmp_path / "cat.png"))]) == 0
    assert capsys.readouterr().out.startswith("features  [1, ")


def test_check_command_fills_the_default_output_beside_nothing_it_reads(tmp_path, monkeypatch):
    from zoo.preflight import Target, check_command

    monkeypatch.chdir(tmp_path)
    png(tmp_path / "chair.png")
    args = argparse.Namespace(prompt="chair.png", out=None, preview=None)
    spec = check_command("generate", Target("x", "shape-generation"), {}, args)
    assert args.out == "chair.obj" and spec.extra == "shapes"
