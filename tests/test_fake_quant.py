"""quantaware.fake_quant: quantizer modes, state, dynamic and float16 quantizers."""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from quantaware.config import FloatSpec, PerChannel, QuantSpec
from quantaware.fake_quant import FakeQuantizer, Float16Quantizer, make_quantizer
from quantaware.observers import CalibrationError, PercentileObserver
from quantaware.primitives import choose_qparams, fake_quantize

pytestmark = pytest.mark.usefixtures("single_thread")

ACT = QuantSpec(bits=8, signed=False, symmetric=False)
DYNAMIC = QuantSpec(bits=8, signed=False, symmetric=False, dynamic=True)


def _calibrated(spec: QuantSpec = ACT, data=None, channels=None) -> FakeQuantizer:
    fq = FakeQuantizer(spec, channels=channels)
    fq.observe_only()
    for x in data if data is not None else [torch.linspace(-1.0, 3.0, 50)]:
        fq(x)
    fq.freeze()
    return fq


def test_new_static_quantizer_refuses_to_quantize_before_calibration():
    fq = FakeQuantizer(ACT)
    assert not bool(fq.calibrated)
    with pytest.raises(CalibrationError, match="calibrat"):
        fq(torch.randn(4))


def test_observe_only_passes_through_unchanged():
    fq = FakeQuantizer(ACT)
    fq.observe_only()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(5, 7, generator=gen) * 3
        y = fq(x)
        assert torch.equal(y, x)
    assert fq.observer.observed
    assert float(fq.observer.max_val) > 0 > float(fq.observer.min_val)
    assert not bool(fq.calibrated)


def test_freeze_fixes_qparams():
    fq = _calibrated()
    scale, zp = fq.scale.clone(), fq.zero_point.clone()
    ref_scale, ref_zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
    assert bool(fq.calibrated) and bool(fq.fake_quant_enabled) and not bool(fq.observer_enabled)
    # wider data no longer moves the qparams, and it saturates
    x = torch.linspace(-10.0, 10.0, 101)
    y = fq(x)
    assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zp)
    assert torch.equal(y, fake_quantize(x, scale, zp, 0, 255))
    assert float(y.max()) == pytest.approx(3.0, abs=float(scale))
    assert float(y.min()) == pytest.approx(-1.0, abs=float(scale))


def test_observe_and_quantize_updates_qparams_every_call():
    fq = FakeQuantizer(ACT)
    fq.observe_and_quantize()
    y1 = fq(torch.tensor([0.0, 1.0]))
    s1 = fq.scale.clone()
    fq(torch.tensor([0.0, 4.0]))
    assert float(fq.scale) == pytest.approx(4 * float(s1))
    assert torch.equal(y1, fake_quantize(torch.tensor([0.0, 1.0]), s1, fq.zero_point, 0, 255))



@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_observe_and_quantize_stores_the_observers_qparams_exactly(observer, symmetric):
    spec = QuantSpec(bits=8, signed=symmetric, symmetric=symmetric, observer=observer)
    fq = FakeQuantizer(spec)
    fq.observe_and_quantize()
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        x = (torch.randn(64, 8, generator=gen) * 3 + 1).requires_grad_()
        y = fq(x)
        scale, zero_point = fq.observer.calculate_qparams()
        assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zero_point), step
        assert fq.zero_point.dtype == torch.int32 and fq.scale.dtype == torch.float32
        assert torch.equal(y, fake_quantize(x.detach(), scale, zero_point, fq.qmin, fq.qmax))

def test_disable_passes_through():
    fq = _calibrated()
    fq.disable()
    x = torch.randn(10) * 50
    assert torch.equal(fq(x), x)


@pytest.mark.parametrize("per_channel", [False, True])
def test_state_dict_round_trip_into_fresh_quantizer(per_channel):
    if per_channel:
        spec = QuantSpec(granularity=PerChannel(1), narrow_range=True)
        data = [torch.randn(4, 3, 5) * torch.tensor([1.0, 5.0, 0.1]).reshape(1, 3, 1)]
        channels = 3
    else:
        spec, data, channels = ACT, None, None
    fq = _calibrated(spec, data, channels)
    state = fq.state_dict()
    assert {"scale", "zero_point", "observer_enabled", "fake_quant_enabled",
            "calibrated"} <= set(state)
    fresh = FakeQuantizer(spec, channels=channels)
    assert not bool(fresh.calibrated)
    fresh.load_state_dict(state)
    for key in ("scale", "zero_point", "observer_enabled", "fake_quant_enabled", "calibrated",
                "observer.min_val", "observer.max_val"):
        assert torch.equal(fresh.state_dict()[key], state[key]), key
    x = torch.randn(2, 3, 5) * 4
    assert torch.equal(fresh(x), fq(x))


def test_state_dict_carries_observe_only_mode():
    fq = FakeQuantizer(ACT)
    fq.observe_only()
    fresh = FakeQuantizer(ACT)
    fresh.load_state_dict(fq.state_dict())
    x = torch.randn(6)
    assert torch.equal(fresh(x), x)
    assert fresh.observer.observed


def test_percentile_quantizer_state_round_trip():
    spec = QuantSpec(signed=False, symmetric=False, observer="percentile", percentile=99.0)
    fq = _calibrated(spec, [torch.randn(1000) for _ in range(3)])
    assert isinstance(fq.observer, PercentileObserver)
    fresh = FakeQuantizer(spec)
    fresh.load_state_dict(fq.state_dict())
    assert torch.equal(fresh.observer.histogram, fq.observer.histogram)
    assert torch.equal(fresh.observer.calculate_qparams()[0], fq.observer.calculate_qparams()[0])


