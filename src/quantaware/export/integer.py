"""Run a quantized torch model with the integer arithmetic of ONNX Runtime's CPU kernels.

A fake-quantized model computes every quantized layer in float on dequantized
values and rounds the result; ONNX Runtime accumulates the same integers exactly in
int32 and rescales them with a float32 multiplier. The two differ only where a
value sits within float rounding error of a rounding tie, but a deep network
amplifies such one-LSB flips: MobileNetV2 evaluated by torch in NCHW and in
channels-last memory formats already disagrees on several percent of top-1
classes. Comparing ONNX Runtime with the fake-quant model therefore cannot tell
an export bug from rounding noise.

Inside :func:`integer_arithmetic` each quantized layer computes what ONNX
Runtime's kernel for it computes, bit for bit:

- ``QLinearConv`` / ``QGemm`` / ``QLinearMatMul`` (quantized Conv and Linear):
  ``acc = sum((x_q - x_zp) * w_q) + bias_q`` exactly (float64 holds every int32
  sum), then ``round_half_even(float32(acc) * float32(x_scale * w_scale / y_scale))
  + y_zp`` saturated; a fused ReLU/ReLU6 is the saturation at the zero point.
- ``QLinearAdd``: the float32 fused multiply-adds of MLAS,
  ``round(a_q * (a_scale / c_scale) + (b_q * (b_scale / c_scale) + k))``.
- ``QLinearGlobalAveragePool``: ``round(float32(sum(x_q) - n x_zp) *
  (x_scale / (y_scale n))) + y_zp``.
- ``DequantizeLinear -> Resize -> QuantizeLinear`` (bilinear upsampling): the float32
  interpolation in ONNX Runtime's order of operations, which decides exact ties;
  a nearest ``Resize`` copies int8 codes.

With ``kernels="litert"`` the arithmetic is LiteRT's (XNNPACK's int8 kernels) for
a file from :func:`quantaware.export_tflite`: convolutions, fully connected layers
and the global average pool requantize as above; ``ADD`` uses fixed-point
multipliers of about 21 bits with a common shift and rounds half up; ``QUANTIZE``
of a float tensor multiplies by the reciprocal scale; a layer that only feeds a
concatenation writes straight onto the concatenation's grid, and any other
concatenation input on another grid is requantized with an 8-bit-fraction
multiplier, rounding half up; ``AVERAGE_POOL_2D`` averages int8 codes on its
input's grid (rounding half away from zero) and is requantized onto the pool's
grid the same way; ``RESIZE_BILINEAR`` interpolates int8 codes with 11-bit
weights (rounding half up) on a grid the converter reconciles with the layer
around it.

Layers ONNX Runtime does not run as one of these integer kernels (float ops,
dynamic quantization, SmoothQuant inputs, concat/average pooling that rescale)
keep their fake-quant forward; the returned :class:`IntegerEmulation` lists them.

Example:
    >>> import torch, quantaware
    >>> from quantaware import presets
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = torch.randn(64, 4)
    >>> q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    >>> with integer_arithmetic(q) as emulation:
    ...     y = q(x)
    >>> emulation.emulated, emulation.fallback
    (['0', '2'], [])
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from quantaware.fake_quant import FakeQuantizer
from quantaware.nn.base import QuantMixin
from quantaware.nn.conv import _QuantConvNd, _QuantConvTransposeNd
from quantaware.nn.functional import QuantAdd, QuantCat, QuantMatmul
from quantaware.nn.linear import QuantLinear
from quantaware.nn.pool import (
    QuantAdaptiveAvgPool2d,
    QuantAvgPool1d,
    QuantAvgPool2d,
    ceil_mode_matters,
)
from quantaware.nn.resize import NEAREST_MODES, QuantUpsample
from quantaware.nn.weighted import BIAS_QMAX, BIAS_QMIN, WeightQuantMixin
from quantaware.prepare import MIXED_INPUT_GRIDS
from quantaware.primitives import quantize

__all__ = ["IntegerEmulation", "fake_quant_arithmetic", "integer_arithmetic"]

_F32 = torch.float32
_F64 = torch.float64


@dataclass
class IntegerEmulation:
    """Which quantized modules run integer-exact inside :func:`integer_arithmetic`.

    Attributes:
        emulated: modules that compute ONNX Runtime's integer kernel bit for bit.
        fallback: ``(module, reason)`` for quantized modules that keep their
            fake-quant (float) forward.
    """

    emulated: list[str] = field(default_factory=list)
    fallback: list[tuple[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every quantized module runs integer-exact."""
        return bool(self.emulated) and not self.fallback


@dataclass(frozen=True)
class _QParams:
    scale: torch.Tensor  # float32 scalar
    zero_point: int
    qmin: int
    qmax: int

    @property
    def max_code(self) -> int:
        """Largest ``|q - zero_point|``."""
        return max(self.qmax - self.zero_point, self.zero_point - self.qmin)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """``QuantizeLinear(x) - zero_point`` as float32 (exact small integers)."""
        q = torch.div(x.to(_F32), self.scale).round_().add_(self.zero_point)
        return q.clamp_(self.qmin, self.qmax).sub_(self.zero_point)

    def output(self, value: torch.Tensor) -> torch.Tensor:
        """Round a float32 requantized value (already divided by the scale), add the
        zero point, saturate, and dequantize as ``DequantizeLinear`` does (in place)."""
        q = value.round_().add_(self.zero_point).clamp_(self.qmin, self.qmax)
        return q.sub_(self.zero_point).mul_(self.scale)


