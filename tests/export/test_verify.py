"""quantaware.verify: the report, mismatch detection and bad files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from tests.export.conftest import _two_heads
from torch import nn

import quantaware
from quantaware import presets
from quantaware.export import VerifyReport
from quantaware.export.verify import _agreement

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


INPUT_SHAPE = (3, 8, 8)


def _batches(count: int, seed: int, batch: int = 25) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *INPUT_SHAPE, generator=gen) for _ in range(count)]


# int8_model / int8_path: the INT8 ResidualCNN export shared with test_onnx.py
# (tests/export/conftest.py).


@pytest.fixture(scope="module")
def report(single_thread, int8_path, int8_model) -> VerifyReport:
    return quantaware.verify(int8_path, int8_model, _batches(8, 1))


def test_report_fields(report, int8_model):
    assert report.num_samples == 8 * 25
    assert report.top1_agreement >= 0.99
    assert 0.999 < report.cosine <= 1.0 + 1e-9
    assert report.min_cosine <= report.cosine + 1e-12
    assert report.max_abs_error >= 0.0
    step = float(int8_model.get_submodule("fc2").output_quantizer.scale)
    assert report.output_scale == pytest.approx(step)
    assert report.max_error_lsb == pytest.approx(report.max_abs_error / step)
    # The torch side ran ONNX Runtime's integer arithmetic: bit for bit the same.
    assert report.reference == "integer"
    assert report.integer_layers > 0 and report.fake_quant_layers == 0
    assert report.max_error_lsb == 0.0 and report.top1_agreement == 1.0
    assert report.layers_checked > 0 and report.first_divergent_layer is None
    # The fake-quant forward accumulates in float: close, not identical.
    assert report.fake_quant_top1_agreement >= 0.99
    assert 0.999 < report.fake_quant_cosine <= 1.0 + 1e-9


def test_fake_quant_reference_is_within_one_lsb(int8_path, int8_model):
    report = quantaware.verify(int8_path, int8_model, _batches(8, 1), reference="fake-quant")
    assert report.reference == "fake-quant" and report.integer_layers == 0
    assert report.fake_quant_top1_agreement is None
    # at most one step apart (float32 rounding of the outputs adds up to ~2e-5 LSB)
    assert report.max_error_lsb <= 1 + 1e-5
    assert report.top1_agreement >= 0.99
    assert "fake-quant forward" in str(report)


def test_unknown_reference_raises(int8_path, int8_model):
    with pytest.raises(ValueError, match="reference must be one of"):
        quantaware.verify(int8_path, int8_model, _batches(1, 0), reference="exact")


def test_generator_data_is_read_once(int8_path, int8_model):
    report = quantaware.verify(int8_path, int8_model, (x for x in _batches(3, 5)))
    assert report.num_samples == 75 and report.reference == "integer"


def test_report_serialises(report):
    data = report.to_dict()
    assert set(data) == {"num_samples", "top1_agreement", "cosine", "min_cosine",
                         "max_abs_error", "max_error_lsb", "output_scale", "layers_checked",
                         "first_divergent_layer", "first_divergent_lsb", "reference",
                         "integer_layers", "fake_quant_layers", "fake_quant_top1_agreement",
                         "fake_quant_cosine", "layers_unavailable", "backend", "num_outputs",
                         "fake_quant_max_error_lsb", "relative_error"}
    assert data["backend"] == "onnxruntime" and data["layers_unavailable"] == 0
    assert data["num_outputs"] == 1
    assert json.loads(report.to_json()) == data
    assert VerifyReport(**data) == report


def test_unknown_backend_raises(int8_path, int8_model):
    with pytest.raises(ValueError, match="onnxruntime, openvino"):
        quantaware.verify(int8_path, int8_model, _batches(1, 0), backend="tensorrt")


def test_report_names_a_backend_other_than_onnxruntime():
    text = str(_report(backend="openvino", layers_unavailable=3))
    assert text.startswith("verify: PASS on 10 samples in openvino")
    assert "not available in openvino" in text
    partial = str(_report(backend="openvino", layers_checked=5, layers_unavailable=2))
    assert "2 not observable in openvino" in partial


def test_report_str_is_readable(report):
    text = str(report)
    lines = text.splitlines()
    assert len(lines) == 7 and "layers" in lines[5] and "identical" in lines[5]
    verdict = "PASS" if report.passed() else "CHECK"
    assert lines[0] == f"verify: {verdict} on 200 samples"
    assert "integer arithmetic" in lines[1] and "fake-quant torch top-1" in lines[6]
    assert "top-1 agreement" in text and f"{100 * report.top1_agreement:.2f}%" in text
    assert "cosine" in text and "LSB" in text and "step" in text
    assert "VerifyReport(" not in text


def _report(**overrides) -> VerifyReport:
    fields = {"num_samples": 10, "top1_agreement": 1.0, "cosine": 1.0, "min_cosine": 1.0,
              "max_abs_error": 0.01, "max_error_lsb": 1.0, "output_scale": 0.01}
    fields.update(overrides)
    return VerifyReport(**fields)


def test_passed_thresholds():
    assert _report().passed()
    assert not _report(top1_agreement=0.98).passed()
    assert _report(top1_agreement=0.98).passed(min_agreement=0.95)
    assert not _report(max_error_lsb=1.5).passed()
    assert _report(max_error_lsb=1.5).passed(max_lsb=2)
    float_output = _report(max_error_lsb=None, output_scale=None, relative_error=0.001)
    assert float_output.passed()
    assert "0.10% of the output (float output)" in str(float_output)
    # a float output off by a factor keeps its cosine: the relative error fails it
    assert not _report(max_error_lsb=None, output_scale=None, relative_error=1.0).passed()
    assert not _report(max_error_lsb=None, output_scale=None, cosine=0.99).passed()
    assert str(_report(top1_agreement=0.5)).startswith("verify: CHECK")
    # A file's NaN outputs: argmax reads them as class 0 everywhere, which "agrees".
    assert not _report(max_abs_error=float("nan"), max_error_lsb=None).passed()
    assert not _report(cosine=float("nan"), max_error_lsb=None).passed()


def test_mismatching_model_gives_low_agreement(int8_path, cnn_factory, calib_data,
                                               example_input):
    other = quantaware.quantize(cnn_factory(1), presets.INT8, calib_data, example_input)
    report = quantaware.verify(int8_path, other, _batches(8, 2))
    assert report.top1_agreement < 0.5
    assert report.max_error_lsb > 5
    assert report.cosine < 0.9
    assert not report.passed()
    assert "CHECK" in str(report)


def test_the_float_file_of_a_quantized_model_is_refused(float_path, int8_model):
    """The float export agrees with the quantized model to its quantization error;
    verify passed it (PASS, "12 of 12 quantized layers exact") though it deploys
    none of the quantization."""
    with pytest.raises(ValueError, match=r"holds no quantized operators.*float export"):
        quantaware.verify(float_path, int8_model, _batches(1, 2))


def test_the_float_file_of_a_float16_model_is_refused(tmp_path, float_path, cnn_factory,
                                                      example_input):
    """Only integer quantizers were looked for: an FP16 model passed against the
    float32 file."""
    fp16 = quantaware.quantize(cnn_factory(0), presets.FP16, [example_input], example_input)
    with pytest.raises(ValueError, match=r"holds no float16 constants.*float export"):
        quantaware.verify(float_path, fp16, _batches(1, 2))
    path = quantaware.export_onnx(fp16, tmp_path / "fp16.onnx", example_input)
    assert quantaware.verify(path, fp16, _batches(4, 2)).passed()
    # weights of a few values are folded into float32 constants: still its own file
    tiny = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(4, 2)
    tiny = quantaware.quantize(tiny, presets.FP16, [x], x[:1])
    path = quantaware.export_onnx(tiny, tmp_path / "tiny.onnx", x[:1])
    assert quantaware.verify(path, tiny, [x]).max_abs_error < 1e-5


def test_a_quantized_table_is_a_quantized_file(tmp_path):
    """An int8 embedding table is looked up with Gather, no quantized operator:
    verify refused the file of a model whose only quantized layer is its table."""

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(40, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids).mean(1)

    torch.manual_seed(0)
    ids = torch.randint(0, 40, (8, 5))
    q = quantaware.quantize(Bag().eval(), presets.W8, [ids], ids[:1])
    path = quantaware.export_onnx(q, tmp_path / "bag.onnx", ids[:1])
    assert quantaware.verify(path, q, [ids]).passed()


def test_num_batches_limits_the_comparison(int8_path, int8_model):
    report = quantaware.verify(int8_path, int8_model, _batches(8, 3), num_batches=2)
    assert report.num_samples == 50
    with pytest.raises(ValueError, match="num_batches"):
        quantaware.verify(int8_path, int8_model, _batches(1, 3), num_batches=0)


def test_tuple_batches(int8_path, int8_model):
    data = [(x, torch.zeros(len(x))) for x in _batches(2, 4)]
    assert quantaware.verify(int8_path, int8_model, data).num_samples == 50


def test_empty_data_raises(int8_path, int8_model):
    with pytest.raises(ValueError, match="no data"):
        quantaware.verify(int8_path, int8_model, [])


def test_non_finite_data_or_model_outputs_are_refused(int8_path, int8_model, cnn_factory,
                                                      calib_data, example_input):
    """NaN data, or a model whose outputs are NaN, made verify PASS (an all-NaN
    output 'agrees' on top-1, and its error read as a float output's)."""
    data = _batches(2, 5)
    data[1][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="verify batch 1 contains 1 NaN/Inf"):
        quantaware.verify(int8_path, int8_model, data)
    broken = quantaware.quantize(cnn_factory(0), presets.INT8, calib_data, example_input)
    with torch.no_grad():
        broken.get_submodule("fc2").bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="torch model's output on verify batch 0 contains"):
        quantaware.verify(int8_path, broken, _batches(1, 6))


