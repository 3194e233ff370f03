"""Pure quantization maths: ranges, qparams, quantize, dequantize, fake-quantize.

The arithmetic follows ONNX ``QuantizeLinear``/``DequantizeLinear`` (opset 21,
https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html) so that what runs in
torch is what ONNX Runtime computes after export:

    q = saturate(round_half_to_even(x / scale) + zero_point)
    x' = (q - zero_point) * scale

Note the division: ``x * (1 / scale)`` differs in the last bit for some inputs
and would move values that sit on a rounding tie.

Fake quantization uses the straight-through estimator (Bengio et al. 2013;
Jacob et al. 2018): the gradient is passed unchanged where ``x`` falls inside the
representable range and is zero where it is clamped.

Learned step size quantization (LSQ: Esser et al. 2019, "Learned Step Size
Quantization", arXiv 1902.08153, eq. 3 and section 2.2) also gives the scale a
gradient, scaled by ``g = 1 / sqrt(N * Qp)``; LSQ+ (Bhalgat et al. 2020, arXiv
2004.09576) adds a learned offset, here an integer zero point rounded with a
straight-through estimator so the exported ``QuantizeLinear`` computes the same.

Example:
    >>> import torch
    >>> x = torch.tensor([-1.0, 0.0, 0.26, 2.0])
    >>> scale, zp = choose_qparams(x.min(), x.max(), -128, 127, symmetric=False)
    >>> q = quantize(x, scale, zp, -128, 127)
    >>> torch.allclose(dequantize(q, scale, zp), x, atol=float(scale) / 2)
    True
"""

from __future__ import annotations

import functools
import math
import struct

import torch

__all__ = [
    "all_finite",
    "choose_qparams",
    "choose_qparams_scalar",
    "dequantize",
    "fake_quantize",
    "fake_quantize_activated",
    "fake_quantize_lsq",
    "lsq_grad_scale",
    "quant_range",
    "quantize",
    "storage_dtype",
    "symmetric_scale",
]

# Smallest scale ever produced: keeps scales finite and non-zero for constant or
# all-zero tensors (float32 eps, as torch.ao and ONNX Runtime's quantizer do).
SCALE_EPS = float(torch.finfo(torch.float32).eps)


def quant_range(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range of a ``bits``-wide format.

    Example:
        >>> quant_range(8, True), quant_range(8, False), quant_range(8, True, True)
        ((-128, 127), (0, 255), (-127, 127))
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be from 2 to 16, got {bits}")
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    if narrow_range:
        qmin += 1
    return qmin, qmax


def storage_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The smallest torch integer dtype that holds [qmin, qmax] (int8/uint8/int16/uint16/int32).

    Example:
        >>> storage_dtype(-128, 127), storage_dtype(0, 255), storage_dtype(0, 65535)
        (torch.int8, torch.uint8, torch.uint16)
    """
    if qmin >= 0:
        for dtype in (torch.uint8, torch.uint16):
            if qmax <= torch.iinfo(dtype).max:
                return dtype
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise ValueError(f"no integer storage for range [{qmin}, {qmax}]")


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of ``x``."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value of every tensor is finite.

    One scalar read per 0-d tensor (``torch.isfinite`` runs several kernels even
    on one value; observers and quantizers call this every training step).

    Example:
        >>> all_finite(torch.tensor(1.0), torch.tensor([0.0, float("nan")]))
        False
    """
    for t in tensors:
        if t.dim() == 0:
            if not math.isfinite(float(t)):
                return False
        # A finite sum means finite values (the exact check only runs when not).
        elif not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping [min_val, max_val] onto [qmin, qmax].

    The range is widened to include 0 (so zero padding and ReLU are exact).
    Works elementwise, so per-channel ranges give per-channel qparams. Scales
    are never zero, NaN or Inf; non-finite ranges raise.

    Returns:
        ``(scale float32, zero_point int32)`` with the shape of ``min_val``.

    Example:
        >>> s, z = choose_qparams(torch.tensor(0.0), torch.tensor(2.55), 0, 255, False)
        >>> round(float(s), 6), int(z)
        (0.01, 0)
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if not all_finite(min_val, max_val):
        raise ValueError(_NON_FINITE_RANGE)
    if symmetric:
        # max(-min(lo, 0), max(hi, 0)) without the clamps: the two differ only where
        # both are negative, which the floor at SCALE_EPS maps to the same scale.
        scale = _symmetric_scale(torch.maximum(max_val, torch.neg(min_val)), qmin, qmax)
        return scale, torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int32)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=SCALE_EPS)
    if not all_finite(scale):  # max - min beyond float32's largest value
        raise ValueError(_RANGE_TOO_WIDE)
    zero_point = qmin - torch.round(min_neg / scale)
    zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int32)
    return scale.to(torch.float32), zero_point


