"""Registry lookups and the `zoo` command line."""

import io
import json
from contextlib import redirect_stdout

import pytest

import zoo
from zoo.cli import main

PUBLISHED = {  # Qwen2 technical report, Table 1
    "qwen2-0.5b": (896, 24, 14, 2, 4864, True, 0.49e9),
    "qwen2-1.5b": (1536, 28, 12, 2, 8960, True, 1.54e9),
    "qwen2-7b": (3584, 28, 28, 4, 18944, False, 7.6e9),
    "qwen2-72b": (8192, 80, 64, 8, 29568, False, 72.7e9),
}


def run(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(list(argv))
    return code, buf.getvalue()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_qwen2_size_is_registered_base_and_instruct_with_published_numbers(name):
    dim, layers, heads, kv, inter, tied, params = PUBLISHED[name]
    for variant in (name, name + "-instruct"):
        info = zoo.model_info(variant)
        c = info["config"]
        assert (c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["intermediate_size"]) == (
            dim, layers, heads, kv, inter)
        assert c["tie_embeddings"] is tied and c["rope_theta"] == 1e6
        assert abs(info["params"] - params) / params < 0.01
        assert info["source"]["repo"].startswith("Qwen/Qwen2-") and info["license"] and info["paper"]
    assert zoo.model_info("qwen2-72b")["config"]["norm_eps"] == 1e-5  # the base config's own value
    assert zoo.model_info("qwen2-72b-instruct")["config"]["norm_eps"] == 1e-6


def test_list_models_filters_by_pattern():
    assert "qwen2-7b" in zoo.list_models()
    assert set(zoo.list_models("qwen2-7b*")) == {"qwen2-7b", "qwen2-7b-instruct"}
    assert zoo.list_models("no-such-thing") == []


def test_cli_list_and_info_show_published_numbers():
    code, out = run("list", "qwen2-*")
    assert code == 0 and "qwen2-0.5b" in out and "Qwen/Qwen2-0.5B" in out
    code, out = run("info", "qwen2-7b")
    assert code == 0 and "18944" in out and "apache-2.0" in out
    code, out = run("info", "qwen2-7b", "--json")
    assert json.loads(out)["config"]["dim"] == 3584


@pytest.mark.parametrize("command", ["list", "info", "convert", "generate", "predict", "features", "push", "pull"])
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_cli_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "qwen2-7bb"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


def test_cli_generate_streams_the_embedded_default(capsys):
    assert main(["generate", "qwen2-tiny-stdlib", "def fibonacci(n):", "--max-new-tokens", "16", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def fibonacci(n):") and len(out) > len("def fibonacci(n):\n")


def test_cli_convert_and_export_round_trip(tmp_path, capsys):
    from tests.helpers import tiny_qwen2

    tiny_qwen2(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert (tmp_path / "native" / "README.md").read_text().count("zoo convert") >= 1
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "native")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--to", "hf", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "qwen2"
