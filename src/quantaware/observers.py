"""Observers: collect statistics of a tensor and turn them into scale and zero point.

The contract (as in ``torch.ao.quantization``): ``forward(x)`` records statistics
and returns ``x`` unchanged; ``calculate_qparams()`` returns ``(scale, zero_point)``.
Observers refuse NaN/Inf (a silently infinite range ruins every scale after it)
and refuse to produce qparams before they have seen data.

- :class:`MinMaxObserver`: running min and max (per tensor or per channel).
- :class:`MovingAverageMinMaxObserver`: exponential moving average of batch
  min/max, ``avg = avg + c * (batch - avg)`` (Jacob et al. 2018), for QAT.
- :class:`PercentileObserver`: histogram of values; range cut at a percentile of
  the distribution at each end (clips rare outliers).
- :class:`MSEObserver`: histogram; the range with the least expected squared
  quantization error (clipping plus rounding).
- :class:`EntropyObserver`: histogram; TensorRT's KL-divergence threshold
  (Migacz, "8-bit Inference with TensorRT", GTC 2017).

Under ``torch.distributed`` an observer with ``sync_across_ranks = True`` (set by
:func:`quantaware.distributed.sync_observers`) all-reduces every batch's min/max
(and histogram counts) over the ranks before updating, so all ranks hold
bit-identical statistics, as if one process had seen every rank's batch.

Example:
    >>> import torch
    >>> obs = MinMaxObserver(qmin=0, qmax=255, symmetric=False)
    >>> _ = obs(torch.tensor([0.0, 1.0, 2.55]))
    >>> scale, zero_point = obs.calculate_qparams()
    >>> round(float(scale), 4), int(zero_point)
    (0.01, 0)
"""

from __future__ import annotations

import torch
from torch import nn

from quantaware.config import QuantSpec
from quantaware.primitives import all_finite, choose_qparams

__all__ = [
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]


class CalibrationError(ValueError):
    """Calibration data or state is unusable; the message says why and what to do."""


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise CalibrationError(
            f"found {bad} NaN/Inf value(s) in a tensor being observed (shape "
            f"{tuple(x.shape)}); clean the calibration data or the model producing them"
        )


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


