"""Resolve ``"package.module:function"`` specs given on the command line."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["load_spec"]


def _import_file(path: Path) -> ModuleType:
    """Import a Python file as a module (its folder first on ``sys.path`` while it
    runs, so it can import its neighbours)."""
    if not path.is_file():
        raise FileNotFoundError(f"Python file {str(path)!r} does not exist")
    name = f"_quantaware_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        sys.modules.pop(name, None)
        raise
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ValueError(f"{str(path)!r} failed while importing: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(folder)
    return module


def load_spec(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (or ``"path/to/file.py:function"``) and
    return the function.

    Example:
        >>> load_spec("quantaware.models:DigitsCNN").__name__
        'DigitsCNN'
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} from {spec!r}: {exc}") from exc
    try:
        fn = getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


def call_spec(spec: str) -> Any:
    """Import the function ``spec`` names (as :func:`load_spec`) and call it without
    arguments; whatever it raises becomes a ``ValueError`` naming the spec.

    Example:
        >>> type(call_spec("quantaware.models:DigitsCNN")).__name__
        'DigitsCNN'
    """
    fn = load_spec(spec)
    try:
        return fn()
    except Exception as exc:  # the user's code: any exception type
        raise ValueError(f"{spec} raised {type(exc).__name__}: {exc}") from exc
