"""Range setting as pure functions: from a histogram (activations) or a tensor (weights)
to the float range that gets mapped onto the integer grid.

- :func:`mse_range`: the range minimising the expected squared error of
  quantize-dequantize over a histogram (clipping error plus rounding error), as the
  MSE calibrators of NVIDIA ModelOpt and AIMET do.
- :func:`entropy_range`: TensorRT's KL-divergence calibration (S. Migacz, "8-bit
  Inference with TensorRT", GTC 2017; the same algorithm as MXNet's
  ``_get_optimal_threshold`` and ONNX Runtime's ``EntropyCalibrater``): the
  clipping threshold whose quantized distribution is closest, in KL divergence,
  to the clipped reference distribution.
- :func:`mse_weight_range`: per-channel weight ranges with the least squared
  quantization error (the weight range setting AdaRound starts from, Nagel et
  al. 2020, section 5).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(size=100_000), [40.0]])  # one outlier
    >>> hist, edges = np.histogram(x, bins=2048)
    >>> lo, hi = mse_range(hist, edges[0], edges[-1], -8, 7, symmetric=True)  # 4-bit
    >>> bool(hi < 10.0)
    True
"""

from __future__ import annotations

import numpy as np
import torch

from quantaware.primitives import choose_qparams

__all__ = ["entropy_range", "entropy_threshold", "kl_divergence", "mse_range", "mse_weight_range"]


def _grid_error(centers: np.ndarray, counts: np.ndarray, width: float, lo: np.ndarray,
                hi: np.ndarray, qmin: int, qmax: int, symmetric: bool) -> np.ndarray:
    """Expected squared error of fake-quantizing a histogram, one value per (lo, hi) pair.

    One ``(candidates, bins)`` buffer is reused in place: the caller passes a few
    hundred candidates at a time, so it stays in cache (64 MB temporaries made the
    search memory-bound).
    """
    scale, zp = choose_qparams(torch.from_numpy(lo).float(), torch.from_numpy(hi).float(),
                               qmin, qmax, symmetric)
    s = scale.double().numpy()[:, None]
    z = zp.double().numpy()[:, None]
    q = np.divide(centers[None, :], s)
    np.round(q, out=q)
    q += z
    inside = q >= qmin
    inside &= q <= qmax
    np.clip(q, qmin, qmax, out=q)
    q -= z
    q *= s
    np.subtract(centers[None, :], q, out=q)
    np.square(q, out=q)
    q += width**2 / 12.0
    # Values spread over a bin: if the step is coarser than the bin they all round to
    # the same level (error measured at the centre plus the bin's own variance); if
    # finer, rounding error is uniform over a step (s^2 / 12).
    fine = s[:, 0] < width
    if fine.any():
        inside &= fine[:, None]
        np.copyto(q, np.broadcast_to(s**2 / 12.0, q.shape), where=inside)
    q *= counts[None, :]
    return q.sum(axis=1)


