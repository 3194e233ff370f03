"""quantaware.prepare: module swaps, quantizer placement, fusion, overrides, fallback."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantaware
from quantaware import presets
from quantaware.config import ConfigError, LayerOverride, PerChannel, QuantSpec
from quantaware.fake_quant import FakeQuantizer, Float16Quantizer
from quantaware.nn import (
    QuantAdaptiveAvgPool2d,
    QuantAdd,
    QuantCat,
    QuantConv2d,
    QuantLinear,
    QuantMatmul,
)
from quantaware.prepare import UnsupportedLayerError, quantizers
from quantaware.qat import prepare_qat

pytestmark = pytest.mark.usefixtures("single_thread")

X1 = torch.zeros(1, 3, 8, 8)


def _activation_quantizers(model: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    return [(n, q) for n, q in quantizers(model) if not n.endswith("weight_quantizer")]


@pytest.fixture
def prepared(residual_cnn):
    return quantaware.prepare(residual_cnn, presets.INT8, X1)


def test_modules_are_swapped(prepared):
    expected = {
        "stem": QuantConv2d, "dw": QuantConv2d, "pw": QuantConv2d, "branch": QuantConv2d,
        "head": QuantConv2d, "fc1": QuantLinear, "fc2": QuantLinear,
        "gap": QuantAdaptiveAvgPool2d, "pool": nn.MaxPool2d, "flatten": nn.Flatten,
    }
    for name, cls in expected.items():
        assert type(prepared.get_submodule(name)) is cls, name
    adds = [m for m in prepared.modules() if isinstance(m, QuantAdd)]
    cats = [m for m in prepared.modules() if isinstance(m, QuantCat)]
    assert len(adds) == 1 and len(cats) == 1
    assert cats[0].dim == 1
    assert prepared.get_submodule("dw").groups == 32
    # the functional add and cat are gone from the graph
    targets = {n.target for n in prepared.graph.nodes if n.op == "call_function"}
    assert torch.cat not in targets
    assert not any(getattr(t, "__name__", "") == "add" for t in targets)
    assert prepared.quantaware_config is presets.INT8


def test_relu_and_relu6_are_fused(prepared):
    acts = {name: type(prepared.get_submodule(name).activation)
            for name in ("stem", "dw", "pw", "branch", "head", "fc1", "fc2")}
    assert acts == {"stem": nn.ReLU, "dw": nn.ReLU6, "pw": type(None), "branch": nn.ReLU,
                    "head": nn.ReLU, "fc1": nn.ReLU, "fc2": type(None)}
    add = next(m for m in prepared.modules() if isinstance(m, QuantAdd))
    assert isinstance(add.activation, nn.ReLU)  # torch.relu(x + y)
    # no standalone activation remains in the graph
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            assert not isinstance(prepared.get_submodule(node.target), nn.ReLU | nn.ReLU6)
        assert node.target not in (F.relu, torch.relu, F.relu6)


def test_every_tensor_is_quantized_exactly_once(prepared):
    stem = prepared.get_submodule("stem")
    assert isinstance(stem.input_quantizer, FakeQuantizer)  # the model input
    for name in ("dw", "pw", "branch", "head", "gap", "fc1", "fc2"):
        module = prepared.get_submodule(name)
        assert module.input_quantizer is None, name
        # ... because the producer's output quantizer already quantized it
        assert isinstance(module.input_source, FakeQuantizer), name
    for module in prepared.modules():
        if isinstance(module, QuantAdd | QuantCat):
            assert all(isinstance(q, nn.Identity) for q in module.input_quantizers)
    names = sorted(n for n, _ in _activation_quantizers(prepared))
    assert names == sorted([
        "stem.input_quantizer", "stem.output_quantizer", "dw.output_quantizer",
        "pw.output_quantizer", "add.output_quantizer", "branch.output_quantizer",
        "cat.output_quantizer", "head.output_quantizer", "gap.output_quantizer",
        "fc1.output_quantizer", "fc2.output_quantizer",
    ])
    # each activation quantizer runs exactly once per forward pass
    calls = {n: 0 for n, _ in _activation_quantizers(prepared)}
    handles = [q.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
               for n, q in _activation_quantizers(prepared)]
    prepared(torch.randn(2, 3, 8, 8))
    for h in handles:
        h.remove()
    assert set(calls.values()) == {1}


def test_producer_quantizer_is_the_consumers_input_source(prepared):
    assert prepared.get_submodule("dw").input_source is prepared.stem.output_quantizer
    assert prepared.get_submodule("gap").input_source is prepared.head.output_quantizer
    assert prepared.get_submodule("fc1").input_source is prepared.gap.output_quantizer


def test_unquantized_producer_keeps_consumer_input_quantizer(residual_cnn):
    cfg = presets.INT8.with_overrides(LayerOverride("head", skip=True))
    prepared = quantaware.prepare(residual_cnn, cfg, X1)
    assert type(prepared.get_submodule("head")) is nn.Conv2d
    # the float head's output must be quantized by its consumer
    assert isinstance(prepared.get_submodule("gap").input_quantizer, FakeQuantizer)


def test_skip_override_keeps_layers_float(residual_cnn):
    cfg = presets.INT8.with_overrides(LayerOverride("fc2", skip=True),
                                      LayerOverride("stem", skip=True))
    prepared = quantaware.prepare(residual_cnn, cfg, X1)
    assert type(prepared.get_submodule("fc2")) is nn.Linear
    assert type(prepared.get_submodule("stem")) is nn.Conv2d
    assert type(prepared.get_submodule("fc1")) is QuantLinear
    assert not any(n.startswith(("fc2.", "stem.")) for n, _ in quantizers(prepared))
    # the skipped stem's output feeds dw, which must now quantize its own input
    assert isinstance(prepared.get_submodule("dw").input_quantizer, FakeQuantizer)


def test_weight_override_changes_the_spec(residual_cnn):
    w4 = QuantSpec(bits=4, narrow_range=True, granularity=PerChannel(0))
    cfg = presets.INT8.with_overrides(LayerOverride("fc*", weight=w4))
    prepared = quantaware.prepare(residual_cnn, cfg, X1)
    assert prepared.get_submodule("fc1").weight_quantizer.qmax == 7
    assert prepared.get_submodule("head").weight_quantizer.qmax == 127


def test_original_model_is_untouched(residual_cnn):
    before = copy.deepcopy(residual_cnn.state_dict())
    types = [type(m) for m in residual_cnn.modules()]
    x = torch.randn(2, 3, 8, 8)
    out_before = residual_cnn(x)
    prepared = quantaware.prepare(residual_cnn, presets.INT8, X1)
    quantaware.calibrate(prepared, [torch.randn(4, 3, 8, 8)])
    with torch.no_grad():
        for p in prepared.parameters():
            p.add_(1.0)
    assert [type(m) for m in residual_cnn.modules()] == types
    after = residual_cnn.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(residual_cnn(x), out_before)
    assert not residual_cnn.training  # mode untouched too


def test_prepared_model_keeps_the_training_mode(residual_cnn):
    residual_cnn.train()
    prepared = quantaware.prepare(residual_cnn, presets.INT8, X1)
    assert prepared.training and residual_cnn.training
    residual_cnn.eval()
    assert not quantaware.prepare(residual_cnn, presets.INT8, X1).training


def test_prepared_model_trains(prepared):
    prepared.train()
    weights = {n: m.weight for n, m in prepared.named_modules()
               if isinstance(m, QuantConv2d | QuantLinear)}
    assert len(weights) == 7
    params = dict(prepared.named_parameters())
    for name, w in weights.items():
        assert isinstance(w, nn.Parameter) and w.requires_grad
        assert any(p is w for p in params.values()), name
        assert w.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    snapshot = {n: w.detach().clone() for n, w in weights.items()}
    loss = F.cross_entropy(prepared(x), y)
    loss.backward()
    for name, w in weights.items():
        assert w.grad is not None and torch.isfinite(w.grad).all(), name
        assert w.grad.abs().sum() > 0, name
    opt.step()
    for name, w in weights.items():
        assert not torch.equal(w.detach(), snapshot[name]), name


def test_qat_loss_decreases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    prepared = quantaware.prepare(model, presets.INT8, X1)
    prepared.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(prepared(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_prepared_output_is_quantized_on_its_grid(prepared):
    quantaware.calibrate(prepared, [torch.randn(8, 3, 8, 8) for _ in range(3)])
    out = prepared(torch.randn(5, 3, 8, 8)).detach()
    q = prepared.fc2.output_quantizer
    steps = out / q.scale + q.zero_point
    torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["INT8_DYNAMIC", "FP16", "W8", "W4A8"])
def test_other_presets_prepare_and_run(residual_cnn, name):
    cfg = presets.PRESETS[name]
    prepared = quantaware.prepare(residual_cnn, cfg, X1)
    assert type(prepared.get_submodule("head")) is QuantConv2d
    wq = prepared.get_submodule("head").weight_quantizer
    if name == "FP16":
        assert isinstance(wq, Float16Quantizer)
        assert not any(isinstance(m, QuantAdd) for m in prepared.modules())
    else:
        assert isinstance(wq, FakeQuantizer)
    if name in ("INT8_DYNAMIC", "W8", "FP16"):  # no static activation quantizers
        assert all(q.from_tensor for _, q in quantizers(prepared))
        assert type(prepared.get_submodule("gap")) is nn.AdaptiveAvgPool2d
    quantaware.calibrate(prepared, [torch.randn(4, 3, 8, 8)])
    out = prepared(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_matmul_between_activations_becomes_quant_matmul():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.k = nn.Linear(8, 8)

        def forward(self, x):
            return self.q(x) @ self.k(x).transpose(-1, -2)

    prepared = quantaware.prepare(Attn(), presets.INT8, torch.randn(1, 4, 8))
    mm = [m for m in prepared.modules() if isinstance(m, QuantMatmul)]
    assert len(mm) == 1
    # q's output is quantized by q; k's output passes through transpose, also quantized
    assert all(isinstance(q, nn.Identity) for q in mm[0].input_quantizers)


class Decoder(nn.Module):
    """Upsampling in every spelling: a module, a functional call with a size read from
    another tensor's shape, nearest and bilinear."""

    def __init__(self, antialias: bool = False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.antialias = antialias

    def forward(self, x):
        y = F.relu(self.a(x))
        z = F.interpolate(self.b(y), scale_factor=0.5, mode="bilinear",
                          antialias=self.antialias)
        z = F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=True)
        return self.c(self.up(z))


