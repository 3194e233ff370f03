"""quantaware.primitives: bit-exactness against ONNX Runtime and torch, STE, qparams."""

from __future__ import annotations

import functools
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from quantaware.primitives import (
    SCALE_EPS,
    choose_qparams,
    choose_qparams_scalar,
    dequantize,
    fake_quantize,
    fake_quantize_lsq,
    quant_range,
    quantize,
    storage_dtype,
    symmetric_scale,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = settings(max_examples=60, deadline=None, database=None)

INT_FORMATS = {
    "int8": (TensorProto.INT8, np.int8, -128, 127),
    "uint8": (TensorProto.UINT8, np.uint8, 0, 255),
}


# -- ONNX Runtime reference ---------------------------------------------------------


@functools.cache
def _qdq_session(fmt: str, axis: int | None) -> ort.InferenceSession:
    """QuantizeLinear and DequantizeLinear (opset 21) on runtime inputs x, scale, zp, q."""
    qtype = INT_FORMATS[fmt][0]
    qparam_shape = [None] if axis is not None else []
    kw = {} if axis is None else {"axis": axis}
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT, qparam_shape),
        helper.make_tensor_value_info("zp", qtype, qparam_shape),
        helper.make_tensor_value_info("q_in", qtype, None),
    ]
    outputs = [
        helper.make_tensor_value_info("q", qtype, None),
        helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **kw),
        helper.make_node("DequantizeLinear", ["q_in", "scale", "zp"], ["x_out"], **kw),
    ]
    graph = helper.make_graph(nodes, "qdq", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _random_case(seed: int, fmt: str, rank: int, per_channel: bool, tie_fraction: float):
    """Random x, scale, zero point (numpy) and an axis; some x sit exactly on .5 ties."""
    rng = np.random.default_rng(seed)
    _, np_dtype, qmin, qmax = INT_FORMATS[fmt]
    shape = tuple(int(d) for d in rng.integers(1, 6, size=rank))
    axis = int(rng.integers(-rank, rank)) if per_channel else None
    nch = shape[axis] if per_channel else None
    qshape = (nch,) if per_channel else ()
    scale = np.asarray(np.exp(rng.uniform(np.log(1e-4), np.log(2.0), size=qshape)), np.float32)
    zp = np.asarray(rng.integers(qmin, qmax + 1, size=qshape), np_dtype)
    bshape = [1] * rank
    if per_channel:
        bshape[axis] = nch
    s_b = scale.reshape(bshape)
    # Values spread beyond the representable range so that saturation is exercised.
    k = rng.integers(-300, 300, size=shape)
    x = (rng.normal(size=shape) * 150.0 * s_b).astype(np.float32)
    ties = ((k + 0.5) * s_b).astype(np.float32)
    mask = rng.random(shape) < tie_fraction
    x = np.where(mask, ties, x).astype(np.float32)
    return x, scale, zp, axis, qmin, qmax


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(sorted(INT_FORMATS)),
    rank=st.integers(1, 4),
    per_channel=st.booleans(),
    tie_fraction=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_quantize_dequantize_bit_exact_vs_onnxruntime(seed, fmt, rank, per_channel, tie_fraction):
    x, scale, zp, axis, qmin, qmax = _random_case(seed, fmt, rank, per_channel, tie_fraction)
    sess = _qdq_session(fmt, axis)
    rng = np.random.default_rng(seed + 1)
    q_in = rng.integers(qmin, qmax + 1, size=x.shape).astype(INT_FORMATS[fmt][1])
    ref_q, ref_x = sess.run(None, {"x": x, "scale": scale, "zp": zp, "q_in": q_in})

    t_scale = torch.from_numpy(scale)
    t_zp = torch.from_numpy(zp.astype(np.int32))
    q = quantize(torch.from_numpy(x), t_scale, t_zp, qmin, qmax, axis=axis)
    assert q.dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    np.testing.assert_array_equal(q.numpy(), ref_q)

    deq = dequantize(torch.from_numpy(q_in), t_scale, t_zp, axis=axis)
    assert deq.dtype == torch.float32
    np.testing.assert_array_equal(deq.numpy(), ref_x)


def test_onnxruntime_reference_sees_real_ties():
    """The tie construction really produces x / scale == k + 0.5 for most elements."""
    x, scale, *_ = _random_case(7, "int8", 3, False, 1.0)
    ratio = x.astype(np.float32) / scale
    exact_ties = np.abs(ratio - np.floor(ratio)) == 0.5
    assert exact_ties.mean() > 0.5


def test_ties_round_half_to_even():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    q = quantize(x, torch.tensor(1.0), torch.tensor(0), -128, 127)
    assert q.tolist() == [-2, -2, 0, 0, 2, 2, 4]


def test_quantize_saturates():
    x = torch.tensor([-1000.0, 1000.0])
    assert quantize(x, torch.tensor(1.0), torch.tensor(0), -128, 127).tolist() == [-128, 127]
    assert quantize(x, torch.tensor(1.0), torch.tensor(3), -7, 7).tolist() == [-7, 7]


# -- torch fake-quantize reference ---------------------------------------------------


def _float32_round_mismatch(x, scale):
    """Elements where round(x / scale) != round(x * (1 / scale)) in float32."""
    return torch.round(x / scale) != torch.round(x * (1.0 / scale))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), exp=st.integers(-10, 2),
       fmt=st.sampled_from(sorted(INT_FORMATS)))
