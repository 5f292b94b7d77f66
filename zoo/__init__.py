"""zoo: a PyTorch model zoo and checkpoint hub.

    import zoo
    zoo.list_models("qwen2-*")
    model = zoo.load("qwen2-tiny-stdlib")
    print(model.generate("def fibonacci(n):", max_new_tokens=64))
"""

from zoo.api import load
from zoo.loading import resolve
from zoo.registry import list_models, model_info


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