_FLOAT32 = struct.Struct("f")


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float); beyond float32's
    range, an infinity (older Pythons' ``struct`` raises there instead)."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def choose_qparams_scalar(min_val: float, max_val: float, qmin: int, qmax: int,
                          symmetric: bool) -> tuple[float, int]:
    """:func:`choose_qparams` for one range given as Python numbers: the same
    float32 scale, bit for bit, without a tensor op.

    Per-tensor quantizers re-derive their qparams at every QAT step; on a CPU
    each of the dozen tensor ops on one value costs more than the arithmetic.
    Each float32 operation here is done in double and rounded to float32, which
    gives the correctly rounded float32 result for ``+ - * /`` (double carries
    more than twice float32's precision).

    Example:
        >>> choose_qparams_scalar(0.0, 2.55, 0, 255, False)
        (0.009999999776482582, 0)
    """
    if not (math.isfinite(min_val) and math.isfinite(max_val)):
        raise ValueError(_NON_FINITE_RANGE)
    lo, hi = _f32(min_val), _f32(max_val)
    if symmetric:
        scale = max(_f32(max(hi, -lo) / ((qmax - qmin) / 2)), SCALE_EPS)
        return scale, (qmin + qmax + 1) // 2
    min_neg, max_pos = min(lo, 0.0), max(hi, 0.0)
    width = _f32(max_pos - min_neg)
    if math.isinf(width):  # rounds beyond float32's largest value, as the tensor's does
        raise ValueError(_RANGE_TOO_WIDE)
    scale = max(_f32(width / float(qmax - qmin)), SCALE_EPS)
    zero_point = qmin - round(_f32(min_neg / scale))
    return scale, int(min(max(zero_point, qmin), qmax))


_RANGE_TOO_WIDE = (
    "cannot choose qparams: the range's width exceeds float32's largest value (3.4e38); "
    "check the data for overflowed values near float32's limits"
)
_NON_FINITE_RANGE = (
    "cannot choose qparams from a non-finite range (NaN/Inf seen, or never observed); "
    "check the calibration data for NaN/Inf values"
)