def test_fake_quantize_per_tensor_matches_torch_on_power_of_two_ties(seed, exp, fmt):
    _, _, qmin, qmax = INT_FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    scale = 2.0**exp
    zp = int(torch.randint(qmin, qmax + 1, (), generator=gen))
    k = torch.randint(-300, 300, (512,), generator=gen).float()
    x = torch.cat([(k + 0.5) * scale, torch.randn(512, generator=gen) * 100 * scale])
    ours = fake_quantize(x, torch.tensor(scale), torch.tensor(zp), qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    assert torch.equal(ours, ref)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), rank=st.integers(1, 4),
       fmt=st.sampled_from(sorted(INT_FORMATS)))
def test_fake_quantize_per_channel_matches_torch_on_power_of_two_ties(seed, rank, fmt):
    _, _, qmin, qmax = INT_FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(int(d) for d in torch.randint(1, 6, (rank,), generator=gen))
    axis = int(torch.randint(0, rank, (), generator=gen))
    nch = shape[axis]
    scale = 2.0 ** torch.randint(-10, 3, (nch,), generator=gen).float()
    zp = torch.randint(qmin, qmax + 1, (nch,), generator=gen, dtype=torch.int32)
    bshape = [1] * rank
    bshape[axis] = nch
    k = torch.randint(-300, 300, shape, generator=gen).float()
    x = (k + 0.5) * scale.reshape(bshape)
    ours = fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("seed", range(4))
def test_fake_quantize_matches_torch_for_random_scales_except_reciprocal_rounding(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, 8, generator=gen) * 4
    qmin, qmax = -128, 127
    # per channel on axis 1
    scale = (torch.rand(16, generator=gen) * 0.1 + 1e-3).float()
    zp = torch.randint(-20, 20, (16,), generator=gen, dtype=torch.int32)
    ours = fake_quantize(x, scale, zp, qmin, qmax, axis=1)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax)
    allowed = _float32_round_mismatch(x, scale.reshape(1, -1, 1))
    differs = ours != ref
    assert not (differs & ~allowed).any()
    assert allowed.float().mean() < 1e-3
    # per tensor
    s = float(torch.rand((), generator=gen) * 0.1 + 1e-3)
    s32 = torch.tensor(s, dtype=torch.float32)
    ours = fake_quantize(x, s32, torch.tensor(5), 0, 255)
    ref = torch.fake_quantize_per_tensor_affine(x, float(s32), 5, 0, 255)
    allowed = _float32_round_mismatch(x, s32)
    assert not ((ours != ref) & ~allowed).any()
    assert allowed.float().mean() < 1e-3


