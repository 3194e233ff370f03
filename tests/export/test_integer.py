"""integer_arithmetic: the torch model computes ONNX Runtime's integer kernels bit for bit."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.config import PerTensor, QuantSpec
from quantaware.export.integer import fake_quant_arithmetic, integer_arithmetic
from quantaware.export.layers import compare_layers
from quantaware.nn.base import ChannelClip

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _ort(path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _torch(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def test_residual_cnn_is_bit_exact(int8_model, int8_path, fresh_data):
    """Conv+BN+ReLU, depthwise+ReLU6, residual add, concat, max/average pooling and
    linear layers: every code and every output equal ONNX Runtime's."""
    x = torch.cat(fresh_data[:4])
    with integer_arithmetic(int8_model) as emulation:
        assert emulation.complete, emulation.fallback
        ours = _torch(int8_model, x)
        rows = compare_layers(int8_path, int8_model, x)
    assert np.array_equal(ours, _ort(int8_path, x))
    assert len(rows) >= 8 and all(r.max_lsb == 0 for r in rows), rows
    # Outside the block the model is the fake-quant model again: close, not identical.
    fake = _torch(int8_model, x)
    step = float(int8_model.get_submodule("fc2").output_quantizer.scale)
    assert np.abs(fake - ours).max() <= 2 * step + 1e-6


def _assert_bit_exact(q: nn.Module, x: torch.Tensor, tmp_path) -> list[str]:
    """Export ``q``; under integer_arithmetic torch must equal ONNX Runtime exactly.
    Returns the emulated layers."""
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", x[:1])
    with integer_arithmetic(q) as emulation:
        assert emulation.complete, emulation.fallback
        assert np.array_equal(_torch(q, x), _ort(path, x))
    return emulation.emulated


def _spec(**changes) -> QuantSpec:
    return replace(presets.INT8.activation, **changes)


