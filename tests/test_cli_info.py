"""What `zoo list` and `zoo info` tell before a download (sizes, memory, licences), backbones named as such, and
messages in the words the user typed (issue 24, items 5, 7, 8)."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest

import zoo
from zoo.cli import main
from zoo.registry import disk_bytes, download_bytes, find_entry, license_link, list_models, memory_bytes


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def info_fields(text: str) -> dict[str, str]:
    """`  key  value` lines of zoo info's facts block -> {key: value}."""
    out = {}
    for line in text.splitlines()[1:]:
        if line.startswith("  published config"):
            break
        key, value = re.match(r"  (\S+(?: \S+)*?)\s{2,}(.*)", line).groups()
        out[key] = value
    return out


# -- item 7: sizes and licences --------------------------------------------------------------------------------------


def test_zoo_list_has_a_header_and_download_and_disk_sizes():
    code, out, err = run("list", "qwen2-72b")
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "FAMILY", "TASK", "PARAMS", "DOWNLOAD", "DISK", "LICENSE", "SOURCE"]
    row = next(r for r in rows if r.startswith("qwen2-72b "))
    assert "145 GB" in row and "tongyi-qianwen" in row  # 72.7B parameters in bf16
    assert "twice the disk" in err and "hf cache rm" in err
    code, out, _ = run("list", "tiny-stdlib")
    assert "ships inside zoo" in out