def test_division_not_reciprocal_multiplication():
    """quantize computes x / scale (as ONNX), which differs from x * (1 / scale) on ties."""
    k = torch.arange(-120, 120).float()
    checked = 0
    for s in (0.045238714665174484, 0.2491282969713211, 0.38511088490486145):
        scale = torch.tensor(s, dtype=torch.float32)
        x = (k + 0.5) * scale
        mismatch = _float32_round_mismatch(x, scale)
        assert mismatch.any()
        q = quantize(x, scale, torch.tensor(0), -128, 127).float()
        assert torch.equal(q, torch.clamp(torch.round(x / scale), -128, 127))
        reciprocal = torch.clamp(torch.round(x * (1.0 / scale)), -128, 127)
        assert not torch.equal(q[mismatch], reciprocal[mismatch])
        checked += int(mismatch.sum())
    assert checked > 0


# -- straight-through gradient ---------------------------------------------------------


def test_ste_gradient_per_tensor():
    gen = torch.Generator().manual_seed(0)
    scale, zp, qmin, qmax = torch.tensor(0.05), torch.tensor(10), 0, 255
    x = (torch.randn(1000, generator=gen) * 8).requires_grad_()
    upstream = torch.randn(1000, generator=gen)
    fake_quantize(x, scale, zp, qmin, qmax).backward(upstream)
    q = torch.round(x.detach() / scale) + zp
    inside = (q >= qmin) & (q <= qmax)
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad[inside], upstream[inside])
    assert torch.all(x.grad[~inside] == 0)


def test_ste_gradient_per_channel():
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.01, 0.1, 1.0])
    zp = torch.tensor([0, -5, 3], dtype=torch.int32)
    x = (torch.randn(3, 200, generator=gen) * torch.tensor([[3.0], [20.0], [300.0]]))
    x.requires_grad_()
    fake_quantize(x, scale, zp, -128, 127, axis=0).sum().backward()
    q = torch.round(x.detach() / scale[:, None]) + zp[:, None]
    inside = (q >= -128) & (q <= 127)
    assert (~inside).sum(1).gt(0).all() and inside.sum(1).gt(0).all()
    assert torch.equal(x.grad, inside.float())
    # torch's own fake quantize uses the same straight-through mask
    x2 = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_channel_affine(x2, scale, zp, 0, -128, 127).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_ste_gradient_at_range_boundaries():
    x = torch.tensor([-128.0, 127.0, -128.6, 127.6, 127.4], requires_grad=True)
    fake_quantize(x, torch.tensor(1.0), torch.tensor(0), -128, 127).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_fake_quantize_equals_dequantize_of_quantize():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, generator=gen) * 3
    scale = torch.rand(6, generator=gen) * 0.05 + 0.005
    zp = torch.randint(0, 256, (6,), generator=gen, dtype=torch.int32)
    expected = dequantize(quantize(x, scale, zp, 0, 255, axis=1), scale, zp, axis=1)
    assert torch.equal(fake_quantize(x, scale, zp, 0, 255, axis=1), expected)


# -- choose_qparams -------------------------------------------------------------------


def _half_step(scale: torch.Tensor, value: float) -> float:
    """Half a quantization step plus float32 rounding of the dequantized value.

    (Symmetric ranges map the range end onto qmax + 0.5, which saturates: exactly
    half a step of error there.)
    """
    return float(scale) / 2 + 4 * float(np.spacing(np.float32(abs(value)))) + 1e-30


def _check_valid(scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> None:
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zp >= qmin) & (zp <= qmax)).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.5, -2.25, 1e-30])
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (0, 255), (-127, 127), (-8, 7)])
def test_choose_qparams_constant_inputs(symmetric, value, qmin, qmax):
    v = torch.tensor(value)
    scale, zp = choose_qparams(v, v, qmin, qmax, symmetric)
    _check_valid(scale, zp, qmin, qmax)
    assert float(scale) >= SCALE_EPS
    zero = dequantize(quantize(torch.zeros(()), scale, zp, qmin, qmax), scale, zp)
    assert float(zero) == 0.0
    # the constant itself is represented to within half a step
    back = dequantize(quantize(v, scale, zp, qmin, qmax), scale, zp)
    assert abs(float(back) - value) <= _half_step(scale, value)