def test_upsampling_is_quantized_and_keeps_the_layers_around_it_integer():
    from quantaware.nn.resize import QuantUpsample

    prepared = quantaware.prepare(Decoder(), presets.INT8, X1)
    ups = {n: m for n, m in prepared.named_modules() if isinstance(m, QuantUpsample)}
    assert len(ups) == 3, prepared.code
    nearest = prepared.get_submodule("up")
    assert isinstance(nearest, QuantUpsample) and nearest.output_quantizer is None
    # the conv before each resize quantizes its own output (it runs as an integer kernel)
    assert prepared.b.output_quantizer is not None
    bilinear = [m for m in ups.values() if m.mode == "bilinear"]
    assert bilinear[0].input_source is prepared.b.output_quantizer
    assert bilinear[1].input_source is bilinear[0].output_quantizer
    # nearest copies codes: c reads the grid of the resize before it
    assert nearest.input_source is bilinear[1].output_quantizer
    assert prepared.c.input_quantizer is None
    assert prepared.c.input_source is bilinear[1].output_quantizer
    quantaware.calibrate(prepared, [torch.randn(4, 3, 8, 8)])
    x = torch.randn(2, 3, 6, 10)  # the traced size is not baked in
    seen = []
    handle = prepared.up.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        out = prepared(x)
    handle.remove()
    assert out.shape == (2, 4, 12, 20)
    grid = bilinear[1].output_quantizer
    assert torch.equal(seen[0], grid(seen[0]))  # the nearest copy is on its input's grid


