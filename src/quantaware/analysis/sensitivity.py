"""Per-layer sensitivity: what each layer's quantization costs.

Two views, both on a calibrated model, by switching quantizers on and off (no
re-preparation): *only this layer quantized* (everything else float) shows the
error the layer introduces on its own; *only this layer float* (everything else
quantized) shows what keeping it in float would win back. Each reports the
metric drop against the float model and the output SQNR.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantaware.analysis.metrics import Outputs, agreement, outputs, sqnr_db
from quantaware.fake_quant import FakeQuantizer
from quantaware.nn.base import QuantMixin

__all__ = ["LayerSensitivity", "layer_quantizers", "sensitivity"]

log = logging.getLogger(__name__)

Metric = Callable[[Outputs, Outputs], float]


@dataclass(frozen=True)
class LayerSensitivity:
    """Sensitivity of one layer (drops in metric points, SQNR in dB)."""

    name: str
    params: int
    only_quantized_drop: float
    only_quantized_sqnr: float
    only_float_drop: float
    only_float_sqnr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_quantizers(model: nn.Module) -> dict[str, list[FakeQuantizer]]:
    """Per quantized module, the quantizers it owns (weight, inputs, output)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantMixin):
            owned = [q for q in module.modules() if isinstance(q, FakeQuantizer)]
            if owned:
                out[name] = owned
    return out


@contextlib.contextmanager
def _only(model: nn.Module, enabled: set[int] | None, disabled: set[int]) -> Iterator[None]:
    """Switch fake quantization off for quantizers not in ``enabled`` / in ``disabled``."""
    saved = []
    for q in model.modules():
        if not isinstance(q, FakeQuantizer):
            continue
        saved.append((q, q.fake_quant_enabled.clone(), q.observer_enabled.clone()))
        if (enabled is not None and id(q) not in enabled) or id(q) in disabled:
            q.fake_quant_enabled.fill_(0)
            q.observer_enabled.fill_(0)
    try:
        yield
    finally:
        for q, fq, obs in saved:
            q.fake_quant_enabled.copy_(fq)
            q.observer_enabled.copy_(obs)


def sensitivity(model: nn.Module, data: Iterable[Any], metric: Metric = agreement,
                layers: Iterable[str] | None = None) -> list[LayerSensitivity]:
    """Per-layer metric drop and SQNR, with only that layer quantized and with only it float.

    Args:
        model: a calibrated model from :func:`quantaware.prepare` + :func:`quantaware.calibrate`.
        data: evaluation batches.
        metric: ``metric(outputs, float_outputs) -> score`` (higher is better);
            default top-1 agreement in percent.
        layers: names to analyse (default: every quantized module).

    Example:
        >>> import torch
        >>> from quantaware import presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> data = [torch.randn(32, 8)]
        >>> rows = sensitivity(quantize(net, presets.W4A8, data, data[0][:1]), data)
        >>> [r.name for r in rows]
        ['0', '2']
    """
    data = list(data)
    if not data:
        raise ValueError("sensitivity needs data: give at least one evaluation batch")
    owned = layer_quantizers(model)
    if not owned:
        raise ValueError(f"{type(model).__name__} has no quantized layers; pass a calibrated "
                         "model (quantaware.quantize, or prepare + calibrate)")
    from quantaware.calibrate import _calibratable

    waiting = [n for n, q in _calibratable(model) if not bool(q.calibrated)]
    if waiting:
        raise ValueError(f"quantizer {waiting[0]!r} has no range yet ({len(waiting)} "
                         "uncalibrated): run quantaware.calibrate(model, data) first, or the "
                         "first forward passes would set the ranges the analysis measures")
    names = list(owned) if layers is None else list(layers)
    unknown = [n for n in names if n not in owned]
    if unknown:
        raise ValueError(f"layer {unknown[0]!r} is not a quantized layer of this model; its "
                         f"quantized layers are: {', '.join(owned) or '(none)'}")
    modules = dict(model.named_modules())
    with _only(model, enabled=set(), disabled=set()):
        ref = outputs(model, data)
    base = metric(ref, ref)
    if not math.isfinite(base):
        raise ValueError(
            f"the metric scores the float model against itself as {base}, so drops from it "
            "mean nothing; use a metric with a finite best score (agreement), and read "
            "only_quantized_sqnr / only_float_sqnr for SQNR")
    rows = []
    for name in names:
        ids = {id(q) for q in owned[name]}
        with _only(model, enabled=ids, disabled=set()):
            alone = outputs(model, data)
        with _only(model, enabled=None, disabled=ids):
            rest = outputs(model, data)
        weight = getattr(modules[name], "weight", None)
        rows.append(LayerSensitivity(
            name=name,
            params=int(weight.numel()) if isinstance(weight, torch.Tensor) else 0,
            only_quantized_drop=base - metric(alone, ref),
            only_quantized_sqnr=sqnr_db(alone, ref),
            only_float_drop=base - metric(rest, ref),
            only_float_sqnr=sqnr_db(rest, ref),
        ))
        log.info("sensitivity %s: alone %.2f (%.1f dB), all-but %.2f (%.1f dB)", name,
                 rows[-1].only_quantized_drop, rows[-1].only_quantized_sqnr,
                 rows[-1].only_float_drop, rows[-1].only_float_sqnr)
    return rows