def test_choose_qparams_per_channel_with_constant_and_zero_channels():
    min_val = torch.tensor([-1.0, 0.0, 2.0, -3.0, 5.0])
    max_val = torch.tensor([1.0, 0.0, 2.0, -3.0, 9.0])
    for symmetric in (True, False):
        scale, zp = choose_qparams(min_val, max_val, -128, 127, symmetric)
        assert scale.shape == zp.shape == (5,)
        _check_valid(scale, zp, -128, 127)
        zeros = dequantize(quantize(torch.zeros(5), scale, zp, -128, 127, axis=0), scale, zp, 0)
        assert torch.equal(zeros, torch.zeros(5))


@SETTINGS
@given(
    lo=st.floats(-1e4, 1e4, allow_nan=False, width=32),
    hi=st.floats(-1e4, 1e4, allow_nan=False, width=32),
    symmetric=st.booleans(),
    fmt=st.sampled_from([(8, True, False), (8, False, False), (8, True, True), (4, True, False),
                         (16, True, False), (2, False, False)]),
)
def test_choose_qparams_properties(lo, hi, symmetric, fmt):
    lo, hi = min(lo, hi), max(lo, hi)
    qmin, qmax = quant_range(*fmt)
    scale, zp = choose_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax, symmetric)
    _check_valid(scale, zp, qmin, qmax)
    # zero is exactly representable
    zero = dequantize(quantize(torch.zeros(()), scale, zp, qmin, qmax), scale, zp)
    assert float(zero) == 0.0
    # the observed range (widened to include 0) is covered to within half a step
    for v in (min(lo, 0.0), max(hi, 0.0)):
        back = dequantize(quantize(torch.tensor(v), scale, zp, qmin, qmax), scale, zp)
        assert abs(float(back) - v) <= _half_step(scale, v)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_choose_qparams_symmetric_signed_zero_point_is_zero(bits, narrow):
    qmin, qmax = quant_range(bits, True, narrow)
    gen = torch.Generator().manual_seed(bits)
    lo = -torch.rand(6, generator=gen) * 5
    hi = torch.rand(6, generator=gen) * 5
    scale, zp = choose_qparams(lo, hi, qmin, qmax, symmetric=True)
    assert torch.equal(zp, torch.zeros(6, dtype=torch.int32))
    amax = torch.maximum(-lo, hi)
    torch.testing.assert_close(scale, amax / ((qmax - qmin) / 2))


def test_choose_qparams_asymmetric_uint8_reference_values():
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, symmetric=False)
    assert float(scale) == pytest.approx(4.0 / 255)
    assert int(zp) == round(1.0 / (4.0 / 255))  # 64
    # all-positive range: zero point at qmin
    scale, zp = choose_qparams(torch.tensor(1.0), torch.tensor(2.55), 0, 255, symmetric=False)
    assert float(scale) == pytest.approx(0.01) and int(zp) == 0
    # all-negative range: zero point at qmax
    scale, zp = choose_qparams(torch.tensor(-2.55), torch.tensor(-1.0), 0, 255, symmetric=False)
    assert float(scale) == pytest.approx(0.01) and int(zp) == 255


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(float("nan"), 1.0), (0.0, float("nan")), (float("-inf"), 1.0), (0.0, float("inf")),
     (float("inf"), float("-inf"))],
)
def test_choose_qparams_rejects_non_finite_ranges(lo, hi):
    with pytest.raises(ValueError, match="NaN/Inf"):
        choose_qparams(torch.tensor(lo), torch.tensor(hi), -128, 127, symmetric=False)


