"""quantaware.export_onnx: Q/DQ graph contents, integer kernels in ONNX Runtime, presets."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

import quantaware
from quantaware import presets
from quantaware.export import ExportError

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # torch.export warns from its own internals while exporting
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# Shared exports (int8_model, int8_path, float_path, preset_exports, ...) live in
# tests/export/conftest.py.
INPUT_SHAPE = (3, 8, 8)
X1 = torch.zeros(1, *INPUT_SHAPE)


# -- helpers ---------------------------------------------------------------------------


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors by output name."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t
    return tensors


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _weight_sources(model: onnx.ModelProto):
    """For every Conv/Gemm/MatMul: (node, weight tensor, bias tensor or None), following DQ."""
    constants, producers = _constants(model), _producers(model)

    def source(name):
        node = producers.get(name)
        if node is not None and node.op_type in ("DequantizeLinear", "Cast"):
            return node.op_type, constants.get(node.input[0])
        return None, constants.get(name)

    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            weight = source(node.input[1])
            bias = source(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            yield node, weight, bias


def _ort_session(path, **config) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in config.items():
        setattr(options, key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- INT8 ------------------------------------------------------------------------------


def test_int8_graph_has_qdq_nodes_and_integer_weights(int8_path):
    model = onnx.load(str(int8_path))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] >= 10 and ops["DequantizeLinear"] >= ops["QuantizeLinear"]
    layers = list(_weight_sources(model))
    assert Counter(n.op_type for n, _, _ in layers) == Counter({"Conv": 5, "Gemm": 2})
    for node, (w_kind, weight), bias in layers:
        assert w_kind == "DequantizeLinear", node.name
        assert weight is not None and weight.data_type == TensorProto.INT8, node.name
        assert bias is not None
        b_kind, b_tensor = bias
        assert b_kind == "DequantizeLinear" and b_tensor.data_type == TensorProto.INT32
        values = numpy_helper.to_array(weight)
        assert values.min() >= -127 and values.max() <= 127  # narrow range
    # no float weight tensors remain (only scales, which are small vectors)
    for name, tensor in _constants(model).items():
        if tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            assert len(tensor.dims) <= 1, name
    assert model.producer_name == "quantaware"
    assert {p.key: p.value for p in model.metadata_props}["quantaware.config"] == "INT8"


def test_int8_weights_are_the_models_quantized_weights(int8_path, int8_model):
    model = onnx.load(str(int8_path))
    weights = {}
    for _, (_, weight), _ in _weight_sources(model):
        weights[tuple(weight.dims)] = numpy_helper.to_array(weight)
    head = int8_model.get_submodule("head")
    w_scale, _, _ = head.weight_qparams()
    expected = torch.clamp(torch.round(head.weight.detach() / w_scale.reshape(-1, 1, 1, 1)),
                           -127, 127).to(torch.int8).numpy()
    np.testing.assert_array_equal(weights[tuple(head.weight.shape)], expected)


def test_int8_verify_on_fresh_inputs(int8_path, int8_model, fresh_data):
    report = quantaware.verify(int8_path, int8_model, fresh_data)
    assert report.num_samples == 200
    assert report.top1_agreement >= 0.99
    assert report.output_scale == pytest.approx(float(int8_model.fc2.output_quantizer.scale))
    # one LSB: ONNX Runtime accumulates in int32, torch in float, so a value on a
    # rounding tie may round the other way (tolerance for the float32 division only)
    assert report.max_error_lsb is not None and report.max_error_lsb <= 1 + 1e-5
    assert report.cosine > 0.999


def test_onnxruntime_runs_integer_kernels(int8_path, tmp_path):
    optimized = tmp_path / "optimized.onnx"
    _ort_session(int8_path, optimized_model_filepath=str(optimized))
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["QLinearConv"] == 5
    assert ops["QLinearAdd"] == 1
    assert ops["QLinearConcat"] == 1
    float_kernels = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "Add",
                     "Concat"}
    assert not float_kernels & set(ops), ops
    # integer from the input's QuantizeLinear to the logits' DequantizeLinear
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops


class SharedConvOutput(nn.Module):
    """c1's output feeds a ReLU (then c2) and the residual add: the ReLU cannot be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c3(self.c2(torch.relu(y)) + y)


def test_conv_after_unfused_relu_runs_as_integer_kernel(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(8, *INPUT_SHAPE) for _ in range(2)]
    model = quantaware.quantize(SharedConvOutput().eval(), presets.INT8, data, X1)
    path = quantaware.export_onnx(model, tmp_path / "shared.onnx", X1)
    assert quantaware.verify(path, model, data).max_error_lsb <= 1 + 1e-5  # numerics are fine
    optimized = tmp_path / "optimized.onnx"
    _ort_session(path, optimized_model_filepath=str(optimized))
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert "Conv" not in ops, ops
    assert ops["QLinearConv"] == 3, ops