def symmetric_scale(absmax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The symmetric scale for the largest magnitude ``max(|x|)`` (per tensor or channel).

    Equal to the scale of ``choose_qparams(min(x), max(x), qmin, qmax,
    symmetric=True)`` with one reduction over ``x`` instead of two; the zero
    point is the centre of the range, ``(qmin + qmax + 1) // 2``.

    Example:
        >>> symmetric_scale(torch.tensor([1.27, 0.0]), -127, 127).tolist()
        [0.009999999776482582, 1.1920928955078125e-07]
    """
    absmax = torch.as_tensor(absmax, dtype=torch.float32)
    if not all_finite(absmax):
        raise ValueError(_NON_FINITE_RANGE)
    return _symmetric_scale(absmax, qmin, qmax)


def _symmetric_scale(absmax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(absmax / ((qmax - qmin) / 2), min=SCALE_EPS).to(torch.float32)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """ONNX ``QuantizeLinear``: ``saturate(round_half_even(x / scale) + zero_point)``.

    Args:
        axis: the channel axis of ``x`` for per-channel ``scale``/``zero_point``.
        dtype: integer storage dtype; defaults to :func:`storage_dtype`.

    Example:
        >>> quantize(torch.tensor([0.5, 1.5, 2.5]), torch.tensor(1.0), torch.tensor(0), -8, 7)
        tensor([0, 2, 2], dtype=torch.int8)
    """
    s = _broadcast(scale.to(torch.float32), x, axis)
    z = _broadcast(zero_point, x, axis).to(torch.float32)
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, qmin, qmax)
    return q.to(dtype or storage_dtype(qmin, qmax))


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None = None,
) -> torch.Tensor:
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` in float32.

    Example:
        >>> dequantize(torch.tensor([0, 2], dtype=torch.int8), torch.tensor(0.5), torch.tensor(0))
        tensor([0., 1.])
    """
    s = _broadcast(scale.to(torch.float32), q, axis)
    z = _broadcast(zero_point, q, axis).to(torch.float32)
    return (q.to(torch.float32) - z) * s


def _rounded_and_clamped(x, scale, zero_point, qmin, qmax, axis):
    """``v = x / s``, ``r = round(v)`` and ``c = clamp(r, qmin - z, qmax - z)``.

    Clamping ``r`` to the zero-point-shifted bounds equals ONNX's
    ``clamp(r + z, qmin, qmax) - z`` exactly (integers in float32: ``|r + z|`` is
    either exact or far outside the range), and takes one pass instead of three;
    ``c * s`` is then the fake-quantized value.
    """
    s, z = _broadcast(scale, x, axis), _zero_shift(zero_point, x, axis)
    v = x / s
    r = torch.round(v)
    return s, v, r, torch.clamp(r, qmin - z, qmax - z)


def _zero_shift(zero_point: torch.Tensor | int, x: torch.Tensor,
                axis: int | None) -> float | torch.Tensor:
    """The zero point as clamp bounds want it: a Python number when there is one
    value (symmetric per-channel weights have only zeros), as clamp runs several
    times faster with scalar bounds; else broadcast to ``x``."""
    if not isinstance(zero_point, torch.Tensor) or zero_point.dim() == 0:
        return float(zero_point)
    if not bool(zero_point.any()):
        return 0.0
    return _broadcast(zero_point, x, axis).to(x.dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _in_range_mask(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``1.0`` where rounding ``r`` was not clamped (``r == c``), else ``0.0``, in
    ``r``'s buffer. A float mask: comparisons with a bool result, and products with
    one, run several times slower than float arithmetic on CPU."""
    return r.eq_(c)


_FLOAT32_BITS = struct.Struct("I")


def _next_f32(value: float, up: bool) -> float:
    """The float32 neighbour of the float32 ``value`` towards +inf (``up``) or -inf."""
    if value == 0.0:
        tiny = _FLOAT32.unpack(_FLOAT32_BITS.pack(1))[0]
        return tiny if up else -tiny
    bits = _FLOAT32_BITS.unpack(_FLOAT32.pack(value))[0]
    bits += 1 if (value > 0) == up else -1
    return _FLOAT32.unpack(_FLOAT32_BITS.pack(bits))[0]


def _quotient_f32(x: float, scale: float) -> float:
    """float32 ``x / scale`` (inf where it overflows), as torch's division computes it."""
    q = x / scale
    try:
        return _f32(q)
    except OverflowError:
        return math.copysign(math.inf, q)


@functools.lru_cache(maxsize=4096)
def _pass_bounds(scale: float, low: float, high: float) -> tuple[float, float]:
    """float32 bounds ``(a, b)`` with ``low <= round(x / scale) <= high`` exactly
    when ``a < x < b``, for every float32 ``x`` (float32 division, ties to even).

    ``round(fl(x / s))`` is monotone in ``x``, so the ``x`` whose rounded value
    lies in the integer range form one interval of floats: found here from its
    estimate ``(low - 0.5) * s`` by stepping over the few float32 values around
    it. With these bounds the straight-through gradient is one fused pass over
    the saved input (``hardtanh_backward``) instead of a mask built in forward.
    """
    def inside(x: float) -> bool:
        return low <= round(_quotient_f32(x, scale)) <= high if math.isfinite(x) else False

    def edge(estimate: float, up: bool) -> float:
        try:
            x = _f32(estimate)
        except OverflowError:
            return math.copysign(math.inf, estimate)
        # Walk to the last x inside the range (towards -inf for the lower bound).
        for _ in range(64):
            if not inside(x):
                x = _next_f32(x, not up)
                continue
            beyond = _next_f32(x, up)
            if not math.isfinite(beyond) or not inside(beyond):
                return beyond
            x = beyond
        raise ArithmeticError(f"no float32 bound found for scale {scale}")

    return edge((low - 0.5) * scale, up=False), edge((high + 0.5) * scale, up=True)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Straight-through fake quantization with per-channel (or tensor) qparams;
    saves only the in-range mask."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        s, z = _broadcast(scale, x, axis), _zero_shift(zero_point, x, axis)
        r = torch.div(x, s).round_()  # x / s is not needed again: round in place
        c = torch.clamp(r, qmin - z, qmax - z)
        ctx.save_for_backward(_in_range_mask(r, c))
        return c.mul_(s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


class _FakeQuantizeSTEPerTensor(torch.autograd.Function):
    """Straight-through fake quantization with one scale: ``clamp(round(x / s),
    low, high) * s``, gradient passed where ``a < x < b``.

    The in-range test on ``round(x / s)`` is an interval of ``x`` (see
    :func:`_pass_bounds`), so forward is four in-place passes and saves ``x``
    (which its producer usually keeps anyway), and backward is one fused pass.
    """

    @staticmethod
    def forward(ctx, x, scale, low, high, bounds):  # type: ignore[override]
        ctx.bounds = bounds
        ctx.save_for_backward(x)
        return torch.div(x, scale).round_().clamp_(low, high).mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        a, b = ctx.bounds
        return torch.ops.aten.hardtanh_backward(grad, x, a, b), None, None, None, None


def _per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int) -> bool:
    """Whether the single-scale float32 path applies (its bounds assume float32)."""
    return x.dtype == torch.float32 and scale.dim() == 0 and (
        not isinstance(zero_point, torch.Tensor) or zero_point.dim() == 0)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    own_range: bool = False,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float, with a straight-through gradient.

    The gradient w.r.t. ``x`` is 1 where ``round(x / scale) + zero_point`` lies in
    ``[qmin, qmax]`` and 0 where it is clamped. ``scale`` and ``zero_point`` get no
    gradient here (see the learned-step-size quantizer for that).

    ``own_range=True`` declares the qparams derived from ``x``'s own min-max range
    (weights during QAT): nothing is clipped, so the gradient is the identity and
    no in-range mask is computed or saved (same values, fewer passes).

    Example:
        >>> x = torch.tensor([0.2, 0.9, 5.0], requires_grad=True)
        >>> y = fake_quantize(x, torch.tensor(0.5), torch.tensor(0), -2, 1)
        >>> y.sum().backward(); y.detach(), x.grad
        (tensor([0.0000, 0.5000, 0.5000]), tensor([1., 0., 0.]))
    """
    if scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    if not _needs_grad(x):
        return _fake_quantize_in_place(x, scale, zero_point, qmin, qmax, axis)
    if own_range:
        return _FakeQuantizeInRange.apply(x, scale, zero_point, qmin, qmax, axis)
    if _per_tensor(x, scale, zero_point):
        z = float(zero_point)
        low, high = qmin - z, qmax - z
        return _FakeQuantizeSTEPerTensor.apply(x, scale, low, high,
                                               _pass_bounds(float(scale), low, high))
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, axis)


def fake_quantize_activated(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int,
    qmin: int,
    qmax: int,
    upper: float = math.inf,
) -> torch.Tensor | None:
    """``fake_quantize(clamp(x, 0, upper))`` (ReLU, or ReLU6 with ``upper=6``)
    with one scale and zero point, without the activation's own pass.

    Values and gradients are those of the activation followed by
    :func:`fake_quantize`: the integer range already clamps at the zero point
    (``0.0``), and the activation's gradient mask joins the in-range one. Returns
    ``None`` where that does not hold (a ``upper`` that is not clipped by the
    integer range anyway, a zero point outside it, per-channel qparams, or a
    non-float32 ``x``); apply the activation and :func:`fake_quantize` then.

    Example:
        >>> x = torch.tensor([-1.0, 0.26, 9.0], requires_grad=True)
        >>> y = fake_quantize_activated(x, torch.tensor(0.02), 0, 0, 255, upper=6.0)
        >>> y.sum().backward(); y.detach(), x.grad
        (tensor([0.0000, 0.2600, 5.1000]), tensor([0., 1., 0.]))
        >>> fake_quantize_activated(x, torch.tensor(0.5), 0, 0, 255, upper=6.0) is None
        True
    """
    if not _per_tensor(x, scale, zero_point) or scale.dtype != torch.float32:
        return None
    s, z = float(scale), float(zero_point)
    low, high = qmin - z, qmax - z
    if not low <= 0.0 <= high or (
            math.isfinite(upper) and round(_quotient_f32(upper, s)) < high):
        return None
    if not _needs_grad(x):
        return torch.div(x, scale).round_().clamp_(0.0, high).mul_(scale)
    a, b = _pass_bounds(s, low, high)
    return _FakeQuantizeSTEPerTensor.apply(x, scale, 0.0, high, (max(a, 0.0), min(b, upper)))


class _FakeQuantizeInRange(torch.autograd.Function):
    """Fake quantization of a tensor whose qparams were just chosen from its own
    range: every value is representable (up to the rounding of the extreme
    ones), so the straight-through gradient is the identity and nothing is saved."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        return _fake_quantize_in_place(x, scale, zero_point, qmin, qmax, axis)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None, None, None


def _fake_quantize_in_place(x, scale, zero_point, qmin, qmax, axis) -> torch.Tensor:
    """The values of :func:`fake_quantize` with one new tensor instead of three:
    on large weights each fresh buffer costs page faults as well as a pass."""
    s, z = _broadcast(scale, x, axis), _zero_shift(zero_point, x, axis)
    return torch.div(x, s).round_().clamp_(qmin - z, qmax - z).mul_(s)


def _reduce_to(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum ``t`` (shaped like ``x``) down to the per-tensor or per-channel qparam shape."""
    if axis is None:
        return t.sum()
    axis = axis % x.dim()
    return t.sum(dim=[d for d in range(x.dim()) if d != axis])


def _reduce_product(a: torch.Tensor, b: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``_reduce_to(a * b)`` in one pass (a dot product per qparam, no temporary)."""
    if axis is None:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    if axis % a.dim() == 0:
        n = a.shape[0]
        return torch.bmm(a.reshape(n, 1, -1), b.reshape(n, -1, 1)).reshape(n)
    return _reduce_to(a * b, a, axis)


class _FakeQuantizeLSQ(torch.autograd.Function):
    """Fake quantization with LSQ gradients for ``x``, ``scale`` and (optionally) offset.

    Saves ``x / s``, the clamped integers and the in-range mask, so backward is
    three passes (masked gradient, residual, one dot product per scale).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_scale):  # type: ignore[override]
        s, v, r, c = _rounded_and_clamped(x, scale, zero_point, qmin, qmax, axis)
        inside = _in_range_mask(r, c)
        ctx.save_for_backward(v, c, inside, scale)
        ctx.meta = (axis, grad_scale)
        return c * s

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, c, inside, scale = ctx.saved_tensors
        axis, grad_scale = ctx.meta
        grad_x = grad * inside
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            # d x_hat / d s: round(v) - v inside the range, the clamped bound
            # (qmin - z or qmax - z) outside, i.e. c - v * inside.
            ds = c - v * inside
            grad_s = _reduce_product(grad, ds, axis).reshape(scale.shape) * grad_scale
        if ctx.needs_input_grad[2]:
            # d x_hat / d z: 0 inside the range (z cancels), -s where clamped.
            grad_z = _reduce_to(grad - grad_x, grad, axis)
            grad_z = grad_z.reshape(scale.shape) * (-scale) * grad_scale
        return (grad_x if ctx.needs_input_grad[0] else None), grad_s, grad_z, None, None, \
            None, None


def fake_quantize_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Fake quantization whose scale (and float zero point) receive LSQ gradients.

    The forward pass equals :func:`fake_quantize` (ONNX arithmetic). Backward:

    - ``x``: 1 inside the representable range, 0 where clamped (straight through);
    - ``scale``: ``round(x/s) - x/s`` inside, ``qmin - z`` / ``qmax - z`` where
      clamped, summed per qparam and multiplied by ``grad_scale`` (LSQ uses
      ``1 / sqrt(N * Qp)``, see :func:`lsq_grad_scale`);
    - ``zero_point`` (a float tensor holding integers, when it requires grad):
      0 inside, ``-scale`` where clamped, times ``grad_scale``.

    Example:
        >>> x = torch.tensor([0.2, 0.9, 5.0])
        >>> s = torch.tensor(0.5, requires_grad=True)
        >>> y = fake_quantize_lsq(x, s, torch.tensor(0.0), -2, 1)
        >>> y.sum().backward(); y.detach(), s.grad
        (tensor([0.0000, 0.5000, 0.5000]), tensor(1.6000))
    """
    zero_point = zero_point.to(x.dtype)
    if not _needs_grad(x, scale, zero_point):
        return _fake_quantize_in_place(x, scale, zero_point, qmin, qmax, axis)
    return _FakeQuantizeLSQ.apply(x, scale, zero_point, qmin, qmax, axis, float(grad_scale))


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * Qp)`` (Esser et al. 2019, section 2.2).

    Example:
        >>> lsq_grad_scale(100, 1)
        0.1
    """
    return 1.0 / max(float(numel_per_scale) * max(qmax, 1), 1.0) ** 0.5
