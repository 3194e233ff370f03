"""quantaware.export.tflite: full-integer LiteRT files that keep quantaware's own scales."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tests.export.conftest import INPUT_SHAPE, _one_thread, _two_heads
from torch import nn

import quantaware
from quantaware import presets
from quantaware.config import PerTensor, QuantSpec
from quantaware.export.onnx import ExportError
from quantaware.fake_quant import FakeQuantizer

# Ops that convert at the float interface; everything between them must be int8.
_INTERFACE = {"QUANTIZE", "DEQUANTIZE"}


@pytest.fixture(scope="module")
def litert():
    return pytest.importorskip("litert_torch"), pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def int8_tflite(litert, int8_model, export_dir, example_input):
    with _one_thread():
        return quantaware.export_tflite(int8_model, export_dir / "int8.tflite", example_input)


def _codes(model, x):
    """The output codes of the torch fake-quant model (output quantizer's grid)."""
    with torch.no_grad():
        return model(x).numpy()


def _round_trip(model, calib, data, path, config=presets.INT8):
    """``model`` quantized on ``calib``, exported to ``path`` and verified in LiteRT on
    ``data``: ``(quantized model, file, report)``."""
    with _one_thread():
        q = quantaware.quantize(model, config, calib, calib[0][:1])
        path = quantaware.export_tflite(q, path, calib[0][:1])
        return q, path, quantaware.verify(path, q, data, backend="litert")


def test_every_op_is_integer_between_float_interface_ops(int8_tflite):
    from quantaware.export.tflite import tflite_ops

    ops = tflite_ops(int8_tflite)
    names = [name for name, _ in ops]
    assert names[0] == "QUANTIZE" and names[-1] == "DEQUANTIZE"
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "CONCATENATION", "MAX_POOL_2D",
            "FULLY_CONNECTED"} <= set(names)
    for name, dtypes in ops:
        if name not in _INTERFACE:
            assert "float32" not in dtypes, (name, dtypes)


def test_scales_and_zero_points_are_the_models_own(int8_tflite, int8_model):
    """Every activation quantizer's scale is in the file bit for bit, with its uint8
    zero point moved to int8 (-128); nothing was recalibrated. The one exception is
    a conv that feeds only the concatenation: LiteRT's concatenation needs one
    grid on all inputs, so the converter writes that conv's output straight onto
    the concatenation's grid (ours, too) instead of rounding twice."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(str(int8_tflite))
    in_file = {(np.float32(d["quantization"][0]).tobytes(), int(d["quantization"][1]))
               for d in interp.get_tensor_details() if d["dtype"] == np.int8}
    ours = {name: (np.float32(float(q.scale)).tobytes(), int(q.zero_point) - 128)
            for name, q in int8_model.named_modules()
            if isinstance(q, FakeQuantizer) and not q.from_tensor}
    assert len(ours) >= 8
    missing = {name for name, key in ours.items() if key not in in_file}
    assert missing <= {"branch.output_quantizer"}
    assert ours["cat.output_quantizer"] in in_file


def test_litert_matches_the_torch_model(int8_tflite, int8_model, fresh_data):
    """Against torch running LiteRT's integer arithmetic, LiteRT computes the same
    codes in every layer: input QUANTIZE, convs, depthwise, the residual ADD, the
    concatenation (whose branch conv LiteRT writes straight onto its grid), max
    pooling, the mean and the linear layers."""
    report = quantaware.verify(int8_tflite, int8_model, fresh_data, backend="litert")
    assert report.backend == "litert" and report.reference == "integer"
    assert report.num_samples == sum(len(b) for b in fresh_data)
    assert report.top1_agreement == 1.0 and report.max_error_lsb == 0.0
    assert report.layers_checked >= 8 and report.first_divergent_layer is None
    assert "LiteRT's integer arithmetic" in str(report)
    fake = quantaware.verify(int8_tflite, int8_model, fresh_data, backend="litert",
                             reference="fake-quant", check_layers=False)
    assert fake.reference == "fake-quant" and fake.cosine > 0.9999


def test_litert_integer_arithmetic_is_exact_without_concatenation(litert, tmp_path):
    """A residual network without concatenation: LiteRT and torch with LiteRT's
    integer arithmetic compute the same codes everywhere (ADD in fixed point,
    QUANTIZE by the reciprocal scale)."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = torch.relu(y + self.b(y))
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Residual().eval()
    calib = [torch.randn(32, 3, 8, 8, generator=gen) for _ in range(2)]
    data = [torch.randn(40, 3, 8, 8, generator=gen) * 1.3 for _ in range(3)]
    _, _, report = _round_trip(model, calib, data, tmp_path / "residual.tflite")
    assert report.reference == "integer" and report.integer_layers >= 3
    assert report.max_error_lsb == 0.0 and report.top1_agreement == 1.0
    assert report.first_divergent_layer is None and report.layers_checked >= 4


def test_concatenation_input_that_also_feeds_a_layer_is_requantized_as_litert_does(
        litert, tmp_path):
    """A skip connection into a concatenation (U-Net style): the tensor also feeds
    the next conv, so it keeps its own grid and LiteRT requantizes it onto the
    concatenation's grid with an int8 -> int8 QUANTIZE (8-bit-fraction
    multiplier). The integer reference computes the same codes."""
    from torch import nn

    from quantaware.export.tflite import tflite_ops

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(16, 4, 1)
            with torch.no_grad():  # a wider range than y's: the concatenation's grid
                self.b.weight.mul_(3)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.c(torch.cat([y, torch.relu(self.b(y))], 1))

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 10, 12, generator=gen) for _ in range(2)]
    _, path, report = _round_trip(Skip().eval(), calib,
                                  [torch.randn(64, 3, 10, 12, generator=gen)],
                                  tmp_path / "skip.tflite")
    assert ("QUANTIZE", ["int8"]) in tflite_ops(path)  # the requantization is there
    assert report.max_error_lsb == 0.0 and report.top1_agreement == 1.0, str(report)
    assert report.first_divergent_layer is None and report.layers_checked >= 4, str(report)