def _float32_is_exact() -> bool:
    """float32 convs and matmuls run in IEEE float32 (no TF32/bf16 shortcuts)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    settings = [getattr(torch.backends, "fp32_precision", "none")]
    mkldnn = torch.backends.mkldnn
    for part in ("conv", "matmul"):
        settings.append(getattr(getattr(mkldnn, part, None), "fp32_precision", "none"))
    settings.append(getattr(mkldnn, "fp32_precision", "none"))
    return all(value in ("none", "ieee") for value in settings)


# float32 holds every integer below 2**24 exactly: a sum of products whose
# magnitudes add up to less than that is computed exactly in any order.
_F32_EXACT = 2**24


def _static_qparams(q: nn.Module | None) -> _QParams | str:
    """qparams of a calibrated static per-tensor quantizer, or why there are none."""
    if not isinstance(q, FakeQuantizer):
        return "input or output not quantized"
    if q.from_tensor or q.spec.dynamic:
        return "dynamic activation quantization"
    if q.axis is not None:
        return "per-channel activation quantization"
    if q._buffers.get("smoothing") is not None:
        return "SmoothQuant-scaled input (ONNX Runtime multiplies in float first)"
    if not bool(q.fake_quant_enabled) or not bool(q.calibrated):
        return "quantizer disabled or not calibrated"
    if bool(q.observer_enabled):
        return "quantizer still observing (calibration or QAT mode)"
    scale, zero_point = q.qparams()
    return _QParams(scale.detach().to(_F32).reshape(()), int(zero_point.reshape(-1)[0]),
                    q.qmin, q.qmax)


def _activation_blocker(module: QuantMixin, out: _QParams) -> str | None:
    """Why ONNX Runtime would not fold the fused activation into its integer
    kernel, or ``None`` when it does.

    ONNX Runtime drops a ReLU/ReLU6 before a QuantizeLinear whose range the
    activation cannot narrow, so the activation is the kernel's saturation at
    ``qmin``; otherwise it runs the layer in float."""
    act = module.activation
    if act is None:
        return None
    if type(act) not in (nn.ReLU, nn.ReLU6):
        return f"fused {type(act).__name__} (not an integer kernel in ONNX Runtime)"
    if out.zero_point != out.qmin:
        return "fused activation above the output range's minimum"
    if isinstance(act, nn.ReLU6) and float((out.qmax - out.zero_point) * out.scale) > 6.0 * (
            1 + 1e-6):
        return "output range wider than ReLU6's [0, 6]"
    return None


def _integer_params(module: WeightQuantMixin) -> tuple[torch.Tensor, torch.Tensor,
                                                      torch.Tensor | None]:
    """``(weight codes minus zero point, weight scale, int32 bias or None)`` as the
    exported file holds them (float64 codes)."""
    wq = module.weight_quantizer
    assert isinstance(wq, FakeQuantizer)
    weight, bias = module.float_params()
    w_scale, w_zp, b_scale = module.weight_qparams()
    axis = module.weight_axis if w_scale.dim() else None
    shape = [1] * weight.dim()
    shape[module.weight_axis] = -1
    qweight = quantize(weight, w_scale, w_zp, wq.qmin, wq.qmax, axis).to(_F64)
    qweight = qweight - (w_zp.reshape(shape) if axis is not None else w_zp).to(_F64)
    qbias = None
    if bias is not None:
        zeros = torch.zeros_like(b_scale, dtype=torch.int32)
        qbias = quantize(bias, b_scale, zeros, BIAS_QMIN, BIAS_QMAX,
                         0 if b_scale.dim() else None).to(_F64)
    return qweight, w_scale.detach(), qbias


def _converter_params(module: WeightQuantMixin, qin: _QParams) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_integer_params` as LiteRT's converter writes a transposed conv: it takes
    the (dequantized) weights as float and quantizes them itself, symmetric int8 per
    output channel with scale ``max|w| / 127`` (rounding half away from zero), and
    the bias to int32 with scale ``input_scale * weight_scale``. Where a channel's
    codes reach +-127 this gives back the model's own scale and codes."""
    qweight, w_scale, qbias = _integer_params(module)
    axis = module.weight_axis
    shape = [1] * qweight.dim()
    shape[axis] = -1
    weight = qweight.to(_F32) * (w_scale.reshape(shape) if w_scale.dim() else w_scale)
    # Per output channel even where the model's weights are per-tensor.
    peak = weight.abs().amax(dim=[d for d in range(weight.dim()) if d != axis])
    scale = torch.where(peak > 0, peak / 127, w_scale.to(_F32).expand_as(peak))
    codes = weight / scale.reshape(shape)
    codes = (codes.sign() * (codes.abs() + 0.5).floor()).clamp_(-127, 127).to(_F64)
    if qbias is not None:
        bias_scale = (qin.scale * scale).to(_F64)
        bias = qbias * (qin.scale.to(_F64) * w_scale.to(_F64))
        qbias = bias.div(bias_scale).round().clamp_(BIAS_QMIN, BIAS_QMAX)
    return codes, scale, qbias