def test_choose_qparams_rejects_one_non_finite_channel():
    lo = torch.tensor([0.0, -1.0, float("nan")])
    hi = torch.tensor([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        choose_qparams(lo, hi, -128, 127, symmetric=True)



@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("qmin", "qmax"), [(0, 255), (-128, 127), (-127, 127), (-8, 7),
                                            (0, 3), (-1, 1), (-32768, 32767)])
def test_choose_qparams_scalar_is_bitwise_choose_qparams(symmetric, qmin, qmax):
    # Ranges over 24 decades, zero-width and all-zero ones, with the float32 results
    # of the tensor version as the reference: scale bits and zero point must match.
    gen = torch.Generator().manual_seed(qmax - qmin + symmetric)
    n = 4000
    lo = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 6)
    hi = lo + torch.rand(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 6)
    lo[:50], hi[50:100], hi[100:150] = 0.0, 0.0, lo[100:150]
    lo[150:200], hi[150:200] = 1e-30, 3e-30
    scale, zero_point = choose_qparams(lo, hi, qmin, qmax, symmetric)
    got = [choose_qparams_scalar(a, b, qmin, qmax, symmetric)
           for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    assert [s for s, _ in got] == scale.tolist()
    assert [z for _, z in got] == zero_point.tolist()


def test_a_range_wider_than_float32_is_refused_not_given_an_infinite_scale():
    lo, hi = torch.tensor([-3e38, -1.0]), torch.tensor([3e38, 1.0])
    with pytest.raises(ValueError, match="width exceeds float32"):
        choose_qparams(lo, hi, 0, 255, symmetric=False)
    with pytest.raises(ValueError, match="width exceeds float32"):
        choose_qparams_scalar(-3e38, 3e38, 0, 255, symmetric=False)
    edge = float(torch.finfo(torch.float32).max)  # the widest range that still fits
    assert choose_qparams_scalar(0.0, edge, 0, 255, False)[0] == float(
        choose_qparams(torch.tensor(0.0), torch.tensor(edge), 0, 255, False)[0])
    scale, _ = choose_qparams(lo, hi, -128, 127, symmetric=True)  # symmetric: max |x|
    assert torch.isfinite(scale).all()


@pytest.mark.parametrize(("lo", "hi"), [(float("nan"), 1.0), (0.0, float("inf"))])
def test_choose_qparams_scalar_rejects_non_finite_ranges(lo, hi):
    with pytest.raises(ValueError, match="NaN/Inf"):
        choose_qparams_scalar(lo, hi, 0, 255, symmetric=False)


@pytest.mark.parametrize(("qmin", "qmax"), [(-127, 127), (-128, 127), (-8, 7)])
def test_symmetric_scale_is_choose_qparams_scale(qmin, qmax):
    w = torch.randn(16, 40) * torch.logspace(-6, 3, 16).unsqueeze(1)
    w[3] = 0.0
    expected, _ = choose_qparams(w.amin(1), w.amax(1), qmin, qmax, symmetric=True)
    assert torch.equal(symmetric_scale(w.abs().amax(1), qmin, qmax), expected)
    with pytest.raises(ValueError, match="NaN/Inf"):
        symmetric_scale(torch.tensor([1.0, float("nan")]), qmin, qmax)

# -- quant_range / storage_dtype -------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 17))
def test_quant_range_all_widths(bits):
    assert quant_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant_range(bits, False) == (0, 2**bits - 1)
    assert quant_range(bits, True, narrow_range=True) == (-(2 ** (bits - 1)) + 1,
                                                          2 ** (bits - 1) - 1)
    assert quant_range(bits, False, narrow_range=True) == (1, 2**bits - 1)
    # the number of levels
    qmin, qmax = quant_range(bits, True)
    assert qmax - qmin + 1 == 2**bits


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_quant_range_rejects_bad_widths(bits):
    with pytest.raises(ValueError, match="bits"):
        quant_range(bits, True)


@pytest.mark.parametrize(
    ("bits", "signed", "narrow", "dtype"),
    [
        (8, True, False, torch.int8), (8, True, True, torch.int8), (8, False, False, torch.uint8),
        (4, True, True, torch.int8), (2, False, False, torch.uint8), (9, True, False, torch.int16),
        (16, True, False, torch.int16), (16, False, False, torch.uint16),
        (12, False, False, torch.uint16),
    ],
)
def test_storage_dtype(bits, signed, narrow, dtype):
    qmin, qmax = quant_range(bits, signed, narrow)
    assert storage_dtype(qmin, qmax) == dtype


def test_storage_dtype_wide_ranges():
    assert storage_dtype(-(2**30), 2**30) == torch.int32
    assert storage_dtype(0, 2**17) == torch.int32
    with pytest.raises(ValueError, match="no integer storage"):
        storage_dtype(-(2**40), 2**40)


def test_quantize_uses_storage_dtype_and_respects_explicit_dtype():
    x = torch.tensor([1.0, -3.0, 70000.0])
    q = quantize(x, torch.tensor(1.0), torch.tensor(0), -(2**15), 2**15 - 1)
    assert q.dtype == torch.int16 and q.tolist() == [1, -3, 32767]
    q32 = quantize(x, torch.tensor(1.0), torch.tensor(0), -(2**30), 2**30, dtype=torch.int32)
    assert q32.dtype == torch.int32 and q32.tolist() == [1, -3, 70000]


@pytest.mark.parametrize("axis,zp", [(None, torch.tensor(3)), (0, torch.tensor([0, 0, 0])),
                                     (0, torch.tensor([0, -5, 3])), (1, torch.tensor([2, 0]))])
def test_fake_quantize_equals_onnx_formula_with_and_without_autograd(axis, zp):
    # clamp(round(x/s), qmin - z, qmax - z) * s must equal (clamp(round(x/s) + z) - z) * s
    gen = torch.Generator().manual_seed(4)
    scale = {None: torch.tensor(0.1), 0: torch.tensor([0.01, 0.1, 1.0]),
             1: torch.tensor([0.05, 0.5])}[axis]
    x = torch.randn(3, 2, 50, generator=gen) * 40
    x[0, 0, :10] = (torch.arange(10) - 4.5) * 0.1  # ties in the per-tensor case
    ref = dequantize(quantize(x, scale, zp, -8, 7, axis=axis, dtype=torch.int32), scale, zp,
                     axis=axis)
    grad_x = x.clone().requires_grad_()
    for out in (fake_quantize(x, scale, zp, -8, 7, axis),
                fake_quantize(grad_x, scale, zp, -8, 7, axis).detach(),
                fake_quantize(x, scale, zp, -8, 7, axis, own_range=True),
                fake_quantize(grad_x, scale, zp, -8, 7, axis, own_range=True).detach(),
                fake_quantize_lsq(grad_x, scale.clone().requires_grad_(), zp.float(), -8, 7,
                                  axis).detach()):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_fake_quantize_inference_path_equals_training_path(seed, per_channel):
    """Without autograd the fast path is used; values equal the STE path's."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 4, 4, generator=gen) * 5
    shape = (6,) if per_channel else ()
    scale = torch.rand(shape, generator=gen) * 0.05 + 0.005
    zp = torch.randint(-20, 20, shape, generator=gen, dtype=torch.int32)
    axis = 1 if per_channel else None
    with torch.no_grad():
        fast = fake_quantize(x, scale, zp, -128, 127, axis)
    slow = fake_quantize(x.clone().requires_grad_(True), scale, zp, -128, 127, axis)
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("narrow", [True, False])
def test_own_range_weights_get_an_identity_gradient(narrow):
    """qparams from the tensor's own min-max: same values as fake_quantize, and the
    gradient passes everywhere (the extremes are representable)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, generator=gen)
    qmin, qmax = (-127, 127) if narrow else (-128, 127)
    flat = w.reshape(8, -1)
    scale, zp = choose_qparams(flat.amin(1), flat.amax(1), qmin, qmax, symmetric=True)
    x = w.clone().requires_grad_()
    y = fake_quantize(x, scale, zp, qmin, qmax, 0, own_range=True)
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(y.detach(), fake_quantize(w, scale, zp, qmin, qmax, 0))
    assert torch.equal(x.grad, torch.full_like(w, 2.0))


