"""Quantized ``nn.Conv1d`` and ``nn.Conv2d`` (grouped and depthwise included)."""

from __future__ import annotations

import torch
from torch import nn

from quantaware.config import FloatSpec, QuantSpec
from quantaware.nn.registry import register
from quantaware.nn.weighted import WeightQuantMixin


class _QuantConvNd(WeightQuantMixin):
    """Shared ``from_float``/``forward`` for the conv modules."""

    _float_type: type[nn.Module]

    @classmethod
    def from_float(cls, module: nn.Module, weight_spec: QuantSpec | FloatSpec | None,
                   activation_spec: QuantSpec | None):
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation,
            groups=module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device=module.weight.device, dtype=module.weight.dtype,
        )
        new.weight = module.weight
        new.bias = module.bias
        new._init_quant(weight_spec, activation_spec)
        return new

    def to_float(self) -> nn.Module:
        """A plain conv module with the float (master) weights."""
        out = self._float_type(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
        )
        out.weight, out.bias = self.weight, self.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        weight, bias = self.quantized_params()
        return self._finish(self._conv_forward(x, weight, bias))


@register(nn.Conv1d)
class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """Quantized ``nn.Conv1d``.

    Example:
        >>> from quantaware import presets
        >>> q = QuantConv1d.from_float(torch.nn.Conv1d(2, 4, 3), presets.W8.weight, None)
        >>> q(torch.randn(1, 2, 8)).shape
        torch.Size([1, 4, 6])
    """

    _float_type = nn.Conv1d


@register(nn.Conv2d)
class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """Quantized ``nn.Conv2d``.

    Example:
        >>> from quantaware import presets
        >>> q = QuantConv2d.from_float(torch.nn.Conv2d(2, 4, 3, groups=2), presets.W8.weight, None)
        >>> q(torch.randn(1, 2, 8, 8)).shape
        torch.Size([1, 4, 6, 6])
    """

    _float_type = nn.Conv2d