class FloatActivations(nn.Module):
    """Convs whose outputs feed float ops: Hardswish, SiLU, a squeeze-excitation gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.project = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.silu(self.dw(F.hardswish(self.stem(x))))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), True)))))
        return self.project(y * gate)


def test_convs_before_float_activations_run_as_integer_kernels(tmp_path):
    """With no quantizer on its output, a conv before Hardswish or SiLU ran in ONNX
    Runtime as a float conv on dequantized weights (a MobileNetV3-style network was
    2.4x slower in INT8 than in float)."""
    torch.manual_seed(0)
    data = [torch.randn(8, *INPUT_SHAPE) for _ in range(2)]
    model = quantaware.quantize(FloatActivations().eval(), presets.INT8, data, X1)
    path = quantaware.export_onnx(model, tmp_path / "float_acts.onnx", X1)
    report = quantaware.verify(path, model, data)
    assert report.passed() and report.max_error_lsb <= 1 + 1e-5, str(report)
    optimized = tmp_path / "optimized.onnx"
    _ort_session(path, optimized_model_filepath=str(optimized))
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["QLinearConv"] == 5, ops
    assert not {"Conv", "FusedConv", "NchwcConv"} & set(ops), ops


def test_layers_around_upsampling_run_as_integer_kernels(upsampling_int8, tmp_path):
    """Every conv of an encoder-decoder stays integer: the layer before a bilinear
    resize quantizes its output (ONNX Runtime interpolates the dequantized codes in
    float and quantizes the result, as the torch model does) and a nearest resize
    copies int8 codes (its output is marked as quantized on its input's grid)."""
    model, data = upsampling_int8
    path = quantaware.export_onnx(model, tmp_path / "upsampling.onnx", data[0][:1])
    optimized = tmp_path / "optimized.onnx"
    _ort_session(path, optimized_model_filepath=str(optimized))
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["QLinearConv"] == 5 and ops["QLinearConcat"] == 1, ops
    # (a float Concat remains: the resize's size, read from the skip's shape)
    assert not {"Conv", "FusedConv", "NchwcConv"} & set(ops), ops
    report = quantaware.verify(path, model, data)
    assert report.reference == "integer" and report.fake_quant_layers == 0, str(report)
    assert report.max_error_lsb == 0.0 and report.top1_agreement == 1.0, str(report)
    # the copy's QuantizeLinear is not taken for the quantizer's own tensor
    assert report.first_divergent_layer is None and report.layers_checked >= 7, str(report)


def test_int8_file_is_much_smaller_than_float(int8_path, float_path, float_model):
    assert sum(p.numel() for p in float_model.parameters()) >= 100_000
    int8_size, float_size = os.path.getsize(int8_path), os.path.getsize(float_path)
    assert float_size >= 4 * 100_000
    assert int8_size <= 0.3 * float_size, (int8_size, float_size)


def test_float_export_is_plain_float(float_path, float_model, fresh_data):
    model = onnx.load(str(float_path))
    ops = {n.op_type for n in model.graph.node}
    assert not {"QuantizeLinear", "DequantizeLinear"} & ops
    assert {p.key: p.value for p in model.metadata_props}["quantaware.config"] == "float"
    report = quantaware.verify(float_path, float_model, fresh_data[:2])
    assert report.max_error_lsb is None and report.max_abs_error < 1e-4


def test_dynamic_batch(int8_path, int8_model):
    """Exported with batch 1, run with batch 7."""
    model = onnx.load(str(int8_path))
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    sess = _ort_session(int8_path)
    x = torch.randn(7, *INPUT_SHAPE, generator=torch.Generator().manual_seed(7))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert out.shape == (7, 10)
    with torch.no_grad():
        ref = int8_model(x).numpy()
    step = float(int8_model.fc2.output_quantizer.scale)
    assert np.abs(out - ref).max() <= step * (1 + 1e-5)


# -- other presets ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["INT8_DYNAMIC", "FP16", "W4A8"])
def test_preset_export_and_verify(name, preset_exports, fresh_data):
    model, path = preset_exports[name]
    report = quantaware.verify(path, model, fresh_data)
    assert report.top1_agreement >= 0.99
    assert report.cosine > 0.999
    if name == "W4A8":
        assert report.max_error_lsb is not None and report.max_error_lsb <= 1 + 1e-5
    else:  # float logits (dynamic quantization or float16 weights)
        assert report.max_error_lsb is None


def _fp16_weight_sources(path):
    model = onnx.load(str(path))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in model.graph.node}
    layers = list(_weight_sources(model))
    assert len(layers) == 7
    return layers


def test_fp16_large_weights_are_float16_and_file_is_half_size(preset_exports, float_path):
    _, path = preset_exports["FP16"]
    float16 = [weight for _, (kind, weight), _ in _fp16_weight_sources(path)
               if kind == "Cast" and weight.data_type == TensorProto.FLOAT16]
    shapes = {tuple(w.dims) for w in float16}
    assert {(128, 64, 3, 3), (256, 128)} <= shapes  # head and fc1: most of the parameters
    assert os.path.getsize(path) <= 0.6 * os.path.getsize(float_path)


def test_fp16_every_weight_is_a_float16_initializer(preset_exports):
    _, path = preset_exports["FP16"]
    for node, (kind, weight), _ in _fp16_weight_sources(path):
        assert kind == "Cast", node.name
        assert weight.data_type == TensorProto.FLOAT16, node.name


