"""Quantized ``nn.Linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantaware.config import FloatSpec, QuantSpec
from quantaware.nn.registry import register
from quantaware.nn.weighted import WeightQuantMixin


@register(nn.Linear)
class QuantLinear(WeightQuantMixin, nn.Linear):
    """``nn.Linear`` with ``weight_quantizer``, ``input_quantizer`` and ``output_quantizer``.

    Parameter names equal ``nn.Linear``'s, so float state dicts load into it.

    Example:
        >>> from quantaware import presets
        >>> q = QuantLinear.from_float(torch.nn.Linear(4, 2), presets.W8.weight, None)
        >>> q(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    @classmethod
    def from_float(cls, module: nn.Linear, weight_spec: QuantSpec | FloatSpec | None,
                   activation_spec: QuantSpec | None) -> QuantLinear:
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.weight = module.weight
        new.bias = module.bias
        new._init_quant(weight_spec, activation_spec)
        return new

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the float (master) weights."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight, out.bias = self.weight, self.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        weight, bias = self.quantized_params()
        return self._finish(F.linear(x, weight, bias))