def test_sizes_follow_the_parameters_and_the_published_bytes():
    qwen, swin, glm8 = find_entry("qwen2-7b"), find_entry("swinv2-tiny-w8-256-in1k"), find_entry("glm-130b-int8")
    assert download_bytes(qwen) == disk_bytes(qwen) == 2 * qwen.params  # bf16 as published
    assert download_bytes(swin) == 4 * swin.params  # fp32
    assert disk_bytes(glm8) == glm8.params  # the published INT8 ranks
    assert download_bytes(find_entry("qwen2-tiny-stdlib")) is None  # nothing to fetch
    assert memory_bytes(qwen) == {"bf16": 2 * qwen.params, "int8": qwen.params, "int4": qwen.params // 2}


def test_zoo_info_gives_download_disk_memory_and_how_to_free_the_cache():
    code, out, _ = run("info", "qwen2-72b")
    facts = info_fields(out)
    assert facts["download"].startswith("about 145 GB") and "hf cache rm model/Qwen/Qwen2-72B" in facts["download"]
    assert "about 145 GB converted" in facts["disk"] and "twice" in facts["disk"]
    assert facts["memory"].startswith("bf16 145 GB, int8 72.7 GB, int4 36.4 GB")


def test_a_first_use_says_how_much_it_fetches_before_the_bytes_move(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    code, out, err = run("generate", "qwen2-72b", "hi")
    assert code == 2 and "downloading about 145 GB" in err
    assert err.index("downloading about 145 GB") < err.index("error:")  # said first, then the offline refusal
    assert out == ""


@pytest.mark.parametrize("name", list_models())
def test_every_entry_names_its_license_and_links_it(name):
    e = find_entry(name)
    assert e.license not in ("", "other", "unknown"), e.license
    assert license_link(e).startswith("https://")
    code, out, _ = run("info", name)
    facts = info_fields(out)
    assert license_link(e) in facts["license"]
    assert "download" in facts and ("disk" in facts or e.source.host == "package") and "memory" in facts


def test_the_videomae2_k710_entries_carry_their_siblings_license():
    licenses = {find_entry(n).license for n in list_models("videomae2-*")}
    assert licenses == {"cc-by-nc-4.0"}


def test_zoo_info_of_the_embedded_model_shows_its_held_out_loss():
    code, out, _ = run("info", "qwen2-tiny-stdlib")
    facts = info_fields(out)
    native = json.loads((zoo.resolve("qwen2-tiny-stdlib") / "config.json").read_text())
    assert facts["held-out loss"].startswith(f"{native['extra']['training']['held_out_loss']} nats/token")


# -- item 8: zoo info reads well ---------------------------------------------------------------------------------------


def test_zoo_info_aligns_long_keys_and_hides_fields_the_model_does_not_use():
    code, out, _ = run("info", "wala-sv-1b")
    config = out.split("published config:\n")[1].splitlines()
    rows = [line for line in config if not line.strip().startswith("(")]
    starts = {len(line) - len(line[4:].split(None, 1)[1]) for line in rows}  # where each value begins
    assert len(starts) == 1, "values not aligned"
    keys = {line.split()[0] for line in rows}
    assert "image_encoder_depth" in keys and not any(k.startswith(("point_", "voxel_")) for k in keys)
    assert "not shown" in out
    code, out, _ = run("info", "wala-pc-1b")
    keys = {line.split()[0] for line in out.split("published config:\n")[1].splitlines() if line[4:5] != "("}
    assert "point_dims" in keys and "image_encoder_depth" not in keys
    code, out, _ = run("info", "phi-4")
    assert "short_factor" not in out and "rope_factor " not in out
    assert json.loads(run("info", "phi-4", "--json")[1])["config"]["short_factor"] == []  # --json keeps everything


# -- item 5: backbones -------------------------------------------------------------------------------------------------


def test_dinov3_is_a_feature_extraction_model_in_list_info_and_its_card(tmp_path):
    from zoo.cards import validate_card
    from zoo.testing.corpus_seeds import _timm_dinov3

    assert {find_entry(n).task for n in list_models("dinov3-*")} == {"image-feature-extraction"}
    assert "image-feature-extraction" in run("list", "dinov3-vits16")[1]
    assert info_fields(run("info", "dinov3-vits16-lvd1689m")[1])["task"] == "image-feature-extraction"
    native = zoo.convert(_timm_dinov3(tmp_path / "src"), tmp_path / "native", progress=False)
    card = (native / "README.md").read_text()
    assert validate_card(card).pipeline_tag == "image-feature-extraction" and "zoo features" in card


# -- item 8: messages in the user's words ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv,says,not_says", [
    (["generate", "qwen2-tiny-stdlib", "x", "--max-new-tokens", "-1"], "--max-new-tokens -1", "max_new_tokens="),
    (["generate", "qwen2-tiny-stdlib", "x", "--device", "gpu"], "--device gpu", "device="),
    (["generate", "qwen2-tiny-stdlib", "x", "--temperature", "-1"], "--temperature -1", "temperature="),
    (["pull", "a/b/c"], "one '/' between the owner and the name", "repo_type"),
    (["generate", "qwen2-tiny-stdlib", "x", "--top-p", "2", "--temperature", "1"], "0 < --top-p <= 1", "None"),
])
def test_errors_speak_of_the_flags_the_user_typed(argv, says, not_says):
    code, _, err = run(*argv)
    assert code == 2 and says in err and not_says not in err, err


def test_an_existing_output_asks_for_the_flag_not_the_python_argument(tmp_path):
    from tests.helpers import tiny_qwen2

    tiny_qwen2(tmp_path / "hf")
    (tmp_path / "native").mkdir()
    code, _, err = run("convert", tmp_path / "hf", tmp_path / "native")
    assert code == 2 and "pass --overwrite" in err and "overwrite=True" not in err


def test_a_model_of_another_task_is_named_with_the_right_article(tmp_path):
    from zoo.testing.corpus_seeds import _timm_swinv2

    native = zoo.convert(_timm_swinv2(tmp_path / "src"), tmp_path / "native", progress=False)
    code, _, err = run("generate", native, "x")
    assert "is an image-classification model" in err and "try `zoo predict`" in err
    code, _, err = run("predict", "qwen2-tiny-stdlib", tmp_path / "x.png")
    assert "is a text-generation model" in err


def test_timms_swinv2_cr_is_named_as_not_supported(tmp_path):
    src = tmp_path / "swinv2_cr"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architecture": "swinv2_cr_tiny_ns_224", "num_classes": 1000}))
    (src / "model.safetensors").write_bytes(b"")
    code, _, err = run("convert", src, tmp_path / "out")
    assert code == 2 and "swinv2_cr is not supported; zoo reads swinv2_* (timm)" in err, err
