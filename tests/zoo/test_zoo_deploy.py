"""Export + verify of the three reference architectures at small input sizes."""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest
import torch

import quantaware
from quantaware.deploy import default_config, quantize_for_backend
from quantaware.prepare import quantizers
from quantaware.zoo import mobilenet_v2, resnet18
from quantaware.zoo.minilm import MiniLMConfig, minilm


def _optimized_ops(path, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath)
                               .graph.node)


@pytest.mark.parametrize("factory", [resnet18, mobilenet_v2])
def test_cnn_exports_integer_end_to_end(factory, tmp_path):
    torch.manual_seed(0)
    model = factory(num_classes=10).eval()
    x = torch.randn(24, 3, 32, 32)
    q = quantaware.quantize(model, default_config(model), [x[:12], x[12:]], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    report = quantaware.verify(path, q, [x])
    # Against the torch model running ONNX Runtime's integer arithmetic: every
    # quantized activation and the output identical.
    assert report.reference == "integer" and report.fake_quant_layers == 0, report
    assert report.top1_agreement == 1.0 and report.max_error_lsb == 0.0, report
    assert report.layers_checked > 20 and report.first_divergent_layer is None, report
    # The fake-quant forward accumulates in float: close, but ties may round apart.
    assert report.fake_quant_top1_agreement >= 0.95 and report.fake_quant_cosine >= 0.999
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] > 0 and ops["Conv"] == 0 and ops["FusedConv"] == 0, ops
    assert ops["QLinearAdd"] > 0, ops


def test_minilm_exports_and_matches_torch(tmp_path):
    cfg = MiniLMConfig(vocab_size=200, hidden_size=64, num_layers=2, num_heads=4,
                       intermediate_size=128, max_positions=32)
    model = minilm(cfg)
    torch.manual_seed(0)
    ids = torch.randint(1, 200, (16, 12))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0
    data = [{"input_ids": ids[:8], "attention_mask": mask[:8]},
            {"input_ids": ids[8:], "attention_mask": mask[8:]}]
    assert default_config(model).name == "INT8_TRANSFORMER"
    q = quantize_for_backend(model, data, (ids[:2], mask[:2]))
    assert any(q_._buffers.get("smoothing") is not None for _, q_ in quantizers(q))
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", (ids[:2], mask[:2]))
    report = quantaware.verify(path, q, data)
    assert report.cosine >= 0.999, report
    assert report.layers_checked > 0, report
    assert report.first_divergent_lsb is None or report.first_divergent_lsb <= 2, report
    ops = _optimized_ops(path, tmp_path)
    # Every Linear (6 per layer) runs on integers, except the most sensitive one, which
    # keeps float inputs and int8 weights (ORT's weight-only MatMulNBits); the
    # attention matmuls stay float.
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 2 * 6 - 1, ops
    assert ops["MatMulNBits"] == 1, ops
