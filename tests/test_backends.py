"""Inference backends: ONNX Runtime and OpenVINO behind one session interface."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import quantaware
from quantaware import presets
from quantaware.backends import (
    BACKENDS,
    check_backend,
    create_backend_session,
    openvino_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")

INPUT_SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, single_thread, cnn_factory, batches_factory):
    """The residual CNN (conv, depthwise, residual add, concat, max/avg pooling) as
    float and INT8 ONNX files: ``(float_model, int8_model, float_path, int8_path)``."""
    folder = tmp_path_factory.mktemp("backends")
    model = cnn_factory(0)
    example = torch.zeros(1, *INPUT_SHAPE)
    calib = batches_factory((16, *INPUT_SHAPE), 8, 0)
    qmodel = quantaware.quantize(model, presets.INT8, calib, example)
    float_path = quantaware.export_onnx(model, folder / "float.onnx", example)
    int8_path = quantaware.export_onnx(qmodel, folder / "int8.onnx", example)
    return model, qmodel, float_path, int8_path


@pytest.fixture(scope="module")
def data(batches_factory):
    """Inputs never seen in calibration."""
    return batches_factory((25, *INPUT_SHAPE), 8, 1)


def test_unknown_backend_lists_the_backends(exports, data):
    _, qmodel, _, int8_path = exports
    assert BACKENDS == ("onnxruntime", "openvino", "litert")
    with pytest.raises(ValueError,
                       match="'tflite'; choose one of: onnxruntime, openvino, litert"):
        create_backend_session(int8_path, "tflite")
    with pytest.raises(ValueError, match="onnxruntime, openvino, litert"):
        quantaware.verify(int8_path, qmodel, data, backend="ONNXRuntime")
    assert check_backend("onnxruntime") == "onnxruntime"


@pytest.mark.parametrize("backend,module", [("litert", "ai_edge_litert"),
                                            ("openvino", "openvino")])
def test_missing_backend_names_the_extra(monkeypatch, exports, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ImportError, match=rf"pip install 'quantaware\[{backend}\]'"):
        check_backend(backend)
    with pytest.raises(ImportError, match=rf"quantaware\[{backend}\]"):
        create_backend_session(exports[3], backend)


def test_onnxruntime_session_is_quantawares(exports):
    from quantaware.bench import Session

    session = create_backend_session(exports[3], "onnxruntime", threads=1)
    assert isinstance(session, Session)  # create_session: without the rewrites that change codes
    with pytest.raises(ValueError, match="threads"):
        create_backend_session(exports[3], "onnxruntime", threads=0)


def test_openvino_compiles_float_layers_in_float32(exports, data):
    """A float model in OpenVINO matches torch to float32 rounding: the f32 hint holds
    (bf16, the CPU plugin's default where the CPU has it, is ~1e-3 off)."""
    ov = pytest.importorskip("openvino")
    model, _, float_path, _ = exports
    assert openvino_config(2) == {"INFERENCE_PRECISION_HINT": "f32",
                                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
                                  "INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"}
    session = create_backend_session(float_path, "openvino", threads=1)
    x = data[0].numpy()
    with torch.no_grad():
        expected = model(data[0]).numpy()
    (out,) = session.run(None, {"x": x})
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    core = ov.Core()
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        default = core.compile_model(core.read_model(str(float_path)), "CPU")
        assert np.abs(default({0: x})[0] - expected).max() > 1e-4  # the hint matters here


def test_openvino_keeps_the_float_inputs_of_int8_weight_layers_float(tmp_path):
    """Weight-only W8: the CPU plugin quantized the float inputs of FullyConnected
    layers with int8 weights at run time (0.05 off torch on a W8 MLP)."""
    ov = pytest.importorskip("openvino")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10)).eval()
    x = torch.randn(16, 64) * 4
    q = quantaware.quantize(net, presets.W8, [x], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "w8.onnx", x[:1])
    with torch.no_grad():
        expected = q(x).numpy()
    (out,) = create_backend_session(path, "openvino", threads=1).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    plugin_default = {k: v for k, v in openvino_config(1).items()
                      if k != "DYNAMIC_QUANTIZATION_GROUP_SIZE"}
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", plugin_default)
    assert np.abs(compiled({0: x.numpy()})[0] - expected).max() > 1e-3  # the option matters


