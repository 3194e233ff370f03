"""Model-output metrics for comparing a quantized model with its float reference."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quantaware._batch import model_device, split_batch, to_device

__all__ = ["agreement", "outputs", "sqnr_db"]


def outputs(model: nn.Module, data: Iterable[Any]) -> torch.Tensor:
    """The model's outputs over all batches, concatenated (first output if a tuple)."""
    device = model_device(model)
    outs = []
    with torch.no_grad():
        for batch in data:
            args, kwargs = to_device(*split_batch(batch), device)
            out = model(*args, **kwargs)
            outs.append((out[0] if isinstance(out, tuple | list) else out).float().cpu())
    return torch.cat(outs)


def agreement(quantized: torch.Tensor, reference: torch.Tensor) -> float:
    """Top-1 agreement in percent between two ``(N, classes)`` outputs.

    Example:
        >>> agreement(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([[0., 1.], [0., 1.]]))
        50.0
    """
    return 100.0 * float((quantized.argmax(-1) == reference.argmax(-1)).float().mean())


def sqnr_db(quantized: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - q|^2)`` in dB.

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]) * 1.1, torch.tensor([1.0, 1.0])), 1)
        20.0
    """
    noise = float((reference - quantized).double().pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