def _histogram(x: torch.Tensor, bins: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``torch.histc(x, bins, lo, hi)`` (float64) for float32 ``x`` within ``[lo, hi]``:
    the same float32 bin arithmetic (``(x - lo) * bins / (hi - lo)`` truncated, ``hi``
    in the last bin), counted with ``bincount``, about 3x faster than ``histc``'s
    loop on CPU."""
    lo32, hi32 = lo.to(torch.float32), hi.to(torch.float32)
    index = torch.sub(x, lo32).mul_(bins).div_(hi32 - lo32).to(torch.int32).clamp_(0, bins - 1)
    return torch.bincount(index.reshape(-1), minlength=bins).to(torch.float64)


class Observer(nn.Module):
    """Base class: range buffers ``min_val``/``max_val`` and qparams from them.

    Args:
        qmin, qmax: the integer range.
        symmetric: symmetric range around zero.
        axis: channel axis for per-channel statistics, ``None`` for per-tensor.
        channels: number of channels (required with ``axis``).
    """

    def __init__(
        self,
        qmin: int,
        qmax: int,
        symmetric: bool,
        axis: int | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if axis is not None and not channels:
            raise ValueError("a per-channel observer needs the number of channels")
        self.qmin, self.qmax, self.symmetric, self.axis = qmin, qmax, symmetric, axis
        shape = (channels,) if axis is not None else ()
        self.sync_across_ranks = False
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))

    def _batch_min_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.numel() == 0:
            raise CalibrationError(f"cannot observe an empty tensor of shape {tuple(x.shape)}")
        x = x.detach().to(torch.float32)
        if self.axis is None:
            lo, hi = torch.aminmax(x)
        else:
            axis = self.axis % x.dim()
            if x.shape[axis] != self.min_val.numel():
                raise CalibrationError(
                    f"per-channel observer expects {self.min_val.numel()} channels on axis "
                    f"{self.axis}, got shape {tuple(x.shape)}"
                )
            lo, hi = torch.aminmax(x.transpose(0, axis).reshape(x.shape[axis], -1), dim=1)
        # NaN and Inf reach the minimum or maximum: checking those is checking x,
        # without another pass over it.
        if not all_finite(lo, hi):
            _check_finite(x)
        if self.sync_across_ranks:
            lo, hi = _all_reduce(lo, "MIN"), _all_reduce(hi, "MAX")
        return lo, hi

    def reset(self) -> None:
        """Forget all statistics."""
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    @property
    def observed(self) -> bool:
        return all_finite(self.min_val)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the range seen so far."""
        if not self.observed:
            raise CalibrationError(
                "this observer has seen no data; run calibration (quantaware.calibrate) "
                "with at least one batch before computing scales"
            )
        return choose_qparams(self.min_val, self.max_val, self.qmin, self.qmax, self.symmetric)

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.axis is None else f"axis={self.axis}"
        return f"qmin={self.qmin}, qmax={self.qmax}, symmetric={self.symmetric}, {axis}"


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything observed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._batch_min_max(x)
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)
        return x


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max."""

    def __init__(self, *args, averaging_constant: float = 0.01, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.averaging_constant = averaging_constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._batch_min_max(x)
        if not self.observed:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            c = self.averaging_constant
            self.min_val.add_(c * (lo - self.min_val))
            self.max_val.add_(c * (hi - self.max_val))
        return x


class HistogramObserver(Observer):
    """Per-tensor histogram of the observed values; subclasses choose the range from it.

    The histogram has ``bins`` uniform bins over the largest range seen; when a
    batch widens the range, existing counts are moved into the wider bins.

    Subclasses whose range search is costly (``costly_range``: MSE, entropy, about a
    second per quantizer) are not searched again at every training step while
    quantizing with observers on (QAT straight after ``prepare``): the range is
    refreshed after batches 1, 2, 4, ..., 64 and then every 64 batches
    (:meth:`range_due`). :func:`quantaware.calibrate` always searches the whole
    histogram at the end.
    """

    costly_range = False
    REFRESH_EVERY = 64

    def __init__(self, *args, bins: int = 2048, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.axis is not None:
            raise ValueError(f"{type(self).__name__} is per-tensor only")
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("hist_min", torch.tensor(0.0))
        self.register_buffer("hist_max", torch.tensor(0.0))
        self.batches = 0  # batches observed since construction or reset (not saved)

    def range_due(self) -> bool:
        """Whether a training step should search the range again (always, unless the
        search is costly; then after batches 1, 2, 4, ... and every 64th)."""
        n = self.batches
        return not self.costly_range or n & (n - 1) == 0 or n % self.REFRESH_EVERY == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        lo, hi = self._batch_min_max(x)
        new_min = torch.minimum(lo, self.min_val) if self.observed else lo
        new_max = torch.maximum(hi, self.max_val) if self.observed else hi
        if new_max <= new_min:
            new_max = new_min + 1e-6
        if self.observed:
            self._rebin(new_min, new_max)
        else:
            self.hist_min.copy_(new_min)
            self.hist_max.copy_(new_max)
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))
        counts = _histogram(x.detach().float(), self.bins, self.hist_min, self.hist_max)
        if self.sync_across_ranks:  # the range is already common to all ranks
            counts = _all_reduce(counts, "SUM")
        self.histogram.add_(counts)
        return x

    def reset(self) -> None:
        super().reset()
        self.histogram.zero_()
        self.batches = 0

    def _rebin(self, new_min: torch.Tensor, new_max: torch.Tensor) -> None:
        if new_min >= self.hist_min and new_max <= self.hist_max:
            return
        old_width = (self.hist_max - self.hist_min) / self.bins
        centers = self.hist_min + old_width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)
        new_width = (new_max - new_min) / self.bins
        idx = ((centers - new_min) / new_width).floor().clamp(0, self.bins - 1).long()
        rebinned = torch.zeros_like(self.histogram).index_add_(0, idx, self.histogram)
        self.histogram.copy_(rebinned)
        self.hist_min.copy_(new_min)
        self.hist_max.copy_(new_max)

    def bin_edges(self) -> torch.Tensor:
        """The ``bins + 1`` histogram edges (float64)."""
        return torch.linspace(float(self.hist_min), float(self.hist_max), self.bins + 1,
                              dtype=torch.float64)

    def chosen_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(lo, hi)`` float range this observer maps onto the integer grid."""
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.observed:
            return super().calculate_qparams()
        lo, hi = self.chosen_range()
        lo = torch.maximum(torch.as_tensor(lo, dtype=torch.float64), self.min_val.double())
        hi = torch.minimum(torch.as_tensor(hi, dtype=torch.float64), self.max_val.double())
        return choose_qparams(lo.float(), hi.float(), self.qmin, self.qmax, self.symmetric)