def test_openvino_session_interface(exports, data):
    pytest.importorskip("openvino")
    _, _, float_path, int8_path = exports
    ort_session = create_backend_session(int8_path, "onnxruntime", threads=1)
    session = create_backend_session(int8_path.read_bytes(), "openvino", threads=1)
    (arg,) = session.get_inputs()
    assert (arg.name, arg.type, arg.shape) == ("x", "tensor(float)", [None, *INPUT_SHAPE])
    assert [o.name for o in session.get_outputs()] == [o.name for o in ort_session.get_outputs()]
    name = session.get_outputs()[0].name
    for rows in (1, 7, 25):  # a dynamic batch: each size compiled with static shapes
        x = data[0][:rows].numpy()
        (out,) = session.run([name], {"x": x})
        assert out.shape == (rows, 10) and out.dtype == np.float32
        np.testing.assert_array_equal(out, session.run(None, {"x": x})[0])
    with pytest.raises(ValueError, match="model's inputs are"):
        session.run(None, {"input": x})
    with pytest.raises(ValueError, match="unknown outputs"):
        session.run(["nope"], {"x": x})
    with pytest.raises(ValueError, match="threads"):
        create_backend_session(float_path, "openvino", threads=0)
    with pytest.raises(FileNotFoundError):
        create_backend_session(float_path.with_name("missing.onnx"), "openvino")


def test_verify_on_each_backend(exports, data, record_property):
    pytest.importorskip("openvino")
    _, qmodel, _, int8_path = exports
    ort_report = quantaware.verify(int8_path, qmodel, data)
    ov_report = quantaware.verify(int8_path, qmodel, data, backend="openvino")
    assert (ort_report.backend, ov_report.backend) == ("onnxruntime", "openvino")
    assert ov_report.num_samples == ort_report.num_samples == 200
    assert ov_report.reference == "integer"
    assert ov_report.top1_agreement >= ort_report.top1_agreement
    assert ov_report.cosine > 0.9999
    # OpenVINO requantizes residual adds in float, so it can sit an LSB or two away
    # from ONNX Runtime's integer kernels (measured: 2.0 LSB here; ORT: 0).
    record_property("openvino_max_error_lsb", ov_report.max_error_lsb)
    assert ort_report.max_error_lsb == 0.0
    assert ov_report.max_error_lsb is not None and ov_report.max_error_lsb <= 4 + 1e-3
    # Each quantized activation is either compared or reported as not observable.
    assert ov_report.layers_checked > 0
    assert ov_report.layers_checked + ov_report.layers_unavailable == ort_report.layers_checked
    assert "in openvino" in str(ov_report).splitlines()[0]
    assert ov_report.to_dict()["backend"] == "openvino"