def _pool_net(pool):
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), pool,
                         nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("pool", [
    torch.nn.AvgPool2d(2), torch.nn.AvgPool2d((2, 3), (2, 1)),
    torch.nn.AvgPool2d(3, 1, 1), torch.nn.AvgPool2d(3, 2, 1),
    torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True),
    torch.nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False),
], ids=["2x2", "2x3-stride-2x1", "3x3-pad-1", "3x3-stride-2-pad-1", "ceil-mode-pad-1",
        "ceil-mode-uncounted"])
def test_average_pooling_is_integer_and_exact(litert, tmp_path, pool):
    """LiteRT averages int8 codes on the input's grid (TFLite's kernel, rounding half
    away from zero) and requantizes onto the pool's grid. A padded pool is exported
    as an explicit zero pad and an unpadded pool: lowered as one op, the converter
    requantized the padded input onto the (narrower) output grid and clipped it,
    20-47 LSB off. A ceil_mode pool with no window hanging over the 9x9 input is
    the floor-mode pool (as one op in ceil mode: 20 LSB and 2 LSB off)."""
    from quantaware.export.integer import integer_arithmetic
    from quantaware.export.tflite import tflite_ops

    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 9, 9, generator=gen) for _ in range(2)]
    q, path, report = _round_trip(_pool_net(pool), calib,
                                  [torch.randn(32, 3, 9, 9, generator=gen)],
                                  tmp_path / "pool.tflite")
    ops = tflite_ops(path)
    assert ("AVERAGE_POOL_2D", ["int8"]) in ops
    assert all("float32" not in d for n, d in ops if n not in _INTERFACE), ops
    with integer_arithmetic(q, "litert") as emulation:
        pass
    assert emulation.complete and "2" in emulation.emulated
    assert report.max_error_lsb == 0.0 and report.first_divergent_layer is None, str(report)


@pytest.mark.parametrize("pool", [nn.AvgPool1d(2), nn.AvgPool1d(3, 2), nn.AvgPool1d(3, 2, 1)],
                         ids=["2", "3-stride-2", "3-stride-2-pad-1"])
@pytest.mark.parametrize("last", [False, True], ids=["inner", "last"])
def test_1d_average_pooling_is_integer_and_exact(litert, tmp_path, pool, last):
    """A Conv1d network's average pool is written as the 2-d pool over (1, L): LiteRT
    averages int8 codes on the input's grid, then requantizes onto the pool's grid.
    (Lowered as a 1-d pool, the converter requantized the input onto the pool's
    narrower grid before averaging: clipped, 6-40 LSB off the model as the last
    layer, which an emulation of that file could not tell.)"""
    from quantaware.export.tflite import tflite_ops
    from quantaware.nn import QuantAvgPool1d

    torch.manual_seed(0)
    layers = [nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), pool]
    if not last:
        layers += [nn.Conv1d(16, 8, 3, padding=1), nn.ReLU()]
    net = nn.Sequential(*layers).eval()
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(32, 1, 40, generator=gen) for _ in range(2)]
    q, path, report = _round_trip(net, calib, [torch.randn(64, 1, 40, generator=gen)],
                                  tmp_path / "pool1d.tflite")
    assert any(isinstance(m, QuantAvgPool1d) for m in q.modules())
    ops = tflite_ops(path)
    names = [n for n, _ in ops]
    assert names.index("AVERAGE_POOL_2D") < names.index("QUANTIZE", 1)  # pool, then requantize
    assert all("float32" not in d for n, d in ops if n not in _INTERFACE), ops
    assert report.fake_quant_layers == 0, str(report)
    assert report.max_error_lsb == 0.0 and report.first_divergent_layer is None, str(report)
    assert report.fake_quant_cosine > 0.999, str(report)  # the model's values, unclipped


def test_upsampling_is_integer_and_exact(litert, upsampling_int8, tmp_path):
    """LiteRT resizes int8 codes: RESIZE_NEAREST_NEIGHBOR copies them; for
    RESIZE_BILINEAR the converter has the layer before write onto the resize's grid
    and XNNPACK interpolates codes with 11-bit weights. The integer reference
    computes the same codes."""
    from quantaware.export.integer import integer_arithmetic
    from quantaware.export.tflite import tflite_ops

    model, data = upsampling_int8
    with _one_thread():
        path = quantaware.export_tflite(model, tmp_path / "upsampling.tflite", data[0][:1])
        report = quantaware.verify(path, model, data, backend="litert")
    ops = tflite_ops(path)
    for op in ("RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"):
        assert (op, ["int8", "int32"]) in ops, ops
    assert all("float32" not in d for n, d in ops if n not in _INTERFACE), ops
    with integer_arithmetic(model, "litert") as emulation:
        pass
    assert emulation.complete and "interpolate" in emulation.emulated, emulation
    assert report.max_error_lsb == 0.0 and report.top1_agreement == 1.0, str(report)
    assert report.first_divergent_layer is None and report.layers_checked >= 6, str(report)