def test_model_with_other_output_shape_raises(int8_path):
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    with pytest.raises(ValueError, match="output shapes differ"):
        quantaware.verify(int8_path, wrong, _batches(1, 0))


def test_missing_file_raises(tmp_path, int8_model):
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        quantaware.verify(tmp_path / "missing.onnx", int8_model, _batches(1, 0))
    with pytest.raises(FileNotFoundError):
        quantaware.verify(tmp_path, int8_model, _batches(1, 0))  # a folder is not a model


@pytest.mark.parametrize("content", [b"not an onnx model \x00\xff" * 40, b"\xff" * 7])
def test_corrupt_file_raises_value_error(tmp_path, int8_model, content):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"corrupt\.onnx"):
        quantaware.verify(path, int8_model, _batches(1, 0))


def test_empty_file_raises_value_error(tmp_path, int8_model):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.onnx"):
        quantaware.verify(path, int8_model, _batches(1, 0))


def test_truncated_file_raises_value_error(tmp_path, int8_path, int8_model):
    path = tmp_path / "truncated.onnx"
    data = int8_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.onnx"):
        quantaware.verify(path, int8_model, _batches(1, 0))


# -- exactly one LSB apart ---------------------------------------------------------------

STEP = 0.0123


@pytest.fixture(scope="module")
def qdq_path(tmp_path_factory):
    """An ONNX model that quantizes its input to uint8 levels and dequantizes it."""
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])],
        initializer=[helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [STEP]),
                     helper.make_tensor("zp", onnx.TensorProto.UINT8, [], [0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path_factory.mktemp("qdq") / "qdq.onnx"
    onnx.save(model, str(path))
    return path


class OneStepLower(nn.Module):
    """What the ONNX model computes, one quantization step lower everywhere."""

    def forward(self, x):
        step = torch.tensor(STEP, dtype=torch.float32)
        return torch.clamp(torch.round(x / step) - 1, 0, 255) * step


def _level_batches():
    gen = torch.Generator().manual_seed(0)
    # distinct high levels per row (200..255), so the arg-max is unambiguous
    levels = torch.stack([torch.randperm(56, generator=gen)[:10] + 200 for _ in range(32)])
    return [levels.float() * torch.tensor(STEP, dtype=torch.float32)]


def test_one_lsb_difference_is_measured_as_one_lsb(qdq_path):
    report = quantaware.verify(qdq_path, OneStepLower(), _level_batches())
    assert report.output_scale == pytest.approx(STEP)
    assert report.top1_agreement == 1.0
    assert report.max_error_lsb == pytest.approx(1.0, abs=1e-4)
    # the float32 outputs make it slightly more than one: the case below
    assert report.max_error_lsb > 1 + 1e-6


def test_one_lsb_difference_passes(qdq_path):
    report = quantaware.verify(qdq_path, OneStepLower(), _level_batches())
    assert report.passed()
    assert str(report).startswith("verify: PASS")


def test_dense_maps_agree_position_by_position_over_the_class_axis():
    """(N, C, H, W) logits: the arg-max is taken over the classes, per pixel; it was
    taken over the width, where an upsampled map has ties everywhere."""
    gen = np.random.default_rng(0)
    ref = gen.standard_normal((2, 3, 4, 4)).astype(np.float32)
    out = ref.copy()
    pixel = out[0, :, 1, 2]
    out[0, :, 1, 2] = pixel[::-1] + np.arange(3) * 10  # a different class wins here
    assert ref[0, :, 1, 2].argmax() != out[0, :, 1, 2].argmax()
    assert _agreement([ref], [out]).top1 == pytest.approx(1 - 1 / 32)
    width_ties = np.repeat(ref[..., :1], 4, axis=3)  # equal along the width
    assert _agreement([width_ties], [width_ties + 1e-7 * gen.random(ref.shape,
                                                                    np.float32)]).top1 == 1.0


def test_exact_ties_broken_by_float_rounding_still_agree():
    """Logits on an integer grid tie exactly; a backend a few ulps off picks another
    of the tied classes, which is not a disagreement (a different class winning by
    a real margin still is)."""
    ref = np.array([[0.5, 0.75, 0.75, 0.1], [1.0, 0.2, 0.3, 0.4]], np.float32)
    out = ref.copy()
    out[0, 2] += 3e-8  # the second of the tied classes now wins
    assert ref[0].argmax() != out[0].argmax()
    assert _agreement([ref], [out]).top1 == 1.0
    out[1, 3] = 1.1
    assert _agreement([ref], [out]).top1 == 0.5


def test_segmentation_model_agrees_with_its_fake_quant_forward(tmp_path):
    class Segmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Conv2d(3, 16, 3, 2, 1)
            self.head = nn.Conv2d(16, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.head(torch.relu(self.down(x)))
            return nn.functional.interpolate(logits, scale_factor=2, mode="bilinear")

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(2)]
    q = quantaware.quantize(Segmenter().eval(), presets.INT8, data, data[0][:1])
    report = quantaware.verify(quantaware.export_onnx(q, tmp_path / "s.onnx", data[0][:1]),
                               q, data)
    assert report.passed() and report.top1_agreement == 1.0, str(report)
    assert report.fake_quant_top1_agreement >= 0.99, str(report)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_every_output_is_compared(tmp_path, as_dict):
    q, path, data = _two_heads(tmp_path, as_dict)
    report = quantaware.verify(path, q, data)
    assert report.num_outputs == 2 and report.passed(), str(report)
    assert report.max_error_lsb == 0.0 and "2 outputs" in str(report)


def test_a_wrong_second_output_fails(tmp_path):
    """Only the first output was compared: a file whose second head computes
    something else passed."""
    q, path, data = _two_heads(tmp_path)
    model = onnx.load(str(path))
    weight = next(i for i in model.graph.initializer if i.name == "boxes._qweight")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0] = -values[0]  # the first box coordinate comes out negated
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(path))
    report = quantaware.verify(path, q, data)
    assert not report.passed() and report.max_error_lsb > 1, str(report)
    assert report.min_cosine < 0.9999, str(report)


