"""Histogram observers (percentile, MSE, entropy) against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnxruntime.quantization.calibrate import HistogramCollector

from quantaware.config import ConfigError, PerChannel, QuantSpec
from quantaware.fake_quant import FakeQuantizer
from quantaware.observers import EntropyObserver, MSEObserver, make_observer
from quantaware.ranges import entropy_threshold, mse_weight_range


def _relu_heavy_tail(seed: int, n: int = 60_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_t(3, size=n), 0.0).astype(np.float32)
    x[:3] = [25.0, 30.0, 18.0]  # rare outliers
    return x


def _reference_kl_threshold(hist: np.ndarray, nq: int) -> int:
    """TensorRT's entropy calibration, written out element by element (slow reference)."""
    best, best_kl = len(hist), np.inf
    for i in range(nq, len(hist) + 1):
        p = [float(v) for v in hist[:i]]
        p[-1] += float(sum(hist[i:]))
        merged = i // nq
        q = [0.0] * i
        for k in range(nq):
            start = k * merged
            end = i if k == nq - 1 else start + merged
            total = float(sum(hist[start:end]))
            nonzero = [j for j in range(start, end) if p[j] != 0]
            for j in nonzero:
                q[j] = total / len(nonzero)
        p_arr, q_arr = np.array(p), np.array(q)
        smoothed = []
        for arr in (p_arr, q_arr):
            zeros = arr == 0
            if zeros.all():
                smoothed = None
                break
            eps1 = 1e-4 * zeros.sum() / (~zeros).sum()
            smoothed.append(arr + 1e-4 * zeros - eps1 * ~zeros)
        if smoothed is None:
            continue
        ps, qs = smoothed[0] / smoothed[0].sum(), smoothed[1] / smoothed[1].sum()
        kl = sum(a * np.log(a / b) for a, b in zip(ps, qs, strict=True) if a > 0)
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def test_entropy_threshold_matches_elementwise_reference():
    x = _relu_heavy_tail(0, 20_000)
    hist, _ = np.histogram(x, bins=300, range=(0.0, float(x.max())))
    assert entropy_threshold(hist, 64) == _reference_kl_threshold(hist, 64)


def test_entropy_observer_matches_reference_and_clips_like_onnxruntime():
    """The reference for the threshold is the element-wise TensorRT/MXNet method above.

    ONNX Runtime's EntropyCalibrater differs from it in three details (its expanded
    ``q`` keeps mass on bins where ``p`` is empty, and is truncated to integers; it
    does not level the zero spike), so against it only the qualitative behaviour
    is compared: both clip the sparse tail.
    """
    x = _relu_heavy_tail(1)
    obs = EntropyObserver(qmin=0, qmax=255, symmetric=False)
    obs(torch.from_numpy(x))
    lo, hi = obs.chosen_range()
    # ONNX Runtime histograms [-max|x|, max|x|]; its window is split into
    # num_quantized_bins levels, so 512 gives 256 levels on the positive half.
    collector = HistogramCollector("entropy", symmetric=False, num_bins=1024,
                                   num_quantized_bins=512, percentile=99.99, scenario="same")
    collector.collect({"t": [x]})
    ort_lo, ort_hi = collector.compute_collection_result()["t"][:2]
    assert float(lo) == 0.0 == float(ort_lo)
    hist = obs.histogram.numpy()
    merged = (hist[::8] + hist[1::8] + hist[2::8] + hist[3::8] + hist[4::8] + hist[5::8]
              + hist[6::8] + hist[7::8])
    merged[0] = merged[1]  # the zero spike levelled, as TensorRT's calibrator does
    kept = _reference_kl_threshold(merged, 32)
    coarse = EntropyObserver(qmin=0, qmax=31, symmetric=False, bins=256)
    coarse(torch.from_numpy(x))
    assert float(coarse.chosen_range()[1]) == pytest.approx(float(x.max()) * kept / 256)
    # Both clip the sparse tail: the largest values (up to 30.7) lie outside the range.
    assert float(hi) < 0.7 * float(x.max()) and float(ort_hi) < 0.7 * float(x.max())
    assert float((x > float(hi)).mean()) < 1e-3