class _Resizes(torch.nn.Module):
    """Bilinear resizes after the model's input, an add and a concatenation, to sizes
    that are not multiples of their inputs' (8x10 -> 19x23), corners aligned or not,
    and one of the model's output."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.a, self.c, self.d = (nn.Conv2d(3, 8, 3, padding=1) if i == 0 else
                                  nn.Conv2d(8, 8, 3, padding=1) for i in range(3))
        self.e, self.f, self.g = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        import torch.nn.functional as F

        size = (19, 23)
        r0 = F.interpolate(x, size=size, mode="bilinear")
        y = F.relu(self.a(x))
        r1 = F.interpolate(y + self.c(y), size=size, mode="bilinear", align_corners=True)
        r2 = F.interpolate(torch.cat([y, self.d(y)], 1), size=size, mode="bilinear")
        out = self.e(r0) + self.f(r1) + self.g(r2)
        return F.interpolate(out, scale_factor=2, mode="bilinear")


class _Resize1d(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv1d(3, 8, 3, padding=1), torch.nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(torch.nn.functional.interpolate(y, scale_factor=2, mode="linear"))


@pytest.mark.parametrize("model,shape", [(_Resizes, (3, 8, 10)), (_Resize1d, (3, 20))],
                         ids=["2d", "1d"])
def test_bilinear_resize_after_any_layer_is_exact(litert, tmp_path, model, shape):
    """LiteRT's converter reconciles a resize's two grids by where its input comes
    from: a conv or an add writes onto the resize's output grid; a concatenation or
    the model's input is requantized onto it first; a 1-d resize (behind reshapes)
    resizes on its input's grid and is requantized after; a resize of the model's
    output (float in the torch model) still resizes int8 codes, on its input's grid.
    XNNPACK interpolates codes with 11-bit weights. The reference follows each."""
    from quantaware.export.tflite import tflite_ops

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, *shape, generator=gen) for _ in range(2)]
    _, path, report = _round_trip(model().eval(), calib,
                                  [torch.randn(32, *shape, generator=gen)],
                                  tmp_path / "resize.tflite")
    assert ("RESIZE_BILINEAR", ["int8", "int32"]) in tflite_ops(path)
    assert report.fake_quant_layers == 0 and report.top1_agreement == 1.0, str(report)
    assert report.max_error_lsb in (0.0, None) and report.cosine > 1 - 1e-9, str(report)
    assert report.first_divergent_layer is None, str(report)


def test_average_pool_without_an_int8_kernel_is_named(litert, tmp_path, caplog):
    """Padding left out of the count with a stride LiteRT's 'same' padding does not
    express: the converter writes a float composite op. The file still exports with
    its float interface, and the export names the op that runs in float."""
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 9, 9, generator=gen) for _ in range(2)]
    net = _pool_net(torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False))
    with caplog.at_level("WARNING", logger="quantaware.export.tflite"):
        _, _, report = _round_trip(net, calib, [torch.randn(16, 3, 9, 9, generator=gen)],
                                   tmp_path / "pool.tflite")
    assert "aten.avg_pool2d.default in float32" in caplog.text
    assert report.cosine > 0.9999 and report.top1_agreement == 1.0


def test_layer_check_reads_square_images_in_litert_layout(litert, tmp_path):
    """A 3-channel 8x8 image and an 8-channel 8x8 activation: shape alone cannot tell
    LiteRT's NHWC from torch's NCHW, the layer check must still compare like with like."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 8, 8, generator=gen) for _ in range(2)]
    _, _, report = _round_trip(model, calib, [torch.randn(8, 3, 8, 8, generator=gen)],
                               tmp_path / "square.tflite")
    assert report.max_error_lsb == 0.0
    assert report.layers_checked >= 3 and report.first_divergent_layer is None, str(report)