def test_output_count_mismatch_is_an_error(tmp_path):
    q, _, data = _two_heads(tmp_path)
    one = quantaware.quantize(nn.Linear(6, 4), presets.INT8, data, data[0][:1])
    single = quantaware.export_onnx(one, tmp_path / "one.onnx", data[0][:1])
    with pytest.raises(ValueError, match="2 outputs and the onnxruntime file 1"):
        quantaware.verify(single, q, data)


def test_data_of_another_shape_is_named(int8_path, int8_model):
    """ONNX Runtime's own message named neither the batch nor the file's shape."""
    x = torch.randn(4, 5, 7, 7)
    with pytest.raises(ValueError, match=r"onnxruntime could not run .* on verify batch 0: "
                                         r"given \w+ \(4, 5, 7, 7\) float, the file takes "
                                         r"\w+ \(N, "):
        quantaware.verify(int8_path, int8_model, [x], check_layers=False)


def test_a_backend_failure_on_fitting_data_is_not_blamed_on_the_data(int8_path, int8_model,
                                                                     monkeypatch):
    """A backend that failed to compile the file was reported as data of the wrong
    shape ("pass data shaped like the example"), its cause cut off."""
    import importlib

    verify_module = importlib.import_module("quantaware.export.verify")
    real = verify_module.create_backend_session

    class Failing:
        def __init__(self, session):
            self.session = session

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, *_args):
            raise RuntimeError("Exception from graph_rewrite.cpp: " + "stack " * 200
                               + "CALLBACK HAS THROWN: index out of range")

    monkeypatch.setattr(verify_module, "create_backend_session",
                        lambda *a, **k: Failing(real(*a, **k)))
    with pytest.raises(ValueError, match=r"failed on .* though the inputs fit the file "
                                         r"\(\w+ \(25, .*CALLBACK HAS THROWN") as err:
        quantaware.verify(int8_path, int8_model, _batches(1, 1), check_layers=False)
    assert "pass data shaped like" not in str(err.value)


