from __future__ import annotations

import copy

import torch

from quantaware import calibrate, prepare, presets
from quantaware.algorithms import bias_correction


def test_bias_correction_reduces_mean_output_error(net, images):
    q = calibrate(prepare(net, presets.W4A8, images[0][:1]), images)
    original = copy.deepcopy(q)
    before = bias_correction.output_mean_errors(q, images)
    bias_correction.apply(q, images)
    after = bias_correction.output_mean_errors(q, images, reference=original)
    total_before = sum(float(e.abs().mean()) for e in before.values())
    total_after = sum(float(e.abs().mean()) for e in after.values())
    assert total_after < 0.5 * total_before
    # Every layer that had a shift worth correcting ends with a smaller one.
    for name in before:
        if float(before[name].abs().mean()) > 1e-3:
            assert float(after[name].abs().mean()) < float(before[name].abs().mean()), name
    # Layers without a bias (BN-free convs) got one, and the model still runs.
    assert all(m.bias is not None for m in q.modules() if hasattr(m, "weight_quantizer"))
    with torch.no_grad():
        assert torch.isfinite(q(images[0])).all()