def _weighted_forward(module: WeightQuantMixin, qin: _QParams, qout: _QParams,
                      apply: Callable[..., torch.Tensor], own_output: bool = True,
                      params: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None
                      = None) -> Callable[..., torch.Tensor]:
    """``params``: the file's ``(codes, weight scale, int32 bias)`` where they are not
    the model's own (:func:`_converter_params`)."""
    conv = isinstance(module, _QuantConvNd | _QuantConvTransposeNd)
    with torch.no_grad():
        qweight, w_scale, qbias = params if params is not None else _integer_params(module)
        # ONNX Runtime: output_scale = x_scale * w_scale / y_scale in float32.
        multiplier = (qin.scale * w_scale.to(_F32)) / qout.scale
        # Largest possible sum of |products| for one output.
        per_output = qweight.abs().transpose(0, module.weight_axis)
        bound = float(per_output.reshape(per_output.shape[0], -1).sum(1).max()) * qin.max_code
    exact32 = bound < _F32_EXACT and _float32_is_exact()
    qweight32 = qweight.to(_F32)
    channel = [-1] + [1] * (qweight.dim() - 2) if conv else [-1]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self._quantize_input(x)
        codes = qin.codes(x)
        if exact32:
            acc = apply(codes, qweight32, None, *args, **kwargs)
            if qbias is not None:
                acc = (acc.to(_F64) + qbias.reshape(channel)).to(_F32)
        else:
            acc = apply(codes.to(_F64), qweight, qbias, *args, **kwargs).to(_F32)
        y = qout.output(acc.mul_(multiplier.reshape(channel) if conv else multiplier))
        return self.output_quantizer(y) if own_output else y

    return forward


def _conv_like(module: nn.Module) -> Callable[..., torch.Tensor]:
    if isinstance(module, _QuantConvTransposeNd):
        return module.transposed_forward
    if isinstance(module, _QuantConvNd):
        return lambda x, w, b: module._conv_forward(x, w, b)
    return lambda x, w, b: F.linear(x, w, b)


def _add_forward(module: QuantAdd, qa: _QParams, qb: _QParams, qc: _QParams):
    ratio_a = (qa.scale / qc.scale).to(_F32)
    ratio_b = (qb.scale / qc.scale).to(_F32)
    # MLAS: fixed = zc - (ra * za + rb * zb) in float32, compiled as
    # zc - fma(ra, za, rb * zb) (the product is exact in float64, then rounded once).
    inner = (ratio_a.to(_F64) * qa.zero_point + (ratio_b * qb.zero_point).to(_F64)).to(_F32)
    fixed = (torch.tensor(float(qc.zero_point), dtype=_F32) - inner).to(_F64)
    ra, rb = ratio_a.to(_F64), ratio_b.to(_F64)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self._quantize_inputs((a, b))
        # Codes with their zero points: MLAS feeds raw uint8/int8 values.
        ca = qa.codes(a).add_(qa.zero_point).to(_F64)
        cb = qb.codes(b).add_(qb.zero_point).to(_F64)
        # Two fused multiply-adds: each is exact in float64, then rounded once.
        t = (cb * rb + fixed).to(_F32).to(_F64)
        t = (ca * ra + t).to(_F32)
        q = torch.clamp(torch.round(t), qc.qmin, qc.qmax)
        return self.output_quantizer((q - qc.zero_point) * qc.scale)

    return forward


def _f32_bits(value: float) -> int:
    return int(torch.tensor(value, dtype=_F32).view(torch.int32))


def _bits_f32(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(_F32))


def int8_code(value: int, qmin: int) -> int:
    """A code (or zero point) of an 8-bit format starting at ``qmin`` as the int8 code
    LiteRT stores: unsigned codes move down by 128, signed ones stay.

    Example:
        >>> int8_code(0, 0), int8_code(255, 0), int8_code(-5, -128)
        (-128, 127, -5)
    """
    return value - 128 if qmin == 0 else value


def _int8_codes(qp: _QParams, x: torch.Tensor) -> torch.Tensor:
    """The int8 codes (zero point included) LiteRT stores for ``x`` on ``qp``'s grid."""
    return (qp.codes(x) + qp.zero_point).to(torch.int64) + (int8_code(qp.zero_point, qp.qmin)
                                                           - qp.zero_point)


def _from_int8_codes(qp: _QParams, code: torch.Tensor) -> torch.Tensor:
    return (code - int8_code(qp.zero_point, qp.qmin)).to(_F32) * qp.scale


def _xnnpack_add_forward(module: QuantAdd, qa: _QParams, qb: _QParams, qc: _QParams,
                         own_output: bool = True):
    """LiteRT's int8 ADD (XNNPACK ``qs8-vadd``): fixed-point multipliers of about
    21 bits for ``a_scale / c_scale`` and ``b_scale / c_scale`` with a common
    shift, ``asr(bias + a_q * ma + b_q * mb, shift)`` (rounding half up), then the
    output zero point and saturation."""
    ratio_a = float(qa.scale.to(_F32) / qc.scale.to(_F32))
    ratio_b = float(qb.scale.to(_F32) / qc.scale.to(_F32))
    exponent = (_f32_bits(max(abs(ratio_a), abs(ratio_b))) >> 23) - 127
    shift = 20 - exponent
    if not 12 <= shift <= 30:
        raise ValueError(f"add scale ratios {ratio_a:.3g}, {ratio_b:.3g} are outside the "
                         "range LiteRT's int8 ADD supports")

    def multiplier(ratio: float) -> int:
        # lrintf of the ratio with ``shift`` added to its exponent: round half to even.
        return round(_bits_f32(_f32_bits(ratio) + (shift << 23)))

    ma, mb = multiplier(ratio_a), multiplier(ratio_b)
    za, zb = int8_code(qa.zero_point, qa.qmin), int8_code(qb.zero_point, qb.qmin)
    zc = int8_code(qc.zero_point, qc.qmin)
    bias = (1 << (shift - 1)) - ma * za - mb * zb
    lo, hi = int8_code(qc.qmin, qc.qmin) - zc, int8_code(qc.qmax, qc.qmin) - zc

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self._quantize_inputs((a, b))
        ca, cb = _int8_codes(qa, a), _int8_codes(qb, b)  # as the kernel reads them
        out = torch.clamp((bias + ca * ma + cb * mb) >> shift, lo, hi).to(_F32) * qc.scale
        return self.output_quantizer(out) if own_output else out

    return forward


