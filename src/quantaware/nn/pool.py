"""Quantized average pooling (ONNX Runtime runs it as QLinearAveragePool /
QLinearGlobalAveragePool). Max pooling needs no module: the max of quantized
values is itself on the grid, so it shares its input's qparams."""

from __future__ import annotations

import torch
from torch import nn

from quantaware.config import QuantSpec
from quantaware.fake_quant import make_quantizer
from quantaware.nn.base import QuantMixin
from quantaware.nn.registry import register


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
