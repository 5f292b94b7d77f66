"""Plug-in discovery: the modules of a package, imported on first use, and what each declares.

Families (zoo.architectures, `FAMILY = Family(...)`), conversion formats (zoo.conversion, `FORMATS = [...]`) and
tasks (zoo.tasks, `@register_task`) are found the same way, so adding one is adding a module; the core never
names them. The imports are dynamic (importlib), so they are not static dependencies of the core.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def declared(package: str, name: str | None = None) -> list[Any]:
    """Import every module of `package` (in name order) and return the value each binds to `name`, for the
    modules that bind it (with name=None, only import them: modules that register themselves)."""
    pkg = importlib.import_module(package)
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        if name is not None and hasattr(module, name):
            found.append(getattr(module, name))
    return found