def test_int8_dynamic_graph(preset_exports):
    _, path = preset_exports["INT8_DYNAMIC"]
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["DynamicQuantizeLinear"] >= 7  # one per conv/linear input
    for node, (kind, weight), _ in _weight_sources(model):
        assert kind == "DequantizeLinear" and weight.data_type == TensorProto.INT8, node.name


def test_w4a8_weights_use_4_bit_levels(preset_exports):
    _, path = preset_exports["W4A8"]
    model = onnx.load(str(path))
    layers = list(_weight_sources(model))
    assert len(layers) == 7
    for node, (_, weight), _ in layers:
        values = numpy_helper.to_array(weight)
        assert values.dtype == np.int8, node.name
        assert values.min() >= -7 and values.max() <= 7, node.name


# -- errors and file handling ----------------------------------------------------------


def test_uncalibrated_static_model_raises(float_model, tmp_path):
    prepared = quantaware.prepare(float_model, presets.INT8, X1)
    target = tmp_path / "uncalibrated.onnx"
    with pytest.raises(ExportError, match="calibrat"):
        quantaware.export_onnx(prepared, target, X1)
    assert list(tmp_path.iterdir()) == []


def test_low_opset_rejected(int8_model, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        quantaware.export_onnx(int8_model, tmp_path / "m.onnx", X1, opset=17)
    assert list(tmp_path.iterdir()) == []


def test_successful_export_leaves_no_temporary_files(int8_path, float_path, preset_exports,
                                                      export_dir):
    expected = {"int8.onnx", "float.onnx", "INT8_DYNAMIC.onnx", "FP16.onnx", "W4A8.onnx"}
    # The folder is shared with other export tests; ours are there, no temporaries.
    onnx_files = {p.name for p in export_dir.iterdir() if ".onnx" in p.name}
    assert onnx_files == expected
    assert not [p for p in export_dir.iterdir() if p.name.endswith(".tmp")]
    assert oct(os.stat(int8_path).st_mode & 0o777) == oct(0o644)


def _tiny_quantized() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [torch.randn(16, 4)]
    return quantaware.quantize(net, presets.INT8, data, data[0][:1])


class _FakeProgram:
    """Stands in for torch.onnx.export's result: file handling is tested without the
    seconds a real export takes (the real path is covered by the fixtures above)."""

    def __init__(self) -> None:
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        self.model_proto = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
        self.model_proto.ir_version = 10
        import onnx_ir

        self.model = onnx_ir.from_proto(self.model_proto)


@pytest.fixture
def fake_exporter(monkeypatch):
    calls = []

    def export(model, args, **kwargs):
        calls.append(model)
        return _FakeProgram()

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary_files(
        tmp_path, monkeypatch, fake_exporter):
    target = tmp_path / "sub" / "model.onnx"
    target.parent.mkdir()
    target.write_bytes(b"previous version")

    def failing_save(proto, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        quantaware.export_onnx(_tiny_quantized(), target, torch.zeros(1, 4))
    assert fake_exporter  # the failure happened at the write, after the export
    assert target.read_bytes() == b"previous version"
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]


def test_export_creates_folders_and_replaces_existing_files(tmp_path, fake_exporter):
    target = tmp_path / "a" / "b" / "tiny.onnx"
    returned = quantaware.export_onnx(_tiny_quantized(), str(target), torch.zeros(1, 4))
    assert returned == target
    target.write_bytes(b"stale")
    quantaware.export_onnx(_tiny_quantized(), target, torch.zeros(1, 4))
    model = onnx.load(str(target))  # the stale file was replaced by a valid model
    assert model.producer_name == "quantaware"
    assert [p.name for p in target.parent.iterdir()] == ["tiny.onnx"]


def test_exporter_failure_is_an_export_error(tmp_path, monkeypatch):
    target = tmp_path / "x" / "m.onnx"

    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator boom")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(ExportError, match="unsupported operator boom"):
        quantaware.export_onnx(_tiny_quantized(), target, torch.zeros(1, 4))
    assert list(target.parent.iterdir()) == []

    def wrapped_export(*args, **kwargs):
        try:
            raise AssertionError("only 4D inputs are supported")
        except AssertionError as inner:
            raise RuntimeError("Failed to convert.\nNext steps: report a bug") from inner

    monkeypatch.setattr(torch.onnx, "export", wrapped_export)
    with pytest.raises(ExportError) as info:
        quantaware.export_onnx(_tiny_quantized(), target, torch.zeros(1, 4))
    message = str(info.value)
    assert "AssertionError: only 4D inputs are supported" in message
    assert "Failed to convert." in message and "Next steps" not in message


def test_export_leaves_the_model_alone(int8_model, int8_snapshot, int8_path):
    """The exporter works on a copy: parameters, buffers and outputs are unchanged."""
    state, x, out = int8_snapshot
    after = int8_model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(isinstance(p, nn.Parameter) for p in int8_model.parameters())
    assert not any(getattr(m, "exporting", False) for m in int8_model.modules())
    with torch.no_grad():
        assert torch.equal(int8_model(x), out)


def test_bias_of_float_output_linear_is_a_float_constant(tmp_path):
    """A Linear whose output stays float (here: into LayerNorm) keeps its int32-exact
    bias as a float32 constant, so ONNX Runtime can fuse the add; values unchanged.
    (Sequences: 3-D inputs export as MatMul + Add; 2-D ones as Gemm, which keeps its
    int32 bias input.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(16, 5, 8)
    config = presets.INT8.with_overrides(quantaware.LayerOverride("1", skip=True))
    q = quantaware.quantize(net, config, [x], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    int32_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT32]
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    float_bias = [i for n in adds for i in n.input if i in inits
                  and inits[i].data_type == TensorProto.FLOAT and len(inits[i].dims) == 1]
    assert float_bias, "the first Linear's bias should be a float constant"
    for node in int32_dq:  # any int32 bias left feeds an integer kernel, not an Add
        assert not any(node.output[0] in a.input for a in adds)
    report = quantaware.verify(path, q, [x])
    assert report.cosine > 0.99999, report
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    step = float(q.get_submodule("2").output_quantizer.scale)
    np.testing.assert_allclose(out, q(x).detach().numpy(), rtol=0, atol=1.001 * step)


def test_int8_activations_with_a_flatten_load_in_onnx_runtime(tmp_path):
    """ONNX Runtime's own DQ-past-Reshape rewrite fails on int8 activations; the
    exporter reshapes the quantized tensor itself."""
    from dataclasses import replace

    import onnxruntime as ort

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3)).eval()
    x = torch.randn(8, 3, 8, 8)
    config = replace(presets.INT8, activation=replace(presets.INT8.activation, signed=True))
    q = quantaware.quantize(net, config, [x], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    proto = onnx.load(str(path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    reshapes = [n for n in proto.graph.node if n.op_type in ("Reshape", "Flatten")]
    assert reshapes and all(producers[n.input[0]].op_type == "QuantizeLinear" for n in reshapes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].shape == (8, 3)


class _Stem(nn.Module):
    def __init__(self, kernel: int, in_channels: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, kernel, stride, kernel // 2)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _session_output(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize(("kernel", "size"), [(7, (29, 31)), (3, (32, 32)), (5, (17, 20))])
def test_stem_runs_on_space_to_depth_input_with_identical_results(tmp_path, kernel, size):
    torch.manual_seed(0)
    x = torch.randn(6, 3, *size)
    q = quantaware.quantize(_Stem(kernel).eval(), presets.INT8, [x], x[:1])
    plain = quantaware.export_onnx(q, tmp_path / "plain.onnx", x[:1], space_to_depth=False)
    s2d = quantaware.export_onnx(q, tmp_path / "s2d.onnx", x[:1])
    ops = Counter(n.op_type for n in onnx.load(str(s2d)).graph.node)
    assert ops["SpaceToDepth"] == 1 and ops["Pad"] == 1, ops
    assert "SpaceToDepth" not in Counter(n.op_type for n in onnx.load(str(plain)).graph.node)
    assert np.array_equal(_session_output(plain, x), _session_output(s2d, x))
    report = quantaware.verify(s2d, q, [x])
    assert report.max_error_lsb == 0.0 and report.first_divergent_layer is None, report
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(s2d), options, providers=["CPUExecutionProvider"])
    optimized = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert optimized["Conv"] == 0 and optimized["QLinearConv"] == 2, optimized


@pytest.mark.parametrize(("in_channels", "stride"), [(8, 2), (3, 1)])
def test_space_to_depth_only_for_strided_convs_on_few_channels(tmp_path, in_channels, stride):
    torch.manual_seed(0)
    x = torch.randn(4, in_channels, 16, 16)
    q = quantaware.quantize(_Stem(7, in_channels, stride).eval(), presets.INT8, [x], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    assert "SpaceToDepth" not in {n.op_type for n in onnx.load(str(path)).graph.node}


def test_float_weight_layer_between_quantized_activations_is_deployed_in_float(tmp_path,
                                                                               caplog):
    """A layer with float weights and quantized activations (a mixed-precision
    choice): ONNX Runtime would quantize those weights itself (per-tensor int8);
    quantaware's sessions do not, so the deployed layer computes in float."""
    from quantaware.config import LayerOverride
    from quantaware.export import verify

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                        nn.Conv2d(16, 8, 1)).eval()
    with torch.no_grad():  # very unequal channels: per-tensor int8 would be far off
        net[2].weight.mul_(torch.logspace(-2, 1, 16).reshape(16, 1, 1, 1))
    x = torch.randn(16, 3, 12, 12)
    cfg = presets.INT8.with_overrides(LayerOverride("2", weight=None))
    q = quantaware.quantize(net, cfg, [x], x[:1])
    with caplog.at_level("WARNING", logger="quantaware.export.onnx"):
        path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    assert "keep float weights between quantized activations (2)" in caplog.text
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["quantaware.disabled_optimizers"] == "WeightBiasQuantization"
    report = verify(path, q, [x])
    assert report.first_divergent_layer is None
    assert report.max_error_lsb is not None and report.max_error_lsb <= 1.0