def test_entropy_range_is_not_pinned_by_the_zero_spike_of_relu_outputs():
    """Half the values of a ReLU6 output are exact zeros; the range must follow the
    distribution's tail, not the spike (which would clip at about a quarter)."""
    rng = np.random.default_rng(3)
    x = np.clip(rng.normal(0.0, 1.5, 200_000), 0.0, 6.0).astype(np.float32)
    obs = EntropyObserver(qmin=0, qmax=255, symmetric=False)
    obs(torch.from_numpy(x))
    hi = float(obs.chosen_range()[1])
    assert 3.0 < hi <= 6.0
    # Less than 0.5 % of the values are clipped.
    assert float((x > hi).mean()) < 0.005


@pytest.mark.parametrize(("name", "zeros"), [("normal", 0), ("student_t3", 0),
                                           ("normal", 100_000)])
def test_signed_histogram_folds_onto_the_histogram_of_abs_x(name, zeros):
    """Entropy calibration of signed data searches a histogram of |x| folded from the
    observer's one over [min, max]: it must be close to the histogram of |x| itself
    (moving whole bins into the narrower |x| bins left every other one empty, 18-26%
    of the mass misplaced, and the threshold 20-40% low), also with exact zeros."""
    from quantaware.ranges import _abs_histogram

    rng = np.random.default_rng(4)
    x = (rng.standard_normal(200_000) if name == "normal"
         else rng.standard_t(3, size=200_000))
    x = np.concatenate([np.zeros(zeros), x]).astype(np.float32)
    obs = EntropyObserver(qmin=-128, qmax=127, symmetric=True)
    obs(torch.from_numpy(x))
    folded, amax, zero_bins = _abs_histogram(obs.histogram.numpy(), float(obs.hist_min),
                                             float(obs.hist_max))
    want, _ = np.histogram(np.abs(x), bins=folded.size, range=(0.0, amax))
    assert folded.sum() == pytest.approx(x.size)
    assert 1 <= zero_bins <= 3
    misplaced = np.abs(folded - want)[zero_bins:].sum() / x.size
    assert misplaced < 0.08, misplaced


def test_percentile_observer_close_to_onnxruntime():
    x = _relu_heavy_tail(2)
    spec = QuantSpec(bits=8, signed=False, symmetric=False, observer="percentile",
                     percentile=99.9)
    obs = make_observer(spec)
    obs(torch.from_numpy(x))
    hi = float(obs.chosen_range()[1])
    # ONNX Runtime cuts (100 - p) / 2 percent on each side, quantaware (100 - p).
    collector = HistogramCollector("percentile", symmetric=False, num_bins=2048,
                                   num_quantized_bins=128, percentile=99.8, scenario="same")
    collector.collect({"t": [x]})
    ort_hi = float(collector.compute_collection_result()["t"][1])
    assert hi == pytest.approx(ort_hi, rel=0.05)
    assert hi == pytest.approx(float(np.percentile(x, 99.9)), rel=0.05)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_observer_near_best_raw_mse(bits):
    x = _relu_heavy_tail(3)
    qmax = 2**bits - 1
    obs = MSEObserver(qmin=0, qmax=qmax, symmetric=False)
    for chunk in np.array_split(x, 3):  # several batches, with rebinning
        obs(torch.from_numpy(chunk))
    scale, zp = obs.calculate_qparams()
    xt = torch.from_numpy(x).double()

    def raw_mse(s: float) -> float:
        xq = torch.clamp(torch.round(xt / s), 0, qmax) * s
        return float(((xt - xq) ** 2).mean())

    grid = float(x.max()) / qmax * np.linspace(0.01, 1.0, 200)
    best = min(raw_mse(s) for s in grid)
    assert raw_mse(float(scale)) <= best * 1.03
    assert int(zp) == 0


def test_mse_weight_range_beats_minmax_at_4_bits():
    torch.manual_seed(0)
    w = torch.randn(16, 200) * torch.rand(16, 1)
    lo, hi = mse_weight_range(w, -7, 7, symmetric=True)
    amax = torch.maximum(-lo, hi)
    mse_scale, mm_scale = amax / 7, w.abs().amax(1) / 7

    def err(s: torch.Tensor) -> torch.Tensor:
        return ((w - torch.clamp(torch.round(w / s[:, None]), -7, 7) * s[:, None]) ** 2).sum(1)

    assert (err(mse_scale) <= err(mm_scale) + 1e-6).all()
    assert err(mse_scale).sum() < err(mm_scale).sum()


