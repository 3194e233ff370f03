"""quantaware.nn.QuantConv1d / QuantConv2d / QuantConvTranspose1d / QuantConvTranspose2d
against float convs on dequantized values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantaware import presets
from quantaware.config import FloatSpec, PerChannel, QuantSpec
from quantaware.nn import QuantConv1d, QuantConv2d, QuantConvTranspose1d, QuantConvTranspose2d

pytestmark = pytest.mark.usefixtures("single_thread")

CONVS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), (4, 9, 9)),
    "dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), (4, 9, 9)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 7, 7)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 7, 7)),
    "depthwise_multiplier": (lambda: nn.Conv2d(3, 6, 3, groups=3), (3, 7, 7)),
    "pointwise_no_bias": (lambda: nn.Conv2d(5, 4, 1, bias=False), (5, 6, 6)),
    "reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 8, 5, padding=2), (4, 20)),
    "conv1d_grouped": (lambda: nn.Conv1d(4, 8, 3, groups=4, stride=2), (4, 20)),
}
QUANT_TYPES = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}


def _make(case: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    make, shape = CONVS[case]
    torch.manual_seed(seed)
    conv = make()
    with torch.no_grad():
        # channels with very different ranges, so per-channel scales matter
        conv.weight.mul_(torch.logspace(-1, 1, conv.out_channels).reshape(
            [-1] + [1] * (conv.weight.dim() - 1)))
    return conv, shape


def _data(shape, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((8, *shape), generator=gen) * 2 - 0.3 for _ in range(2)]


@pytest.mark.parametrize("case", sorted(CONVS))
def test_int8_conv_equals_float_conv_on_dequantized_values(case, ref):
    conv, shape = _make(case)
    qtype = QUANT_TYPES[type(conv)]
    q = qtype.from_float(conv, presets.INT8.weight, presets.INT8.activation)
    assert type(q) is qtype
    data = _data(shape)
    ref.observe_then_freeze(q, *[(x,) for x in data])

    in_scale, in_zp = ref.activation_qparams(torch.cat(data))
    w_deq, w_scale = ref.weight_per_channel(conv.weight)
    reference = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size,
                           stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                           groups=conv.groups, bias=conv.bias is not None,
                           padding_mode=conv.padding_mode)
    with torch.no_grad():
        reference.weight.copy_(w_deq)
        if conv.bias is not None:
            reference.bias.copy_(ref.bias(conv.bias, in_scale, w_scale))
    q.output_quantizer.disable()
    x = torch.randn((3, *shape)) * 2
    with torch.no_grad():
        out = q(x)
        torch.testing.assert_close(out, reference(ref.fake_act(x, in_scale, in_zp)),
                                   rtol=1e-5, atol=1e-5)
        assert out.shape == conv(x).shape
        assert not torch.allclose(out, conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["conv2d", "depthwise", "conv1d"])
def test_weight_only_conv(case, ref):
    conv, shape = _make(case)
    q = QUANT_TYPES[type(conv)].from_float(conv, presets.W8.weight, None)
    w_deq, _ = ref.weight_per_channel(conv.weight)
    x = torch.randn((2, *shape))
    expected = conv._conv_forward(x, w_deq, conv.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)


def test_4bit_depthwise_weights_take_at_most_15_levels_per_channel():
    conv, _ = _make("depthwise")
    q = QuantConv2d.from_float(conv, presets.W4A8.weight, None)
    weight, _ = q.quantized_params()
    scale = conv.weight.detach().abs().amax((1, 2, 3)) / 7
    levels = (weight.detach() / scale.reshape(-1, 1, 1, 1)).round()
    assert levels.abs().max() <= 7
    torch.testing.assert_close(weight.detach() / scale.reshape(-1, 1, 1, 1), levels,
                               rtol=0, atol=1e-4)


def test_float16_conv_weights():
    conv, shape = _make("grouped")
    q = QuantConv2d.from_float(conv, FloatSpec(), None)
    x = torch.randn((2, *shape))
    expected = F.conv2d(x, conv.weight.detach().half().float(), conv.bias, padding=1, groups=2)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


def test_weight_axis_other_than_output_channels_rejected():
    conv, _ = _make("conv2d")
    spec = QuantSpec(granularity=PerChannel(1))
    with pytest.raises(ValueError, match="axis 0"):
        QuantConv2d.from_float(conv, spec, None)


@pytest.mark.parametrize("case", sorted(CONVS))
def test_from_float_keeps_parameter_names_and_hyperparameters(case):
    conv, _ = _make(case)
    q = QUANT_TYPES[type(conv)].from_float(conv, presets.INT8.weight, presets.INT8.activation)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(q, attr) == getattr(conv, attr), attr
    assert q.weight is conv.weight and q.bias is conv.bias
    other, _ = _make(case, seed=3)
    missing, unexpected = q.load_state_dict(other.state_dict(), strict=False)
    assert unexpected == [] and all("quantizer" in key for key in missing)
    assert torch.equal(q.weight, other.weight)


@pytest.mark.parametrize("case", sorted(CONVS))
def test_to_float_round_trip(case):
    conv, shape = _make(case)
    q = QUANT_TYPES[type(conv)].from_float(conv, presets.INT8.weight, presets.INT8.activation)
    back = q.to_float()
    assert type(back) is type(conv)
    assert back.weight is conv.weight
    assert (back.bias is None) == (conv.bias is None)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(back, attr) == getattr(conv, attr), attr
    x = torch.randn((2, *shape))
    assert torch.equal(back(x), conv(x))


def test_gradients_reach_float_conv_weights(ref):
    conv, shape = _make("depthwise")
    q = QuantConv2d.from_float(conv, presets.INT8.weight, presets.INT8.activation)
    ref.observe_then_freeze(q, *[(x,) for x in _data(shape)])
    x = torch.randn((2, *shape), requires_grad=True)
    q(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_per_tensor_weights_with_bias_keep_one_scale():
    """The int32-bias guard widens a per-tensor weight scale as a whole."""
    import dataclasses

    from quantaware import calibrate, prepare, presets
    from quantaware.config import PerTensor, QuantSpec

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    cfg = dataclasses.replace(presets.INT8, weight=QuantSpec(narrow_range=True,
                                                            granularity=PerTensor()))
    x = torch.randn(4, 3, 8, 8)
    q = calibrate(prepare(net, cfg, x[:1]), [x])
    w_scale, _, b_scale = q.get_submodule("2").weight_qparams()
    assert w_scale.dim() == 0 and b_scale.dim() == 0
    assert torch.allclose(q(x), net(x), atol=0.1)


# -- transposed convolutions: weights (in, out / groups, *kernel), scales along axis 1 --

TRANSPOSED = {
    "transposed2d": (lambda: nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1), (4, 5, 5)),
    "transposed2d_output_padding": (
        lambda: nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1,
                                   bias=False), (3, 6, 6)),
    "transposed1d": (lambda: nn.ConvTranspose1d(4, 8, 5, stride=3, padding=2), (4, 9)),
}
TRANSPOSED_TYPES = {nn.ConvTranspose1d: QuantConvTranspose1d,
                    nn.ConvTranspose2d: QuantConvTranspose2d}


def _transposed(case: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    make, shape = TRANSPOSED[case]
    torch.manual_seed(seed)
    conv = make()
    with torch.no_grad():  # output channels (axis 1) with very different ranges
        conv.weight.mul_(torch.logspace(-1, 1, conv.out_channels).reshape(
            [1, -1] + [1] * (conv.weight.dim() - 2)))
    return conv, shape


@pytest.mark.parametrize("case", sorted(TRANSPOSED))
def test_int8_transposed_conv_equals_float_on_dequantized_values(case, ref):
    """Per-output-channel weight scales lie along the weight's axis 1."""
    conv, shape = _transposed(case)
    qtype = TRANSPOSED_TYPES[type(conv)]
    q = qtype.from_float(conv, presets.INT8.weight, presets.INT8.activation)
    assert type(q) is qtype and q.weight_quantizer.axis == 1
    data = _data(shape)
    ref.observe_then_freeze(q, *[(x,) for x in data])
    in_scale, in_zp = ref.activation_qparams(torch.cat(data))
    w_deq, w_scale = ref.weight_per_channel(conv.weight.detach().transpose(0, 1))
    reference = q.to_float()
    reference.weight = nn.Parameter(w_deq.transpose(0, 1))
    if conv.bias is not None:
        reference.bias = nn.Parameter(ref.bias(conv.bias, in_scale, w_scale))
    q.output_quantizer.disable()
    x = torch.randn((3, *shape)) * 2
    with torch.no_grad():
        out = q(x)
        torch.testing.assert_close(out, reference(ref.fake_act(x, in_scale, in_zp)),
                                   rtol=1e-5, atol=1e-5)
        assert out.shape == conv(x).shape
        assert not torch.allclose(out, conv(x), rtol=1e-5, atol=1e-5)
        back = q.to_float()
        assert type(back) is type(conv) and back.weight is conv.weight
        assert torch.equal(back(x), conv(x))