# -- single-scale straight-through gradient: bounds on x instead of a mask ----------


def _float32_neighbours(value: float, count: int = 40) -> torch.Tensor:
    """The ``2 * count + 1`` float32 values around ``value`` (finite ones)."""
    bits = torch.tensor(value, dtype=torch.float32).view(torch.int32)
    near = (bits + torch.arange(-count, count + 1, dtype=torch.int32)).view(torch.float32)
    return near[torch.isfinite(near)]


@SETTINGS
@given(st.floats(1e-6, 1e3), st.sampled_from([(0, 255), (-128, 127), (-127, 127), (-8, 7),
                                               (0, 3)]), st.integers(0, 255))
def test_pass_bounds_select_exactly_the_unclamped_inputs(scale, fmt, zp_seed):
    """``a < x < b`` holds exactly where ``round(x / s)`` is not clamped, ties included."""
    from quantaware.primitives import _pass_bounds

    qmin, qmax = fmt
    s = float(torch.tensor(scale, dtype=torch.float32))
    z = qmin + zp_seed % (qmax - qmin + 1)
    low, high = float(qmin - z), float(qmax - z)
    a, b = _pass_bounds(s, low, high)
    x = torch.cat([_float32_neighbours(a), _float32_neighbours(b),
                   _float32_neighbours((low - 0.5) * s), _float32_neighbours((high + 0.5) * s)])
    r = torch.round(x / torch.tensor(s))
    assert torch.equal((x > a) & (x < b), (r >= low) & (r <= high))


