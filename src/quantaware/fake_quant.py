"""Fake-quantizer modules: an observer, qparams and enable flags, over the primitives.

:class:`FakeQuantizer` is the one object that stands for "this tensor is
quantized". Its state (``scale``, ``zero_point``, ``observer_enabled``,
``fake_quant_enabled`` and the observer's statistics) are buffers, so they travel
with ``state_dict``, checkpoints and DDP.

Three sources of qparams:

- calibrated (static activations): the observer collects ranges while
  ``observer_enabled``; :meth:`FakeQuantizer.freeze` turns them into qparams.
- from the tensor itself (``from_tensor=True``): weights, whose qparams follow the
  current weight at every call (so QAT updates them), and dynamic activations
  (ONNX ``DynamicQuantizeLinear`` semantics, computed per call).

:class:`Float16Quantizer` rounds to float16 (straight-through gradient).

Example:
    >>> import torch
    >>> from quantaware.config import QuantSpec
    >>> fq = FakeQuantizer(QuantSpec(bits=8, signed=False, symmetric=False))
    >>> fq.observe_only(); _ = fq(torch.linspace(0, 2.55, 100)); fq.freeze()
    >>> fq(torch.tensor([0.014])).item()
    0.009999999776482582
"""

from __future__ import annotations

import torch
from torch import nn

from quantaware.config import FloatSpec, PerChannel, QuantSpec
from quantaware.observers import CalibrationError, make_observer
from quantaware.primitives import choose_qparams, fake_quantize

__all__ = ["FakeQuantizer", "Float16Quantizer", "make_quantizer"]


class FakeQuantizer(nn.Module):
    """Quantize-dequantize a tensor in float with a straight-through gradient.

    Args:
        spec: the integer format.
        channels: number of channels for per-channel specs.
        from_tensor: compute qparams from each input (weights, dynamic activations)
            instead of from calibrated statistics.
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None,
                 from_tensor: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.qmin, self.qmax = spec.quant_range
        self.axis: int | None = (
            spec.granularity.axis if isinstance(spec.granularity, PerChannel) else None
        )
        if self.axis is not None and not channels:
            raise ValueError("per-channel quantization needs the number of channels")
        self.from_tensor = from_tensor or spec.dynamic
        self.observer = None if self.from_tensor else make_observer(spec, channels)
        shape = (channels,) if self.axis is not None else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.tensor(1, dtype=torch.uint8))
        # 1 once qparams hold calibrated values (never set for from_tensor quantizers).
        self.register_buffer("calibrated", torch.tensor(0, dtype=torch.uint8))
        self.exporting = False

    # -- modes -----------------------------------------------------------------
    def observe_only(self) -> None:
        """Collect statistics, pass tensors through unchanged (PTQ calibration)."""
        if self.observer is not None:
            self.observer_enabled.fill_(1)
            self.fake_quant_enabled.fill_(0)

    def observe_and_quantize(self) -> None:
        """Collect statistics and quantize with qparams updated every call (QAT)."""
        if self.observer is not None:
            self.observer_enabled.fill_(1)
        self.fake_quant_enabled.fill_(1)

    def freeze(self) -> None:
        """Fix qparams from the statistics seen so far and quantize with them."""
        if self.observer is not None:
            self.load_qparams(*self.observer.calculate_qparams())
            self.observer_enabled.fill_(0)
        self.fake_quant_enabled.fill_(1)

    def disable(self) -> None:
        """Pass tensors through in float."""
        self.observer_enabled.fill_(0)
        self.fake_quant_enabled.fill_(0)

    def load_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set fixed qparams (checked to be finite and positive)."""
        scale = scale.detach().to(self.scale)
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise CalibrationError(f"invalid scale {scale}: scales must be finite and > 0")
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.detach().reshape(self.zero_point.shape))
        self.calibrated.fill_(1)

    # -- maths -----------------------------------------------------------------
    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The qparams used for ``x`` (needed for ``from_tensor`` quantizers)."""
        if self.from_tensor:
            if x is None:
                raise ValueError("this quantizer derives qparams from its input; pass x")
            detached = x.detach()
            if self.axis is None:
                lo, hi = torch.aminmax(detached)
            else:
                axis = self.axis % x.dim()
                lo, hi = torch.aminmax(detached.transpose(0, axis).reshape(x.shape[axis], -1),
                                       dim=1)
            return choose_qparams(lo, hi, self.qmin, self.qmax, self.spec.symmetric)
        if not bool(self.calibrated):
            raise CalibrationError(
                "quantizer used before calibration: run quantaware.calibrate(model, data) "
                "(PTQ) or enable observers for QAT before quantizing"
            )
        return self.scale, self.zero_point

    def set_smoothing(self, factor: torch.Tensor | None) -> None:
        """Multiply inputs by a per-channel (last axis) ``factor`` before quantizing.

        SmoothQuant-style scale migration (see :mod:`quantaware.smoothquant`): the
        consumers of this quantizer carry the inverse factor in their weights.
        """
        if factor is None:
            self._buffers.pop("smoothing", None)
        else:
            self.register_buffer("smoothing", factor.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smoothing = self._buffers.get("smoothing")
        if smoothing is not None:
            x = x * smoothing
        if self.exporting:
            return self._export_forward(x)
        if self.observer is not None and bool(self.observer_enabled):
            self.observer(x)
            if bool(self.fake_quant_enabled):
                self.load_qparams(*self.observer.calculate_qparams())
        if not bool(self.fake_quant_enabled):
            return x
        scale, zero_point = self.qparams(x)
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, self.axis)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        from quantaware.export import ops

        # Export traces Python: no branching on buffer values here (validated before).
        if self.spec.dynamic:
            return torch.ops.quantaware.dynamic_quantize_dequantize(x)
        return torch.ops.quantaware.quantize_dequantize(
            x, self.scale, self.zero_point, ops.AXIS_NONE if self.axis is None else self.axis,
            self.qmin, self.qmax,
        )

    def extra_repr(self) -> str:
        s = self.spec
        kind = "dynamic" if s.dynamic else ("from_tensor" if self.from_tensor else "calibrated")
        gran = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        sym = "symmetric" if s.symmetric else "asymmetric"
        return f"{s.bits}-bit [{self.qmin}, {self.qmax}], {sym}, {gran}, {kind}"


class Float16Quantizer(nn.Module):
    """Round to float16 and back (straight-through gradient).

    Example:
        >>> Float16Quantizer()(torch.tensor([1.0 + 2**-12])).item()
        1.0
    """

    exporting = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rounded = x.detach().to(torch.float16).to(x.dtype)
        return x + (rounded - x).detach() if x.requires_grad else rounded


def make_quantizer(spec: QuantSpec | FloatSpec, channels: int | None = None,
                   from_tensor: bool = False) -> nn.Module:
    """The quantizer module for a spec (weights use ``from_tensor=True``)."""
    if isinstance(spec, FloatSpec):
        return Float16Quantizer()
    return FakeQuantizer(spec, channels=channels, from_tensor=from_tensor)