@dataclass(frozen=True)
class _Requantize:
    """XNNPACK's int8 -> int8 QUANTIZE (``qs8-vcvt``): a multiplier with 8 fractional
    bits, ``m = lrintf(256 * in_scale / out_scale)``, rounding half up:
    ``asr((q - in_zp) * m + (out_zp << 8) + 128, 8)``, saturated."""

    multiplier: int
    bias: int
    lo: int
    hi: int

    @classmethod
    def between(cls, qi: _QParams, qo: _QParams) -> _Requantize | str | None:
        """The step from ``qi``'s grid to ``qo``'s; ``None`` on the same grid, or a reason
        LiteRT cannot run it in int8."""
        zi, zo = int8_code(qi.zero_point, qi.qmin), int8_code(qo.zero_point, qo.qmin)
        ratio = float(qi.scale.to(_F32) / qo.scale.to(_F32))
        if ratio == 1.0 and zi == zo:
            return None
        if not 2.0 ** -8 <= ratio <= 2.0 ** 7:
            return (f"scale ratio {ratio:.3g} is outside the range of LiteRT's int8 "
                    "requantization")
        multiplier = round(ratio * 256)  # lrintf: half to even (ratio * 256 is exact)
        return cls(multiplier, (zo << 8) - multiplier * zi + 0x80,
                   int8_code(qo.qmin, qo.qmin), int8_code(qo.qmax, qo.qmin))

    def __call__(self, code: torch.Tensor) -> torch.Tensor:
        """int64 int8 codes on the input grid -> int8 codes on the output grid."""
        return torch.clamp((self.bias + code * self.multiplier) >> 8, self.lo, self.hi)


def _xnnpack_concatenation_forward(module: QuantCat, qps: list[_QParams],
                                   on_grid: frozenset[int]):
    """LiteRT's concatenation: XNNPACK concatenates int8 codes of one grid, so the
    converter puts a QUANTIZE (:class:`_Requantize`) before every input on another
    grid. Inputs in ``on_grid`` (layers written straight onto the concatenation's
    grid) and inputs already on its grid pass unchanged."""
    qc = qps[-1]
    steps: list[_Requantize | None] = []
    for index, qi in enumerate(qps[:-1]):
        step = None if index in on_grid else _Requantize.between(qi, qc)
        if isinstance(step, str):
            return f"input {index} of the concatenation: {step}"
        steps.append(step)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        parts = []
        for x, qi, step in zip(self._quantize_inputs(tensors), qps[:-1], steps, strict=True):
            parts.append(x if step is None else _from_int8_codes(qc, step(_int8_codes(qi, x))))
        return self._finish(torch.cat(parts, dim=self.dim))

    return forward


