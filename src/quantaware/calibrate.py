"""Post-training calibration: run data through the model and fix activation ranges."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quantaware._batch import (
    call_hint,
    check_finite,
    dtype_hint,
    model_device,
    split_batch,
    to_device,
)
from quantaware.config import QuantConfig
from quantaware.observers import CalibrationError

__all__ = ["CalibrationError", "calibrate", "quantize"]

log = logging.getLogger(__name__)


def _calibratable(model: nn.Module):
    from quantaware.prepare import quantizers

    return [(n, q) for n, q in quantizers(model) if q.observer is not None]


def calibrate(model: nn.Module, data: Iterable[Any], num_batches: int | None = None) -> nn.Module:
    """Observe activation ranges on ``data`` and freeze them (PTQ). Returns ``model``.

    Statistics are collected in float (fake quantization off) with the model in
    eval mode; then every quantizer's scale and zero point are fixed and fake
    quantization is switched on. Calling it again recalibrates from scratch.

    Args:
        model: a model returned by :func:`quantaware.prepare`.
        data: an iterable of batches: tensors, ``(inputs, ...)`` tuples/lists, or
            dicts of keyword inputs.
        num_batches: stop after this many batches (default: all).

    Example:
        >>> import torch
        >>> from quantaware import prepare, presets
        >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), presets.INT8,
        ...             torch.randn(1, 4))
        >>> m = calibrate(m, [torch.randn(8, 4) for _ in range(4)])
        >>> bool(m.get_submodule("0").input_quantizer.calibrated)
        True
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    targets = _calibratable(model)
    if not targets:
        from quantaware.nn.base import QuantMixin

        if getattr(model, "quantaware_config", None) is None and not any(
                isinstance(m, QuantMixin) for m in model.modules()):
            raise ValueError(
                f"calibrate needs a prepared model, but {type(model).__name__} has no "
                "quantizers; prepare it first (quantaware.prepare(model, config, "
                "example_inputs)), or use quantaware.quantize, which does both")
        log.info("nothing to calibrate: the model has no static activation quantizers")
        return model
    for _, q in targets:
        q.observer.reset()
        q.observe_only()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    device = model_device(model)
    seen = 0
    called: set[str] = set()
    owners = {name.rpartition(".")[0] for name, _ in targets}
    hooks = [module.register_forward_pre_hook(lambda _m, _i, name=name: called.add(name))
             for name, module in model.named_modules() if name in owners]
    try:
        with torch.no_grad():
            # islice: an iterator gives up no batch past the last one used
            for batch in itertools.islice(data, num_batches):
                args, kwargs = split_batch(batch)
                check_finite(args, kwargs, f"calibration batch {seen}", CalibrationError)
                args, kwargs = to_device(args, kwargs, device)
                try:
                    model(*args, **kwargs)
                except CalibrationError as exc:
                    raise CalibrationError(f"calibration batch {seen}: {exc}") from exc
                except RuntimeError as exc:
                    hint = dtype_hint(args, kwargs, model)
                    if not hint:
                        raise
                    raise CalibrationError(f"calibration batch {seen} failed{hint}: "
                                           f"{exc}") from exc
                except TypeError as exc:
                    hint = call_hint(exc)
                    if not hint or seen:
                        raise
                    raise TypeError(f"calibration batch {seen}: {exc}{hint}") from exc
                seen += 1
    finally:
        for module, training in modes:  # each module's own mode (frozen batch norms)
            module.train(training)
        for hook in hooks:
            hook.remove()
    if seen == 0:
        raise CalibrationError(
            "calibration data is empty: pass an iterable with at least one batch "
            "(a few hundred representative samples is typical)"
        )
    unused = [name for name, q in targets if not q.observer.observed]
    idle = [name for name in unused if name.rpartition(".")[0] not in called]
    if idle and not isinstance(model, torch.fx.GraphModule):
        # An untraced model's layer that no calibration batch ran (a training-only
        # head, a branch the data never takes) stays float rather than failing.
        layers = sorted({name.rpartition(".")[0] for name in idle})
        log.warning("layer(s) %s never ran on the calibration data and stay float; add "
                    "batches that run them to quantize them", ", ".join(layers[:5]))
        from quantaware.prepare import quantizers

        for name, q in quantizers(model):
            if name.rpartition(".")[0] in layers:
                q.disable()
        unused = [name for name in unused if name not in idle]
        targets = [(n, q) for n, q in targets if n not in idle]
    if unused:
        raise CalibrationError(
            f"quantizer(s) {unused[:5]} saw no data during calibration; the calibration "
            "batches must exercise every quantized layer"
        )
    for _, q in targets:
        q.freeze()
    log.info("calibrated %d quantizers on %d batches", len(targets), seen)
    return model


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any],
    example_inputs: torch.Tensor | tuple,
    num_batches: int | None = None,
) -> nn.Module:
    """One-call PTQ: :func:`quantaware.prepare` then :func:`calibrate`.

    Example:
        >>> import torch
        >>> from quantaware import presets
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> q = quantize(net, presets.INT8, [torch.randn(16, 4)], torch.randn(1, 4))
        >>> q(torch.randn(2, 4)).shape
        torch.Size([2, 2])
    """
    from quantaware.prepare import prepare

    prepared = prepare(model, config, example_inputs)
    return calibrate(prepared, calib_data, num_batches=num_batches)