def test_weight_only_linears_record_the_session_option_that_keeps_inputs_float(tmp_path,
                                                                              caplog):
    """ONNX Runtime runs DequantizeLinear -> MatMul on a float input as MatMulNBits,
    which by default quantizes that input to int8 (0.02 off torch on this W8 MLP over
    sequences). The file records the option that keeps it float32 and the export
    says so. (On 2-d inputs the layers export as Gemm, which stays float.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    x = torch.randn(8, 8, 32) * 3
    q = quantaware.quantize(net, presets.W8, [x], x[:1])
    with caplog.at_level("WARNING", logger="quantaware.export.onnx"):
        path = quantaware.export_onnx(q, tmp_path / "w8.onnx", x[:1])
    assert "2 layer(s) multiply float inputs by int8 weights (0, 2)" in caplog.text
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    key, value = meta["quantaware.session_config"].split("=")
    options = ort.SessionOptions()
    options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name:
                                                      x.numpy()})[0],
                                   q(x).numpy(), atol=1e-5)
    # a fully quantized model has no such layer and records nothing
    q8 = quantaware.quantize(net, presets.INT8, [x], x[:1])
    path = quantaware.export_onnx(q8, tmp_path / "int8.onnx", x[:1])
    assert "quantaware.session_config" not in {p.key for p in onnx.load(path).metadata_props}


@pytest.mark.parametrize("pool", [
    nn.AvgPool2d(2, ceil_mode=True), nn.AvgPool2d((2, 3), 2, ceil_mode=True),
    nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(3, 2, 1, ceil_mode=True),
], ids=["2x2", "2x3", "pad-not-counted", "pad-counted"])
def test_ceil_mode_average_pooling_is_exact_in_onnx_runtime(tmp_path, pool):
    """ONNX Runtime's fused QLinearAveragePool divides a window hanging over the
    input's end by the full kernel size (torch and its float AveragePool: by the
    values covered). The export writes the overhang as explicit end padding left
    out of the count, and counted padding as a zero Pad, so both kernels average
    the same values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(8, 4, 1))
    net.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 9, 10, generator=gen)
    q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "q.onnx", x[:1])
    pools = [n for n in onnx.load(str(path)).graph.node if n.op_type == "AveragePool"]
    assert [_attr_value(n, "ceil_mode") for n in pools] == [0]
    report = quantaware.verify(path, q, [torch.randn(32, 3, 9, 10, generator=gen)])
    assert report.max_error_lsb == 0.0 and report.first_divergent_layer is None, str(report)
    float_path = quantaware.export_onnx(net, tmp_path / "f.onnx", x[:1])
    with torch.no_grad():
        np.testing.assert_allclose(_session_output(float_path, x), net(x).numpy(), atol=1e-5)


