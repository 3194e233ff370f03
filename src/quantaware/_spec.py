"""Resolve ``"package.module:function"`` specs given on the command line."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["load_spec"]


def load_spec(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the function.

    Example:
        >>> load_spec("quantaware.models:DigitsCNN").__name__
        'DigitsCNN'
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
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
