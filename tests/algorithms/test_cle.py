from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from quantaware import PerTensor, QuantSpec, calibrate, prepare, presets
from quantaware.algorithms import cle


def _weight_range_spread(model: nn.Module) -> float:
    """Mean over convs of max/min per-output-channel weight range (1 = perfectly equal)."""
    spreads = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            r = m.weight.detach().abs().reshape(m.out_channels, -1).amax(1)
            spreads.append(float(r.max() / r.min()))
    return sum(spreads) / len(spreads)


def test_cle_keeps_float_function_with_relu(net_factory):
    net = net_factory(nn.ReLU)
    x = torch.randn(4, 3, 24, 24)
    eq = cle.apply(net, x[:1])
    torch.testing.assert_close(eq(x), net(x), rtol=1e-4, atol=1e-4)
    assert _weight_range_spread(eq) < _weight_range_spread(cle.apply(net, x[:1], iterations=0))


def test_cle_skip_mode_keeps_relu6_function_exactly(net_factory):
    net = net_factory(nn.ReLU6)
    x = torch.randn(4, 3, 24, 24)
    eq = cle.apply(net, x[:1], relu6="skip")
    torch.testing.assert_close(eq(x), net(x), rtol=1e-4, atol=1e-4)


def test_cle_replace_mode_equals_the_relu_network(net_factory):
    x = torch.randn(4, 3, 24, 24)
    relu6_net = net_factory(nn.ReLU6)
    relu_net = net_factory(nn.ReLU)  # same seed: same weights
    eq = cle.apply(relu6_net, x[:1], relu6="replace")
    assert any(isinstance(m, nn.ReLU) for m in eq.modules())
    # The pairs' ReLU6 became ReLU; the stem's ReLU6 also feeds an equalized pair.
    torch.testing.assert_close(eq(x), relu_net(x), rtol=1e-4, atol=1e-4)
    folded = cle.apply(relu6_net, x[:1], iterations=0)
    assert _weight_range_spread(eq) < _weight_range_spread(folded)


def test_cle_lowers_per_tensor_quantization_error(net_factory, images):
    net = net_factory(nn.ReLU)
    cfg = dataclasses.replace(presets.INT8, weight=QuantSpec(
        bits=8, narrow_range=True, granularity=PerTensor()))
    x = torch.cat(images)

    def err(model: nn.Module) -> float:
        q = calibrate(prepare(model, cfg, x[:1]), images)
        with torch.no_grad():
            return float((q(x) - net(x)).pow(2).mean())

    assert err(cle.apply(net, x[:1])) < err(net)


def test_cle_rejects_bad_relu6_mode(net_factory):
    with pytest.raises(ValueError, match="relu6"):
        cle.apply(net_factory(), torch.randn(1, 3, 24, 24), relu6="clip")


def test_cle_scale_mode_keeps_relu6_function_exactly_with_active_clips(net_factory):
    from quantaware.nn.base import ChannelClip

    net = net_factory(nn.ReLU6)
    x = torch.randn(4, 3, 24, 24) * 4
    with torch.no_grad():
        stem = net.stem[1](net.stem[0](x))
    assert bool((stem > 6).any())  # the clip is reached, so moving it matters
    eq = cle.apply(net, x[:1], relu6="scale")
    clips = [m for m in eq.modules() if isinstance(m, ChannelClip)]
    assert clips and any(bool((c.upper != 6).any()) for c in clips)
    torch.testing.assert_close(eq(x), net(x), rtol=1e-4, atol=1e-4)
    assert _weight_range_spread(eq) < _weight_range_spread(cle.apply(net, x[:1], iterations=0))
    # prepare fuses the per-channel clip into the producing conv, before its output quantizer.
    q = prepare(eq, presets.INT8, x[:1])
    fused = [m for m in q.modules() if isinstance(getattr(m, "activation", None), ChannelClip)]
    assert len(fused) == len(clips)
    calibrate(q, [x])
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