def test_load_qparams_rejects_invalid_scales():
    fq = FakeQuantizer(ACT)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(CalibrationError, match="scale"):
            fq.load_qparams(torch.tensor(bad), torch.tensor(0))
    assert not bool(fq.calibrated)


def test_weight_quantizer_follows_the_tensor():
    spec = QuantSpec(narrow_range=True, granularity=PerChannel(0))
    fq = FakeQuantizer(spec, channels=3, from_tensor=True)
    assert fq.observer is None
    w = torch.randn(3, 8) * torch.tensor([[0.1], [1.0], [10.0]])
    scale, zp = fq.qparams(w)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    assert torch.equal(zp, torch.zeros(3, dtype=torch.int32))
    assert torch.equal(fq(w), fake_quantize(w, scale, zp, -127, 127, axis=0))
    assert torch.equal(fq.qparams(w * 2)[0], fq.qparams(w)[0] * 2)
    with pytest.raises(ValueError, match="pass x"):
        fq.qparams()


def test_per_channel_needs_channels():
    with pytest.raises(ValueError, match="channels"):
        FakeQuantizer(QuantSpec(granularity=PerChannel(0)))


# -- dynamic quantization vs ONNX DynamicQuantizeLinear --------------------------------


@functools.lru_cache(maxsize=1)
def _dynamic_session() -> ort.InferenceSession:
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zp"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("zp", TensorProto.UINT8, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _dynamic_inputs():
    rng = np.random.default_rng(0)
    for i in range(120):
        shape = tuple(int(d) for d in rng.integers(1, 7, size=rng.integers(1, 4)))
        x = rng.normal(size=shape) * rng.uniform(0.01, 20) + rng.uniform(-3, 3)
        if i % 5 == 1:
            x = np.abs(x)  # all positive: zero point 0
        elif i % 5 == 2:
            x = -np.abs(x)  # all negative: zero point 255
        yield x.astype(np.float32)
    yield np.array([0.0, 0.5, -0.5, 1.5], np.float32)
    yield np.full((2, 3), 2.5, np.float32)
    yield np.full((4,), -7.0, np.float32)


def test_dynamic_quantizer_matches_onnx_dynamic_quantize_linear():
    fq = FakeQuantizer(DYNAMIC)
    assert fq.from_tensor and fq.observer is None
    sess = _dynamic_session()
    for x in _dynamic_inputs():
        ref, ref_scale, ref_zp = sess.run(None, {"x": x})
        t = torch.from_numpy(x)
        scale, zp = fq.qparams(t)
        assert float(scale) == float(ref_scale), x
        assert int(zp) == int(ref_zp), x
        np.testing.assert_array_equal(fq(t).numpy(), ref)


def test_dynamic_quantizer_all_zero_input():
    """ONNX gives scale 0 here; quantaware keeps a tiny positive scale, same values."""
    x = np.zeros((3, 4), np.float32)
    ref = _dynamic_session().run(None, {"x": x})[0]
    fq = FakeQuantizer(DYNAMIC)
    out = fq(torch.from_numpy(x))
    np.testing.assert_array_equal(out.numpy(), ref)
    scale, _ = fq.qparams(torch.from_numpy(x))
    assert float(scale) > 0


def test_dynamic_quantizer_ignores_calibration_modes():
    fq = FakeQuantizer(DYNAMIC)
    fq.observe_only()  # nothing to observe: stays quantizing
    x = torch.randn(20) * 3
    assert not torch.equal(fq(x), x)
    fq.freeze()
    assert not bool(fq.calibrated)
    assert torch.equal(fq(x * 2), fake_quantize(x * 2, *fq.qparams(x * 2), 0, 255))


# -- float16 ---------------------------------------------------------------------------


def test_float16_quantizer_rounds_to_half():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen) * 100
    x[:3] = torch.tensor([1.0 + 2**-12, 1e6, 1e-9])
    y = Float16Quantizer()(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, x.half().float())
    assert y[0] == 1.0 and torch.isinf(y[1]) and y[2] == 0.0
    assert not torch.equal(y, x)


def test_float16_quantizer_straight_through_gradient():
    x = (torch.randn(50) * 10).requires_grad_()
    y = Float16Quantizer()(x)
    assert torch.equal(y.detach(), x.detach().half().float())
    upstream = torch.randn(50)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_make_quantizer_dispatch():
    assert isinstance(make_quantizer(FloatSpec()), Float16Quantizer)
    fq = make_quantizer(QuantSpec(granularity=PerChannel(0)), channels=5, from_tensor=True)
    assert isinstance(fq, FakeQuantizer) and fq.from_tensor and fq.scale.shape == (5,)
    fq = make_quantizer(ACT)
    assert isinstance(fq, FakeQuantizer) and not fq.from_tensor and (fq.qmin, fq.qmax) == (0, 255)


def test_weight_quantizer_following_its_tensor_passes_the_whole_gradient():
    from quantaware import presets

    fq = make_quantizer(presets.INT8.weight, channels=4, from_tensor=True)
    w = (torch.randn(4, 6) * torch.tensor([[0.1], [1.0], [10.0], [0.01]])).requires_grad_()
    fq(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    # Loaded (fixed) qparams can clip: the in-range mask applies again.
    fq.load_qparams(torch.full((4,), 0.001), torch.zeros(4, dtype=torch.int32))
    w.grad = None
    fq(w).sum().backward()
    assert 0 < float(w.grad.mean()) < 1