def test_histogram_observers_are_per_tensor_only():
    with pytest.raises(ConfigError, match="per-tensor only"):
        QuantSpec(observer="entropy", granularity=PerChannel(0))


def test_weight_quantizer_uses_loaded_qparams_until_released():
    spec = QuantSpec(bits=4, narrow_range=True, granularity=PerChannel(0))
    fq = FakeQuantizer(spec, channels=2, from_tensor=True)
    w = torch.tensor([[1.0, -0.5], [0.2, 0.1]])
    minmax = fq(w)
    fq.load_qparams(torch.tensor([0.5, 0.5]), torch.zeros(2, dtype=torch.int32))
    assert torch.equal(fq(w), torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
    fq.follow_tensor()
    assert torch.equal(fq(w), minmax)


@pytest.mark.parametrize(("lo", "hi"), [(5.0, 10.0), (1.0, 2.0), (-2.0, -1.0)])
def test_entropy_range_does_not_clip_data_away_from_zero(lo, hi):
    """KL cannot see clipping: on values in [5, 10] every threshold at or below 5
    folds all of them into one bin that q matches exactly, and the search chose 5.005
    (99.9% of the values clipped; a Linear fed [1, 2] had 70x the error of min-max)."""
    x = np.random.default_rng(0).uniform(lo, hi, 100_000).astype(np.float32)
    obs = EntropyObserver(qmin=0, qmax=255, symmetric=False)
    obs(torch.from_numpy(x))
    chosen_lo, chosen_hi = (float(v) for v in obs.chosen_range())
    assert float(((x < chosen_lo) | (x > chosen_hi)).mean()) <= 0.01


def test_entropy_range_counts_the_levels_a_symmetric_format_has_on_one_side():
    """A symmetric int8 format spans [-t, t]: ReLU'd data gets its 128 positive levels,
    not 256. The search must be the asymmetric one with half the levels."""
    x = np.maximum(np.random.default_rng(4).laplace(size=200_000), 0.0).astype(np.float32)
    symmetric = EntropyObserver(qmin=-128, qmax=127, symmetric=True)
    half = EntropyObserver(qmin=0, qmax=127, symmetric=False)
    full = EntropyObserver(qmin=0, qmax=255, symmetric=False)
    for obs in (symmetric, half, full):
        obs(torch.from_numpy(x))
    assert float(symmetric.chosen_range()[1]) == float(half.chosen_range()[1])
    assert float(symmetric.chosen_range()[1]) != float(full.chosen_range()[1])


@pytest.mark.parametrize("observer", ["mse", "entropy"])
def test_costly_ranges_are_refreshed_every_few_training_steps(monkeypatch, observer):
    """Quantizing with observers on (QAT straight after prepare), the MSE or KL search
    (about a second per quantizer) ran at every step: training 50-100x slower. It
    runs after batches 1, 2, 4, ... and every 64th; calibration's result is the
    search over everything seen."""
    q = FakeQuantizer(QuantSpec(observer=observer))
    q.observe_and_quantize()
    calls = []
    search = type(q.observer).chosen_range
    monkeypatch.setattr(type(q.observer), "chosen_range",
                        lambda self: calls.append(self.batches) or search(self))
    gen = torch.Generator().manual_seed(0)
    for _ in range(130):
        q(torch.randn(256, generator=gen) * 3)
    assert calls == [1, 2, 4, 8, 16, 32, 64, 128]
    calls.clear()
    scale, _ = q.observer.calculate_qparams()  # what calibrate computes at the end
    assert calls == [130] and float(scale) > 0


def test_histogram_counts_as_torch_histc():
    """The observers count with bincount (histc's CPU loop was a third of a
    percentile calibration); the bins must be histc's, edges included."""
    from quantaware.observers import _histogram

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(20_000, generator=gen) * float(torch.rand(1, generator=gen) * 10)
        lo = torch.tensor(float(x.min()) - float(torch.rand(1, generator=gen)))
        hi = torch.tensor(float(x.max()) + float(torch.rand(1, generator=gen)))
        for low, high in ((lo, hi), (x.min(), x.max())):
            assert torch.equal(_histogram(x, 2048, low, high),
                               torch.histc(x, 2048, float(low), float(high)).double())