def test_data_of_another_type_is_named(int8_path, int8_model):
    """float64 data fit the file's shape: the backend was blamed."""
    with pytest.raises(ValueError, match=r"could not run .* given \w+ \(25, 3, 8, 8\) double, "
                                         r"the file takes \w+ \(N, 3, 8, 8\) float"):
        quantaware.verify(int8_path, int8_model, [b.double() for b in _batches(1, 0)],
                          check_layers=False)


def test_verify_and_evaluation_leave_a_qat_model_that_still_observes_unchanged(tmp_path):
    """QAT without calibration keeps its observers on: verify's own forward passes
    widened the ranges (CHECK at 3 LSB against the file just exported, 150 LSB on
    wider data) and left the model in eval mode."""
    from quantaware.models import DigitsCNN
    from quantaware.prepare import quantizers
    from quantaware.train import evaluate_accuracy

    torch.manual_seed(0)
    data = [(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))) for _ in range(4)]
    qmodel = quantaware.prepare(DigitsCNN(), presets.INT8, example_inputs=data[0][0][:1])
    optimizer = torch.optim.AdamW(qmodel.parameters(), lr=1e-4)
    for x, y in data:
        loss = nn.functional.cross_entropy(qmodel(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = quantaware.export_onnx(qmodel, tmp_path / "m.onnx", data[0][0][:1])
    before = {n: q.scale.clone() for n, q in quantizers(qmodel)}
    wider = [torch.randn(32, 1, 8, 8) * 3 for _ in range(2)]
    report = quantaware.verify(path, qmodel, wider, threads=1)
    evaluate_accuracy(qmodel, [(x * 3, y) for x, y in data])
    assert report.passed and report.max_error_lsb == 0
    assert all(torch.equal(before[n], q.scale) for n, q in quantizers(qmodel))
    assert qmodel.training


@pytest.mark.parametrize("quantized_output", [True, False])
def test_a_wrong_regression_output_is_not_passed(tmp_path, quantized_output):
    """An (N,) output passed however wrong: top-1 of one value always agrees, each
    sample's cosine was only its sign, and the step was not found through the
    Squeeze, so nothing bounded the error (200% off read PASS)."""
    from quantaware.config import LayerOverride

    class Regression(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(6, 16), nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x))).squeeze(-1)

    torch.manual_seed(0)
    x = torch.randn(64, 6)
    config = presets.INT8 if quantized_output else presets.INT8.with_overrides(
        LayerOverride("head", activation=None))
    q = quantaware.quantize(Regression().eval(), config, [x], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "r.onnx", x[:1])
    report = quantaware.verify(path, q, [x])
    assert report.passed(), str(report)
    assert (report.max_error_lsb is not None) is quantized_output
    proto = onnx.load(path)  # a wrong file: it negates its input
    name = proto.graph.input[0].name
    for node in proto.graph.node:
        node.input[:] = [f"{name}_negated" if i == name else i for i in node.input]
    proto.graph.node.insert(0, onnx.helper.make_node("Neg", [name], [f"{name}_negated"]))
    onnx.save(proto, tmp_path / "wrong.onnx")
    wrong = quantaware.verify(tmp_path / "wrong.onnx", q, [x])
    assert not wrong.passed(), str(wrong)
    scaled = onnx.load(path)  # a file off by a factor: the same cosine
    out = scaled.graph.output[0].name
    for node in scaled.graph.node:
        node.output[:] = [f"{out}_unscaled" if o == out else o for o in node.output]
    scaled.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(2.0), "two"))
    scaled.graph.node.append(onnx.helper.make_node("Mul", [f"{out}_unscaled", "two"], [out]))
    onnx.save(scaled, tmp_path / "scaled.onnx")
    doubled = quantaware.verify(tmp_path / "scaled.onnx", q, [x])
    assert doubled.cosine > 0.999 and not doubled.passed(), str(doubled)
    # no NOTE that the integer reference follows the backend: it does not
    assert "NOTE" not in str(wrong)
    assert ("differs from both" in str(wrong)) is quantized_output
