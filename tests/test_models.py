"""Tests for the demo CNN."""

from __future__ import annotations

import torch
from torch import nn

from quantaware.models import DigitsCNN, count_parameters


def test_parameter_count() -> None:
    model = DigitsCNN()
    assert count_parameters(model) >= 100_000
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.fc2.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 2560


def test_output_shape() -> None:
    model = DigitsCNN(num_classes=7).eval()
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 7)


def test_symbolic_trace_matches_eager_and_keeps_add_and_cat() -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(traced(x), model(x))
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert torch.cat in targets
    assert any(getattr(t, "__name__", "") == "add" for t in targets)


def test_covers_required_module_types() -> None:
    model = DigitsCNN()
    types = {type(m) for m in model.modules()}
    assert {
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.ReLU6,
        nn.MaxPool2d,
        nn.AdaptiveAvgPool2d,
        nn.Linear,
    } <= types
    depthwise = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert depthwise