def mse_range(histogram: np.ndarray, hist_min: float, hist_max: float, qmin: int, qmax: int,
              symmetric: bool, candidates: int = 128) -> tuple[float, float]:
    """The ``(lo, hi)`` range with the least expected squared quantization error.

    Candidates shrink the observed range towards zero in ``candidates`` steps: one
    end for one-signed data, both ends together for symmetric formats, a grid over
    both ends for asymmetric formats on signed data.

    Args:
        histogram: counts of ``len(histogram)`` uniform bins over ``[hist_min, hist_max]``.
        qmin, qmax: the integer range.
        symmetric: whether the format is symmetric (zero point in the middle).
        candidates: number of candidate clipping ratios per end.

    Example:
        >>> import numpy as np
        >>> hist = np.ones(100)  # uniform data: no clipping is best
        >>> mse_range(hist, 0.0, 1.0, 0, 255, symmetric=False)
        (0.0, 1.0)
    """
    counts = np.asarray(histogram, dtype=np.float64)
    bins = counts.size
    width = (hist_max - hist_min) / bins
    centers = hist_min + width * (np.arange(bins) + 0.5)
    occupied = counts != 0  # empty bins add exactly 0
    centers, counts = centers[occupied], counts[occupied]
    ratios = np.linspace(1.0 / candidates, 1.0, candidates)
    lo_end, hi_end = min(hist_min, 0.0), max(hist_max, 0.0)
    if symmetric:
        amax = max(-lo_end, hi_end) * ratios
        lo, hi = -amax, amax
    elif lo_end == 0.0 or hi_end == 0.0:
        lo, hi = lo_end * ratios, hi_end * ratios
    else:
        lo = np.repeat(lo_end * ratios, candidates)
        hi = np.tile(hi_end * ratios, candidates)
    chunk = 256
    errors = np.concatenate([
        _grid_error(centers, counts, width, lo[i:i + chunk], hi[i:i + chunk], qmin, qmax,
                    symmetric)
        for i in range(0, lo.size, chunk)
    ])
    best = int(np.argmin(errors))
    return float(max(lo[best], hist_min)), float(min(hi[best], hist_max))


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move ``eps`` of mass onto empty bins so KL stays finite (as TensorRT/MXNet do)."""
    zeros = p == 0
    n_zeros = int(zeros.sum())
    n_nonzeros = p.size - n_zeros
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    return p.astype(np.float64) + eps * zeros - eps1 * ~zeros


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two (unnormalised, smoothed) distributions over the same bins."""
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _abs_histogram(histogram: np.ndarray, hist_min: float,
                   hist_max: float) -> tuple[np.ndarray, float, int]:
    """Fold a histogram onto ``|x|`` with the same number of bins over ``[0, max|x|]``.

    Each bin's count is spread over the ``|x|`` bins it overlaps, in proportion
    (counts uniform within a bin), from the piecewise-linear cumulative count:
    the ``|x|`` bins are narrower than the signed ones, and moving each whole bin
    to one of them left every other ``|x|`` bin empty, a comb the KL search read
    as a much narrower distribution (a threshold 20-40% low on normal data).

    Returns:
        ``(counts, max|x|, zero_bins)``: the leading ``zero_bins`` bins cover the
        signed bin that holds 0, where exact zeros (ReLU-like outputs) pile up.
    """
    counts = np.asarray(histogram, dtype=np.float64)
    bins = counts.size
    if hist_min >= 0.0 and hist_min <= (hist_max - hist_min) / bins:
        return counts, hist_max, 1
    amax = max(abs(hist_min), abs(hist_max))
    edges = np.linspace(hist_min, hist_max, bins + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    t = np.linspace(0.0, amax, bins + 1)
    inside = np.interp(t, edges, cumulative) - np.interp(-t, edges, cumulative)
    folded = np.maximum(np.diff(inside), 0.0)
    zero_bins = 1
    if hist_min < 0.0 < hist_max:
        width = (hist_max - hist_min) / bins
        j = min(int((0.0 - hist_min) // width), bins - 1)
        reach = max(abs(edges[j]), abs(edges[j + 1]))
        zero_bins = min(int(np.ceil(reach / amax * bins)), bins - 1)
    return folded, amax, max(zero_bins, 1)


def entropy_threshold(abs_hist: np.ndarray, num_quantized_bins: int,
                      min_bins: int = 0) -> int:
    """TensorRT's KL search on a histogram of ``|x|``: the number of bins to keep.

    For each candidate ``i`` (``num_quantized_bins`` to all bins), the reference
    ``p`` is the first ``i`` bins with everything beyond folded into bin ``i - 1``;
    ``q`` merges those ``i`` bins into ``num_quantized_bins`` levels and spreads
    each level evenly over its non-empty bins. The ``i`` with least KL(p || q) wins.

    Candidates below ``min_bins`` are not considered (see :func:`entropy_range`).

    Example:
        >>> import numpy as np
        >>> hist = np.exp(-np.arange(2048) / 64.0) * 1e6  # a long exponential tail
        >>> entropy_threshold(hist, 128) < 2048
        True
    """
    hist = np.asarray(abs_hist, dtype=np.float64)
    bins = hist.size
    if bins <= num_quantized_bins:
        return bins
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    best_i, best_kl = bins, np.inf
    for i in range(max(num_quantized_bins, min_bins), bins + 1):
        p = hist[:i].copy()
        p[-1] += suffix[i]
        merged = i // num_quantized_bins
        group = np.minimum(np.arange(i) // merged, num_quantized_bins - 1)
        levels = np.bincount(group, weights=hist[:i], minlength=num_quantized_bins)
        nonzero = p != 0
        norm = np.bincount(group, weights=nonzero, minlength=num_quantized_bins)
        q = np.where(nonzero, levels[group] / np.maximum(norm[group], 1), 0.0)
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None:
            continue
        kl = kl_divergence(ps, qs)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def entropy_range(histogram: np.ndarray, hist_min: float, hist_max: float,
                  levels: int, symmetric: bool = False,
                  max_clipped: float = 0.01) -> tuple[float, float]:
    """TensorRT's KL-divergence range for a histogram over ``[hist_min, hist_max]``.

    The search runs on the histogram of ``|x|`` with the bin(s) holding 0 levelled to
    their neighbour (as TensorRT's calibrator does with its zero bin). An asymmetric
    format gives one-signed data all ``levels`` integer levels over ``[0, t]``; a
    symmetric format (``[-t, t]`` whatever the data) and signed data get half of
    them per side.

    Thresholds that clip more than ``max_clipped`` of the values are not
    considered. KL cannot see clipping: with everything folded into its last bin,
    ``p`` is one spike that ``q`` matches exactly, so on data away from zero (values
    in ``[5, 10]``) the search chose a threshold at the data's minimum and clipped
    nearly all of it. On the distributions KL is meant for, its choice clips far
    less (0.0005%-0.3% on normal, Laplace, Cauchy and ReLU'd data at 4 and 8 bits).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> hist, edges = np.histogram(np.abs(rng.standard_cauchy(50_000)), bins=2048)
        >>> lo, hi = entropy_range(hist, edges[0], edges[-1], 256)
        >>> bool(0.0 <= lo < hi < edges[-1])
        True
    """
    abs_hist, amax, zero_bins = _abs_histogram(histogram, hist_min, hist_max)
    signed = hist_min < 0.0 < hist_max
    beyond = np.concatenate([np.cumsum(abs_hist[::-1])[::-1], [0.0]])  # clipped at i bins
    min_bins = int(np.argmax(beyond <= max_clipped * beyond[0]))
    # The first bin holds the exact zeros of ReLU outputs (often half the mass). Any
    # candidate that merges it with its neighbour smears that spike and scores a
    # huge divergence, so the search would settle on the widest candidate that
    # still keeps one bin per level (clipping ReLU6 outputs to a quarter of their
    # range on MobileNetV2). TensorRT's pytorch-quantization calibrator levels the
    # spike the same way before its search.
    if abs_hist.size > zero_bins:
        abs_hist = abs_hist.copy()
        abs_hist[:zero_bins] = abs_hist[zero_bins]
    kept = entropy_threshold(abs_hist, levels // 2 if signed or symmetric else levels,
                             min_bins)
    threshold = amax * kept / abs_hist.size
    if hist_min >= 0.0:
        return hist_min, min(threshold, hist_max)
    if hist_max <= 0.0:
        return max(-threshold, hist_min), hist_max
    return max(-threshold, hist_min), min(threshold, hist_max)


def mse_weight_range(weight: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                     axis: int | None = 0, candidates: int = 100
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (or per-tensor) ``(lo, hi)`` weight ranges with the least squared error.

    Each candidate shrinks the channel's min-max range by a common ratio; the
    error is measured exactly on the weights (no histogram), all channels and
    ratios at once.

    Example:
        >>> w = torch.randn(4, 64)
        >>> lo, hi = mse_weight_range(w, -7, 7, symmetric=True)
        >>> bool((hi <= w.amax(1)).all())
        True
    """
    w = weight.detach().to(torch.float32)
    if axis is None:
        flat = w.reshape(1, -1)
    else:
        flat = w.transpose(0, axis % w.dim()).reshape(w.shape[axis], -1)
    lo0, hi0 = torch.aminmax(flat, dim=1)
    lo0, hi0 = lo0.clamp(max=0.0), hi0.clamp(min=0.0)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for ratio in torch.linspace(1.0 / candidates, 1.0, candidates):
        lo, hi = lo0 * ratio, hi0 * ratio
        scale, zp = choose_qparams(lo, hi, qmin, qmax, symmetric)
        s, z = scale[:, None], zp[:, None].float()
        xq = (torch.clamp(torch.round(flat / s) + z, qmin, qmax) - z) * s
        err = ((flat - xq) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    if axis is None:
        return best_lo[0], best_hi[0]
    return best_lo, best_hi
