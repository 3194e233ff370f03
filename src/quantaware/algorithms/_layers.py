"""Shared plumbing for the PTQ algorithms: weighted layers in execution order, the
float reference (quantizers switched off), and capturing a layer's inputs with a
forward pass that stops right after that layer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantaware._batch import model_device, split_batch, to_device
from quantaware.fake_quant import FakeQuantizer, frozen
from quantaware.nn.weighted import WeightQuantMixin


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@contextlib.contextmanager
def float_reference(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with every quantizer off (the float function of a prepared model)."""
    from quantaware.prepare import _set_quantizer_state

    saved = _set_quantizer_state(model)
    try:
        yield model
    finally:
        _set_quantizer_state(model, saved)


def _run(model: nn.Module, data: Iterable[Any]) -> None:
    """Run ``model`` on ``data`` in eval mode (no dropout, batch norms on their running
    statistics: the function being quantized) with its ranges fixed; the caller's
    modes come back after."""
    device = model_device(model)
    with torch.no_grad(), frozen(model):
        for batch in data:
            args, kwargs = to_device(*split_batch(batch), device)
            with contextlib.suppress(_Stop):
                model(*args, **kwargs)


def weighted_layers(model: nn.Module, data: Iterable[Any]) -> list[tuple[str, nn.Module]]:
    """Quantized weighted layers with an integer weight quantizer, in execution order."""
    order: list[str] = []
    names = {id(m): n for n, m in model.named_modules()
             if isinstance(m, WeightQuantMixin) and isinstance(m.weight_quantizer, FakeQuantizer)}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: order.append(names[id(mod)])
                                         if names[id(mod)] not in order else None)
             for m in model.modules() if id(m) in names]
    try:
        with float_reference(model):
            _run(model, [next(iter(data))])
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in order]


def pre_activation(module: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None,
                   quantize_input: bool = True) -> torch.Tensor:
    """The layer's output before its fused activation and output quantizer."""
    if quantize_input:
        x = module._quantize_input(x)
    w, b = module.quantized_params()
    if weight is not None:
        w = weight
    if isinstance(module, nn.Linear):
        return F.linear(x, w, b)
    if hasattr(module, "transposed_forward"):
        return module.transposed_forward(x, w, b)
    return module._conv_forward(x, w, b)


def capture(model: nn.Module, modules: list[nn.Module], data: Iterable[Any],
            fn: Callable[[nn.Module, torch.Tensor], None]) -> None:
    """Call ``fn(module, input)`` for each of ``modules`` on every batch of ``data``.

    The forward pass stops after the last of ``modules`` has run.
    """
    last = modules[-1]
    seen: set[int] = set()

    def pre(mod: nn.Module, inputs: tuple) -> None:
        fn(mod, inputs[0])
        seen.add(id(mod))
        if mod is last:
            raise _Stop

    hooks = [m.register_forward_pre_hook(pre) for m in modules]
    try:
        _run(model, data)
    finally:
        for h in hooks:
            h.remove()


def channel_mean(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Mean of ``module``'s output ``y`` over every dimension but the channel one: the
    last for a linear layer (``(N, F)``, ``(N, L, F)``, ...), 1 for a conv (``NC...``)."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1]).mean(0)
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)


def ensure_bias(module: nn.Module) -> None:
    """Give a layer without bias a zero bias (algorithms that correct it need one)."""
    if module.bias is None:
        channels = getattr(module, "out_channels", None) or module.weight.shape[0]
        module.bias = nn.Parameter(torch.zeros(channels, dtype=module.weight.dtype,
                                               device=module.weight.device))