@pytest.mark.parametrize("view", ["flatten", "view"])
def test_mean_of_a_flattened_quantized_map_runs_in_openvino(tmp_path, view):
    """OpenVINO 2026.4 computes QuantizeLinear -> Reshape -> DequantizeLinear ->
    ReduceMean wrongly on the CPU when the zero point is not 0 and the reshaped
    tensor has few rows (x.flatten(2).mean(-1) at batch 16 x 3 channels read 155 codes
    off ONNX Runtime). The export takes the mean over the unmerged dimensions
    instead, which OpenVINO computes as ONNX Runtime does."""
    pytest.importorskip("openvino")
    import onnx

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)  # no ReLU: an asymmetric grid with a non-zero zero point
            flat = y.flatten(2) if view == "flatten" else y.view(y.shape[0], y.shape[1], -1)
            return self.head(flat.mean(-1))

    torch.manual_seed(0)
    net, x = Pooled().eval(), torch.randn(64, 3, 4, 4)
    qmodel = quantaware.quantize(net, presets.INT8, [x], x[:1])
    path = quantaware.export_onnx(qmodel, tmp_path / "m.onnx", x[:1])
    proto = onnx.load(path)
    producers = {o: n for n in proto.graph.node for o in n.output}
    (mean,) = [n for n in proto.graph.node if n.op_type == "ReduceMean"]
    assert producers[mean.input[0]].op_type == "DequantizeLinear"
    assert producers[producers[mean.input[0]].input[0]].op_type == "QuantizeLinear"
    for batch in (x[:16], x[:7], x[:1]):
        ort_report = quantaware.verify(path, qmodel, [batch])
        ov_report = quantaware.verify(path, qmodel, [batch], backend="openvino")
        assert ort_report.max_error_lsb == 0.0
        assert ov_report.max_error_lsb == 0.0, str(ov_report)


def test_mean_over_tokens_before_a_quantizer_runs_in_openvino():
    """OpenVINO 2026.4 computes LayerNormalization -> ReduceMean(keepdims=0) ->
    QuantizeLinear wrongly on the CPU (169 codes off ONNX Runtime here, a mean-pooled
    transformer's head read 35% top-1). The export writes the mean with its
    dimension kept and then squeezed, which OpenVINO computes as ONNX Runtime does."""
    pytest.importorskip("openvino")
    from onnx import TensorProto, helper, numpy_helper

    from quantaware.backends import create_backend_session
    from quantaware.export.onnx import _reduce_mean_keeping_dims

    rng = np.random.default_rng(0)
    channels = 32
    inits = [numpy_helper.from_array(np.array(0.00803159, np.float32), "s"),
             numpy_helper.from_array(np.array(117, np.uint8), "zp"),
             numpy_helper.from_array(rng.uniform(0.9, 1.3, channels).astype(np.float32), "g"),
             numpy_helper.from_array(np.zeros(channels, np.float32), "b"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1),
             helper.make_node("ReduceMean", ["ln", "axes"], ["mean"], keepdims=0),
             helper.make_node("QuantizeLinear", ["mean", "s", "zp"], ["q"])]
    graph = helper.make_graph(
        nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64, 32])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    feed = {"x": rng.normal(size=(100, 64, channels)).astype(np.float32) * 2}

    def codes(backend: str) -> np.ndarray:
        session = create_backend_session(model.SerializeToString(), backend, threads=1)
        return session.run(None, feed)[0].astype(np.int64)

    # As built, OpenVINO 2026.4 reads 169 codes off here.
    assert _reduce_mean_keeping_dims(model) == 1
    assert [n.op_type for n in model.graph.node] == [
        "LayerNormalization", "ReduceMean", "Squeeze", "QuantizeLinear"]
    assert np.abs(codes("openvino") - codes("onnxruntime")).max() == 0


def test_a_mean_over_channels_and_positions_is_left_as_exported(tmp_path):
    """Rewritten into a mean over the unmerged channel and position axes, a Conv1d's
    flatten(1).mean(-1) read 30 codes off in OpenVINO (0 as exported)."""
    pytest.importorskip("openvino")

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = torch.nn.Conv1d(3, 4, 3), torch.nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).flatten(1).mean(-1, keepdim=True))

    torch.manual_seed(0)
    net, x = Flat().eval(), torch.randn(64, 3, 10)
    qmodel = quantaware.quantize(net, presets.INT8, [x], x[:1])
    path = quantaware.export_onnx(qmodel, tmp_path / "m.onnx", x[:1])
    report = quantaware.verify(path, qmodel, [x[:16]], backend="openvino")
    assert report.max_error_lsb == 0.0, str(report)