def test_int8_interface(litert, int8_model, export_dir, example_input, fresh_data):
    from quantaware.backends import LiteRTSession

    path = quantaware.export_tflite(int8_model, export_dir / "int8_io.tflite", example_input,
                                    int8_io=True)
    session = LiteRTSession(path, threads=1)
    assert [i.type for i in session.get_inputs()] == ["tensor(int8)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(int8)"]
    x = fresh_data[0]
    # The session quantizes float feeds and dequantizes int8 outputs.
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    float_path = quantaware.export_tflite(int8_model, export_dir / "int8_f.tflite",
                                          example_input)
    ref = LiteRTSession(float_path, threads=1)
    ref_out = ref.run(None, {ref.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == ref_out.shape == _codes(int8_model, x).shape
    np.testing.assert_array_equal(out, ref_out)  # the same QUANTIZE, the same codes


def test_float_model_exports_float(litert, float_model, export_dir, example_input, fresh_data):
    from quantaware.backends import LiteRTSession
    from quantaware.export.tflite import tflite_ops

    path = quantaware.export_tflite(float_model, export_dir / "float.tflite", example_input)
    assert all("int8" not in dtypes for _, dtypes in tflite_ops(path))
    session = LiteRTSession(path, threads=1)
    x = fresh_data[0]
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, float_model(x).numpy(), rtol=1e-3, atol=1e-4)


def test_shape_mismatch_is_a_clear_error(int8_tflite):
    from quantaware.backends import LiteRTSession

    session = LiteRTSession(int8_tflite, threads=1)
    name = session.get_inputs()[0].name
    with pytest.raises(ValueError, match=r"samples of shape \[3, 9, 9\]; this LiteRT file "
                                         r"takes \[.*static shapes"):
        session.run(None, {name: np.zeros((2, 3, 9, 9), np.float32)})
    with pytest.raises(ValueError, match="model's inputs"):
        session.run(None, {"nope": np.zeros((1, *INPUT_SHAPE), np.float32)})
    with pytest.raises(ValueError, match="unknown outputs"):
        session.run(["nope"], {name: np.zeros((1, *INPUT_SHAPE), np.float32)})


def test_a_batch_runs_as_invocations_of_the_files_batch(int8_tflite, fresh_data):
    from quantaware.backends import LiteRTSession

    session = LiteRTSession(int8_tflite, threads=1)
    name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    x = fresh_data[0][:3].numpy()
    (batch,) = session.run([out_name], {name: x})
    singles = [session.run(None, {name: x[i:i + 1]})[0] for i in range(3)]
    np.testing.assert_array_equal(batch, np.concatenate(singles))
    assert batch.dtype == np.float32 and len({s.tobytes() for s in singles}) == 3


@pytest.mark.parametrize("preset,match", [("INT8_DYNAMIC", "dynamic activation"),
                                          ("W4A4", "only 8-bit activations"),
                                          ("FP16", "float16 weights have no LiteRT")])
def test_configs_without_an_integer_litert_form_are_refused(litert, preset, match, float_model,
                                                            calib_data, example_input,
                                                            tmp_path):
    with _one_thread():
        model = quantaware.quantize(float_model, presets.PRESETS[preset], calib_data,
                                    example_input)
        with pytest.raises(ExportError, match=match):
            quantaware.export_tflite(model, tmp_path / "m.tflite", example_input)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_litert_is_an_import_error_with_the_fix(monkeypatch, int8_model, tmp_path,
                                                        example_input):
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(ImportError, match=r"quantaware\[litert\]"):
        quantaware.export_tflite(int8_model, tmp_path / "m.tflite", example_input)
    assert not (tmp_path / "m.tflite").exists()


def test_corrupt_file_is_refused(litert, tmp_path):
    from quantaware.backends import LiteRTSession
    from quantaware.bench import OnnxModelError

    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(OnnxModelError, match="LiteRT cannot load"):
        LiteRTSession(bad)


def test_conv1d_network_with_4_bit_weights_is_exact(litert, tmp_path):
    """Conv1d layers (LiteRT runs them as 2-D convs) and 4-bit weights stored in
    int8: same codes as torch with LiteRT's arithmetic."""
    from quantaware.export.tflite import tflite_ops
    from quantaware.models import MNIST1DCNN

    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    calib = [torch.randn(32, 1, 40, generator=gen) for _ in range(2)]
    data = [torch.randn(32, 1, 40, generator=gen) for _ in range(2)]
    _, path, report = _round_trip(MNIST1DCNN(width=8).eval(), calib, data,
                                  tmp_path / "mnist1d.tflite", presets.W4A8)
    assert all("float32" not in d for n, d in tflite_ops(path) if n not in _INTERFACE)
    assert report.max_error_lsb == 0.0 and report.top1_agreement == 1.0


def test_asymmetric_weights_are_refused(litert, float_model, calib_data, example_input,
                                        tmp_path):
    import dataclasses

    config = dataclasses.replace(
        presets.INT8, weight=dataclasses.replace(presets.INT8.weight, symmetric=False))
    with _one_thread():
        model = quantaware.quantize(float_model, config, calib_data, example_input)
        with pytest.raises(ExportError, match="signed symmetric weights"):
            quantaware.export_tflite(model, tmp_path / "m.tflite", example_input)
    assert not list(tmp_path.iterdir())


_TWO_INPUTS = '''
import sys, torch, quantaware
from torch import nn
from quantaware import presets

class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids, scale):
        return self.fc(torch.relu(self.embed(ids) * scale))

torch.manual_seed(0)
model = Tagger().eval()
batches = [{"scale": torch.rand(8, 6, 1) + 0.5, "ids": torch.randint(0, 50, (8, 6))}
           for _ in range(2)]
example = (batches[0]["ids"][:1], batches[0]["scale"][:1])
q = quantaware.quantize(model, presets.INT8, batches, example)
path = quantaware.export_tflite(q, sys.argv[1], example)
report = quantaware.verify(path, q, batches, backend="litert")
print(report.num_samples, report.cosine, report.layers_checked)
'''


def test_embedding_model_with_keyword_batches(litert, tmp_path):
    """In a fresh process the first quantized layer an export runs is an embedding
    (the export ops were not registered yet), and verify feeds keyword batches (in
    another order than forward's) to LiteRT's numbered inputs in the order of the
    model's forward parameters, for the outputs and for the layer check."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", _TWO_INPUTS, str(tmp_path / "m.tflite")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    samples, cosine, layers = result.stdout.split()[-3:]
    assert int(samples) == 16 and float(cosine) > 0.999 and int(layers) > 0


class _ImageAndVector(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.vec = torch.nn.Linear(5, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(image)), 1)
        return self.head(pooled.flatten(1) + torch.relu(self.vec(vector)))


def test_positional_inputs_verify_layer_by_layer(litert, tmp_path):
    """Batches of ``((image, vector), label)``: both backends are fed both inputs
    and the layer check runs the torch model on both (it called the model with
    the tuple as one argument)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [((torch.randn(8, 3, 8, 8, generator=gen), torch.randn(8, 5, generator=gen)),
                torch.zeros(8)) for _ in range(3)]
    example = tuple(x[:1] for x in batches[0][0])
    q = quantaware.quantize(_ImageAndVector().eval(), presets.INT8, batches, example)
    for backend, path in (
            ("onnxruntime", quantaware.export_onnx(q, tmp_path / "m.onnx", example)),
            ("litert", quantaware.export_tflite(q, tmp_path / "m.tflite", example))):
        report = quantaware.verify(path, q, batches, backend=backend)
        assert report.num_samples == 24 and report.layers_checked >= 5, str(report)
        assert report.max_error_lsb == 0.0 and report.first_divergent_layer is None, str(report)


def test_every_output_is_compared_in_the_files_order(litert, tmp_path):
    """Two heads of the same shape: LiteRT's outputs come in the model's order."""
    q, _, data = _two_heads(tmp_path)
    path = quantaware.export_tflite(q, tmp_path / "heads.tflite", data[0][:1])
    report = quantaware.verify(path, q, data, backend="litert")
    assert report.num_outputs == 2 and report.max_error_lsb == 0.0, str(report)


def test_a_tensor_flattened_twice_keeps_its_layout(litert, tmp_path):
    """One conv output flattened for two linear layers: with one DEQUANTIZE shared
    by both flattens, the file read one of them in the wrong layout (77 LSB, top-1
    50%); a tensor that is also resized after a flatten failed to convert."""
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.fc, self.aux = nn.Linear(128, 10), nn.Linear(128, 10)
            self.up = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            d = F.relu(self.conv(x))
            logits = self.fc(d.flatten(1)) + self.aux(d.view(d.size(0), -1))
            return logits, self.up(F.interpolate(d, scale_factor=2.0, mode="nearest"))

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.rand(32, 1, 8, 8, generator=gen)]
    _, _, report = _round_trip(Net().eval(), calib, [torch.rand(32, 1, 8, 8, generator=gen)],
                               tmp_path / "flat.tflite")
    assert report.max_error_lsb == 0.0 and report.top1_agreement == 1.0, str(report)


def test_hardswish_runs_in_xnnpack_between_integer_convs(litert, tmp_path):
    """LiteRT's int8 HARD_SWISH has no XNNPACK kernel: the interpreter ran it itself and
    split the graph. It is written as dequantize -> float32 HARD_SWISH -> quantize (on
    the same grids), and the convs around it stay integer."""
    from ai_edge_litert.interpreter import Interpreter
    from torch import nn

    from quantaware.export.tflite import tflite_ops

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish(), nn.Conv2d(8, 8, 1),
                        nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    calib = [torch.randn(32, 3, 8, 8, generator=gen)]
    _, path, report = _round_trip(net.eval(), calib, [torch.randn(32, 3, 8, 8, generator=gen)],
                                  tmp_path / "hardswish.tflite")
    assert report.passed() and report.max_error_lsb <= 1.0, str(report)
    ops = tflite_ops(path)
    assert ("HARD_SWISH", ["float32"]) in [(n, d[:1]) for n, d in ops], ops
    for name, dtypes in ops:
        if name in {"CONV_2D", "FULLY_CONNECTED"}:
            assert "float32" not in dtypes, (name, dtypes)
    interpreter = Interpreter(str(path))
    interpreter.allocate_tensors()
    assert [o["op_name"] for o in interpreter._get_ops_details()].count("DELEGATE") == 1


