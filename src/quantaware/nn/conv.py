"""Quantized ``nn.Conv1d``, ``nn.Conv2d`` (grouped and depthwise included) and the
transposed ``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d``.

A transposed convolution stores its weight as ``(in, out / groups, *kernel)``:
per-channel weight scales are per output channel, along the weight's axis 1, which
a single axis covers only without groups. Grouped transposed convolutions are
therefore quantized with per-channel weights only when ``groups == 1``;
:func:`quantaware.prepare` keeps a grouped one float under a per-channel spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantaware.config import FloatSpec, QuantSpec
from quantaware.nn.registry import register
from quantaware.nn.weighted import WeightQuantMixin


class _ConvLike(WeightQuantMixin):
    """``from_float``/``to_float`` shared by the conv and transposed conv modules: the
    float module's constructor arguments are its attributes ``_ARGS``."""

    _float_type: type[nn.Module]
    _ARGS: tuple[str, ...] = ("stride", "padding", "dilation", "groups", "padding_mode")

    @classmethod
    def from_float(cls, module: nn.Module, weight_spec: QuantSpec | FloatSpec | None,
                   activation_spec: QuantSpec | None):
        new = cls(module.in_channels, module.out_channels, module.kernel_size,
                  bias=module.bias is not None, device=module.weight.device,
                  dtype=module.weight.dtype, **{n: getattr(module, n) for n in cls._ARGS})
        new.weight = module.weight
        new.bias = module.bias
        new._init_quant(weight_spec, activation_spec)
        return new

    def to_float(self) -> nn.Module:
        """A plain conv module with the float (master) weights."""
        out = self._float_type(self.in_channels, self.out_channels, self.kernel_size,
                               bias=self.bias is not None,
                               **{n: getattr(self, n) for n in self._ARGS})
        out.weight, out.bias = self.weight, self.bias
        return out


class _QuantConvNd(_ConvLike):
    """Shared ``forward`` for the conv modules."""

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


class _QuantConvTransposeNd(_ConvLike):
    """Shared ``forward`` for the transposed conv modules."""

    _ARGS = (*_ConvLike._ARGS, "output_padding")
    weight_axis = 1

    def transposed_forward(self, x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None,
                           output_size: list[int] | None = None) -> torch.Tensor:
        """The transposed convolution of ``x`` with ``weight`` and ``bias``."""
        dims = len(self.kernel_size)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation)
        function = F.conv_transpose1d if dims == 1 else F.conv_transpose2d
        return function(x, weight, bias, self.stride, self.padding, output_padding,
                        self.groups, self.dilation)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        x = self._quantize_input(x)
        weight, bias = self.quantized_params()
        return self._finish(self.transposed_forward(x, weight, bias, output_size))


@register(nn.ConvTranspose1d)
class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """Quantized ``nn.ConvTranspose1d`` (per-channel weight scales along axis 1).

    Example:
        >>> from quantaware import presets
        >>> q = QuantConvTranspose1d.from_float(torch.nn.ConvTranspose1d(2, 4, 3, stride=2),
        ...                                     presets.W8.weight, None)
        >>> q(torch.randn(1, 2, 8)).shape, q.weight_quantizer.axis
        (torch.Size([1, 4, 17]), 1)
    """

    _float_type = nn.ConvTranspose1d


@register(nn.ConvTranspose2d)
class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """Quantized ``nn.ConvTranspose2d`` (per-channel weight scales along axis 1).

    Example:
        >>> from quantaware import presets
        >>> q = QuantConvTranspose2d.from_float(
        ...     torch.nn.ConvTranspose2d(2, 4, 4, stride=2, padding=1), presets.W8.weight, None)
        >>> q(torch.randn(1, 2, 8, 8)).shape
        torch.Size([1, 4, 16, 16])
    """

    _float_type = nn.ConvTranspose2d
