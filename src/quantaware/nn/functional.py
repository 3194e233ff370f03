"""Quantized tensor-tensor ops: residual add, concat, matmul.

``prepare`` rewrites ``a + b``, ``torch.cat([...])`` and ``a @ b`` between
tensors into these modules, so that each input and the output carry qparams
and the deployed graph stays integer (ONNX Runtime's ``QLinearAdd``,
``QLinearConcat``, ``QLinearMatMul``). An input already quantized by the module
that produced it gets no second quantizer (its slot holds ``nn.Identity``).
"""

from __future__ import annotations

import torch
from torch import nn

from quantaware.config import QuantSpec
from quantaware.fake_quant import make_quantizer
from quantaware.nn.base import QuantMixin


class _MultiInputQuant(QuantMixin, nn.Module):
    """Holds ``input_quantizers`` (one per input), ``output_quantizer`` and ``activation``."""

    def __init__(self, activation_spec: QuantSpec, num_inputs: int) -> None:
        super().__init__()
        self._init_activation_slots()
        self.input_quantizers = nn.ModuleList(
            make_quantizer(activation_spec) for _ in range(num_inputs)
        )
        self.output_quantizer = make_quantizer(activation_spec)

    def drop_input_quantizer(self, index: int, source: nn.Module | None = None) -> None:
        """Input ``index`` is already quantized upstream (by ``source``): do not
        quantize it again."""
        self.input_quantizers[index] = nn.Identity()
        sources = self.__dict__.setdefault("_input_sources", {})
        sources[index] = source

    def input_source_of(self, index: int) -> nn.Module | None:
        """The quantizer whose qparams input ``index`` carries, if any."""
        own = self.input_quantizers[index]
        if not isinstance(own, nn.Identity):
            return own
        return self.__dict__.get("_input_sources", {}).get(index)

    def _quantize_inputs(self, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [q(x) for q, x in zip(self.input_quantizers, xs, strict=True)]


class QuantAdd(_MultiInputQuant):
    """``a + b`` with quantized inputs and output (optionally fused ReLU).

    Example:
        >>> from quantaware import presets
        >>> add = QuantAdd(presets.INT8.activation)
        >>> for q in add.modules():
        ...     if hasattr(q, "observe_only"): q.observe_only()
        >>> add(torch.ones(2), torch.ones(2))
        tensor([2., 2.])
    """

    def __init__(self, activation_spec: QuantSpec) -> None:
        super().__init__(activation_spec, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self._quantize_inputs((a, b))
        return self._finish(a + b)


class QuantCat(_MultiInputQuant):
    """``torch.cat(tensors, dim)`` with quantized inputs and output.

    Example:
        >>> from quantaware import presets
        >>> cat = QuantCat(presets.INT8.activation, num_inputs=2, dim=1)
        >>> cat.extra_repr()
        'dim=1'
    """

    def __init__(self, activation_spec: QuantSpec, num_inputs: int, dim: int = 0) -> None:
        super().__init__(activation_spec, num_inputs)
        self.dim = dim

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._finish(torch.cat(self._quantize_inputs(tensors), dim=self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class QuantMatmul(_MultiInputQuant):
    """``a @ b`` between two activations (attention scores, context) with quantized inputs.

    Example:
        >>> from quantaware import presets
        >>> QuantMatmul(presets.INT8.activation).input_quantizers[0].qmax
        255
    """

    def __init__(self, activation_spec: QuantSpec) -> None:
        super().__init__(activation_spec, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self._quantize_inputs((a, b))
        return self._finish(torch.matmul(a, b))