def test_float_linear_weights_are_stored_as_int8_codes(litert, tmp_path, monkeypatch):
    """A linear layer whose output feeds a float op runs in float32 in LiteRT, and the
    converter folded its weights to float32: 4x the bytes of the codes they came from.
    They are stored as int8 codes behind a DEQUANTIZE, and the file computes the same."""
    from ai_edge_litert.interpreter import Interpreter
    from torch import nn

    from quantaware.export import tflite
    from quantaware.export.tflite import tflite_ops

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    x = torch.randn(32, 64)
    with _one_thread():
        q = quantaware.quantize(net, presets.INT8, [x], x[:1])
        path = quantaware.export_tflite(q, tmp_path / "int8.tflite", x[:1])
        monkeypatch.setattr(tflite, "_int8_float_weights", lambda content, **_: content)
        folded = quantaware.export_tflite(q, tmp_path / "folded.tflite", x[:1])
    assert path.stat().st_size < folded.stat().st_size - 3 * 256 * 64 * 0.9
    assert ("DEQUANTIZE", ["int8"]) in tflite_ops(path)
    outputs = []
    for file in (path, folded):
        interpreter = Interpreter(str(file))
        interpreter.allocate_tensors()
        ops = [o["op_name"] for o in interpreter._get_ops_details()]
        assert ops.count("DELEGATE") == 1, ops
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x[:1].numpy())
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(*outputs)
    report = quantaware.verify(path, q, [x], backend="litert")
    assert report.passed() and report.max_error_lsb == 0.0, str(report)


class _Embedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(1000, 64)
        self.norm, self.head = torch.nn.LayerNorm(64), torch.nn.Linear(64, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)).mean(1))


def test_quantized_embedding_tables_are_stored_as_int8_rows(litert, tmp_path, monkeypatch):
    """A quantized embedding table, folded to float32 by the converter, is stored as
    its int8 codes with a scale per row, which LiteRT's lookup dequantizes: a quarter
    of the bytes, and the file computes the same values."""
    from ai_edge_litert.interpreter import Interpreter

    from quantaware.deploy import quantize_for_backend
    from quantaware.export import tflite
    from quantaware.export.tflite import tflite_ops

    ids = torch.randint(0, 1000, (64, 12), generator=torch.Generator().manual_seed(0))
    q = quantize_for_backend(_Embedder().eval(), [ids[:32], ids[32:]], ids[:1])
    with _one_thread():
        path = quantaware.export_tflite(q, tmp_path / "int8.tflite", ids[:1])
        monkeypatch.setattr(tflite, "_int8_float_weights", lambda content, **_: content)
        folded = quantaware.export_tflite(q, tmp_path / "folded.tflite", ids[:1])
    assert ("EMBEDDING_LOOKUP", ["int32", "int8"]) in tflite_ops(path)
    assert ("EMBEDDING_LOOKUP", ["int32", "float32"]) in tflite_ops(folded)
    assert path.stat().st_size < folded.stat().st_size - 3 * 1000 * 64 * 0.9
    outputs = []
    for file in (path, folded):
        interpreter = Interpreter(str(file))
        interpreter.allocate_tensors()
        for k in range(4):
            detail = interpreter.get_input_details()[0]
            interpreter.set_tensor(detail["index"], ids[k:k + 1].numpy().astype(detail["dtype"]))
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(np.stack(outputs[:4]), np.stack(outputs[4:]))
    report = quantaware.verify(path, q, [ids[:16]], backend="litert", threads=1)
    assert report.passed(), str(report)


def test_litert_quantization_runs_layers_before_float_ops_as_int8_kernels(litert, tmp_path,
                                                                         caplog):
    """Quantized for LiteRT, the Linear before GELU keeps its int8 output, so LiteRT
    runs it as an int8 FULLY_CONNECTED (with the ONNX Runtime default it is a float32
    one on dequantized weights); the layer whose int8 output would cost too much
    stays float32. The file computes what the torch model computes."""
    from tests.test_text_and_defaults import TwoBranches, two_branch_data

    from quantaware.deploy import quantize_for_backend
    from quantaware.export.tflite import tflite_ops

    net, calib = TwoBranches().eval(), two_branch_data()
    fcs, warned = {}, {}
    for backend in ("onnxruntime-x86", "litert"):
        q = quantize_for_backend(net, calib, calib[0][:1], backend=backend,
                                 config=presets.INT8).eval()
        caplog.clear()
        with _one_thread(), caplog.at_level("WARNING", "quantaware.export.tflite"):
            path = quantaware.export_tflite(q, tmp_path / f"{backend}.tflite", calib[0][:1])
        warned[backend] = [r.getMessage() for r in caplog.records if "float32 on" in
                           r.getMessage()]
        fcs[backend] = sorted(dtypes[0] for name, dtypes in tflite_ops(path)
                              if name == "FULLY_CONNECTED")
    assert fcs == {"onnxruntime-x86": ["float32", "float32"], "litert": ["float32", "int8"]}
    # quantized for ONNX Runtime, the export says why and what to do
    assert len(warned["onnxruntime-x86"]) == 1 and not warned["litert"]
    assert "2 of the 2 linear layers" in warned["onnxruntime-x86"][0]
    assert "backend='litert'" in warned["onnxruntime-x86"][0]
    report = quantaware.verify(path, q, [c[:256] for c in calib], backend="litert", threads=1)
    assert report.passed() and report.reference == "integer" and report.max_error_lsb == 0