def test_an_upsampling_module_used_twice_gets_a_module_per_use():
    """A decoder's one nn.Upsample at every level: each use resizes on its own input's
    grid (one shared module would put the second level on the first level's grid)."""
    from quantaware.nn.resize import QuantUpsample

    class TwoLevels(nn.Module):
        def __init__(self, mode: str):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.c = nn.Conv2d(8, 4, 1)
            self.up = nn.Upsample(scale_factor=2, mode=mode)
            with torch.no_grad():
                self.b.weight.mul_(5)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.c(self.up(y) + self.up(self.up(torch.relu(self.b(y)))))

    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    for mode in ("nearest", "bilinear"):
        prepared = quantaware.prepare(TwoLevels(mode), presets.INT8, X1)
        ups = [m for m in prepared.modules() if isinstance(m, QuantUpsample)]
        assert len(ups) == 3 and len({id(m) for m in ups}) == 3, mode
        quantaware.calibrate(prepared, [x])
        add = next(m for m in prepared.modules() if isinstance(m, QuantAdd))
        sources = [add.input_source_of(i) for i in range(2)]
        if mode == "nearest":  # copies: the add reads the two convs' own grids
            assert sources == [prepared.a.output_quantizer, prepared.b.output_quantizer]
            assert float(sources[0].scale) != float(sources[1].scale)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_an_upsampled_model_output_is_resized_in_float(mode):
    """Nothing integer reads a segmentation model's full-size output: quantizing it
    would add a quantize/dequantize pair on the largest tensor, so the resize runs in
    float on the dequantized input (the conv before it stays integer)."""
    from quantaware.nn.resize import QuantUpsample

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return F.interpolate(self.b(torch.relu(self.a(x))), scale_factor=4, mode=mode)

    prepared = quantaware.prepare(Head(), presets.INT8, X1)
    up = next(m for m in prepared.modules() if isinstance(m, QuantUpsample))
    assert up.output_quantizer is None and not up.requantize_output
    assert up.input_source is prepared.b.output_quantizer  # b runs as an integer kernel
    quantaware.calibrate(prepared, [torch.randn(4, 3, 8, 8)])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = F.interpolate(prepared.b(prepared.a(x)), scale_factor=4, mode=mode)
        assert torch.equal(prepared(x), expected)


