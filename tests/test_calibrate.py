"""quantaware.calibrate / quantize: data handling and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.calibrate import CalibrationError
from quantaware.fake_quant import FakeQuantizer
from quantaware.prepare import quantizers

pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _prepared() -> nn.Module:
    return quantaware.prepare(_mlp(), presets.INT8, torch.zeros(1, 4))


def _static(model: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    return [(n, q) for n, q in quantizers(model) if q.observer is not None]


def _qparams(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (q.scale.clone(), q.zero_point.clone()) for n, q in _static(model)}


def _data(count: int = 4, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=gen) * scale for _ in range(count)]


def test_calibrate_freezes_every_static_quantizer():
    model = _prepared()
    assert not any(bool(q.calibrated) for _, q in _static(model))
    out = quantaware.calibrate(model, _data())
    assert out is model
    static = _static(model)
    assert len(static) == 3  # input, hidden, output
    for _, q in static:
        assert bool(q.calibrated) and bool(q.fake_quant_enabled)
        assert not bool(q.observer_enabled)
    # the input quantizer's range is the data's range (widened to include 0)
    data = torch.cat(_data())
    q_in = model.get_submodule("0").input_quantizer
    lo, hi = float(data.min()), float(data.max())
    assert float(q_in.scale) == pytest.approx((hi - lo) / 255, rel=1e-5)


def test_calibrate_restores_training_mode():
    model = _prepared().train()
    quantaware.calibrate(model, _data(1))
    assert model.training
    model.eval()
    quantaware.calibrate(model, _data(1))
    assert not model.training


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_calibration_data_raises(bad):
    data = _data(4)
    data[2] = data[2].clone()
    data[2][3, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf") as info:
        quantaware.calibrate(_prepared(), data)
    assert "calibration batch 2" in str(info.value)
    assert "1 NaN/Inf" in str(info.value)


def test_non_finite_calibration_data_raises_calibration_error():
    data = _data(2)
    data[1] = data[1].clone()
    data[1][0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="calibration batch 1"):
        quantaware.calibrate(_prepared(), data)


def test_non_finite_in_tuple_batch_raises():
    x, y = _data(1)[0], torch.zeros(8)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 0 contains 1 NaN/Inf"):
        quantaware.calibrate(_prepared(), [(x, y)])


def test_non_finite_activations_inside_the_model_raise_calibration_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite weights, infinite activations
    prepared = quantaware.prepare(model, presets.INT8, torch.zeros(1, 4))
    with pytest.raises(CalibrationError, match=r"calibration batch 0: .*NaN/Inf"):
        quantaware.calibrate(prepared, [torch.ones(2, 4)])


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_empty_calibration_data_raises(empty):
    with pytest.raises(CalibrationError, match="empty"):
        quantaware.calibrate(_prepared(), empty)


def test_empty_dataloader_raises():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 4)),
                                         batch_size=4)
    with pytest.raises(CalibrationError, match="empty"):
        quantaware.calibrate(_prepared(), loader)


def test_tuple_batches_use_the_first_element():
    data = _data()
    labels = [torch.randint(0, 3, (8,)) for _ in data]
    ref = _prepared()
    quantaware.calibrate(ref, data)
    with_labels = _prepared()
    quantaware.calibrate(with_labels, list(zip(data, labels, strict=True)))
    as_lists = _prepared()
    quantaware.calibrate(as_lists, [[x, y] for x, y in zip(data, labels, strict=True)])
    for model in (with_labels, as_lists):
        for name, (scale, zp) in _qparams(ref).items():
            assert torch.equal(_qparams(model)[name][0], scale)
            assert torch.equal(_qparams(model)[name][1], zp)


def test_dataloader_of_pairs():
    data = torch.cat(_data())
    dataset = torch.utils.data.TensorDataset(data, torch.zeros(len(data), dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    model = quantaware.calibrate(_prepared(), loader)
    ref = quantaware.calibrate(_prepared(), _data())
    assert torch.equal(model.get_submodule("0").input_quantizer.scale,
                       ref.get_submodule("0").input_quantizer.scale)


class KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x, extra):
        return self.a(x) + self.b(extra)


def test_dict_batches_are_keyword_inputs():
    torch.manual_seed(0)
    model = quantaware.prepare(KeywordModel(), presets.INT8, (torch.zeros(1, 4), torch.zeros(1, 2)))
    gen = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(5, 4, generator=gen),
                "extra": torch.randn(5, 2, generator=gen) * 7} for _ in range(3)]
    quantaware.calibrate(model, batches)
    extra_q = model.get_submodule("b").input_quantizer
    extra = torch.cat([b["extra"] for b in batches])
    assert float(extra_q.scale) == pytest.approx(
        (float(extra.max()) - float(extra.min())) / 255, rel=1e-5)
    out = model(**batches[0])
    assert out.shape == (5, 3)


class PositionalModel(KeywordModel):
    pass


def test_positional_inputs_in_the_first_place_of_a_batch():
    torch.manual_seed(0)
    example = (torch.zeros(1, 4), torch.zeros(1, 2))
    gen = torch.Generator().manual_seed(0)
    batches = [((torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen) * 7),
                torch.zeros(5)) for _ in range(3)]
    model = quantaware.calibrate(quantaware.prepare(PositionalModel(), presets.INT8, example),
                                 batches)
    extra = torch.cat([b[0][1] for b in batches])
    assert float(model.get_submodule("b").input_quantizer.scale) == pytest.approx(
        (float(extra.max()) - float(extra.min())) / 255, rel=1e-5)


def test_inputs_given_as_input_and_label_get_a_hint():
    """``(x, extra)`` is an input and its label; the model's missing argument is
    reported with the batch convention."""
    model = quantaware.prepare(PositionalModel(), presets.INT8,
                               (torch.zeros(1, 4), torch.zeros(1, 2)))
    with pytest.raises(TypeError, match=r"missing 1 required.*\(\(x1, x2\), y\)"):
        quantaware.calibrate(model, [(torch.zeros(5, 4), torch.zeros(5, 2))])


def test_numpy_batches_are_accepted():
    data = _data()
    ref = quantaware.calibrate(_prepared(), data)
    model = quantaware.calibrate(_prepared(), [x.numpy() for x in data])
    assert torch.equal(model.get_submodule("0").input_quantizer.scale,
                       ref.get_submodule("0").input_quantizer.scale)


def test_unsupported_batch_type_raises():
    with pytest.raises(TypeError, match="batch of type str"):
        quantaware.calibrate(_prepared(), ["not a tensor"])


def test_num_batches_limits_the_batches():
    data = [*_data(3), torch.full((8, 4), 1000.0)]  # a 4th batch with a huge range
    model = quantaware.calibrate(_prepared(), data, num_batches=3)
    q_in = model.get_submodule("0").input_quantizer
    assert float(q_in.scale) < 1.0
    first3 = torch.cat(data[:3])
    assert float(q_in.scale) == pytest.approx(
        (float(first3.max()) - float(first3.min())) / 255, rel=1e-5)
    everything = quantaware.calibrate(_prepared(), data)
    assert float(everything.get_submodule("0").input_quantizer.scale) > 1.0


def test_num_batches_stops_consuming_the_iterator():
    consumed = []

    def stream():
        for i, x in enumerate(_data(10)):
            consumed.append(i)
            yield x

    quantaware.calibrate(_prepared(), stream(), num_batches=2)
    assert len(consumed) <= 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_num_batches_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="num_batches"):
        quantaware.calibrate(_prepared(), _data(), num_batches=bad)


def test_calibrating_twice_gives_the_same_qparams():
    model = _prepared()
    quantaware.calibrate(model, _data())
    first = _qparams(model)
    quantaware.calibrate(model, _data())
    second = _qparams(model)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name][0], second[name][0]), name
        assert torch.equal(first[name][1], second[name][1]), name


def test_recalibration_starts_from_scratch():
    model = _prepared()
    quantaware.calibrate(model, _data(scale=100.0))
    wide = float(model.get_submodule("0").input_quantizer.scale)
    quantaware.calibrate(model, _data(scale=1.0))
    narrow = float(model.get_submodule("0").input_quantizer.scale)
    assert narrow < wide / 50
    fresh = quantaware.calibrate(_prepared(), _data(scale=1.0))
    assert narrow == float(fresh.get_submodule("0").input_quantizer.scale)


def test_layer_never_reached_is_reported():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    model = quantaware.prepare(Partial(), presets.INT8, torch.zeros(1, 4))
    model.unused = quantaware.nn.QuantLinear.from_float(
        nn.Linear(4, 2), presets.INT8.weight, presets.INT8.activation)
    with pytest.raises(CalibrationError, match="unused"):
        quantaware.calibrate(model, _data(2))


def test_model_without_static_quantizers_is_returned_unchanged():
    model = quantaware.prepare(_mlp(), presets.W8, torch.zeros(1, 4))
    assert quantaware.calibrate(model, []) is model  # nothing to calibrate, no error


def test_quantize_is_prepare_then_calibrate():
    data = _data()
    one_call = quantaware.quantize(_mlp(), presets.INT8, data, torch.zeros(1, 4))
    two_calls = quantaware.calibrate(_prepared(), data)
    x = torch.randn(6, 4)
    assert torch.equal(one_call(x), two_calls(x))
    partial = quantaware.quantize(_mlp(), presets.INT8, data, torch.zeros(1, 4), num_batches=1)
    assert not torch.equal(_qparams(partial)["0.input_quantizer"][0],
                           _qparams(one_call)["0.input_quantizer"][0])


def test_calibrated_qparams_stay_fixed_afterwards():
    model = quantaware.quantize(_mlp(), presets.INT8, _data(), torch.zeros(1, 4))
    before = _qparams(model)
    x = torch.randn(6, 4) * 100  # far outside the calibrated range: saturates
    y1 = model(x)
    after = _qparams(model)
    for name in before:
        assert torch.equal(before[name][0], after[name][0]), name
    assert torch.equal(model(x), y1)


def test_num_batches_takes_no_batch_past_the_last_one_used():
    """An iterator gave up one batch more than num_batches (lost to its next reader)."""
    pulled = []

    def stream():
        for i in range(10):
            pulled.append(i)
            yield torch.randn(8, 4)

    q = quantaware.prepare(nn.Sequential(nn.Linear(4, 2)), presets.INT8, torch.randn(1, 4))
    batches = stream()
    quantaware.calibrate(q, batches, num_batches=2)
    assert pulled == [0, 1] and len(list(batches)) == 8


def test_each_module_gets_its_own_mode_back():
    """A train-mode model with a module kept in eval mode came back all in train."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    q = quantaware.prepare(net, presets.INT8, torch.randn(1, 4))
    q.train()
    kept = [m for m in q.modules() if isinstance(m, nn.Dropout)]
    assert kept
    for m in kept:
        m.eval()
    quantaware.calibrate(q, [torch.randn(8, 4)])
    assert q.training and all(not m.training for m in kept)


def test_a_model_that_was_never_prepared_is_refused():
    """calibrate(float_model) gave the float model back, with an INFO line only."""
    with pytest.raises(ValueError, match=r"needs a prepared model.*quantaware.prepare"):
        quantaware.calibrate(nn.Linear(4, 2), [torch.randn(8, 4)])


def test_data_of_another_float_type_than_the_weights_is_named():
    """float64 NumPy data failed inside the first layer: 'mat1 and mat2 must have the
    same dtype, but got Double and Float'."""
    q = quantaware.prepare(nn.Sequential(nn.Linear(4, 2)), presets.INT8, torch.randn(1, 4))
    with pytest.raises(CalibrationError, match=r"batch 0 failed \(the data is float64.*"
                                               r"x.to\(torch.float32\)"):
        quantaware.calibrate(q, [torch.randn(8, 4, dtype=torch.float64)])
