"""quantaware.nn.resize: QuantUpsample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantaware import presets
from quantaware.nn.resize import QuantUpsample

pytestmark = pytest.mark.usefixtures("single_thread")

ACT = presets.INT8.activation


def _batches(seed: int, count: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 5, 6, generator=gen) * 2,) for _ in range(count)]


def test_bilinear_quantizes_input_and_output_on_their_own_grids(ref):
    up = QuantUpsample(ACT, scale_factor=2, mode="bilinear")
    batches = _batches(0)
    ref.observe_then_freeze(up, *batches)
    xs = torch.cat([b[0] for b in batches])
    si, zi = ref.activation_qparams(xs)
    so, zo = ref.activation_qparams(F.interpolate(ref.fake_act(xs, si, zi), scale_factor=2,
                                                  mode="bilinear"))
    assert float(up.input_quantizer.scale) == si
    assert (float(up.output_quantizer.scale), int(up.output_quantizer.zero_point)) == (so, zo)
    x = _batches(1, 1)[0][0]
    interpolated = F.interpolate(ref.fake_act(x, si, zi), scale_factor=2, mode="bilinear")
    torch.testing.assert_close(up(x), ref.fake_act(interpolated, so, zo), rtol=0, atol=1e-6)


def test_nearest_output_stays_on_the_input_grid(ref):
    up = QuantUpsample(ACT, scale_factor=(2, 3), mode="nearest")
    assert up.output_quantizer is None
    ref.observe_then_freeze(up, *_batches(0))
    x = _batches(2, 1)[0][0]
    s, zp = float(up.input_quantizer.scale), int(up.input_quantizer.zero_point)
    expected = F.interpolate(ref.fake_act(x, s, zp), scale_factor=(2, 3), mode="nearest")
    assert torch.equal(up(x), expected)


def test_size_given_at_call_time_replaces_the_stored_size(ref):
    up = QuantUpsample(ACT, size=(4, 4), mode="bilinear", align_corners=True)
    ref.observe_then_freeze(up, *_batches(0))
    x = _batches(3, 1)[0][0]
    assert up(x).shape[-2:] == (4, 4)
    assert up(x, size=torch.Size([7, 9])).shape[-2:] == (7, 9)


def test_gradients_reach_the_input_in_qat():
    up = QuantUpsample(ACT, scale_factor=2, mode="bilinear")
    for q in (up.input_quantizer, up.output_quantizer):
        q.observe_and_quantize()  # as after prepare
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    up(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unsupported_mode_is_refused_naming_the_modes():
    with pytest.raises(ValueError, match=r"mode must be one of .*'bilinear'.*got 'area'"):
        QuantUpsample(ACT, scale_factor=2, mode="area")


def test_repr_names_the_resize():
    assert "scale_factor=2, mode='bilinear'" in repr(QuantUpsample(ACT, scale_factor=2,
                                                                    mode="bilinear"))