def test_a_layer_used_again_keeps_the_input_quantizer_its_first_call_needs():
    """The first call reads a float tensor (after a sigmoid), the second a quantized
    conv's output: dropping the shared input quantizer at the second call would leave
    the first call's input unquantized."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.head(torch.sigmoid(y)) + self.head(y)

    prepared = quantaware.prepare(Shared(), presets.INT8, X1)
    assert isinstance(prepared.head.input_quantizer, FakeQuantizer)
    quantaware.calibrate(prepared, [torch.randn(4, 3, 8, 8)])
    seen = []
    handle = prepared.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        prepared(torch.randn(2, 3, 8, 8))
    handle.remove()
    q = prepared.head.input_quantizer
    assert torch.equal(seen[0], torch.sigmoid(seen[1]))  # the float input of the first call
    with torch.no_grad():  # ... is quantized inside the layer, with the shared quantizer
        assert not torch.equal(q(seen[0]), seen[0])


@pytest.mark.parametrize("after_first_call", ["relu", "batch_norm"])
@pytest.mark.parametrize("qat", [False, True])
def test_a_layer_called_twice_keeps_what_follows_one_call_out_of_the_other(
        after_first_call, qat):
    """A ReLU or batch norm after the first call of a shared conv was fused or folded
    into the conv, so the second call applied it too (relative error 0.76 / 2.2)."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 4, 3, padding=1)
            self.after = nn.ReLU() if after_first_call == "relu" else nn.BatchNorm2d(4)

        def forward(self, x):
            return self.c(self.after(self.c(x))).mean((2, 3))

    torch.manual_seed(0)
    net = Shared()
    if after_first_call == "batch_norm":
        with torch.no_grad():
            net.after.running_mean.uniform_(-2, 2)
            net.after.running_var.uniform_(0.1, 4)
    net.eval()
    x = torch.randn(64, 4, 8, 8)
    prepare_fn = prepare_qat if qat else quantaware.prepare
    model = quantaware.calibrate(prepare_fn(net, presets.INT8, x[:1]), [x]).eval()
    with torch.no_grad():
        ref = net(x)
        error = float((model(x) - ref).norm() / ref.norm())
    assert error < 0.05, error


def test_antialiased_resize_stays_float():
    from quantaware.nn.resize import QuantUpsample

    prepared = quantaware.prepare(Decoder(antialias=True), presets.INT8, X1)
    ups = [m for m in prepared.modules() if isinstance(m, QuantUpsample)]
    assert len(ups) == 2  # the antialiased downsampling is left as it is
    assert sum("interpolate(" in line for line in prepared.code.splitlines()) == 1