class PercentileObserver(HistogramObserver):
    """Histogram; the range is cut at ``percentile`` on each side."""

    def __init__(self, *args, percentile: float = 99.99, bins: int = 2048, **kwargs) -> None:
        super().__init__(*args, bins=bins, **kwargs)
        self.percentile = percentile

    def chosen_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        cdf = torch.cumsum(self.histogram, 0)
        total = cdf[-1]
        width = (self.hist_max - self.hist_min) / self.bins
        tail = total * (1.0 - self.percentile / 100.0)
        lo_bin = int(torch.searchsorted(cdf, tail, right=True).clamp(max=self.bins - 1))
        hi_bin = int(torch.searchsorted(cdf, total - tail, right=False).clamp(max=self.bins - 1))
        return self.hist_min + width * lo_bin, self.hist_min + width * (hi_bin + 1)


class MSEObserver(HistogramObserver):
    """Histogram; the range minimising the expected squared quantization error.

    See :func:`quantaware.ranges.mse_range` for the search.
    """

    costly_range = True

    def chosen_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        from quantaware.ranges import mse_range

        lo, hi = mse_range(self.histogram.numpy(), float(self.hist_min), float(self.hist_max),
                           self.qmin, self.qmax, self.symmetric)
        return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)


class EntropyObserver(HistogramObserver):
    """Histogram; the clipping threshold minimising the KL divergence between the
    clipped and the quantized distribution (TensorRT's calibrator, Migacz 2017).

    See :func:`quantaware.ranges.entropy_range`.
    """

    costly_range = True

    def chosen_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        from quantaware.ranges import entropy_range

        lo, hi = entropy_range(self.histogram.numpy(), float(self.hist_min),
                               float(self.hist_max), self.qmax - self.qmin + 1,
                               symmetric=self.symmetric)
        return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)


def make_observer(spec: QuantSpec, channels: int | None = None) -> Observer:
    """Build the observer a :class:`QuantSpec` asks for.

    Example:
        >>> from quantaware.config import QuantSpec, PerChannel
        >>> make_observer(QuantSpec(granularity=PerChannel(0)), channels=4).min_val.shape
        torch.Size([4])
    """
    qmin, qmax = spec.quant_range
    axis = getattr(spec.granularity, "axis", None)
    common = {"qmin": qmin, "qmax": qmax, "symmetric": spec.symmetric, "axis": axis,
              "channels": channels}
    if spec.observer == "minmax":
        return MinMaxObserver(**common)
    if spec.observer == "moving_average":
        return MovingAverageMinMaxObserver(**common, averaging_constant=spec.averaging_constant)
    if spec.observer == "percentile":
        return PercentileObserver(**common, percentile=spec.percentile)
    if spec.observer == "mse":
        return MSEObserver(**common)
    if spec.observer == "entropy":
        return EntropyObserver(**common)
    raise ValueError(f"unknown observer {spec.observer!r}")