CONFIGS = {
    "per-tensor weights": replace(presets.INT8, weight=replace(presets.INT8.weight,
                                                               granularity=PerTensor())),
    "int8 activations": replace(presets.INT8, activation=_spec(signed=True)),
    "4-bit weights": presets.W4A8,
}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = x + self.conv2(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_other_formats_are_bit_exact(name, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(24, 3, 16, 16)
    q = quantaware.quantize(_Block().eval(), CONFIGS[name], [x[:12], x[12:]], x[:1])
    _assert_bit_exact(q, x, tmp_path)


class _Wide(nn.Module):
    """A Linear whose int32 sums exceed float32's exact range (float64 path)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2048, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_sums_beyond_float32_precision_are_exact(tmp_path):
    torch.manual_seed(0)
    model = _Wide().eval()
    with torch.no_grad():  # same-sign weights: the sums reach ~2048 * 255 * 127 = 2**26
        model.fc1.weight.abs_()
    x = torch.rand(32, 2048) * 4
    q = quantaware.quantize(model, presets.INT8, [x], x[:1])
    _assert_bit_exact(q, x, tmp_path)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        return self.out(scores)


def test_activation_matmul_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16)
    q = quantaware.quantize(_Attention().eval(), presets.INT8, [x], x[:1])
    assert any("matmul" in name for name in _assert_bit_exact(q, x, tmp_path))


class _Upsampling(nn.Module):
    """Bilinear resizes at several scales, corners aligned or not, and a 1-d one."""

    def __init__(self, align_corners: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv1d(8, 4, 1)
        self.align = align_corners

    def forward(self, x):
        import torch.nn.functional as F

        y = F.relu6(self.a(x))
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=self.align)
        y = F.interpolate(self.b(y), size=(11, 13), mode="bilinear", align_corners=self.align)
        y = F.interpolate(y.flatten(2), scale_factor=1.5, mode="linear",
                          align_corners=self.align)
        return self.c(y)


@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_resize_on_one_grid_rounds_ties_as_onnxruntime(tmp_path, align_corners):
    """A resize whose output grid equals its input's (a ReLU6 range on both sides)
    puts interpolated values on exact rounding ties; ONNX Runtime's float32 order of
    operations decides them, and the reference computes in that order."""
    from quantaware.nn.resize import QuantUpsample

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 7, generator=gen)
    q = quantaware.quantize(_Upsampling(align_corners).eval(), presets.INT8, [x], x[:1])
    resizes = [m for m in q.modules() if isinstance(m, QuantUpsample)]
    assert len(resizes) == 3
    first = resizes[0]
    first.output_quantizer.load_qparams(first.input_source.scale, first.input_source.zero_point)
    data = torch.randn(32, 3, 5, 7, generator=gen)
    _assert_bit_exact(q, data, tmp_path)
    # The resize's output shares its scale constant with its input in the file; the
    # layer check still finds it (a bilinear resize is not a copy of its input).
    name = next(n for n, m in q.named_modules() if m is first) + ".output_quantizer"
    with integer_arithmetic(q):
        rows = {row.name: row.max_lsb for row in compare_layers(tmp_path / "m.onnx", q, data)}
    assert rows.get(name) == 0, rows
    if not align_corners:  # weights 1/4, 3/4: ties occur, and float order decides them
        assert not np.array_equal(_torch(q, data), _ort(tmp_path / "m.onnx", data))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsampled_float_output_is_bit_exact(tmp_path, mode):
    """A resize at the model's output runs in float on the dequantized input; the
    reference interpolates in ONNX Runtime's float32 order, so even the float
    outputs are identical (interpolated plateaus make arg-max ties)."""
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.nn.functional.interpolate(y, scale_factor=4, mode=mode)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 7, generator=gen)
    q = quantaware.quantize(Head().eval(), presets.INT8, [x], x[:1])
    _assert_bit_exact(q, torch.randn(32, 3, 5, 7, generator=gen), tmp_path)


class _SharedHead(nn.Module):
    """One conv applied to two feature maps on different grids (a shared detection head)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.b.weight.mul_(4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.head(y) + self.head(self.b(y))


def test_a_layer_shared_by_inputs_on_different_grids_falls_back(tmp_path):
    """Each call of the shared conv reads its own input's grid; the reference has no
    one set of input qparams for it, says so, and verify stays exact elsewhere."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 6, 6, generator=gen)
    q = quantaware.quantize(_SharedHead().eval(), presets.INT8, [x], x[:1])
    with integer_arithmetic(q) as emulation:
        reasons = dict(emulation.fallback)
    assert "different qparams" in reasons["head"], reasons
    path = quantaware.export_onnx(q, tmp_path / "shared.onnx", x[:1])
    report = quantaware.verify(path, q, [torch.randn(32, 3, 6, 6, generator=gen)])
    assert report.max_error_lsb <= 1 + 1e-3 and report.cosine > 0.9999, str(report)
    # the head's quantizers run twice: no one tensor to compare them with
    assert report.first_divergent_layer is None, str(report)


class _SharedLinearHead(nn.Module):
    """One Linear head for two branches ~20x apart in range."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)
        with torch.no_grad():
            self.b.weight.mul_(20)
            self.head.bias.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]))

    def forward(self, x):
        return self.head(self.a(x)), self.head(self.b(x))


def test_a_shared_linear_on_different_grids_keeps_its_bias_float(tmp_path):
    """ONNX Runtime fuses each call of a shared Linear into a QGemm that reads the one
    int32 bias on that call's own input grid: the second call added the bias x 20
    (178 LSB, top-1 19%). The bias is stored float, as the model computes it."""
    import onnx

    torch.manual_seed(0)
    calib = [torch.randn(8, 6) for _ in range(4)]
    q = quantaware.quantize(_SharedLinearHead().eval(), presets.INT8, calib, calib[0][:1])
    path = quantaware.export_onnx(q, tmp_path / "shared.onnx", calib[0][:1])
    inits = {i.name: i.data_type for i in onnx.load(path).graph.initializer}
    assert inits.get("head.bias") == onnx.TensorProto.FLOAT, inits
    report = quantaware.verify(path, q, [torch.randn(64, 6)])
    assert report.passed() and report.max_error_lsb <= 1 + 1e-3, str(report)


def test_layers_without_integer_kernel_fall_back_and_are_listed(int8_model):
    model = copy.deepcopy(int8_model)
    model.get_submodule("dw").activation = ChannelClip(torch.full((32,), 4.0))
    model.pool = nn.Identity()  # unchanged model structure otherwise
    with integer_arithmetic(model) as emulation:
        reasons = dict(emulation.fallback)
    assert "dw" in reasons and "ChannelClip" in reasons["dw"]
    assert "dw" not in emulation.emulated and not emulation.complete