# -- fallback and bad input ------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        y = self.conv(x)
        if x.sum() > 0:
            y = y * 2
        return self.fc(y.flatten(1)) + 1.0


def test_untraceable_model_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = DataDependent()
    with pytest.warns(UserWarning, match="could not trace DataDependent"):
        prepared = quantaware.prepare(model, presets.INT8, X1)
    assert type(prepared.conv) is QuantConv2d and type(prepared.fc) is QuantLinear
    assert type(prepared) is DataDependent  # not a GraphModule
    for m in (prepared.conv, prepared.fc):
        assert isinstance(m.input_quantizer, FakeQuantizer)
        assert m.output_quantizer is None
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    quantaware.calibrate(prepared, data)
    assert all(bool(q.calibrated) for _, q in quantizers(prepared) if not q.from_tensor)
    out = prepared(data[0])
    assert out.shape == (4, 5)
    with torch.no_grad():
        assert not torch.equal(out, model(data[0]))  # really quantized
        torch.testing.assert_close(out, model(data[0]), atol=0.1, rtol=0.1)


class _TrainingOnlyHead(nn.Module):
    """Untraceable (a shape-dependent tensor), with a head only training uses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.aux = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5), \
            nn.Linear(8, 5)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.conv(x)).mean((2, 3)) + torch.zeros(x.shape[0], 8)
        return (self.fc(h), self.aux(h)) if self.training else self.fc(h)


def test_untraceable_model_keeps_layers_calibration_never_ran_float(tmp_path, caplog):
    """Calibration asked for batches that exercise the training-only head, which an
    eval forward never runs; it stays float now, with a warning. Every layer is still
    swapped, so the structure does not depend on which branch the example took."""
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with pytest.warns(UserWarning, match="could not trace"), caplog.at_level("WARNING"):
        q = quantaware.quantize(_TrainingOnlyHead().eval(), presets.INT8, data, data[0][:1])
    assert "layer(s) aux never ran on the calibration data and stay float" in caplog.text
    assert type(q.conv) is QuantConv2d and type(q.fc) is QuantLinear
    assert not bool(q.aux.input_quantizer.fake_quant_enabled)
    assert bool(q.fc.input_quantizer.calibrated)
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", data[0][:1])
    assert quantaware.verify(path, q, data).passed()


def test_traceable_model_prepares_without_warning(residual_cnn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantaware.prepare(residual_cnn, presets.INT8, X1)


@pytest.mark.parametrize("layer,shape", [(nn.Conv2d(3, 4, 3), (2, 3, 8, 8)),
                                         (nn.Linear(6, 5), (2, 6))])
def test_a_bare_layer_is_quantized(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = quantaware.quantize(layer, presets.INT8, [x], x[:1])
    assert isinstance(q.get_submodule("0"), (QuantConv2d, QuantLinear))
    assert len([name for name, _ in quantizers(q)]) >= 3  # input, weight, output
    with torch.no_grad():
        out = q(x)
        assert not torch.equal(out, layer(x))  # really quantized
        torch.testing.assert_close(out, layer(x), atol=0.05, rtol=0.05)
    assert type(layer) in (nn.Conv2d, nn.Linear)  # the user's layer is left as it was


def test_override_on_unsupported_layer_raises():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 5))
    model.add_module("norm", nn.LayerNorm(5))
    cfg = presets.INT8.with_overrides(LayerOverride("norm", weight=QuantSpec()))
    with pytest.raises(UnsupportedLayerError) as info:
        quantaware.prepare(model, cfg, torch.randn(1, 4))
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert "'norm'" in message and "LayerNorm" in message
    assert "skip=True" in message and "Remove the override" in message
    assert "Linear" in message  # lists what is supported
    # skipping the unsupported layer is fine
    ok = presets.INT8.with_overrides(LayerOverride("norm", skip=True))
    assert type(quantaware.prepare(model, ok, torch.randn(1, 4)).get_submodule("fc")) \
        is QuantLinear


def test_unknown_config_key_raises_config_error_naming_it():
    data = presets.INT8.to_dict()
    data["activation"]["granularty"] = {"kind": "per_tensor"}
    with pytest.raises(ConfigError, match="granularty"):
        quantaware.QuantConfig.from_dict(data)


def test_per_channel_activation_rejected():
    cfg = presets.INT8.with_overrides(
        LayerOverride("fc", activation=QuantSpec(granularity=PerChannel(1))))
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 5))
    with pytest.raises(ConfigError, match="per-channel activation"):
        quantaware.prepare(model, cfg, torch.randn(1, 4))


def test_bad_arguments():
    with pytest.raises(TypeError, match="QuantConfig"):
        quantaware.prepare(nn.Linear(2, 2), "INT8", torch.randn(1, 2))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        quantaware.prepare(lambda x: x, presets.INT8, torch.randn(1, 2))
    with pytest.raises(TypeError, match="example_inputs"):
        quantaware.prepare(nn.Sequential(nn.Linear(2, 2)), presets.INT8, {"x": 1})


def test_functional_average_pools_are_quantized_like_their_modules():
    """F.avg_pool2d / F.adaptive_avg_pool2d stayed float, and so did the conv before
    them (its output had no integer consumer)."""
    from quantaware.nn.pool import QuantAdaptiveAvgPool2d, QuantAvgPool2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x):
            y = F.avg_pool2d(torch.relu(self.conv(x)), kernel_size=3, stride=2, padding=1)
            return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(8, 3, 16, 16)
    q = quantaware.quantize(model, presets.INT8, [x], x[:1])
    pools = [type(m) for m in q.modules() if isinstance(m, QuantAvgPool2d | QuantAdaptiveAvgPool2d)]
    assert pools == [QuantAvgPool2d, QuantAdaptiveAvgPool2d]
    assert q.get_submodule("conv").output_quantizer is not None
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(x), model(x)).min() > 0.999


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(3))


def test_an_already_prepared_model_is_refused():
    x = torch.randn(2, 1, 6, 6)
    model = _small()
    model(x)
    once = quantaware.prepare(model, presets.INT8, x)
    with pytest.raises(ValueError, match=r"already prepared .* pass the original float model"):
        quantaware.prepare(once, presets.INT8, x)


def test_non_finite_weights_are_named():
    x = torch.randn(2, 1, 6, 6)
    model = _small()
    model(x)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
        model[4].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf values in '0\.weight', '4\.bias'"):
        quantaware.prepare(model, presets.INT8, x)


class _MaskedScores(nn.Module):
    """A buffer that holds -inf on purpose, as causal attention masks do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x) @ self.proj(x).transpose(-1, -2) + self.mask, -1)


