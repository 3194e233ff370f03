"""quantaware.nn.QuantLinear against a float nn.Linear on dequantized values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantaware import presets
from quantaware.config import FloatSpec, QuantSpec
from quantaware.fake_quant import FakeQuantizer, Float16Quantizer
from quantaware.nn import QuantLinear
from quantaware.nn.weighted import BIAS_QMAX

pytestmark = pytest.mark.usefixtures("single_thread")


def _float_linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(12, 6, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-1, 1, 6).reshape(6, 1))  # very different channels
        if bias:
            layer.bias.normal_()
    return layer


def _data(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 12, generator=gen) * 2 + 0.5 for _ in range(3)]


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_equals_float_linear_on_dequantized_values(bias, ref):
    layer = _float_linear(bias)
    q = QuantLinear.from_float(layer, presets.INT8.weight, presets.INT8.activation)
    data = _data()
    ref.observe_then_freeze(q, *[(x,) for x in data])

    in_scale, in_zp = ref.activation_qparams(torch.cat(data))
    assert float(q.input_quantizer.scale) == in_scale
    assert int(q.input_quantizer.zero_point) == in_zp
    w_deq, w_scale = ref.weight_per_channel(layer.weight)
    torch.testing.assert_close(q.weight_qparams()[0], w_scale, rtol=0, atol=0)

    reference = nn.Linear(12, 6, bias=bias)
    with torch.no_grad():
        reference.weight.copy_(w_deq)
        if bias:
            reference.bias.copy_(ref.bias(layer.bias, in_scale, w_scale))
    q.output_quantizer.disable()  # compare before output rounding
    x = torch.randn(10, 12) * 3
    with torch.no_grad():
        expected = reference(ref.fake_act(x, in_scale, in_zp))
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
        # quantization is visible: the float layer on the raw input differs
        assert not torch.allclose(q(x), layer(x), rtol=1e-5, atol=1e-5)


def test_output_lies_on_the_output_grid(ref):
    q = QuantLinear.from_float(_float_linear(), presets.INT8.weight, presets.INT8.activation)
    ref.observe_then_freeze(q, *[(x,) for x in _data()])
    out = q(torch.randn(20, 12)).detach()
    oq = q.output_quantizer
    levels = out / oq.scale + oq.zero_point
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
    assert levels.min() >= -1e-3 and levels.max() <= 255 + 1e-3


def test_fused_relu_is_applied_before_output_quantization(ref):
    q = QuantLinear.from_float(_float_linear(), presets.INT8.weight, presets.INT8.activation)
    q.activation = nn.ReLU()
    ref.observe_then_freeze(q, *[(x,) for x in _data()])
    assert int(q.output_quantizer.zero_point) == 0  # only non-negative outputs observed
    out = q(torch.randn(20, 12) * 3)
    assert (out >= 0).all() and (out == 0).any()


def test_weight_only_linear(ref):
    layer = _float_linear()
    q = QuantLinear.from_float(layer, presets.W8.weight, None)
    assert q.input_quantizer is None and q.output_quantizer is None
    w_deq, _ = ref.weight_per_channel(layer.weight)
    x = torch.randn(5, 12)
    torch.testing.assert_close(q(x), F.linear(x, w_deq, layer.bias), rtol=1e-5, atol=1e-6)


def test_per_tensor_4bit_weights():
    layer = _float_linear()
    spec = QuantSpec(bits=4)  # per-tensor, symmetric, full range [-8, 7]
    q = QuantLinear.from_float(layer, spec, None)
    scale = layer.weight.detach().abs().max() / 7.5
    expected_w = torch.clamp(torch.round(layer.weight.detach() / scale), -8, 7) * scale
    weight, _ = q.quantized_params()
    torch.testing.assert_close(weight, expected_w, rtol=0, atol=1e-7)
    assert weight.detach().div(scale).round().unique().numel() <= 16


def test_float16_weights():
    layer = _float_linear()
    q = QuantLinear.from_float(layer, FloatSpec(), None)
    assert isinstance(q.weight_quantizer, Float16Quantizer)
    x = torch.randn(4, 12)
    expected = F.linear(x, layer.weight.detach().half().float(), layer.bias)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


def test_dynamic_activation_linear(ref):
    layer = _float_linear()
    q = QuantLinear.from_float(layer, presets.INT8_DYNAMIC.weight,
                               presets.INT8_DYNAMIC.activation)
    assert isinstance(q.input_quantizer, FakeQuantizer) and q.input_quantizer.from_tensor
    assert q.output_quantizer is None
    x = torch.randn(7, 12) * 4
    scale = (x.max() - x.min()) / 255  # x spans both signs
    zp = torch.round(-x.min() / scale)
    xq = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    w_deq, _ = ref.weight_per_channel(layer.weight)
    # dynamic input scale: the bias stays float (no static input scale to tie it to)
    torch.testing.assert_close(q(x), F.linear(xq, w_deq, layer.bias), rtol=1e-5, atol=1e-5)


def test_large_bias_with_tiny_weights_widens_the_weight_scale(ref):
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-9, -1e-9, 5e-10, 0.0], [0.5, -0.25, 0.1, 0.3]]))
        layer.bias.copy_(torch.tensor([1000.0, 0.1]))
    q = QuantLinear.from_float(layer, presets.INT8.weight, presets.INT8.activation)
    ref.observe_then_freeze(q, (torch.rand(32, 4) * 0.01,))
    w_scale, _, b_scale = q.weight_qparams()
    in_scale = float(q.input_quantizer.scale)
    assert float(w_scale[0]) > 1e-9 / 127  # widened for channel 0
    assert float(w_scale[1]) == pytest.approx(0.5 / 127)  # untouched for channel 1
    torch.testing.assert_close(b_scale, in_scale * w_scale)
    # the bias fits the int32 range and is reproduced to within half a step
    assert (layer.bias.detach().abs() / b_scale).max() <= BIAS_QMAX
    _, qbias = q.quantized_params()
    assert ((qbias - layer.bias).abs() <= b_scale / 2 + 1e-6).all()


def test_from_float_keeps_parameter_names_and_shares_parameters():
    layer = _float_linear()
    q = QuantLinear.from_float(layer, presets.INT8.weight, presets.INT8.activation)
    assert q.weight is layer.weight and q.bias is layer.bias
    assert [n for n, _ in q.named_parameters()] == ["weight", "bias"]
    other = _float_linear(seed=5)
    missing, unexpected = q.load_state_dict(other.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all("quantizer" in key for key in missing)
    assert torch.equal(q.weight, other.weight) and torch.equal(q.bias, other.bias)
    # and a quantized state dict round-trips strictly
    fresh = QuantLinear.from_float(_float_linear(seed=9), presets.INT8.weight,
                                   presets.INT8.activation)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.weight, other.weight)


def test_to_float_round_trip():
    layer = _float_linear()
    q = QuantLinear.from_float(layer, presets.INT8.weight, presets.INT8.activation)
    back = q.to_float()
    assert type(back) is nn.Linear
    assert (back.in_features, back.out_features) == (12, 6)
    assert torch.equal(back.weight, layer.weight) and torch.equal(back.bias, layer.bias)
    x = torch.randn(3, 12)
    assert torch.equal(back(x), layer(x))
    no_bias = QuantLinear.from_float(_float_linear(bias=False), presets.W8.weight, None)
    assert no_bias.to_float().bias is None


def test_gradients_reach_the_float_weights(ref):
    layer = _float_linear()
    q = QuantLinear.from_float(layer, presets.INT8.weight, presets.INT8.activation)
    ref.observe_then_freeze(q, *[(x,) for x in _data()])
    q(torch.randn(8, 12)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0