def _attr_value(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


class _Encoder(nn.Module):
    """Token ids -> a transformer encoder with a learned position table -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.position = nn.Parameter(torch.randn(1, 12, 32) * 0.1)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.position).mean(1))


def _encoder_data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (8, 12), generator=gen) for _ in range(4)]


def test_batch_one_example_exports_a_model_that_runs_at_any_batch(tmp_path):
    """torch.export specializes a size-1 dimension: traced at batch 1,
    nn.MultiheadAttention's head split kept the batch as the constant 1 and the
    file failed at every other batch size ("cannot reshape {12,8,96} to
    {12,1,3,32}")."""
    torch.manual_seed(0)
    net, data = _Encoder().eval(), _encoder_data()
    path = quantaware.export_onnx(net, tmp_path / "f.onnx", data[0][:1])
    with torch.no_grad():
        for batch in (data[0], data[1][:1]):
            np.testing.assert_allclose(_session_output(path, batch), net(batch).numpy(),
                                       atol=1e-5)


def test_a_model_that_pins_its_batch_still_exports(tmp_path):
    """A model whose batch is fixed by a reshape cannot trace at batch 2: the file
    is exported at the example's batch, as before."""

    class Pinned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(1, 12))

    net, x = Pinned().eval(), torch.randn(1, 3, 4)
    path = quantaware.export_onnx(net, tmp_path / "p.onnx", x)
    with torch.no_grad():
        np.testing.assert_allclose(_session_output(path, x), net(x).numpy(), atol=1e-6)


def test_quantized_constant_is_stored_as_integer_codes(tmp_path):
    """A learned table added to an activation (a position embedding) is stored as
    its int8 codes, not quantized at run time; OpenVINO failed to compile the
    QuantizeLinear of a constant before an integer Add."""
    torch.manual_seed(0)
    net, data = _Encoder().eval(), _encoder_data()
    q = quantaware.quantize(net, presets.INT8, data, data[0][:1])
    path = quantaware.export_onnx(q, tmp_path / "q.onnx", data[0][:1])
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    assert "position" not in inits
    quantize_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantize_inputs & set(inits)
    (codes,) = [numpy_helper.to_array(i) for i in model.graph.initializer
                if list(i.dims) == [1, 12, 32]]
    quantizer = q.add.input_quantizers[1]  # the position table's quantizer
    assert codes.dtype == np.uint8
    with torch.no_grad():
        expected = quantizer(q.position).numpy()
    np.testing.assert_array_equal(
        (codes.astype(np.float32) - float(quantizer.zero_point)) * float(quantizer.scale),
        expected)
    # verified at batch 8 (exported at batch 1), in ONNX Runtime and OpenVINO
    report = quantaware.verify(path, q, data)
    assert report.passed() and report.max_error_lsb == 0.0, str(report)
    pytest.importorskip("openvino")
    report = quantaware.verify(path, q, data, backend="openvino", check_layers=False)
    assert report.passed() and report.max_error_lsb <= 1.0 + 1e-3, str(report)


@pytest.mark.parametrize(("rank", "mask"), [(3, None), (3, "bool"), (2, "float"),
                                            (2, "causal")])
def test_attention_of_any_rank_exports(tmp_path, rank, mask):
    """torch's scaled_dot_product_attention takes (..., L, E) inputs; the ONNX
    translation took only 4-d ones ("only 4D query, key, and value are supported")."""

    class Attention(nn.Module):
        def __init__(self, attn_mask: torch.Tensor | None, causal: bool) -> None:
            super().__init__()
            self.attn_mask, self.causal = attn_mask, causal

        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=self.attn_mask, is_causal=self.causal)

    gen = torch.Generator().manual_seed(rank)
    shape = (2, 3, 5, 6)[4 - rank:]
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(*shape[:-1], 5, generator=gen) > 0.3
        attn_mask[..., 0] = True
    elif mask == "float":
        attn_mask = torch.randn(5, 5, generator=gen)
    net = Attention(attn_mask, mask == "causal").eval()
    path = quantaware.export_onnx(net, tmp_path / "a.onnx", (q, k, v), dynamic_batch=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, dict(zip(names, (q.numpy(), k.numpy(), v.numpy()), strict=True)))[0]
    np.testing.assert_allclose(out, net(q, k, v).numpy(), atol=1e-5)


