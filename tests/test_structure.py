"""The package's shape: imports flow one way, and `import zoo` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each installed package lives in the source tree (pyproject's package-dir)
PACKAGES = {"zoo": ROOT / "zoo", "zoo.architectures": ROOT / "architectures", "zoo.weights": ROOT / "weights",
            "zoo.conversion": ROOT / "conversion"}


def zoo_modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if name.startswith("zoo.data"):
                continue
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> zoo modules it imports, anywhere in the file (inside functions too: a lazy import is still
    a dependency). Plug-in discovery (importlib.import_module over a package) is not a static import."""
    modules = zoo_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in modules:  # "zoo.tasks.ZooModel" -> "zoo.tasks"
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_zoo_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_task_interfaces_do_not_import_loading_or_distributed_code():
    graph = import_graph()
    tasks = [m for m in graph if m == "zoo.tasks" or m.startswith("zoo.tasks.")]
    assert {"zoo.tasks.text", "zoo.tasks.vision"} <= set(tasks)
    for m in tasks:
        assert not graph[m] & {"zoo.api", "zoo.loading", "zoo.tensor_parallel", "zoo.device_map"}, m


def test_loading_does_not_import_distributed_code():
    graph = import_graph()
    assert not graph["zoo.loading"] & {"zoo.tensor_parallel", "zoo.device_map", "zoo.api"}
    assert "zoo.loading" in graph["zoo.tensor_parallel"] and "zoo.loading" in graph["zoo.device_map"]


def test_import_zoo_and_generate_import_nothing_heavy():
    """DTensor (0.5 s of sympy and torch.distributed.tensor), dynamo and triton load only when asked for."""
    code = ("import sys, zoo; m = zoo.load('qwen2-tiny-stdlib'); m.generate([1, 2, 3], max_new_tokens=2); "
            "print(sorted(k for k in ('torch.distributed.tensor', 'torch._dynamo', 'triton', 'sympy', "
            "'transformers', 'timm') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_benchmarks_do_not_import_the_test_suite():
    """What benchmarks and tests share (the malformed-input corpus, the Hub server) lives in zoo.testing."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "tests" or n.startswith("tests.") for n in names), f"{path.name} imports {names}"


def test_import_zoo_leaves_the_shared_test_machinery_unimported():
    code = "import sys, zoo; print([m for m in sys.modules if m.startswith('zoo.testing')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
