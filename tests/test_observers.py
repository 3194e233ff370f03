"""quantaware.observers: range statistics against reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import quantaware.observers as observers_mod
from quantaware.config import PerChannel, QuantSpec
from quantaware.observers import (
    CalibrationError,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PercentileObserver,
    make_observer,
)
from quantaware.primitives import choose_qparams

pytestmark = pytest.mark.usefixtures("single_thread")


def _batches(seed: int, shape, count: int, spread: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * spread * (i + 1) + i for i in range(count)]


def test_minmax_per_tensor_matches_aminmax():
    obs = MinMaxObserver(qmin=0, qmax=255, symmetric=False)
    batches = _batches(0, (4, 5, 6), 5)
    for b in batches:
        out = obs(b)
        assert out is b
    lo, hi = torch.aminmax(torch.cat([b.flatten() for b in batches]))
    assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi)
    scale, zp = obs.calculate_qparams()
    ref_scale, ref_zp = choose_qparams(lo, hi, 0, 255, symmetric=False)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_minmax_per_channel_matches_aminmax(axis):
    shape = (3, 4, 5)
    channels = shape[axis]
    obs = MinMaxObserver(qmin=-127, qmax=127, symmetric=True, axis=axis, channels=channels)
    batches = _batches(1, shape, 4)
    for b in batches:
        obs(b)
    stacked = torch.stack(batches)  # batch dimension in front
    ax = axis % len(shape) + 1
    flat = stacked.movedim(ax, 0).reshape(channels, -1)
    lo, hi = torch.aminmax(flat, dim=1)
    assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi)
    scale, zp = obs.calculate_qparams()
    assert scale.shape == zp.shape == (channels,)
    torch.testing.assert_close(scale, torch.maximum(-lo, hi) / 127)
    assert torch.equal(zp, torch.zeros(channels, dtype=torch.int32))


def test_per_channel_observer_rejects_wrong_channel_count():
    obs = MinMaxObserver(qmin=-128, qmax=127, symmetric=True, axis=0, channels=4)
    with pytest.raises(CalibrationError, match="4 channels"):
        obs(torch.randn(3, 2))
    with pytest.raises(ValueError, match="channels"):
        MinMaxObserver(qmin=-128, qmax=127, symmetric=True, axis=0)


def test_moving_average_matches_hand_computation():
    c = 0.25
    obs = MovingAverageMinMaxObserver(qmin=0, qmax=255, symmetric=False, averaging_constant=c)
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 6.0]), torch.tensor([0.5, 1.0]),
               torch.tensor([-2.0, 10.0])]
    lo = hi = None
    for b in batches:
        obs(b)
        blo, bhi = float(b.min()), float(b.max())
        if lo is None:
            lo, hi = blo, bhi  # the first batch initialises the average
        else:
            lo, hi = lo + c * (blo - lo), hi + c * (bhi - hi)
        assert float(obs.min_val) == pytest.approx(lo, rel=1e-6)
        assert float(obs.max_val) == pytest.approx(hi, rel=1e-6)
    # hand values: -1 -> -1.5 -> -1.0 -> -1.25 ; 2 -> 3 -> 2.5 -> 4.375
    assert float(obs.min_val) == pytest.approx(-1.25)
    assert float(obs.max_val) == pytest.approx(4.375)


def test_moving_average_per_channel():
    obs = MovingAverageMinMaxObserver(qmin=-128, qmax=127, symmetric=True, axis=1, channels=2,
                                      averaging_constant=0.5)
    obs(torch.tensor([[0.0, -4.0], [1.0, 4.0]]))
    obs(torch.tensor([[-2.0, 0.0], [3.0, 0.0]]))
    assert obs.min_val.tolist() == [-1.0, -2.0]
    assert obs.max_val.tolist() == [2.0, 2.0]


# -- percentile ------------------------------------------------------------------------


@pytest.fixture
def percentile_range(monkeypatch):
    """Capture the (lo, hi) range a PercentileObserver hands to choose_qparams."""
    seen: dict[str, float] = {}

    def spy(lo, hi, *args, **kwargs):
        seen["lo"], seen["hi"] = float(lo), float(hi)
        return choose_qparams(lo, hi, *args, **kwargs)

    monkeypatch.setattr(observers_mod, "choose_qparams", spy)

    def get(obs: PercentileObserver) -> tuple[float, float]:
        seen.clear()
        obs.calculate_qparams()
        return seen["lo"], seen["hi"]

    return get


def _bin_width(obs: PercentileObserver) -> float:
    return float((obs.hist_max - obs.hist_min) / obs.bins)


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_single_batch(percentile, percentile_range):
    gen = torch.Generator().manual_seed(0)
    # dense tails: uniform plus a bump, so neighbouring order statistics are < 1 bin apart
    x = torch.cat([torch.rand(150_000, generator=gen) * 4 - 1,
                   torch.randn(50_000, generator=gen) * 0.3 + 1.0])
    obs = PercentileObserver(qmin=0, qmax=255, symmetric=False, percentile=percentile)
    obs(x)
    lo, hi = percentile_range(obs)
    ref_lo, ref_hi = np.percentile(x.numpy(), [100 - percentile, percentile])
    width = _bin_width(obs)
    assert abs(lo - ref_lo) <= width
    assert abs(hi - ref_hi) <= width
    # the range never leaves [min, max]; at 99.9 and below the cut is inside it
    assert float(x.min()) <= lo and hi <= float(x.max())
    if percentile <= 99.9:
        assert float(x.min()) < lo and hi < float(x.max())


@pytest.mark.parametrize("percentile", [99.0, 99.9])
def test_percentile_matches_numpy_when_later_batches_widen_the_range(percentile,
                                                                     percentile_range):
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.rand(60_000, generator=gen) * 2 - 1,          # [-1, 1]
        torch.rand(60_000, generator=gen) * 6 - 3,          # widens both ends
        torch.rand(60_000, generator=gen) * 2 + 1,          # inside
        torch.rand(60_000, generator=gen) * 9 - 2,          # widens the top to 7
    ]
    obs = PercentileObserver(qmin=0, qmax=255, symmetric=False, percentile=percentile)
    widths = []
    for b in batches:
        obs(b)
        widths.append(_bin_width(obs))
    assert widths[-1] > widths[0]  # the histogram really was re-binned
    allx = torch.cat(batches).numpy()
    lo, hi = percentile_range(obs)
    ref_lo, ref_hi = np.percentile(allx, [100 - percentile, percentile])
    width = widths[-1]
    assert abs(lo - ref_lo) <= width
    assert abs(hi - ref_hi) <= width
    assert float(obs.histogram.sum()) == allx.size


def test_percentile_100_keeps_full_range(percentile_range):
    x = torch.linspace(-2.0, 5.0, 10_001)
    obs = PercentileObserver(qmin=0, qmax=255, symmetric=False, percentile=100.0)
    obs(x)
    lo, hi = percentile_range(obs)
    assert lo == pytest.approx(-2.0, abs=_bin_width(obs))
    assert hi == pytest.approx(5.0, abs=_bin_width(obs))


def test_percentile_clips_outliers(percentile_range):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(100_000, generator=gen)
    x[:3] = torch.tensor([1000.0, -500.0, 800.0])
    obs = PercentileObserver(qmin=0, qmax=255, symmetric=False, percentile=99.9)
    obs(x)
    lo, hi = percentile_range(obs)
    assert -10 < lo < 0 < hi < 10
    minmax = MinMaxObserver(qmin=0, qmax=255, symmetric=False)
    minmax(x)
    assert float(obs.calculate_qparams()[0]) < float(minmax.calculate_qparams()[0]) / 50


def test_percentile_constant_input_gives_valid_qparams():
    obs = PercentileObserver(qmin=0, qmax=255, symmetric=False)
    obs(torch.full((100,), 3.0))
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale) and float(scale) > 0
    assert 0 <= int(zp) <= 255


def test_percentile_is_per_tensor_only():
    with pytest.raises(ValueError, match="per-tensor"):
        PercentileObserver(qmin=0, qmax=255, symmetric=False, axis=0, channels=3)


# -- errors ----------------------------------------------------------------------------


OBSERVER_FACTORIES = {
    "minmax": lambda: MinMaxObserver(qmin=0, qmax=255, symmetric=False),
    "minmax_per_channel": lambda: MinMaxObserver(qmin=-128, qmax=127, symmetric=True, axis=0,
                                                 channels=3),
    "moving_average": lambda: MovingAverageMinMaxObserver(qmin=0, qmax=255, symmetric=False),
    "percentile": lambda: PercentileObserver(qmin=0, qmax=255, symmetric=False),
}


@pytest.mark.parametrize("kind", sorted(OBSERVER_FACTORIES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(kind, bad):
    obs = OBSERVER_FACTORIES[kind]()
    obs(torch.ones(3, 4))
    before = (obs.min_val.clone(), obs.max_val.clone())
    x = torch.randn(3, 4)
    x[1, 2] = bad
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        obs(x)
    # the bad batch left no trace in the statistics
    assert torch.equal(obs.min_val, before[0]) and torch.equal(obs.max_val, before[1])


@pytest.mark.parametrize("kind", sorted(OBSERVER_FACTORIES))
def test_calculate_qparams_before_data_raises(kind):
    obs = OBSERVER_FACTORIES[kind]()
    assert not obs.observed
    with pytest.raises(CalibrationError, match="no data"):
        obs.calculate_qparams()


@pytest.mark.parametrize("kind", sorted(OBSERVER_FACTORIES))
def test_reset_forgets_statistics(kind):
    obs = OBSERVER_FACTORIES[kind]()
    obs(torch.randn(3, 4) * 100)
    assert obs.observed
    obs.reset()
    assert not obs.observed
    with pytest.raises(CalibrationError):
        obs.calculate_qparams()
    obs(torch.full((3, 4), 0.5))
    assert torch.all(obs.max_val == 0.5)


def test_empty_tensor_rejected():
    with pytest.raises(CalibrationError, match="empty"):
        MinMaxObserver(qmin=0, qmax=255, symmetric=False)(torch.empty(0, 3))


def test_make_observer_follows_the_spec():
    obs = make_observer(QuantSpec(observer="moving_average", averaging_constant=0.5))
    assert isinstance(obs, MovingAverageMinMaxObserver) and obs.averaging_constant == 0.5
    obs = make_observer(QuantSpec(observer="percentile", percentile=99.5, signed=False))
    assert isinstance(obs, PercentileObserver) and obs.percentile == 99.5
    assert (obs.qmin, obs.qmax) == (0, 255)
    obs = make_observer(QuantSpec(granularity=PerChannel(1), narrow_range=True), channels=7)
    assert isinstance(obs, MinMaxObserver)
    assert obs.axis == 1 and obs.min_val.shape == (7,) and (obs.qmin, obs.qmax) == (-127, 127)
