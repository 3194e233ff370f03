"""Quantized average pooling (ONNX Runtime runs it as QLinearAveragePool /
QLinearGlobalAveragePool). Max pooling needs no module: the max of quantized
values is itself on the grid, so it shares its input's qparams."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantaware.config import QuantSpec
from quantaware.fake_quant import make_quantizer
from quantaware.nn.base import QuantMixin
from quantaware.nn.registry import register


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def ceil_mode_matters(kernel_size: int | Sequence[int], stride: int | Sequence[int] | None,
                      padding: int | Sequence[int], size: Sequence[int]) -> bool:
    """True if a 2-d pool with ``ceil_mode=True`` over an input of spatial ``size``
    ``(H, W)`` writes more outputs than with ``ceil_mode=False`` (a last window that
    hangs over the input). Otherwise both compute the same windows and divisors.

    Example:
        >>> ceil_mode_matters(2, 2, 0, (8, 8)), ceil_mode_matters(2, 2, 0, (9, 9))
        (False, True)
    """
    kernel, pad = _pair(kernel_size), _pair(padding)
    step = _pair(stride) if stride else kernel  # nn.AvgPool2d's stride defaults to its kernel

    def outputs(length: int, k: int, s: int, p: int, ceil: bool) -> int:
        n = (length + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
        # torch drops a last window that would start in the right padding
        return n - 1 if ceil and (n - 1) * s >= length + p else n

    return any(outputs(n, k, s, p, True) != outputs(n, k, s, p, False)
               for n, k, s, p in zip(tuple(size)[-2:], kernel, step, pad, strict=True))


class _QuantPool(QuantMixin):
    _ARGS: tuple[str, ...]

    @classmethod
    def from_float(cls, module: nn.Module, weight_spec, activation_spec: QuantSpec | None):
        new = cls(**{name: getattr(module, name) for name in cls._ARGS})
        new._init_activation_slots()
        if activation_spec is not None and not activation_spec.dynamic:
            new.input_quantizer = make_quantizer(activation_spec)
            new.output_quantizer = make_quantizer(activation_spec)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(super().forward(self._quantize_input(x)))


@register(nn.AdaptiveAvgPool2d)
class QuantAdaptiveAvgPool2d(_QuantPool, nn.AdaptiveAvgPool2d):
    """Quantized ``nn.AdaptiveAvgPool2d``.

    Example:
        >>> QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), None, None).output_size
        1
    """

    _ARGS = ("output_size",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "exporting", False) and self.output_size in (1, (1, 1)):
            # GlobalAveragePool, which ONNX Runtime runs as QLinearGlobalAveragePool
            # (the exporter would write ReduceMean, which stays float).
            x = torch.ops.quantaware.global_average_pool(self._quantize_input(x))
            return self._finish(x)
        return super().forward(x)


@register(nn.AvgPool2d)
class QuantAvgPool2d(_QuantPool, nn.AvgPool2d):
    """Quantized ``nn.AvgPool2d``.

    Example:
        >>> QuantAvgPool2d.from_float(nn.AvgPool2d(2), None, None).kernel_size
        2
    """

    _ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")


@register(nn.AvgPool1d)
class QuantAvgPool1d(_QuantPool, nn.AvgPool1d):
    """Quantized ``nn.AvgPool1d``.

    Example:
        >>> QuantAvgPool1d.from_float(nn.AvgPool1d(2), None, None).kernel_size
        (2,)
    """

    _ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