def test_minus_infinity_in_a_buffer_is_allowed():
    prepared = quantaware.prepare(_MaskedScores(), presets.INT8, torch.randn(2, 4, 4))
    assert any(isinstance(m, QuantLinear) for m in prepared.modules())


def test_example_inputs_the_model_rejects_are_reported_as_such(capfd):
    model = _small()
    model(torch.randn(2, 1, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tracing warning: the inputs are the problem
        with pytest.raises(ValueError, match=r"fails on the example inputs \(\(2, 3, 6, 6\)\)"
                                             r": RuntimeError: .*channels"):
            quantaware.prepare(model, presets.INT8, torch.randn(2, 3, 6, 6))
    assert "Traceback" not in capfd.readouterr().err  # torch.fx's shape pass printed one


class _LinearGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def test_integer_output_keeps_the_output_quantizer_before_a_float_op():
    """A Linear read only by GELU loses its output quantizer unless the config asks
    to keep it integer; the rule changes nothing else."""
    x = torch.randn(4, 8)
    plain = quantaware.prepare(_LinearGelu(), presets.INT8, x)
    assert plain.fc1.output_quantizer is None
    config = presets.INT8.with_overrides(LayerOverride("fc1", integer_output=True))
    kept = quantaware.prepare(_LinearGelu(), config, x)
    assert isinstance(kept.fc1.output_quantizer, FakeQuantizer)
    assert isinstance(kept.fc2.input_quantizer, FakeQuantizer)  # GELU's output: its own grid
    assert kept.quantaware_config == config
    # an output-only rule matching every layer asks to quantize nothing it cannot
    everything = presets.INT8.with_overrides(LayerOverride("*", integer_output=True))
    assert isinstance(quantaware.prepare(_LinearGelu(), everything, x).fc1.output_quantizer,
                      FakeQuantizer)


def test_layers_with_weights_and_no_quantized_form_are_named(caplog):
    """An LSTM stays float32; a user reading the size and speed figures must know."""
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.norm, self.head = nn.LSTM(8, 16, batch_first=True), \
                nn.LayerNorm(16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.rnn(x)[0][:, -1]))

    with caplog.at_level("WARNING", logger="quantaware.prepare"):
        quantaware.prepare(Recurrent().eval(), presets.INT8, torch.randn(1, 5, 8))
    assert "1 layer(s) with weights have no quantized form and stay float: rnn (LSTM)" in (
        caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING", logger="quantaware.prepare"):
        quantaware.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(64, 3), nn.LayerNorm(3)),
                           presets.INT8.with_overrides(LayerOverride("4", skip=True)),
                           torch.randn(1, 1, 6, 6))
    assert "no quantized form" not in caplog.text  # a layer kept float by choice is not