class _DictOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.proj = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.head(x), "aux": {"emb": self.proj(x), "pair": [x * 2, x]}}


def test_dict_outputs_keep_their_keys_as_onnx_output_names(tmp_path):
    torch.manual_seed(0)
    model, x = _DictOutputs().eval(), torch.randn(16, 4)
    names = ["logits", "aux.emb", "aux.pair.0", "aux.pair.1"]
    for variant in (model, quantaware.quantize(model, presets.INT8, [x], x[:1])):
        path = quantaware.export_onnx(variant, tmp_path / "m.onnx", x[:1])
        graph = onnx.load(str(path)).graph
        # the last output is the input passed through: it keeps the exporter's name
        assert [o.name for o in graph.output][:3] == names[:3]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in graph.output],
                       session.run(None, {graph.input[0].name: x.numpy()}), strict=True))
        ref = variant(x)
        np.testing.assert_allclose(got["aux.pair.0"], (2 * x).numpy(), rtol=0, atol=0.05)
        assert got["logits"].shape == ref["logits"].shape == (16, 3)
        assert quantaware.verify(path, variant, [x]).passed()


def test_transposed_conv_exports_int8_weights_per_output_channel(tmp_path):
    """ConvTranspose reads int8 weights dequantized per output channel (the weight's
    axis 1); ONNX Runtime, which has no integer ConvTranspose kernel, computes what the
    fake-quant layer computes, and the other layers stay integer-exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 3, 1)).eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, 12, 12, generator=gen) for _ in range(2)]
    q = quantaware.quantize(net, presets.INT8, data, data[0][:1])
    path = quantaware.export_onnx(q, tmp_path / "decoder.onnx", data[0][:1])
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    (deconv,) = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    weight_dq = producers[deconv.input[1]]
    assert weight_dq.op_type == "DequantizeLinear"
    assert [a.i for a in weight_dq.attribute if a.name == "axis"] == [1]
    assert inits[weight_dq.input[0]].dtype == np.int8
    assert inits[weight_dq.input[1]].shape == (6,)
    report = quantaware.verify(path, q, data)
    assert report.passed() and report.max_error_lsb <= 1.0, str(report)
    assert (report.integer_layers, report.fake_quant_layers) == (2, 1), str(report)


def _verified(model: nn.Module, config, x: torch.Tensor, tmp_path, name: str, **export):
    q = quantaware.quantize(model.eval(), config, [x], example_inputs=x[:1])
    path = quantaware.export_onnx(q, tmp_path / f"{name}.onnx", x[:1], **export)
    return path, quantaware.verify(path, q, [x, x * 2], threads=1)


def test_space_to_depth_stem_pads_with_the_weight_zero_point(tmp_path):
    """The new taps held code 0: with unsigned weights (zero point 128) every one added
    a wrong term, 98 output LSB off torch."""
    from quantaware.config import PerChannel, QuantConfig, QuantSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    x = torch.randn(4, 3, 16, 16)
    for weight in (QuantSpec(bits=8, signed=False, symmetric=True, granularity=PerChannel(0)),
                   QuantSpec(bits=8, signed=True, symmetric=False, granularity=PerChannel(0))):
        config = QuantConfig(weight=weight, activation=presets.INT8.activation)
        path, report = _verified(model, config, x, tmp_path, "s2d")
        assert any(n.op_type == "SpaceToDepth" for n in onnx.load(str(path)).graph.node)
        assert report.passed() and report.max_error_lsb == 0, report


@pytest.mark.parametrize("kind", ["maxpool-flatten", "permute"])
def test_signed_int8_activations_load_in_onnx_runtime(kind, tmp_path):
    """ONNX Runtime's int8-to-uint8 rewrite failed to load files where a max pool or a
    transpose read a DequantizeLinear ("output_dtype INT8 does not match y_zero_point
    type UINT8")."""
    from quantaware.config import QuantConfig, QuantSpec

    class Permute(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).permute(0, 2, 3, 1))

    torch.manual_seed(0)
    model = (nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))
             if kind == "maxpool-flatten" else Permute())
    config = QuantConfig(weight=presets.INT8.weight,
                         activation=QuantSpec(bits=8, signed=True, symmetric=False))
    _, report = _verified(model, config, torch.randn(4, 3, 6, 6), tmp_path, kind)
    assert report.passed() and report.max_error_lsb == 0, report


