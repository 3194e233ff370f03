"""MSE weight ranges."""

from __future__ import annotations

import pytest
import torch

from quantaware import calibrate, prepare, presets
from quantaware.algorithms import weight_range


def test_weight_ranges_of_a_qat_conv_bn_come_from_its_folded_weight():
    """A QAT conv quantizes the weight folded with its batch norm: the MSE ranges are
    that weight's (they were the raw weight's, up to 30x off)."""
    from quantaware.qat import prepare_qat

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.001, 0.01)
    x = torch.randn(16, 3, 6, 6)
    errors = []
    for model in (prepare(net, presets.W4A8, x[:1]), prepare_qat(net, presets.W4A8, x[:1])):
        model = calibrate(model, [x]).eval()
        weight_range.apply(model)
        with torch.no_grad():
            errors.append(float((model(x) - net(x)).pow(2).mean()))
    assert errors[1] == pytest.approx(errors[0], rel=0.05), errors
