"""One plug-in discovery (zoo.plugins.declared) finds families, conversion formats and tasks alike."""

from __future__ import annotations

import sys

from zoo.conversion import formats

from zoo.plugins import declared
from zoo.registry import families
from zoo.tasks import TASKS, get_task


def test_declared_imports_every_module_of_a_package_and_collects_what_each_binds(tmp_path, monkeypatch):
    pkg = tmp_path / "zoo_plugins_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("THING = 'a'\n")
    (pkg / "b.py").write_text("OTHER = 'b'\n")  # declares nothing under the name asked for
    (pkg / "c.py").write_text("THING = 'c'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert declared("zoo_plugins_probe", "THING") == ["a", "c"]
    assert "zoo_plugins_probe.b" in sys.modules  # imported all the same
    for mod in ("", ".a", ".b", ".c"):
        sys.modules.pop("zoo_plugins_probe" + mod)
    assert declared("zoo_plugins_probe") == []  # name=None: imported only (modules that register themselves)
    assert "zoo_plugins_probe.c" in sys.modules


def test_families_formats_and_tasks_are_what_their_packages_declare():
    assert {f.name for f in declared("zoo.architectures", "FAMILY")} == set(families())
    assert {f.name for group in declared("zoo.conversion", "FORMATS") for f in group} == set(formats())
    get_task("text-generation")  # discovery runs on first use
    assert {"text-generation", "image-classification"} <= set(TASKS)
