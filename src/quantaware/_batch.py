"""The batch convention shared by every API that takes data.

A batch is a tensor (the model input), a tuple/list whose first element is the
model input (so ``(x, y)`` pairs work), or a mapping of keyword inputs
(transformers). NumPy arrays are accepted wherever tensors are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def _as_tensor(x: Any) -> Any:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call the model with for one batch.

    Example:
        >>> import torch
        >>> args, kwargs = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> args[0].shape, kwargs
        (torch.Size([2, 3]), {})
    """
    if isinstance(batch, torch.Tensor | np.ndarray):
        return (_as_tensor(batch),), {}
    if isinstance(batch, tuple | list):
        if not batch:
            raise ValueError("got an empty tuple/list as a batch; expected (inputs, ...) ")
        return (_as_tensor(batch[0]),), {}
    if isinstance(batch, Mapping):
        return (), {k: _as_tensor(v) for k, v in batch.items()}
    raise TypeError(
        f"cannot use a batch of type {type(batch).__name__}: give a tensor, a tuple/list "
        "whose first element is the model input, or a dict of keyword inputs"
    )


def to_device(args: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    """Move tensor arguments to ``device``."""
    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def check_finite(args: tuple, kwargs: dict, where: str) -> None:
    """Raise a clear error if a floating-point input holds NaN/Inf."""
    for value in (*args, *kwargs.values()):
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and not torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"{where} contains {bad} NaN/Inf value(s) (input shape "
                f"{tuple(value.shape)}); remove or clean those samples"
            )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