@pytest.mark.parametrize("seed", range(4))
def test_single_scale_gradient_equals_the_mask_gradient(seed):
    """The per-tensor path (bounds on x) and the per-channel path (saved mask) give
    the same values and gradients, also on rounding ties at the range ends."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor(2.0 ** -int(torch.randint(1, 8, (), generator=gen)))
    zp = int(torch.randint(-128, 128, (), generator=gen))
    ties = (torch.arange(-300, 300) + 0.5) * scale
    x = torch.cat([torch.randn(2000, generator=gen) * 200 * scale, ties]).reshape(1, -1)
    upstream = torch.randn_like(x)
    one = x.clone().requires_grad_()
    per_channel = x.clone().requires_grad_()
    y1 = fake_quantize(one, scale, torch.tensor(zp), -128, 127)
    y2 = fake_quantize(per_channel, scale.reshape(1), torch.tensor([zp]), -128, 127, axis=0)
    y1.backward(upstream)
    y2.backward(upstream)
    assert torch.equal(y1, y2)
    assert torch.equal(one.grad, per_channel.grad)
    assert 0 < int((one.grad == 0).sum()) < x.numel()


def test_single_scale_path_keeps_float64_exact():
    """Bounds are float32 facts: other dtypes take the mask path (same rule)."""
    x = torch.tensor([-128.5, -128.4999, 127.5, 127.49999], dtype=torch.float64,
                     requires_grad=True)
    fake_quantize(x, torch.tensor(1.0, dtype=torch.float64), 0, -128, 127).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("upper", [math.inf, 6.0])
@pytest.mark.parametrize("zp", [0, -128, 5])
def test_fake_quantize_activated_equals_activation_then_fake_quantize(upper, zp):
    from quantaware.primitives import fake_quantize_activated

    gen = torch.Generator().manual_seed(zp + 200)
    qmin, qmax = (0, 255) if zp >= 0 else (-128, 127)
    scale = torch.tensor(6.0 / (qmax - zp) * 0.9)  # the range ends below 6: ReLU6 is absorbed
    ties = (torch.arange(-20, qmax - zp + 20) + 0.5) * scale
    x = torch.cat([torch.randn(3000, generator=gen) * 4, ties,
                   torch.tensor([0.0, -0.0, 6.0, upper, -math.inf, 1e30])])
    upstream = torch.randn_like(x)
    fused_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = fake_quantize_activated(fused_x, scale, zp, qmin, qmax, upper)
    act = torch.relu(ref_x) if math.isinf(upper) else torch.nn.functional.relu6(ref_x)
    ref = fake_quantize(act, scale, zp, qmin, qmax)
    fused.backward(upstream)
    ref.backward(upstream)
    assert torch.equal(fused, ref) and torch.equal(fused_x.grad, ref_x.grad)
    with torch.no_grad():
        assert torch.equal(fake_quantize_activated(x, scale, zp, qmin, qmax, upper), ref)


def test_fake_quantize_activated_declines_what_it_cannot_fuse():
    from quantaware.primitives import fake_quantize_activated

    x = torch.randn(10)
    s = torch.tensor(0.1)
    assert fake_quantize_activated(x, s, 0, 0, 255, upper=6.0) is None  # 25.5 > 6
    assert fake_quantize_activated(x, s, 300, 0, 255) is None  # zero point above the range
    assert fake_quantize_activated(x.double(), s, 0, 0, 255) is None
    assert fake_quantize_activated(x, torch.full((10,), 0.1), 0, 0, 255) is None