@pytest.mark.parametrize("bits, narrow", [(12, False), (16, True)])
def test_activations_narrower_than_16_bit_storage_run_and_verify(bits, narrow, tmp_path):
    """The codes were clipped with an int16 Clip, which ONNX Runtime does not implement
    (NOT_IMPLEMENTED: Where(16)); the layer check read the codes before the clip."""
    from quantaware.config import QuantConfig, QuantSpec

    activation = (QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=True)
                  if narrow else QuantSpec(bits=bits, signed=False, symmetric=False))
    config = QuantConfig(weight=presets.INT8.weight, activation=activation)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    _, report = _verified(model, config, torch.randn(8, 3, 6, 6), tmp_path, f"a{bits}")
    assert report.passed() and report.max_error_lsb == 0
    assert report.first_divergent_layer is None, report  # x * 2 saturates the input codes


def test_half_precision_models_are_refused_with_the_fix():
    """float16 failed on the first forward after quantizing (int32 bias bounds overflow
    half); bfloat16 fake-quantized more than a step off the deployed grid."""
    for dtype in (torch.float16, torch.bfloat16):
        model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval().to(dtype)
        x = torch.randn(2, 3, 6, 6, dtype=dtype)
        with pytest.raises(ValueError, match=r"'0.weight' is .*float16; quantaware quantizes "
                                             r"float32 models.*model\.float\(\)"):
            quantaware.quantize(model, presets.INT8, [x], example_inputs=x[:1])


def test_a_forward_with_varargs_exports_with_a_dynamic_batch(tmp_path):
    """forward(self, *xs) failed with "forward() branches on a tensor's value": the
    dynamic batch was given per input, not as the tuple the signature takes."""

    class Varargs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return self.conv(xs[0]) + self.conv(xs[1])

    x = torch.randn(3, 3, 4, 4)
    path = quantaware.export_onnx(Varargs().eval(), tmp_path / "v.onnx", (x[:1], x[:1]))
    session = ort.InferenceSession(str(path))
    out = session.run(None, {i.name: x.numpy() for i in session.get_inputs()})[0]
    assert out.shape == (3, 4, 4, 4)


def test_varargs_left_empty_and_16_bit_stems_export(tmp_path):
    """forward(self, x, *rest) with nothing in rest got a dynamic-shape entry for the
    empty tuple; a 16-bit stem was rewritten to an integer Pad ONNX Runtime lacks."""
    from quantaware.config import QuantConfig, QuantSpec

    class Rest(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    x = torch.randn(5, 4)
    path = quantaware.export_onnx(Rest().eval(), tmp_path / "rest.onnx", (x[:1],))
    assert ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0].shape == (5, 3)
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    config = QuantConfig(weight=presets.INT8.weight,
                         activation=QuantSpec(bits=16, signed=True, symmetric=True))
    _, report = _verified(stem, config, torch.randn(2, 3, 16, 16), tmp_path, "stem16")
    assert report.passed()


class _TiedHead(nn.Module):
    """A language-model head that reads the embedding table functionally."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.tied = tied
        self.embed = nn.Embedding(60, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(self.embed(ids)))
        if self.tied:
            return F.linear(h, self.embed.weight, self.out.bias.sum() + self.fc.bias[:1])
        return self.out(h)


@pytest.mark.parametrize("tied", [True, False])
def test_parameters_read_outside_their_layer_keep_their_float_value(tmp_path, tied):
    """A functional head reading a quantized table (``F.linear(h, embed.weight)``)
    failed to export ("nonexistent target embed.weight"): export stores the table
    as int8 codes and the float parameter was gone. The head reads the float
    table in torch and now in the file; a table nobody else reads is not stored
    twice."""
    torch.manual_seed(0)
    net = _TiedHead(tied).eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 60, (4, 9), generator=gen) for _ in range(4)]
    q = quantaware.quantize(net, presets.INT8, data, data[0])
    path = quantaware.export_onnx(q, tmp_path / "t.onnx", data[0])
    with torch.no_grad():
        np.testing.assert_allclose(_session_output(path, data[1]), q(data[1]).numpy(),
                                   atol=1e-5)
    tables = [i for i in onnx.load(str(path)).graph.initializer
              if sorted(i.dims) == [16, 60]]  # the float table may be stored transposed
    kinds = sorted(TensorProto.DataType.Name(i.data_type) for i in tables)
    assert kinds == (["FLOAT", "INT8"] if tied else ["INT8"])


def test_float16_embedding_tables_are_stored_in_float16(tmp_path):
    """The FP16 preset left embedding tables in float32 (plus a Cast to float16 and
    back over the whole table at every run): a text model's file did not shrink."""
    torch.manual_seed(0)
    net = _TiedHead(tied=False).eval()
    ids = torch.randint(0, 60, (4, 9))
    q = quantaware.quantize(net, presets.FP16, [ids], ids[:1])
    path = quantaware.export_onnx(q, tmp_path / "fp16.onnx", ids[:1])
    proto = onnx.load(str(path))
    (table,) = [i for i in proto.graph.initializer if list(i.dims) == [60, 16]]
    assert table.data_type == TensorProto.FLOAT16
    with torch.no_grad():
        np.testing.assert_allclose(_session_output(path, ids), q(ids).numpy(), atol=1e-5)