class _MaskedAttention(nn.Module):
    """Ids and an attention mask -> one attention layer -> mean over real tokens."""

    def __init__(self, causal: bool = False, module: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.softmax = nn.Softmax(-1) if module else None  # BERT's layout
        self.embed = nn.Embedding(40, 16)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        bias = ((1.0 - attention_mask.to(torch.float32)) * -1e4)[:, None, :]
        if self.causal:
            n = ids.size(1)
            bias = bias + torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        scores = scores + bias
        probs = self.softmax(scores) if self.softmax is not None else scores.softmax(-1)
        h = torch.matmul(probs, v)
        weights = attention_mask.unsqueeze(-1).to(torch.float32)
        return self.out((h * weights).sum(1) / weights.sum(1))


@pytest.mark.parametrize(("causal", "module"), [(False, False), (True, False), (False, True)])
def test_masks_computed_from_integer_inputs_stay_float(causal, module):
    """The add that applies an attention mask made from ``attention_mask`` was
    quantized by presets.INT8: calibrated on unpadded batches its mask input saw only
    zeros, so at run time padding was ignored (a padded sentence's output changed).
    A causal mask of -inf made no model at all (non-finite range)."""
    torch.manual_seed(0)
    net = _MaskedAttention(causal, module).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [((torch.randint(0, 40, (4, 6), generator=gen), torch.ones(4, 6, dtype=torch.long)),)
             for _ in range(4)]
    q = quantaware.quantize(net, presets.INT8, calib, calib[0][0])
    ids = torch.randint(0, 40, (2, 6), generator=gen)
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], 1).long()
    with torch.no_grad():
        alone = q(ids, torch.ones(2, 6, dtype=torch.long))
        torch.testing.assert_close(q(padded, mask), alone, atol=1e-5, rtol=0)
    assert isinstance(q.matmul, QuantMatmul)  # q @ k still runs in int8
    assert not [n for n, m in q.named_modules() if isinstance(m, QuantAdd)]


class _Bag(nn.Module):
    def __init__(self, **embedding: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8, **embedding)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def test_embedding_with_max_norm_stays_float(caplog, tmp_path):
    """max_norm renormalises the looked-up rows at every call; the quantized table
    ignored it on export (up to 6.96 off torch on outputs up to 1.86). Such a table
    stays float."""
    torch.manual_seed(0)
    net = _Bag(max_norm=0.5).eval()
    ids = torch.randint(0, 30, (6, 5))
    with caplog.at_level("WARNING", logger="quantaware.prepare"):
        q = quantaware.quantize(net, presets.W8, [ids], ids[:1])
    assert "emb (nn.Embedding, max_norm=0.5) stays float" in caplog.text
    assert type(q.emb) is nn.Embedding and isinstance(q.fc, QuantLinear)
    path = quantaware.export_onnx(q, tmp_path / "m.onnx", ids[:1])
    report = quantaware.verify(path, q, [ids])
    assert report.max_abs_error < 1e-5, str(report)


