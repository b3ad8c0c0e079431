"""Importing handler modules, named by dotted name or by the path of a ``.py`` file."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["import_handler_module", "is_path"]


def is_path(module: str) -> bool:
    """Whether ``module`` names a file (it ends in ``.py`` or holds a ``/``) rather than a dotted name."""
    return module.endswith(".py") or "/" in module


def import_handler_module(module: str) -> ModuleType:
    """Import ``module``, which registers its handlers as a side effect.

    A file is imported under its stem as module name (``digits.py`` -> ``digits``), with its
    directory first on ``sys.path`` so that it can import the modules beside it, as
    ``python digits.py`` would.

    Args:
        module: a dotted module name (``myproject.handlers``) or a ``.py`` file's path.

    Returns:
        The imported module.

    Raises:
        ImportError: the module or file cannot be found (anything its code raises while
            importing propagates as it is).
    """
    if not is_path(module):
        return importlib.import_module(module)
    path = Path(module).resolve()
    if not path.is_file():
        raise ImportError(f"handler module file {module!r} does not exist ({path})")
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {module!r} as a Python module")
    sys.path.insert(0, str(path.parent))
    loaded = importlib.util.module_from_spec(spec)
    # Registered before running it, as the import system does: msgspec and dataclasses
    # look the module up while its classes are being defined.
    sys.modules[name] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[name]
        raise
    return loaded
