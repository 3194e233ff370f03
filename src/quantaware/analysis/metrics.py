"""Model-output metrics for comparing a quantized model with its float reference."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quantaware._batch import check_finite, model_device, split_batch, to_device
from quantaware.fake_quant import frozen

__all__ = ["agreement", "outputs", "sqnr_db"]


Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def _flat(out: Any) -> tuple[torch.Tensor, ...]:
    """A model output as a tuple of tensors: a tensor, each of a tuple/list (nested),
    or each value of a dict in its order."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return tuple(t for item in out for t in _flat(item))
    return ()


def outputs(model: nn.Module, data: Iterable[Any]) -> Outputs:
    """The model's outputs over all batches, concatenated along the batch (in eval mode,
    with observers off: the model is left as it was).

    A model with several outputs (a tuple, list or dict) gives a tuple with one
    tensor per output; :func:`agreement` and :func:`sqnr_db` take either form.
    Scalar outputs (a loss returned beside the logits) are left out: they have no
    batch to join.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> outputs(net, [torch.randn(2, 4), torch.randn(5, 4)]).shape
        torch.Size([7, 3])
    """
    device = model_device(model)
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad(), frozen(model):
        for index, batch in enumerate(data):
            args, kwargs = split_batch(batch)
            check_finite(args, kwargs, f"batch {index}")
            args, kwargs = to_device(args, kwargs, device)
            flat = tuple(t for t in _flat(model(*args, **kwargs)) if t.dim() > 0)
            if not flat:
                raise TypeError("the model returned no tensor with a batch axis; return a "
                                "tensor, or a tuple or dict of tensors, shaped (N, ...)")
            parts.append(tuple(t.detach().float().cpu() for t in flat))
    if not parts:
        raise ValueError("no data: give at least one batch to run the model on")
    joined = tuple(_join(list(column), k) for k, column in enumerate(zip(*parts, strict=True)))
    return joined[0] if len(joined) == 1 else joined


def _join(parts: list[torch.Tensor], index: int) -> torch.Tensor:
    """One output's batches joined along the batch; ``(N, L, D)`` sequences of
    batches padded to different lengths are zero-padded to the longest (zeros add
    neither signal nor noise to :func:`sqnr_db`, and :func:`agreement` leaves
    sequences out)."""
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) == 1:
        return torch.cat(parts)
    if any(p.dim() != 3 for p in parts) or len({p.shape[2] for p in parts}) != 1:
        raise ValueError(
            f"output {index} has shape {tuple(parts[0].shape)} in one batch and "
            f"{next(tuple(p.shape) for p in parts if p.shape[1:] != parts[0].shape[1:])} in "
            "another; give batches whose outputs differ only in the batch size (or in the "
            "sequence length of (N, L, D) outputs)")
    length = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, length - p.shape[1]))
                      for p in parts])


def _pairs(quantized: Outputs, reference: Outputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    q = quantized if isinstance(quantized, tuple) else (quantized,)
    r = reference if isinstance(reference, tuple) else (reference,)
    if len(q) != len(r):
        raise ValueError(f"{len(q)} outputs to compare with {len(r)}")
    return list(zip(q, r, strict=True))


def agreement(quantized: Outputs, reference: Outputs) -> float:
    """Top-1 agreement in percent between two ``(N, classes)`` outputs (dense maps
    ``(N, classes, H, W)`` per position; several outputs: the worst of those with
    class scores, leaving out feature outputs such as ``(N, L, D)``).

    Example:
        >>> agreement(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([[0., 1.], [0., 1.]]))
        50.0
    """
    # class scores: (N, classes), or dense maps (N, classes, H, W, ...) per position;
    # (N, L, D) sequences of features are not
    scores = [100.0 * float((q.argmax(1) == r.argmax(1)).float().mean())
              for q, r in _pairs(quantized, reference)
              if (r.dim() == 2 or r.dim() >= 4) and r.shape[1] > 1]
    if not scores:
        raise ValueError("top-1 agreement needs an output of class scores (N, classes) or "
                         "(N, classes, H, W); compare these outputs with another metric, "
                         "e.g. sqnr_db")
    return min(scores)


def sqnr_db(quantized: Outputs, reference: Outputs) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - q|^2)`` in dB
    (several outputs: their signal and noise summed).

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]) * 1.1, torch.tensor([1.0, 1.0])), 1)
        20.0
    """
    pairs = _pairs(quantized, reference)
    noise = sum(float((r - q).double().pow(2).sum()) for q, r in pairs)
    signal = sum(float(r.double().pow(2).sum()) for _, r in pairs)
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
