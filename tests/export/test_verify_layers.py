"""verify's layer-by-layer comparison finds where ONNX Runtime and torch part ways."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.export.layers import compare_layers, first_divergence


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("layers")
    x = torch.randn(32, 3, 12, 12)
    q = quantaware.quantize(_net(), presets.INT8, [x[:16], x[16:]], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    return q, path, x


def test_clean_export_has_no_divergent_layer(quantized):
    q, path, x = quantized
    rows = compare_layers(path, q, x)
    assert [r.name for r in rows][:2] == ["0.input_quantizer", "0.output_quantizer"]
    assert len(rows) >= 5
    assert first_divergence(rows) is None
    report = quantaware.verify(path, q, [x])
    assert report.first_divergent_layer is None and report.layers_checked == len(rows)
    assert "activations identical" in str(report)
    fake = quantaware.verify(path, q, [x], reference="fake-quant")
    assert fake.first_divergent_layer is None and "within 1 LSB" in str(fake)


def test_one_code_off_is_a_divergence_against_the_integer_reference(quantized):
    """With the integer reference every code must match: the 1-LSB allowance is
    only for the fake-quant reference."""
    q, path, x = quantized
    q = copy.deepcopy(q)
    out = q.get_submodule("4").output_quantizer
    with torch.no_grad():  # shift the third conv's output grid by a fraction of a step
        out.scale.mul_(1.01)
    report = quantaware.verify(path, q, [x])
    assert report.first_divergent_layer == "4.output_quantizer", report
    assert report.first_divergent_lsb >= 1


def test_injected_divergence_is_located(quantized):
    q, path, x = quantized
    q = copy.deepcopy(q)
    with torch.no_grad():  # the torch model drifts from the file at the second conv
        q.get_submodule("2").weight.mul_(1.5)
    report = quantaware.verify(path, q, [x])
    assert report.first_divergent_layer == "2.output_quantizer"
    assert report.first_divergent_lsb > 1
    assert "first divergence at 2.output_quantizer" in str(report)


def test_quantizers_sharing_qparams_are_told_apart(tmp_path):
    """Two ReLU6 outputs calibrated to exactly [0, 6] share one scale constant in
    the file; each Q node is still paired with its own quantizer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(),
                        nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        for conv in (net[0], net[2]):
            conv.weight.mul_(20.0)  # both ReLU6 outputs reach 6
    x = torch.randn(16, 3, 10, 10)
    q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    assert torch.equal(q.get_submodule("0").output_quantizer.scale,
                       q.get_submodule("2").output_quantizer.scale)
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    rows = compare_layers(path, q, x)
    names = [r.name for r in rows]
    assert "0.output_quantizer" in names and "2.output_quantizer" in names
    assert len(names) == len(set(names))
    assert first_divergence(rows) is None, rows


def test_quantizers_sharing_a_scale_but_not_a_zero_point_are_told_apart(tmp_path):
    """The scale constant is shared, the zero points differ: each Q node is paired
    by the qparams it reads in the file, not by the quantizer its scale is named after."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                        nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(16, 3, 8, 8)
    q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    scale = q.get_submodule("0").output_quantizer.scale.clone()
    for name, zero_point in (("0", 120), ("1", 128), ("2", 140)):
        q.get_submodule(name).output_quantizer.load_qparams(
            scale * 4, torch.tensor(zero_point, dtype=torch.int32))
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    report = quantaware.verify(path, q, [x])
    assert report.layers_checked == 4 and report.first_divergent_layer is None, report
    assert report.max_error_lsb == 0.0, report


def test_saturated_low_bit_codes_are_read_after_their_clip(tmp_path):
    """A 4-bit activation saturates in a Clip after its QuantizeLinear; the layer
    check read the unclipped codes and reported a false divergence wherever
    values fell outside the calibrated range."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    gen = torch.Generator().manual_seed(0)
    q = quantaware.quantize(net, presets.W4A4, [torch.randn(64, 8, generator=gen) * 0.2],
                            torch.zeros(1, 8))
    path = quantaware.export_onnx(q, tmp_path / "w4a4.onnx", torch.zeros(1, 8))
    wide = torch.randn(32, 8, generator=gen) * 3  # far outside the calibrated range
    rows = compare_layers(path, q, wide)
    assert len(rows) >= 5
    assert first_divergence(rows) is None, first_divergence(rows)


def test_a_learned_scale_pushed_negative_is_read_as_the_scale_used(tmp_path):
    """A training step can push a learned scale through zero; the quantizer uses
    |scale| and the export writes it, so the layer check must read the same value
    (it read the raw negative one and reported a false divergence)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 8)
    q = quantaware.quantize(net, presets.W4A4, [x], x[:1]).eval()
    with torch.no_grad():
        before = q(x)
        q.get_submodule("2.output_quantizer").scale.neg_()
        assert torch.equal(q(x), before)
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    rows = compare_layers(path, q, x)
    assert "2.output_quantizer" in [r.name for r in rows]
    assert first_divergence(rows) is None, first_divergence(rows)