class _CatBeforeSigmoid(torch.nn.Module):
    """Two convs of different ranges concatenated, read only by a float op."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.b.weight *= 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.cat([self.a(x), self.b(x)], 1))


def test_concatenation_before_a_float_op_computes_the_models_values(litert, tmp_path):
    """LiteRT's converter puts every input of a concatenation on one grid. When the
    concatenation's output was float (only float ops read it), it took the first
    input's grid and clipped the second conv's outputs to it: top-1 54%. The
    concatenation keeps its output quantizer, so that grid is the model's own."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    q = quantaware.quantize(_CatBeforeSigmoid().eval(), presets.INT8, [x], x[:1])
    assert q.cat.output_quantizer is not None
    with _one_thread():
        path = quantaware.export_tflite(q, tmp_path / "cat.tflite", x[:1])
        report = quantaware.verify(path, q, [x], backend="litert", threads=1)
    assert report.passed() and report.max_abs_error < 1e-6, str(report)


class _Decoder(nn.Module):
    """Encoder conv, then transposed convs with batch norm and ReLU back up."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up1d = nn.Conv2d(8, 8, 1)
        self.head = nn.ConvTranspose2d(8, 3, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.up(torch.relu(self.down(x)))))
        return self.head(torch.relu(self.up1d(y)))


def _decoder() -> nn.Module:
    torch.manual_seed(0)
    model = _Decoder().eval()
    model.bn.running_mean.uniform_(-0.2, 0.2)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def test_transposed_convs_are_int8_and_exact(litert, tmp_path, caplog):
    """TRANSPOSE_CONV runs in int8 with the model's own weight codes and scales (batch
    norm folded in), and LiteRT computes the codes torch with LiteRT's arithmetic
    computes."""
    from quantaware.export.tflite import tflite_ops

    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 12, 12, generator=gen) for _ in range(2)]
    data = [torch.randn(16, 3, 12, 12, generator=gen) * 1.2 for _ in range(2)]
    with caplog.at_level("WARNING", logger="quantaware.export.tflite"):
        _, path, report = _round_trip(_decoder(), calib, data, tmp_path / "decoder.tflite")
    ops = tflite_ops(path)
    assert [n for n, _ in ops].count("TRANSPOSE_CONV") == 2
    assert all("float32" not in d for n, d in ops if n not in _INTERFACE), ops
    assert "transposed convolutions" not in caplog.text  # the model's codes reach 127
    assert report.integer_layers == 4 and report.fake_quant_layers == 0, str(report)
    assert report.max_error_lsb == 0.0 and report.first_divergent_layer is None, str(report)


def test_transposed_conv_weights_the_converter_requantizes_are_named_and_emulated(
        litert, tmp_path, caplog):
    """4-bit weight codes stay below 127: the converter stores the transposed convs'
    weights on its own 8-bit scale. The export says so, and the integer reference
    uses the file's codes, so LiteRT still matches it exactly."""
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 12, 12, generator=gen) for _ in range(2)]
    data = [torch.randn(16, 3, 12, 12, generator=gen) for _ in range(2)]
    with caplog.at_level("WARNING", logger="quantaware.export.tflite"):
        _, _, report = _round_trip(_decoder(), calib, data, tmp_path / "w4.tflite",
                                   presets.W4A8)
    assert "8 of 8 output channels of up have codes below 127" in caplog.text
    assert report.integer_layers == 4 and report.max_error_lsb == 0.0, str(report)
    assert report.first_divergent_layer is None, str(report)