def _litert_avg_pool_forward(module: QuantAvgPool2d | QuantAvgPool1d, qin: _QParams,
                             qout: _QParams, input_size: tuple[int, ...] | None = None):
    """LiteRT's int8 AVERAGE_POOL_2D (TFLite's kernel: XNNPACK has no int8 average
    pooling) keeps the input's grid: the sum of the window's int8 codes divided by
    the number of values averaged, rounding half away from zero. When the pool's
    own grid differs, a QUANTIZE (:class:`_Requantize`) moves the result onto it.
    A ``ceil_mode`` pool is emulated where no window hangs over the traced input
    (``input_size``): :func:`quantaware.export_tflite` writes it in floor mode. A 1-d
    pool is the 2-d pool over ``(1, L)`` that :func:`quantaware.export_tflite`
    writes."""
    if getattr(module, "divisor_override", None):
        return "average pooling with divisor_override"
    kernel, stride, padding = module.kernel_size, module.stride or module.kernel_size, \
        module.padding
    one_d = isinstance(module, QuantAvgPool1d)
    if one_d:
        kernel, stride, padding = (1, kernel[0]), (1, stride[0]), (0, padding[0])
        if input_size is not None:
            input_size = (*input_size[:-1], 1, input_size[-1])
    ceil_mode = bool(module.ceil_mode)
    if ceil_mode and input_size is None:
        return "average pooling with ceil_mode on an input of unknown size"
    if ceil_mode and ceil_mode_matters(kernel, stride, padding, input_size):
        return ("average pooling whose last ceil_mode window hangs over the input "
                "(LiteRT pads and rescales it)")
    if padding not in (0, (0, 0)) and not module.count_include_pad:
        # LiteRT runs it as a 'same'-padded pool or as a float composite, by shape.
        return "average pooling that leaves its padding out of the count"
    step = _Requantize.between(qin, qout)
    if isinstance(step, str):
        return f"output: {step}"
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    count = kh * kw
    zi = int8_code(qin.zero_point, qin.qmin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], 1, x.shape[-1]) if one_d else x.shape
        if ceil_mode and ceil_mode_matters(kernel, stride, padding, shape):
            raise ValueError(
                f"the integer emulation of this ceil_mode average pool holds for inputs "
                f"whose windows all lie on the input, as the traced {tuple(input_size)} "
                f"does; {tuple(x.shape)} has a window hanging over it (a LiteRT file's "
                f"input size is the example's: feed inputs of that size)")
        code = _int8_codes(qin, self._quantize_input(x)).to(_F64)
        if one_d:
            code = code.unsqueeze(-2)
        if padding not in (0, (0, 0)):  # an explicit pad with the zero point's code
            ph, pw = (padding, padding) if isinstance(padding, int) else padding
            code = F.pad(code, (pw, pw, ph, ph), value=float(zi))
        total = F.avg_pool2d(code, kernel, stride, 0, divisor_override=1)
        # C integer division of (sum +- count / 2): half away from zero.
        out = torch.sign(total) * torch.floor((total.abs() + count // 2) / count)
        out = out.to(torch.int64).clamp(-128, 127)
        if one_d:
            out = out.squeeze(-2)
        if step is not None:
            return self._finish(_from_int8_codes(qout, step(out)))
        return self._finish(_from_int8_codes(qin, out))

    return forward


def _resize_output_size(module: QuantUpsample, x: torch.Tensor, size) -> tuple[int, int]:
    """``(height, width)`` a resize writes; a 1-d resize ``(N, C, L)`` has a height of one."""
    shape = module.resize(x[:1, :1], size).shape
    return (1, shape[-1]) if x.dim() == 3 else (shape[-2], shape[-1])


def _corners(t: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, x0: torch.Tensor,
             x1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``t`` at rows/columns ``(y0, x0)``, ``(y0, x1)``, ``(y1, x0)``, ``(y1, x1)``."""
    rows = [t.index_select(-2, y) for y in (y0, y1)]
    return tuple(r.index_select(-1, c) for r in rows for c in (x0, x1))


def _onnxruntime_resize_taps(size_in: int, size_out: int, scale: float | None,
                             align_corners: bool) -> tuple[torch.Tensor, ...]:
    """ONNX Runtime's bilinear source indices and weights along one axis, in float32
    as its ``SetupUpsampleBilinear`` computes them: the source coordinate (half-pixel
    ``(i + 0.5) / scale - 0.5`` or corners aligned ``i (in - 1) / (out - 1)``;
    ``scale = out / in`` unless the file gives it), clamped; ``lo = trunc``,
    ``hi = min(lo + 1, in - 1)``; weights ``|c - hi|`` for ``lo`` and ``|c - lo|`` for
    ``hi``, both 0.5 where ``lo == hi``."""
    index = torch.arange(size_out, dtype=_F32)
    scale32 = torch.tensor(size_out, dtype=_F32) / torch.tensor(size_in, dtype=_F32) \
        if scale is None else torch.tensor(scale, dtype=_F32)
    if bool(scale32 == 1.0):
        pos = index
    elif align_corners:
        pos = index * float(size_in - 1) / float(size_out - 1) if size_out > 1 \
            else torch.zeros_like(index)
    else:
        pos = (index + 0.5) / scale32 - 0.5
    pos = pos.clamp(0.0, size_in - 1)
    lo = pos.to(torch.int64).clamp(max=size_in - 1)
    hi = torch.clamp(lo + 1, max=size_in - 1)
    w_lo, w_hi = (pos - hi.to(_F32)).abs(), (pos - lo.to(_F32)).abs()
    same = lo == hi
    w_lo[same], w_hi[same] = 0.5, 0.5
    return lo, hi, w_lo, w_hi


def _onnxruntime_resize_forward(module: QuantUpsample, qin: _QParams, qout: _QParams | None):
    """ONNX Runtime's ``DequantizeLinear -> Resize -> QuantizeLinear`` (linear mode)
    in its float32 order: ``((c11 X11 + c21 X21) + c12 X12) + c22 X22`` with each
    weight a float32 product ``dx * dy``, then ``round_half_even(y / scale)``. Where
    the two grids coincide (a ReLU6 range on both sides), interpolated values often
    sit on exact rounding ties, and this order decides them. Without ``qout`` (nothing
    integer reads the output) the float32 result is the output."""
    align = bool(module.align_corners)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        x = self._quantize_input(x)
        flat = x.dim() == 3  # (N, C, L): a height of one
        value = (qin.codes(x) * qin.scale).to(_F32)  # DequantizeLinear
        value = value.unsqueeze(-2) if flat else value
        out_h, out_w = _resize_output_size(self, x, size)
        factor = self.scale_factor if size is None and self.size is None \
            and not self.recompute_scale_factor else None
        if isinstance(factor, (int, float)):
            factor = (factor, factor)
        factors = (None, None) if factor is None else (
            (1.0, float(factor[-1])) if flat else (float(factor[-2]), float(factor[-1])))
        y0, y1, dy2, dy1 = _onnxruntime_resize_taps(value.shape[-2], out_h, factors[0], align)
        x0, x1, dx2, dx1 = _onnxruntime_resize_taps(value.shape[-1], out_w, factors[1], align)
        x11, x21, x12, x22 = _corners(value, y0, y1, x0, x1)
        dy1, dy2 = dy1[:, None], dy2[:, None]
        out = (dx2 * dy2) * x11 + (dx1 * dy2) * x21
        out = out + (dx2 * dy1) * x12
        out = out + (dx1 * dy1) * x22
        if qout is not None:
            out = self.output_quantizer(qout.output(out / qout.scale))
        return out.squeeze(-2) if flat else out

    return forward


def _xnnpack_resize_taps(size_in: int, size_out: int, align_corners: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """XNNPACK's bilinear source rows (or columns) and weights along one axis: the
    float32 source coordinate (half-pixel centres, or corners aligned), clamped;
    ``lo = trunc``, ``hi = min(lo + 1, size_in - 1)``, and the fraction as an
    11-bit weight ``lrintf(2048 * fraction)``."""
    index = torch.arange(size_out, dtype=_F32)
    if align_corners and size_out > 1:
        scale = torch.tensor(size_in - 1, dtype=_F32) / torch.tensor(size_out - 1, dtype=_F32)
        pos = index * scale
    else:
        scale = torch.tensor(size_in, dtype=_F32) / torch.tensor(size_out, dtype=_F32)
        pos = (index * scale + (0.5 * scale - 0.5)).clamp(0.0, size_in - 1)
    lo = pos.to(torch.int64)  # the coordinate is >= 0: truncation is floor
    weight = torch.round((pos - lo.to(_F32)) * 2048.0).to(torch.int64)
    return lo, torch.clamp(lo + 1, max=size_in - 1), weight


def _litert_resize_forward(module: QuantUpsample, qin: _QParams, qout: _QParams | None,
                           placement: str):
    """LiteRT's int8 RESIZE_BILINEAR (XNNPACK's ``ibilinear`` kernel) keeps its input's
    grid. With 11-bit weights ``a`` (columns) and ``b`` (rows): ``top = tl * 2048 +
    (tr - tl) a``, ``bottom`` alike, ``(top * 2048 + (bottom - top) b + 2^21) >> 22``
    (rounding half up); 0 of 3496 codes differ from LiteRT's. A 1-d linear resize
    runs as a bilinear one over a height of one. Where the resize's two grids
    differ, ``placement`` says where the converter reconciles them (see
    :func:`_litert_grids`): ``"onto"`` (the layer before writes onto the output
    grid), ``"before"`` or ``"after"`` (a requantizing QUANTIZE, :class:`_Requantize`,
    before or after the resize). Without ``qout`` (nothing integer reads the output)
    the converter still resizes int8 codes, on the input's grid."""
    if module.mode not in ("bilinear", "linear"):
        return f"{module.mode} resize (LiteRT's int8 resize is bilinear or nearest)"
    own_output = qout is not None
    qout = qin if qout is None else qout
    step = None if placement == "onto" else _Requantize.between(qin, qout)
    if isinstance(step, str):
        return f"output: {step}"
    before, after = (step, None) if placement == "before" else (None, step)
    grid = qout if placement == "onto" else qin  # the grid of the codes read
    align = bool(module.align_corners)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        x = self._quantize_input(x)
        flat = x.dim() == 3  # (N, C, L): a height of one
        out_h, out_w = _resize_output_size(self, x, size)
        code = _int8_codes(grid, x.unsqueeze(-2) if flat else x)
        if before is not None:
            code = before(code)
        y0, y1, wy = _xnnpack_resize_taps(code.shape[-2], out_h, align)
        x0, x1, wx = _xnnpack_resize_taps(code.shape[-1], out_w, align)
        tl, tr, bl, br = _corners(code, y0, y1, x0, x1)
        top = (tl << 11) + (tr - tl) * wx
        bottom = (bl << 11) + (br - bl) * wx
        out = ((top << 11) + (bottom - top) * wy[:, None] + (1 << 21)) >> 22
        out = _from_int8_codes(qout, out if after is None else after(out))
        out = out.squeeze(-2) if flat else out
        return self.output_quantizer(out) if own_output else out

    return forward


def _litert_quantize_forward(quantizer: FakeQuantizer) -> Callable[..., torch.Tensor] | None:
    """LiteRT's QUANTIZE of a float tensor (XNNPACK's f32 -> int8 convert):
    ``round_half_even(x * float32(1 / scale))``, a multiplication by the
    reciprocal where ONNX divides. On values already on the grid both give the
    same codes; on float inputs (the model's input) a few ties differ."""
    qp = _static_qparams(quantizer)
    if isinstance(qp, str) or quantizer.axis is not None or "smoothing" in quantizer._buffers:
        return None
    inverse = torch.reciprocal(qp.scale.to(_F32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x.to(_F32) * inverse).add_(qp.zero_point).clamp_(qp.qmin, qp.qmax)
        return q.sub_(qp.zero_point).mul_(qp.scale).to(x.dtype)

    return forward


def _matmul_forward(module: QuantMatmul, qa: _QParams, qb: _QParams, qc: _QParams):
    multiplier = (qa.scale * qb.scale) / qc.scale
    exact32 = _float32_is_exact()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self._quantize_inputs((a, b))
        ca, cb = qa.codes(a), qb.codes(b)
        if exact32 and a.shape[-1] * qa.max_code * qb.max_code < _F32_EXACT:
            acc = torch.matmul(ca, cb)
        else:
            acc = torch.matmul(ca.to(_F64), cb.to(_F64)).to(_F32)
        return self.output_quantizer(qc.output(acc.mul_(multiplier)))

    return forward


def _global_pool_forward(module: QuantAdaptiveAvgPool2d, qin: _QParams, qout: _QParams):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        n = x.shape[-1] * x.shape[-2]
        acc = qin.codes(x).to(_F64).sum(dim=(-2, -1), keepdim=True)  # sum(x_q) - n x_zp
        scale = qin.scale / (qout.scale * torch.tensor(float(n), dtype=_F32))
        y = qout.output(acc.to(_F32) * scale)
        return self.output_quantizer(y)

    return forward


def _plan(module: nn.Module, kernels: str = "onnxruntime",
          onto: nn.Module | None = None, on_grid: frozenset[int] = frozenset(),
          placement: str = "before",
          input_size: tuple[int, ...] | None = None) -> Callable[..., torch.Tensor] | str | None:
    """The integer-exact forward for ``module``, a reason it has none, or ``None``
    for modules that are not quantized layers. ``onto``: the quantizer whose grid
    a layer writes its output on instead of its own (LiteRT's concatenation and
    bilinear resize inputs, see :func:`_litert_grids`); ``on_grid``: a
    concatenation's inputs written that way; ``placement``: where a resize's grids
    are reconciled (see :func:`_litert_resize_forward`); ``input_size``: the
    layer's input shape in the traced graph, if known."""
    if isinstance(module, QuantMixin) and module.__dict__.get(MIXED_INPUT_GRIDS):
        return ("called on inputs with different qparams (one layer shared by several "
                "call sites)")
    if isinstance(module, WeightQuantMixin) and isinstance(
            module, _QuantConvNd | _QuantConvTransposeNd | QuantLinear):
        wq = module.weight_quantizer
        if not isinstance(wq, FakeQuantizer) or not bool(wq.fake_quant_enabled):
            return None if module.input_source is None else "float weights"
        if getattr(module, "exporting", False):
            return "frozen for export"
        transposed = isinstance(module, _QuantConvTransposeNd)
        if transposed and kernels != "litert":
            return ("transposed conv (ONNX Runtime has no integer ConvTranspose kernel: it "
                    "runs float32 on dequantized values)")
        if transposed and module.groups > 1:
            return ("grouped transposed conv (LiteRT's converter splits it into float32 "
                    "convs)")
        if not transposed and isinstance(module, _QuantConvNd) and module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if module.training and hasattr(module, "bn_frozen") and not bool(module.bn_frozen):
            return "training with batch statistics"
        qin = _static_qparams(module.input_source)
        qout = _static_qparams(module.output_quantizer if onto is None else onto)
        for part, qp in (("input", qin), ("output", qout)):
            if isinstance(qp, str):
                return f"{part}: {qp}"
        assert isinstance(qin, _QParams) and isinstance(qout, _QParams)
        blocker = _activation_blocker(module, qout)
        if blocker is not None:
            return blocker
        params = _converter_params(module, qin) if transposed else None
        return _weighted_forward(module, qin, qout, _conv_like(module), own_output=onto is None,
                                 params=params)
    if isinstance(module, QuantAdd | QuantMatmul | QuantCat):
        count = len(module.input_quantizers)
        qps = [_static_qparams(module.input_source_of(i)) for i in range(count)]
        qps.append(_static_qparams(module.output_quantizer))
        for i, qp in enumerate(qps):
            if isinstance(qp, str):
                return f"{'output' if i == count else f'input {i}'}: {qp}"
        blocker = _activation_blocker(module, qps[-1])
        if blocker is not None:
            return blocker
        if isinstance(module, QuantCat):
            if module.activation is not None:
                return "concat with a fused activation"
            if kernels == "litert":
                return _xnnpack_concatenation_forward(module, qps, on_grid)
            # QLinearConcat maps each input code through the table
            # QuantizeLinear(DequantizeLinear(code)): the fake-quant forward exactly.
            return type(module).forward
        if isinstance(module, QuantMatmul):
            return _matmul_forward(module, *qps)
        if kernels == "litert":
            if onto is not None:
                qps[-1] = _static_qparams(onto)
                if isinstance(qps[-1], str):
                    return f"output: {qps[-1]}"
            return _xnnpack_add_forward(module, *qps, own_output=onto is None)
        return _add_forward(module, *qps)
    if isinstance(module, QuantAdaptiveAvgPool2d) or (
            isinstance(module, QuantAvgPool2d | QuantAvgPool1d) and kernels == "litert"):
        qin, qout = _static_qparams(module.input_source), _static_qparams(module.output_quantizer)
        if isinstance(module, QuantAdaptiveAvgPool2d) and module.output_size not in (1, (1, 1)):
            return "adaptive average pooling to more than 1x1"
        for part, qp in (("input", qin), ("output", qout)):
            if isinstance(qp, str):
                return f"{part}: {qp}"
        blocker = _activation_blocker(module, qout)
        if blocker is not None:
            return blocker
        if isinstance(module, QuantAvgPool2d | QuantAvgPool1d):
            return _litert_avg_pool_forward(module, qin, qout, input_size)
        return _global_pool_forward(module, qin, qout)
    if isinstance(module, QuantUpsample):
        qin = _static_qparams(module.input_source)
        if isinstance(qin, str):
            return f"input: {qin}"
        if module.mode in NEAREST_MODES:
            return type(module).forward  # codes copied: exact everywhere
        qout = None if module.output_quantizer is None else \
            _static_qparams(module.output_quantizer)
        if isinstance(qout, str):
            return f"output: {qout}"
        if kernels == "litert":
            return _litert_resize_forward(module, qin, qout, placement)
        return _onnxruntime_resize_forward(module, qin, qout)
    if isinstance(module, QuantMixin) and (module.output_quantizer is not None
                                           or module.input_quantizer is not None):
        return f"{type(module).__name__} has no integer-exact emulation"
    return None


@dataclass
class _LiteRTGrids:
    """Where LiteRT's converter puts tensors on another layer's grid.

    Attributes:
        onto: layer name -> the quantizer whose grid the layer writes its output on.
        on_grid: concatenation name -> the indices of its inputs written that way.
        placement: bilinear resize name -> ``"onto"``, ``"before"`` or ``"after"``
            (see :func:`_litert_resize_forward`).
        input_size: layer name -> the shape of its (first) input in the traced graph.
    """

    onto: dict[str, nn.Module] = field(default_factory=dict)
    on_grid: dict[str, frozenset[int]] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)
    input_size: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _litert_grids(model: nn.Module) -> _LiteRTGrids:
    """The grids LiteRT's converter merges, read from the traced graph.

    LiteRT's concatenation needs one grid on all inputs, and its int8 bilinear
    resize one grid on input and output. The converter has a weighted layer whose
    output feeds only a concatenation requantize its accumulators straight onto the
    concatenation's grid (one rounding, where the torch model rounds onto the
    layer's own grid and then onto the concatenation's); other inputs on another
    grid get a requantizing QUANTIZE (see :func:`_xnnpack_concatenation_forward`).
    Before a 2-d bilinear resize, a 2-d conv or an add that feeds only the resize
    writes onto the resize's output grid; any other input is requantized onto it
    first, and a 1-d resize (behind reshapes) resizes on its input's grid and is
    requantized after (measured on each case against LiteRT's tensors).
    """
    from torch import fx

    grids = _LiteRTGrids()
    if not isinstance(model, fx.GraphModule):
        return grids
    inputs: dict[str, set[int]] = {}

    def single_use(arg: Any) -> nn.Module | None:
        if not isinstance(arg, fx.Node) or arg.op != "call_module" or len(arg.users) != 1:
            return None
        return model.get_submodule(arg.target)

    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        consumer = model.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node) and "tensor_meta" in source.meta and \
                hasattr(source.meta["tensor_meta"], "shape"):
            grids.input_size[node.target] = tuple(source.meta["tensor_meta"].shape)
        if isinstance(consumer, QuantCat):
            for index, arg in enumerate(node.args):
                layer = single_use(arg)
                if (isinstance(layer, WeightQuantMixin) and layer.output_quantizer is not None
                        and consumer.input_source_of(index) is layer.output_quantizer):
                    grids.onto[arg.target] = consumer.output_quantizer
                    inputs.setdefault(node.target, set()).add(index)
        elif isinstance(consumer, QuantUpsample) and consumer.output_quantizer is not None:
            layer = single_use(node.args[0])
            two_d = "tensor_meta" in node.meta and len(node.meta["tensor_meta"].shape) == 4
            if (two_d and getattr(layer, "output_quantizer", None) is not None
                    and consumer.input_source is layer.output_quantizer
                    and (isinstance(layer, QuantAdd) or (isinstance(layer, _QuantConvNd)
                                                         and len(layer.kernel_size) == 2))):
                grids.onto[node.args[0].target] = consumer.output_quantizer
                grids.placement[node.target] = "onto"
            else:
                grids.placement[node.target] = "before" if two_d else "after"
    grids.on_grid = {name: frozenset(indices) for name, indices in inputs.items()}
    return grids


_MARK = "_quantaware_integer_forward"


@contextlib.contextmanager
def fake_quant_arithmetic(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` runs its fake-quant forward even inside an
    :func:`integer_arithmetic` block (which is restored afterwards).

    Example:
        >>> import torch, quantaware
        >>> from quantaware import presets
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> x = torch.randn(8, 4)
        >>> q = quantaware.quantize(net, presets.INT8, [x], x[:1])
        >>> with integer_arithmetic(q), fake_quant_arithmetic(q):
        ...     "forward" in vars(q.get_submodule("0"))
        False
    """
    saved = [(m, m.__dict__.pop("forward")) for m in model.modules() if m.__dict__.get(_MARK)]
    try:
        yield
    finally:
        for module, forward in saved:
            module.forward = forward


@contextlib.contextmanager
def integer_arithmetic(model: nn.Module,
                       kernels: str = "onnxruntime") -> Iterator[IntegerEmulation]:
    """Within the block, ``model``'s quantized layers compute ONNX Runtime's integer kernels.

    The model must be calibrated (or trained) and in eval mode with its quantizers
    frozen; its parameters are not changed. Layers without an integer-exact form
    keep their fake-quant forward and are listed in the yielded
    :class:`IntegerEmulation`.

    Args:
        model: a calibrated or trained quantized model.
        kernels: ``"onnxruntime"`` (default) or ``"litert"`` (the arithmetic of a
            :func:`quantaware.export_tflite` file in LiteRT's int8 kernels).

    Example:
        >>> import torch, quantaware
        >>> from quantaware import presets
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> x = torch.randn(8, 3, 8, 8)
        >>> q = quantaware.quantize(net, presets.INT8, [x], x[:1])
        >>> with integer_arithmetic(q) as emulation:
        ...     y = q(x)
        >>> emulation.complete
        True
    """
    if kernels not in ("onnxruntime", "litert"):
        raise ValueError(f"kernels must be 'onnxruntime' or 'litert', got {kernels!r}")
    report = IntegerEmulation()
    # (module, the instance forward it had before: set by an enclosing block, or None)
    patched: list[tuple[nn.Module, object]] = []
    grids = _litert_grids(model) if kernels == "litert" else _LiteRTGrids()
    try:
        for name, module in model.named_modules():
            plan = _plan(module, kernels, grids.onto.get(name),
                         grids.on_grid.get(name, frozenset()),
                         grids.placement.get(name, "before"), grids.input_size.get(name))
            if plan is None and kernels == "litert" and type(module) is FakeQuantizer:
                plan = _litert_quantize_forward(module)
                if plan is not None:  # a quantizer, not a layer: not counted
                    patched.append((module, module.__dict__.get("forward")))
                    module.forward = types.MethodType(plan, module)
                    module.__dict__[_MARK] = True
                continue
            if plan is None:
                continue
            if isinstance(plan, str):
                report.fallback.append((name, plan))
                continue
            patched.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(plan, module)
            module.__dict__[_MARK] = True
            report.emulated.append(name)
        yield report
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
                module.__dict__.pop(_MARK, None)
            else:
                module.forward = previous