def test_float16_weights_that_would_overflow_stay_float32(caplog):
    """float16 tops out at 65504: a larger weight became inf, silently."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        net[1].weight[0, 0] = 1e5
    with caplog.at_level("WARNING", logger="quantaware.prepare"):
        q = quantaware.prepare(net, presets.FP16, torch.randn(1, 4))
    assert "1 stays float32: its largest weight (1e+05) overflows float16" in caplog.text
    assert type(q.get_submodule("1")) is nn.Linear
    assert isinstance(q.get_submodule("0").weight_quantizer, Float16Quantizer)
    with torch.no_grad():
        assert torch.isfinite(q(torch.randn(3, 4))).all()


def test_asymmetric_weights_name_the_embedding_and_the_fix():
    spec = QuantSpec(bits=8, symmetric=False)
    with pytest.raises(ConfigError, match=r"layer 'emb' \(nn.Embedding\).*"
                       r"LayerOverride\('emb', weight=QuantSpec\(symmetric=True\)\)"):
        quantaware.prepare(_Bag(), dataclasses.replace(presets.W8, weight=spec),
                           torch.zeros(1, 5, dtype=torch.long))


class _Uint8Image(nn.Module):
    """A uint8 camera image scaled in forward and concatenated with features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img.float() / 255.0
        return self.out(torch.cat([self.conv(x), x], 1))


class _SinePositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.out(h + torch.sin(torch.arange(h.shape[1], dtype=torch.float32)[:, None]))


class _IntegerTuples(nn.Module):
    """Ops on integer inputs that give several tensors (chunk, max with indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a, b = ids.chunk(2, dim=1)
        last = mask.max(dim=1).indices
        return self.emb(a) + self.emb(b) + self.emb(last)[:, None]


def test_only_adds_applying_masks_to_scores_stay_float():
    """Float tensors computed from integer inputs are not all masks: a uint8 image
    scaled in forward and a sine position code stay quantized; ops giving tuples of
    tensors from integer inputs (chunk, max) made prepare fail on their metadata."""
    img = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    q = quantaware.prepare(_Uint8Image(), presets.INT8, img)
    assert [type(m) for m in q.modules() if isinstance(m, QuantCat)] == [QuantCat]
    q = quantaware.prepare(_SinePositions(), presets.INT8, torch.randn(2, 4, 8))
    assert [m for m in q.modules() if isinstance(m, QuantAdd)]
    ids, mask = torch.randint(0, 10, (2, 4)), torch.ones(2, 4, dtype=torch.long)
    q = quantaware.prepare(_IntegerTuples(), presets.INT8, (ids, mask))
    assert len([m for m in q.modules() if isinstance(m, QuantAdd)]) == 2


class _Optional(nn.Module):
    """A forward with optional inputs the example leaves out."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, mask=None, return_features=False):
        h = torch.relu(self.c1(x))
        h = h + torch.relu(self.c2(h))
        if mask is not None:
            h = h * mask
        f = h.mean((2, 3))
        return f if return_features else self.fc(f)


def test_optional_inputs_left_at_their_defaults_are_traced_at_them():
    """forward(x, mask=None, return_features=False) fell back to quantizing modules
    only (the residual add float), blaming data-dependent control flow."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        q = quantaware.quantize(_Optional().eval(), presets.INT8, [x], x[:1])
    assert isinstance(q, torch.fx.GraphModule)
    assert any(type(m).__name__ == "QuantAdd" for m in q.modules())
    assert q(x).shape == (8, 4)
    assert torch.equal(q(x, mask=None), q(x))  # called by name as the model is
    # the traced graph holds the default's branch, and says how to get the other
    for call in ({"mask": torch.ones(8, 8, 6, 6)}, {"return_features": True}):
        name = next(iter(call))
        with pytest.raises(AssertionError, match=f"{name} was traced at its default .*give "
                                                 f"{name} in the example inputs"):
            q(x, **call)


def test_an_example_forward_cannot_take_is_named():
    """An (x, y) batch given as the example traced (the graph ignored y) and then
    failed with a bare 'forward() takes 2 positional arguments but 3 were given'."""
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"2 tensors, but Sequential.forward takes \(input\)"
                                         r".*not \(x, y\)"):
        quantaware.prepare(nn.Sequential(nn.Linear(4, 2)), presets.INT8, (x[:1], y[:1]))