class _SizedUp(nn.Module):
    """A transposed conv called with ``output_size``."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.h = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(torch.relu(self.c(x)), output_size=[2 * x.shape[-2], 2 * x.shape[-1]])
        return self.h(torch.relu(y))


def _up(after: nn.Module, bias: bool = True, groups: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(8, 8, 4, 2, 1, bias=bias, groups=groups), after,
                         nn.Conv2d(8, 2, 1))


_PER_TENSOR = presets.INT8.with_overrides(quantaware.LayerOverride("2", weight=QuantSpec(
    bits=8, narrow_range=True, granularity=PerTensor())))


@pytest.mark.parametrize("make, config, integer", [
    (lambda: _up(nn.ReLU(), bias=False), presets.INT8, True),
    (lambda: _up(nn.ReLU6()), presets.INT8, True),
    (lambda: _up(nn.LeakyReLU(0.1)), presets.INT8, True),
    (_SizedUp, presets.INT8, True),
    (lambda: _up(nn.ReLU()), _PER_TENSOR, True),
    (lambda: _up(nn.ReLU(), groups=2), _PER_TENSOR, False),
], ids=["no-bias-relu", "relu6", "leaky-relu", "output-size", "per-tensor", "grouped"])
def test_transposed_conv_forms_run_as_litert_verifies_them(litert, tmp_path, caplog, make,
                                                           config, integer):
    """No bias, a ReLU6 the output grid applies, a float activation after it, an
    output_size and per-tensor weights: int8 TRANSPOSE_CONV, exact. A grouped one runs
    in float32 (the converter splits it): the export says so and verify compares it
    with the fake-quant layer instead of counting it integer."""
    from quantaware.export.tflite import tflite_ops

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(3)]
    with caplog.at_level("WARNING", logger="quantaware.export.tflite"):
        _, path, report = _round_trip(make().eval(), calib, calib, tmp_path / "up.tflite",
                                      config)
    floats = [n for n, d in tflite_ops(path) if n not in _INTERFACE and "float32" in d]
    assert report.passed() and report.max_error_lsb <= 1.0, str(report)
    if integer:
        assert floats == [] and report.fake_quant_layers == 0, (floats, str(report))
    else:
        assert "TRANSPOSE_CONV" in floats and report.fake_quant_layers == 1, str(report)
        assert "LiteRT runs 2 in float32: it is a grouped transposed conv" in caplog.text


def test_weight_only_transposed_conv_keeps_int8_weights(litert, tmp_path):
    """W8 (float activations): the converter folds a transposed conv's dequantized
    weights to float32; the file stores them as the int8 codes with a DEQUANTIZE, as it
    does for convs, and computes the same values."""
    from quantaware.export.tflite import tflite_ops

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(16, 32, 4, 2, 1), nn.ReLU(),
                        nn.Conv2d(32, 2, 1)).eval()
    x = torch.randn(8, 3, 16, 16)
    _, path, report = _round_trip(net, [x], [x], tmp_path / "w8.tflite", presets.W8)
    ops = tflite_ops(path)
    index = [n for n, _ in ops].index("TRANSPOSE_CONV")
    assert ops[index - 1] == ("DEQUANTIZE", ["int8"]), ops
    float_file = quantaware.export_tflite(net, tmp_path / "fp32.tflite", x[:1])
    assert path.stat().st_size < 0.4 * float_file.stat().st_size
    assert report.passed() and report.max_abs_error < 1e-5, str(report)


class _Resize(nn.Module):
    def __init__(self, mode: str, size: tuple[int, int]) -> None:
        super().__init__()
        self.conv, self.mode, self.size = nn.Conv2d(3, 4, 3, padding=1), mode, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.conv(x), size=self.size, mode=self.mode)


@pytest.mark.parametrize(("mode", "size", "refused"), [
    ("nearest", (9, 7), True), ("nearest", (2, 2), True), ("nearest", (10, 15), False),
    ("nearest-exact", (9, 7), False)])
def test_nearest_resizes_litert_computes_otherwise_are_refused(litert, tmp_path, mode, size,
                                                               refused):
    """LiteRT's nearest resize samples at half-pixel centres: an FPN's size= resize on
    odd maps, a 1.5x or 0.5x scale picked other pixels than torch's 'nearest' (67 LSB,
    float files too). Integer upscales and 'nearest-exact' agree."""
    from quantaware.backends import create_backend_session

    net, x = _Resize(mode, size).eval(), torch.randn(1, 3, 5, 5)
    if refused:
        with pytest.raises(ExportError, match=r"nearest resize from \(5, 5\) to .* not an "
                                              "integer upscale.*nearest-exact"):
            quantaware.export_tflite(net, tmp_path / "r.tflite", x)
        return
    path = quantaware.export_tflite(net, tmp_path / "r.tflite", x)
    session = create_backend_session(str(path), "litert", threads=1)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, net(x).numpy(), atol=1e-5)


def test_a_1d_transposed_conv_with_output_padding_is_refused(litert, tmp_path):
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ConvTranspose1d(4, 2, 3, stride=2,
                                                               output_padding=1)).eval()
    with pytest.raises(ExportError, match=r"1 \(ConvTranspose1d, output_padding=\(1,\)\)"):
        quantaware.export_tflite(net, tmp_path / "t.tflite", torch.randn(1, 2, 9))


class _Call(nn.Module):
    def __init__(self, call) -> None:
        super().__init__()
        self.conv, self.call, self.head = nn.Conv2d(3, 8, 3, padding=1), call, nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(self.call(y))


_F = torch.nn.functional
_CALLS = {
    "expand_as": (lambda y: y + y.mean((2, 3), keepdim=True).expand_as(y), "4-d expand_as"),
    "expand": (lambda y: y * y.mean(1, keepdim=True).expand(-1, 8, -1, -1), "4-d expand"),
    "broadcast_to": (lambda y: y + torch.broadcast_to(y.amax((2, 3), keepdim=True), y.shape),
                     "4-d broadcast_to"),
    "repeat": (lambda y: y.repeat(1, 2, 1, 1)[:, :8], "4-d repeat.*torch.cat"),
    "adaptive_max_pool": (lambda y: y * _F.adaptive_max_pool2d(y, 1), "adaptive max pooling"),
    "antialias": (lambda y: _F.interpolate(y, scale_factor=0.5, mode="bilinear",
                                           antialias=True), "antialias=False"),
}


@pytest.mark.parametrize("kind", sorted(_CALLS))
def test_calls_litert_converts_wrongly_or_not_at_all_are_refused(litert, tmp_path, kind):
    """A 4-d expand/repeat is moved to LiteRT's NHWC layout as if it were NCHW: with
    C == H == W (8x8x8 here) the float and int8 files ran but were wrong (top-1 0.48-0.92),
    otherwise the conversion failed with a converter error. Adaptive max pooling and
    antialiased resizes have no LiteRT form (a raw 'Lowering not found')."""
    call, message = _CALLS[kind]
    net, x = _Call(call).eval(), torch.randn(16, 3, 8, 8)
    for model in (net, quantaware.quantize(net, presets.INT8, [x], x[:1])):
        with pytest.raises(ExportError, match=message):
            quantaware.export_tflite(model, tmp_path / "c.tflite", x[:1])
    assert not (tmp_path / "c.tflite").exists()


class _AttentionMask(nn.Module):
    """A Hugging Face-style 4-d attention mask, (B, 1, 1, L) expanded to (B, 1, L, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        m = mask[:, None, None, :].expand(b, 1, length, length).float()
        s = (self.q(x)[:, None] @ self.k(x)[:, None].transpose(-1, -2)) / 8 ** 0.5
        s = s + (1.0 - m) * -1e4
        return self.fc((s.softmax(-1) @ x[:, None]).mean((1, 2)))


@pytest.mark.parametrize("kind", ["implicit", "context", "mask"])
def test_broadcasts_litert_gets_right_are_exported(litert, tmp_path, kind):
    """Implicit broadcasting, a pooled context expanded before a reduction and an
    attention mask's 4-d expand convert right; the expands were refused up front."""
    from quantaware.backends import create_backend_session

    torch.manual_seed(0)
    if kind == "mask":
        net = _AttentionMask().eval()
        example = (torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    else:
        call = ((lambda y: y + y.mean((2, 3), keepdim=True)) if kind == "implicit" else
                (lambda y: y * y.mean((2, 3), keepdim=True).expand_as(y)))
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Lambda(call),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
        example = (torch.randn(2, 3, 8, 8),)
    for model in (net, quantaware.quantize(net, presets.INT8, [(example,)], example)):
        path = quantaware.export_tflite(model, tmp_path / "b.tflite", example)
        session = create_backend_session(str(path), "litert", threads=1)
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), example, strict=True)}
        (out,) = session.run(None, feed)
        with torch.no_grad():
            np.testing.assert_allclose(out, model(*example).numpy(), atol=1e-5)


class _Lambda(nn.Module):
    def __init__(self, call) -> None:
        super().__init__()
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