def test_dynamic_quantization_falls_back():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    q = quantaware.quantize(model, presets.INT8_DYNAMIC, [x], x[:1])
    with integer_arithmetic(q) as emulation:
        y = _torch(q, x)
    assert emulation.emulated == [] and emulation.fallback
    assert all("dynamic" in reason for _, reason in emulation.fallback), emulation.fallback
    assert np.array_equal(y, _torch(q, x))


def test_observing_quantizers_fall_back(int8_model):
    model = copy.deepcopy(int8_model)
    model.get_submodule("stem").output_quantizer.observe_and_quantize()
    with integer_arithmetic(model) as emulation:
        reasons = dict(emulation.fallback)
    assert "observing" in reasons["stem"]


def test_forwards_are_restored_even_after_an_error(int8_model, fresh_data):
    x = fresh_data[0]
    before = _torch(int8_model, x)
    with pytest.raises(RuntimeError, match="boom"), integer_arithmetic(int8_model):
        assert "forward" in vars(int8_model.get_submodule("stem"))
        raise RuntimeError("boom")
    assert "forward" not in vars(int8_model.get_submodule("stem"))
    assert np.array_equal(_torch(int8_model, x), before)


def test_blocks_nest(int8_model, int8_path, fresh_data, monkeypatch):
    """verify() enters integer_arithmetic itself; inside a caller's block too, and
    its fake-quant pass still runs the fake-quant forward."""
    from quantaware.nn.conv import QuantConv2d

    calls = []
    original = QuantConv2d.forward

    def counting(self, x):
        calls.append(1)
        return original(self, x)

    monkeypatch.setattr(QuantConv2d, "forward", counting)
    x = fresh_data[0]
    with integer_arithmetic(int8_model):
        inner = _torch(int8_model, x)
        assert not calls  # the integer forwards ran
        report = quantaware.verify(int8_path, int8_model, [x])
        assert report.max_error_lsb == 0.0 and calls  # the fake-quant pass ran too
        calls.clear()
        with fake_quant_arithmetic(int8_model):
            _torch(int8_model, x)
        assert calls
        calls.clear()
        assert "forward" in vars(int8_model.get_submodule("stem"))
        assert np.array_equal(_torch(int8_model, x), inner) and not calls
    assert "forward" not in vars(int8_model.get_submodule("stem"))


def test_float_model_has_nothing_to_emulate():
    model = nn.Sequential(nn.Linear(4, 4))
    with integer_arithmetic(model) as emulation:
        assert emulation.emulated == [] and emulation.fallback == []
        assert not emulation.complete


def test_litert_ceil_mode_pool_is_emulated_where_no_window_hangs_over():
    """LiteRT's file of a ceil_mode pool traced at 8x8 is the floor-mode pool: the
    reference emulates it, and refuses inputs where a window would hang over. Traced
    at 9x9 (the converter pads and rescales) it names why it is not emulated."""
    def pooled(size):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                            nn.AvgPool2d(2, 2, ceil_mode=True)).eval()
        x = torch.randn(8, 3, size, size)
        return quantaware.quantize(net, presets.INT8, [x], x[:1]), x

    q, x = pooled(8)
    with integer_arithmetic(q, "litert") as emulation:
        q(x)
        with pytest.raises(ValueError, match="window hanging over"):
            q(torch.randn(2, 3, 9, 9))
    assert emulation.complete, emulation.fallback
    q, _ = pooled(9)
    with integer_arithmetic(q, "litert") as emulation:
        pass
    assert [reason for _, reason in emulation.fallback] == [
        "average pooling whose last ceil_mode window hangs over the input (LiteRT pads "
        "and rescales it)"]


def test_litert_emulation_of_a_resize_after_max_pooling():
    """A max pool (no quantizer of its own) before a bilinear resize: reading the
    LiteRT grids raised AttributeError ('MaxPool2d' has no 'output_quantizer')."""
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2)
            self.out = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.pool(torch.relu(self.conv(x)))
            return self.out(F.interpolate(y, size=(8, 8), mode="bilinear", align_corners=False))

    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    q = quantaware.quantize(Net().eval(), presets.INT8, [x], x[:1])
    with integer_arithmetic(q, "litert") as emulation:
        assert q(x).shape == (8, 2, 8, 8)
    assert emulation.complete, emulation.fallback
