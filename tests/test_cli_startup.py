"""`zoo --help`, `zoo list`, `zoo info` and `import zoo` import no torch: the registry snapshot (zoo/data/registry.json)
stands in for the architecture modules, and is proven equal to the live registry here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_shipped_registry_snapshot_equals_the_live_registry():
    from zoo.registry import SNAPSHOT, build_snapshot

    shipped = json.loads(SNAPSHOT.read_text())
    live = build_snapshot()
    assert shipped["entries"] == live["entries"], \
        "zoo/data/registry.json is stale: run `python scripts/write_registry_snapshot.py`"
    assert shipped["unused_fields"] == live["unused_fields"]
    assert shipped["fingerprint"] == live["fingerprint"], \
        "architectures/ changed since zoo/data/registry.json was written (zoo list / info would import torch): " \
        "run `python scripts/write_registry_snapshot.py`"


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "qwen2-*"], ["info", "qwen2-7b"],
                                  ["info", "wala-sv-1b"], ["info", "qwen2-tiny-stdlib"], ["info", "phi-4", "--json"],
                                  ["info", "qwen2-7bb"], ["generate", "--help"]])
def test_help_list_and_info_never_import_torch(argv):
    code = (f"import sys\nfrom zoo.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = run_python(code)
    assert out.strip().endswith("TORCH False"), out[-400:]


def test_import_zoo_is_light_and_load_arrives_on_first_use():
    out = run_python("import sys, zoo\nprint('torch' in sys.modules, zoo.list_models('qwen2-7b*'))\n"
                     "zoo.load\nprint('torch' in sys.modules)")
    first, second = out.splitlines()
    assert first == "False ['qwen2-7b', 'qwen2-7b-instruct']" and second == "True"


def test_a_snapshot_older_than_the_architectures_is_not_used(tmp_path):
    """An edited entry without a regenerated snapshot: the live registry answers (slower, never wrong)."""
    code = f"""
import json, sys, pathlib
import zoo.registry as r
d = json.loads(r.SNAPSHOT.read_text())
d["entries"][0]["description"] = "FROM THE SNAPSHOT"
fresh = pathlib.Path({str(tmp_path)!r}) / "fresh.json"
fresh.write_text(json.dumps(d))
stale = pathlib.Path({str(tmp_path)!r}) / "stale.json"
stale.write_text(json.dumps({{**d, "fingerprint": "0" * 64}}))
name = d["entries"][0]["name"]
r.SNAPSHOT = fresh
print(r.find_entry(name).description, "torch" in sys.modules)
r.SNAPSHOT, r._snapshot = stale, None
print(r.find_entry(name).description == "FROM THE SNAPSHOT", "torch" in sys.modules)
"""
    current, stale = run_python(code).splitlines()
    assert current == "FROM THE SNAPSHOT False"  # the current snapshot is what answers, without torch
    assert stale == "False True"  # a stale one is ignored: the live registry was imported


def test_snapshot_entries_are_the_live_entries():
    from zoo.registry import _entry_from_dict, get_entry, list_models

    for name in list_models():
        live = get_entry(name)
        light = _entry_from_dict(json.loads(json.dumps(live.to_dict())))
        assert json.dumps(light.to_dict()) == json.dumps(live.to_dict()) and light.source == live.source


def test_zoo_home_is_the_same_without_torch(monkeypatch, tmp_path):
    from zoo.loading import zoo_home
    from zoo.preflight import zoo_home as light_zoo_home

    assert light_zoo_home() == zoo_home()
    monkeypatch.setenv("ZOO_HOME", str(tmp_path))
    assert light_zoo_home() == zoo_home() == tmp_path