def test_transposed_conv_takes_an_output_size():
    conv, shape = _transposed("transposed2d")
    q = QuantConvTranspose2d.from_float(conv, presets.W8.weight, None)
    x = torch.randn((1, *shape))
    out = q(x, output_size=[11, 11])
    assert out.shape == conv(x, output_size=[11, 11]).shape == (1, 6, 11, 11)


def test_grouped_transposed_conv_stays_float_under_per_channel_weights(caplog):
    """Its output channels are not one axis of its weight: prepare keeps it float and
    says how to quantize it (per-tensor weights), which then works."""
    import dataclasses

    from quantaware import quantize
    from quantaware.config import LayerOverride, PerTensor

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, groups=2)).eval()
    x = torch.randn(8, 3, 8, 8)
    with caplog.at_level("WARNING", logger="quantaware.prepare"):
        q = quantize(net, presets.INT8, [x], x[:1])
    assert type(q.get_submodule("2")) is nn.ConvTranspose2d
    assert "2 (ConvTranspose2d, groups=2) stays float" in caplog.text
    per_tensor = dataclasses.replace(presets.INT8.weight, granularity=PerTensor())
    q = quantize(net, presets.INT8.with_overrides(LayerOverride("2", weight=per_tensor)),
                 [x], x[:1])
    assert type(q.get_submodule("2")) is QuantConvTranspose2d
    assert q.get_submodule("2").weight_quantizer.axis is None
    torch.testing.assert_close(q(x), net(x), rtol=0.1, atol=0.05)
