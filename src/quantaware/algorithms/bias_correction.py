"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV, arXiv 1906.04721, section 4.2).

Quantization error shifts the mean of a layer's output: ``E[W~ x~] != E[W x]``.
The empirical variant measures the shift on data: for each weighted layer, in
execution order, the per-channel mean of its pre-activation output in the
quantized model (with every earlier layer already corrected) is compared with the
float model's, and the difference is subtracted from the bias. The float
reference is the same prepared model with its quantizers switched off, so both
see identical, BN-folded layers.

Run it after :func:`quantaware.calibrate` (activation ranges fixed) and after any
weight-rounding algorithm (it corrects the final weights).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quantaware._batch import split_batch
from quantaware.algorithms._layers import (
    capture,
    channel_mean,
    ensure_bias,
    float_reference,
    pre_activation,
    weighted_layers,
)

__all__ = ["apply", "output_mean_errors"]

log = logging.getLogger(__name__)


def _means(model: nn.Module, layers: list[nn.Module],
           data: Iterable[Any]) -> dict[int, torch.Tensor]:
    sums: dict[int, list[torch.Tensor]] = {}

    def record(module: nn.Module, x: torch.Tensor) -> None:
        mean = channel_mean(module, pre_activation(module, x))
        sums.setdefault(id(module), []).append(mean * x.shape[0])

    capture(model, layers, data, record)
    return {key: torch.stack(v).sum(0) for key, v in sums.items()}


def _reference_means(model: nn.Module, reference: nn.Module | None,
                     layers: list[tuple[str, nn.Module]], data: list) -> dict[str, torch.Tensor]:
    ref_model = model if reference is None else reference
    ref_modules = dict(ref_model.named_modules())
    missing = [n for n, _ in layers if n not in ref_modules]
    if missing:
        raise ValueError(
            f"the reference model has no layer(s) {missing[:3]}; pass the prepared model "
            "itself (before any algorithm changed it), e.g. a copy.deepcopy taken earlier"
        )
    modules = [ref_modules[n] for n, _ in layers]
    with float_reference(ref_model):
        means = _means(ref_model, modules, data)
    return {n: means[id(ref_modules[n])] for n, _ in layers}


def output_mean_errors(model: nn.Module, data: Iterable[Any],
                       reference: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Per layer, the per-channel mean pre-activation error ``E[y_quant] - E[y_float]``.

    This is what bias correction drives to zero. ``y_float`` comes from
    ``reference`` (default ``model``) run with its quantizers off; after biases
    or weights were changed, pass a copy of the model taken before.

    Example:
        >>> import torch
        >>> from quantaware import presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> data = [torch.randn(32, 8)]
        >>> q = quantize(net, presets.W4A8, data, data[0][:1])
        >>> list(output_mean_errors(q, data))
        ['0']
    """
    data = list(data)
    layers = weighted_layers(model, data)
    ref = _reference_means(model, reference, layers, data)
    quant = _means(model, [m for _, m in layers], data)
    total = sum(split_size(b) for b in data)
    return {name: (quant[id(m)] - ref[name]) / total for name, m in layers}


def split_size(batch: Any) -> int:
    """Number of samples in a batch."""
    args, kwargs = split_batch(batch)
    first = args[0] if args else next(iter(kwargs.values()))
    return int(first.shape[0])


def apply(model: nn.Module, data: Iterable[Any], reference: nn.Module | None = None,
          num_batches: int | None = None) -> nn.Module:
    """Correct the biases of a calibrated model in place (empirical bias correction).

    Args:
        model: a calibrated model from :func:`quantaware.prepare` +
            :func:`quantaware.calibrate`. Layers without a bias get one.
        data: batches (as for :func:`quantaware.calibrate`); a few hundred samples
            is plenty, the calibration set works.
        reference: a prepared model whose float function (quantizers off) is the
            target; default ``model`` itself, which is right unless an earlier
            algorithm (e.g. AdaRound) already changed its float weights.
        num_batches: use only the first ``num_batches`` batches (default: all).

    With one batch, every layer is corrected in a single forward pass (each
    layer's hook sees the input produced by the already-corrected layers
    before it), so cost is two forward passes; with several batches each layer
    needs its own pass up to that layer. Concatenate small batches into one
    when memory allows.

    Returns:
        ``model``, with ``bias`` of every integer-weight layer corrected.

    Example:
        >>> import copy, torch
        >>> from quantaware import presets, quantize
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
        ...                           torch.nn.Linear(16, 4))
        >>> data = [torch.rand(64, 16) * 4 for _ in range(2)]  # post-ReLU-like, mean > 0
        >>> q = quantize(net, presets.W4A8, data, data[0][:1])
        >>> original = copy.deepcopy(q)
        >>> before = sum(e.abs().sum() for e in output_mean_errors(q, data).values())
        >>> q = apply(q, data)
        >>> after = sum(e.abs().sum() for e in output_mean_errors(q, data, original).values())
        >>> bool(after < before)
        True
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    data = list(data)[:num_batches]
    if not data:
        raise ValueError("bias correction needs data: pass at least one batch")
    layers = weighted_layers(model, data)
    live = [n for n, m in layers if getattr(m, "bn", None) is not None]
    if live:  # a QAT conv + batch norm: its bias is scaled by the fold, and cancelled
        # by batch statistics in training; correct the model quantize/prepare give
        log.warning("bias correction: %d QAT conv + batch norm layer(s) left as they are: "
                    "%s", len(live), ", ".join(live[:5]))
        layers = [(n, m) for n, m in layers if n not in live]
    if not layers:
        log.warning("bias correction: no integer-weight layer found; nothing to correct")
        return model
    total = sum(split_size(b) for b in data)
    ref = _reference_means(model, reference, layers, data)
    names = {id(m): n for n, m in layers}
    corrected: set[str] = set()

    def correct(module: nn.Module, x: torch.Tensor) -> None:
        name = names[id(module)]
        if name in corrected:  # a layer called twice in one pass keeps its first correction
            return
        _subtract(module, name, channel_mean(module, pre_activation(module, x)) - ref[name] / total)
        corrected.add(name)

    if len(data) == 1:
        capture(model, [m for _, m in layers], data, correct)
    else:
        for name, module in layers:
            quant = _means(model, [module], data)[id(module)]
            _subtract(module, name, (quant - ref[name]) / total)
    log.info("bias correction: corrected %d layers", len(layers))
    return model


def _subtract(module: nn.Module, name: str, shift: torch.Tensor) -> None:
    ensure_bias(module)
    with torch.no_grad():
        module.bias.sub_(shift.to(module.bias.dtype))
    log.debug("bias correction %s: mean |shift| %.3g", name, float(shift.abs().mean()))
