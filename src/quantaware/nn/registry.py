"""Registry from float module types to their quantized counterparts.

Example:
    >>> import torch
    >>> from quantaware.nn.registry import quantized_type
    >>> quantized_type(torch.nn.Linear).__name__
    'QuantLinear'
"""

from __future__ import annotations

from torch import nn

_REGISTRY: dict[type[nn.Module], type[nn.Module]] = {}


def register(float_type: type[nn.Module]):
    """Class decorator: ``@register(nn.Linear)`` on a module with ``from_float``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if not hasattr(cls, "from_float"):
            raise TypeError(f"{cls.__name__} must define from_float() to be registered")
        _REGISTRY[float_type] = cls
        return cls

    return wrap


def quantized_type(float_type: type[nn.Module]) -> type[nn.Module] | None:
    """The quantized class for an exact float module type, or ``None``."""
    return _REGISTRY.get(float_type)


def supported_types() -> list[str]:
    """Names of the float module types quantaware can quantize."""
    return sorted(t.__name__ for t in _REGISTRY)
