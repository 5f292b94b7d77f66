"""zoo: a PyTorch model zoo and checkpoint hub.

    import zoo
    zoo.list_models("qwen2-*")
    model = zoo.load("qwen2-tiny-stdlib")
    print(model.generate("def fibonacci(n):", max_new_tokens=64))

`import zoo` imports no torch: load and resolve come in on first use (module __getattr__), and list_models /
model_info read the registry snapshot (zoo/registry.py), so `zoo list` and `zoo info` start in a blink.
"""

from typing import Any

from zoo.registry import list_models, model_info


def __getattr__(name: str) -> Any:
    if name == "load":
        from zoo.api import load

        return load
    if name == "resolve":
        from zoo.loading import resolve

        return resolve
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def convert(*args, **kwargs):
    """Convert a published checkpoint into the native format (see zoo.conversion.convert)."""
    from zoo.conversion import convert as _convert

    return _convert(*args, **kwargs)


def export(*args, **kwargs):
    """Export a native checkpoint back to a published layout (see zoo.conversion.export)."""
    from zoo.conversion import export as _export

    return _export(*args, **kwargs)


__all__ = ["convert", "export", "list_models", "load", "model_info", "resolve"]
__version__ = "0.1.0"
