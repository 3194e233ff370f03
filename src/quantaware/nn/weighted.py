"""Weight and bias handling shared by quantized Linear and Conv modules.

Biases are quantized to int32 with scale ``input_scale * weight_scale`` (zero
point 0), as ONNX Runtime's integer kernels consume them, so the fake-quant model
adds the same bias the deployed model adds. Where a large bias over a tiny weight
range would overflow the int32 range, the weight scale is widened for that
channel (ONNX Runtime's quantizer does the same).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from quantaware.config import FloatSpec, PerChannel, QuantSpec
from quantaware.fake_quant import FakeQuantizer, Float16Quantizer, make_quantizer
from quantaware.nn.base import QuantMixin, release_parameter, static_scale
from quantaware.primitives import fake_quantize, quantize

# Bias integers stay within +-2**30: exactly representable in float32 arithmetic
# and far inside int32.
BIAS_QMAX = 2**30
BIAS_QMIN = -(2**30)


class WeightQuantMixin(QuantMixin):
    """Adds ``weight_quantizer``, int32 bias quantization and export freezing."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: nn.Module | None
    # The weight's output-channel axis (transposed convolutions store (in, out, ...)).
    weight_axis = 0

    def _init_quant(self, weight_spec: QuantSpec | FloatSpec | None,
                    activation_spec: QuantSpec | None) -> None:
        self._init_activation_slots()
        self.weight_quantizer = None
        if weight_spec is not None:
            axis = getattr(getattr(weight_spec, "granularity", None), "axis", 0)
            if axis not in (0, -self.weight.dim()):
                raise ValueError(
                    f"{type(self).__name__} weights are quantized per output channel "
                    f"(axis 0); got axis {axis}"
                )
            if self.weight_axis and isinstance(weight_spec, QuantSpec) and isinstance(
                    weight_spec.granularity, PerChannel):
                weight_spec = dataclasses.replace(
                    weight_spec, granularity=PerChannel(axis=self.weight_axis))
            self.weight_quantizer = make_quantizer(
                weight_spec, channels=self.weight.shape[self.weight_axis], from_tensor=True
            )
        if activation_spec is not None:
            self.input_quantizer = make_quantizer(activation_spec)
            if not activation_spec.dynamic:
                self.output_quantizer = make_quantizer(activation_spec)
        self.exporting = False

    # -- qparams ---------------------------------------------------------------
    def float_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight and bias that get quantized (modules that fold a
        batch norm during training override this)."""
        return self.weight, self.bias

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(weight_scale, weight_zero_point, bias_scale or None)`` as deployed."""
        wq = self.weight_quantizer
        assert isinstance(wq, FakeQuantizer)
        weight, bias = self.float_params()
        w_scale, w_zp = wq.qparams(weight)
        in_scale = static_scale(self.input_source)
        if bias is None or in_scale is None:
            return w_scale, w_zp, None
        # Widen the weight scale where the bias would not fit in the int32 range.
        needed = bias.detach().abs() / (in_scale * BIAS_QMAX)
        if w_scale.dim() == 0:  # per-tensor weights: one scale must cover every bias
            needed = needed.max()
        w_scale = torch.maximum(w_scale, needed)
        return w_scale, w_zp, in_scale * w_scale

    def quantized_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (fake-quantized) weight and bias the forward pass uses."""
        if self.exporting:
            return self._export_params()
        wq = self.weight_quantizer
        weight, bias = self.float_params()
        if not isinstance(wq, FakeQuantizer) or not bool(wq.fake_quant_enabled):
            weight = weight if wq is None or isinstance(wq, FakeQuantizer) else wq(weight)
            return weight, bias
        w_scale, w_zp, b_scale = self.weight_qparams()
        weight = wq.fake_quantize_with(weight, w_scale, w_zp)
        if b_scale is not None:
            # int32, zero point 0; the weight scale was widened so that the bias
            # fits: nothing is clipped, the gradient is the identity.
            bias = fake_quantize(bias, b_scale, 0, BIAS_QMIN, BIAS_QMAX, 0, own_range=True)
        return weight, bias

    # -- export ----------------------------------------------------------------
    def freeze_for_export(self) -> None:
        """Replace float parameters by integer (or float16) constants for export.

        Only call on a copy of the model: the float weights are removed.
        """
        wq = self.weight_quantizer
        with torch.no_grad():
            if isinstance(wq, FakeQuantizer) and bool(wq.fake_quant_enabled):
                w_scale, w_zp, b_scale = self.weight_qparams()
                self.register_buffer(
                    "_qweight",
                    quantize(self.weight, w_scale, w_zp, wq.qmin, wq.qmax, self.weight_axis)
                )
                self.register_buffer("_wscale", w_scale.clone())
                self.register_buffer("_wzp", w_zp.to(self._qweight.dtype))
                release_parameter(self, "weight")
                from quantaware.prepare import MIXED_INPUT_GRIDS

                if b_scale is not None and self.__dict__.get(MIXED_INPUT_GRIDS):
                    # Called on inputs of different grids: an int32 bias is read on
                    # each call's own grid (ONNX Runtime's QGemm), which holds only
                    # for the first call. Stored float, as the model computes it.
                    self.bias.copy_(fake_quantize(self.bias, b_scale, 0, BIAS_QMIN,
                                                  BIAS_QMAX, 0, own_range=True))
                elif b_scale is not None:
                    self.register_buffer(
                        "_qbias",
                        quantize(self.bias, b_scale, torch.zeros_like(b_scale, dtype=torch.int32),
                                 BIAS_QMIN, BIAS_QMAX, 0, dtype=torch.int32),
                    )
                    self.register_buffer("_bscale", b_scale.clone())
                    release_parameter(self, "bias")
            elif isinstance(wq, Float16Quantizer):
                self.register_buffer("_w16", self.weight.detach().to(torch.float16))
                release_parameter(self, "weight")
        self.exporting = True

    def _export_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        ops = torch.ops.quantaware
        if hasattr(self, "_qweight"):
            weight = ops.dequantize(self._qweight, self._wscale, self._wzp, self.weight_axis)
        elif hasattr(self, "_w16"):
            weight = ops.cast_float(self._w16)
        else:
            weight = self.weight
        bias = self.bias
        if hasattr(self, "_qbias"):
            bias = ops.dequantize_symmetric(self._qbias, self._bscale, 0)
        return weight, bias