class _DivisorPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(torch.relu(self.conv(x)), 2, divisor_override=3)


@pytest.mark.parametrize("functional", [False, True])
def test_average_pooling_with_a_divisor_override_is_refused(tmp_path, functional):
    """torch's ONNX export drops divisor_override: the file divided by the window
    size (63 LSB off on a 2x2 pool with divisor 3), float and INT8 alike."""
    net = (_DivisorPool() if functional else
           nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(2, divisor_override=3))
           ).eval()
    x = torch.randn(4, 3, 8, 8)
    q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    for model in (net, q):
        with pytest.raises(ExportError, match=r"divisor_override.*cannot be exported to ONNX"):
            quantaware.export_onnx(model, tmp_path / "p.onnx", x[:1])
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_an_example_of_another_float_type_is_refused_unless_the_model_casts_it(tmp_path,
                                                                             dtype):
    """A float64 example (NumPy data) exported without complaint a file ONNX Runtime
    refused to load (INVALID_GRAPH: tensor(double) into QuantizeLinear). A model that
    casts its input itself exports as before."""

    class Casting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x.float())

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    with pytest.raises(ExportError, match=r"does not type-check \(example input 0 is "
                                          r"float(64|16).*x.float\(\)"):
        quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1].to(dtype))
    assert not (tmp_path / "m.onnx").exists()
    casting = Casting().eval()
    path = quantaware.export_onnx(casting, tmp_path / "c.onnx", x[:1].to(dtype))
    report = quantaware.verify(path, casting, [x.to(dtype)])
    assert report.passed(), str(report)


def test_a_buffer_named_like_an_op_output_exports(tmp_path):
    """A buffer called 'mean' (input normalisation) and a .mean() call both declared
    'mean': the exporter's file failed to load (onnx_ir SerdeError, 'redeclared')."""

    class Normalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - self.mean) / self.std
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    class Scaled(nn.Module):  # a buffer named like the input: it became its default
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("x", torch.rand(1, 8) + 0.5)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x * self.x)

    torch.manual_seed(0)
    net, x = Normalised().eval(), torch.rand(16, 3, 8, 8)
    q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    scaled, v = Scaled().eval(), torch.randn(16, 8)
    path = quantaware.export_onnx(scaled, tmp_path / "scaled.onnx", v[:1])
    assert quantaware.verify(path, scaled, [v]).passed()
    for name, model in (("float", net), ("int8", q)):
        path = quantaware.export_onnx(model, tmp_path / f"{name}.onnx", x[:1])
        report = quantaware.verify(path, model, [x])
        assert report.passed(), str(report)


@pytest.mark.parametrize("preset", ["FP16", "INT8"])
def test_a_tied_embedding_and_head_are_stored_once(tmp_path, preset):
    """head.weight = emb.weight: the float16 (and int8) table was stored twice, so an
    FP16 file was 97% of the float one's size."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mix = nn.Embedding(1000, 64), nn.Linear(64, 64)
            self.head = nn.Linear(64, 1000, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mix(self.emb(ids))))

    torch.manual_seed(0)
    net, ids = TiedLM().eval(), torch.randint(0, 1000, (8, 12))
    q = quantaware.quantize(net, getattr(presets, preset), [ids], ids[:1])
    path = quantaware.export_onnx(q, tmp_path / "lm.onnx", ids[:1])
    tables = [i.name for i in onnx.load(path).graph.initializer if 1000 in i.dims and 64 in i.dims]
    assert len(tables) == 1, tables
    report = quantaware.verify(path, q, [ids])
    assert report.passed(), str(report)


def test_a_quantized_input_reshaped_on_its_way_is_not_called_float(tmp_path):
    """A timm-style attention's projection reads a quantized tensor through Transpose
    and Reshape: it was reported as a float-input MatMul ONNX Runtime would run as
    MatMulNBits (and the file got a session option for it); ORT runs it as an
    integer MatMul."""

    class Attention(nn.Module):
        def __init__(self, dim: int = 32, heads: int = 2) -> None:
            super().__init__()
            self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(
                2, 0, 3, 1, 4).unbind(0)
            a = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1)
            return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    calib = [torch.randn(8, 16, 32) for _ in range(2)]
    q = quantaware.quantize(Attention().eval(), presets.INT8, calib, calib[0][:1])
    path = quantaware.export_onnx(q, tmp_path / "a.onnx", calib[0][:1])
    assert "quantaware.session_config" not in {m.key for m in onnx.load(path).metadata_props}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert "MatMulNBits" not in ops, ops