def test_a_batch_expand_litert_cannot_run_is_refused(litert, tmp_path):
    """A positional map expanded on the batch converted to a file LiteRT could not load
    (BROADCAST_TO failed to prepare)."""

    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 3, 6, 6))
            self.conv, self.fc = nn.Conv2d(6, 8, 3, padding=1), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.cat([x, self.pos.expand(x.shape[0], -1, -1, -1)], 1)
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    with pytest.raises(ExportError, match=r"LiteRT cannot run it.*4-d expand from "
                                          r"\(1, 3, 6, 6\) to \(2, 3, 6, 6\)"):
        quantaware.export_tflite(Positional().eval(), tmp_path / "p.tflite",
                                 torch.rand(2, 3, 6, 6))
    assert not (tmp_path / "p.tflite").exists()


def test_bicubic_resizes_are_refused_in_int8_only(litert, tmp_path):
    """The converter lays out the int8 bicubic resize wrongly (top-1 0.28 at 8x8x8, a
    broadcast error otherwise); its float file is right."""
    from quantaware.backends import create_backend_session

    net = _Call(lambda y: _F.interpolate(y, scale_factor=2, mode="bicubic")).eval()
    x = torch.randn(16, 3, 8, 8)
    with pytest.raises(ExportError, match=r"bicubic.*mode='bilinear'"):
        quantaware.export_tflite(quantaware.quantize(net, presets.INT8, [x], x[:1]),
                                 tmp_path / "q.tflite", x[:1])
    path = quantaware.export_tflite(net, tmp_path / "f.tflite", x[:1])
    session = create_backend_session(str(path), "litert", threads=1)
    (out,) = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, net(x[:1]).numpy(), atol=1e-4)


class _Outputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor):
        y = self.fc(x)
        if self.kind == "namedtuple":
            import collections

            return collections.namedtuple("Out", "logits features")(y, x)
        if self.kind == "none":
            return y, None
        if y.mean() > 10:
            return y * 2
        return y


@pytest.mark.parametrize(("kind", "message"), [
    ("namedtuple", r"output is a named tuple \(Out\).*plain tuple"),
    ("none", r"output\[1\] is NoneType, not a tensor"),
    ("branch", r"branches on a tensor's value \(File .*line \d+: `if y.mean\(\) > 10:`\)")])
def test_outputs_and_branches_litert_cannot_hold_are_named(litert, tmp_path, kind, message):
    """A named tuple or a None output and a value-dependent branch failed with the
    converter's raw errors ("'type' object is not iterable", a guard dump)."""
    with pytest.raises(ExportError, match=message):
        quantaware.export_tflite(_Outputs(kind).eval(), tmp_path / "o.tflite",
                                 torch.randn(1, 4))


def test_an_uncalibrated_model_is_refused_and_left_uncalibrated(litert, tmp_path):
    """The LiteRT pre-check's forward pass calibrated the caller's model on the example
    (prepared models observe until calibrated), so the refusal never came."""
    from quantaware.prepare import quantizers

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    prepared = quantaware.prepare(net, presets.INT8, x)
    with pytest.raises(ExportError, match="has no calibrated range"):
        quantaware.export_tflite(prepared, tmp_path / "u.tflite", x)
    assert not any(bool(q.calibrated) for _, q in quantizers(prepared) if not q.from_tensor)


def test_verify_says_when_the_file_differs_from_the_trained_model(litert, tmp_path):
    """LiteRT's converter puts a bilinear resize's input on the resize's own grid:
    the file matched the integer reference (PASS, 0 LSB) while computing other
    values than the fake-quant model, and the report called the gap rounding ties."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Upsample(scale_factor=2,
                                                                   mode="bilinear"),
                        nn.Conv2d(8, 4, 3, padding=1)).eval()
    data = [torch.randn(8, 3, 6, 6) for _ in range(4)]
    q = quantaware.quantize(net, presets.INT8, data, data[0][:1])
    path = quantaware.export_tflite(q, tmp_path / "m.tflite", data[0][:1])
    report = quantaware.verify(path, q, [b[:1] for b in data], backend="litert")
    assert report.passed() and report.fake_quant_max_error_lsb > 2
    assert "NOTE: litert computes this file otherwise than the trained" in str(report)
    onnx_path = quantaware.export_onnx(q, tmp_path / "m.onnx", data[0][:1])
    report = quantaware.verify(onnx_path, q, data)
    assert report.fake_quant_max_error_lsb <= 1 and "NOTE" not in str(report)


def test_a_square_constant_matmul_operand_is_compared_in_its_stored_layout(litert, tmp_path):
    """LiteRT stores the constant operand of x @ W (8x8) transposed, as a
    FULLY_CONNECTED weight of the same shape: the layer check read a 173-LSB
    divergence there while the file matched the model exactly."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
            self.W = nn.Parameter(torch.randn(8, 8) * 0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.inp(x) @ self.W))

    torch.manual_seed(1)
    x = torch.randn(16, 6)
    q = quantaware.quantize(Net().eval(), presets.INT8, [x], x[:1])
    path = quantaware.export_tflite(q, tmp_path / "m.tflite", x[:1])
    report = quantaware.verify(path, q, [x[:8]], backend="litert")
    assert report.passed() and report.first_divergent_layer is None, str(report)


def test_a_file_that_does_not_compute_the_model_is_reported_at_export(litert, tmp_path,
                                                                       caplog):
    """A fused q/k projection split for q @ k^T: LiteRT's converter puts the one
    FULLY_CONNECTED output on one of the two grids and clips the other (71 output
    steps off); the export said nothing. It runs the file on the example now."""

    class FusedQK(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qk, self.out = nn.Linear(16, 32), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k = self.qk(x).chunk(2, -1)
            return self.out((q @ k.transpose(-1, -2)).softmax(-1)[..., :8])

    torch.manual_seed(0)
    net = FusedQK().eval()
    with torch.no_grad():
        net.qk.weight[:16] *= 4  # q on a grid 4x wider than k's
    x = torch.randn(16, 8, 16)
    q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    with caplog.at_level("WARNING", logger="quantaware.export.tflite"):
        quantaware.export_tflite(q, tmp_path / "qk.tflite", x[:1])
    assert any("does not compute what FusedQK does on the example" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    caplog.clear()
    plain = quantaware.quantize(nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval(),
                                presets.INT8, [x], x[:1])
    with caplog.at_level("WARNING", logger="quantaware.export.tflite"):
        quantaware.export_tflite(plain, tmp_path / "plain.tflite", x[:1])
    assert not any("does not compute" in r.getMessage() for r in caplog.records)
