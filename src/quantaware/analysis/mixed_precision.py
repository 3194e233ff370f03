"""Mixed precision under an accuracy budget: per layer int8, low-bit weights or float.

The search minimises model size (weight bytes) subject to
``reference_score - score <= max_drop``:

1. Prepare and calibrate the model once with the base (int8) config.
2. Rank layers by how little a low-bit weight costs: output SQNR with only that
   layer's weights at low bit (on ``data``), cheapest bytes saved first.
3. If all-int8 misses the budget, keep the layers whose float weights win back
   the most in float until it is met.
4. Bisect the number of top-ranked layers moved to low bit: the largest count
   that meets the budget (the score is close to monotone in that count).
5. Write the choice as a :class:`~quantaware.config.QuantConfig` with
   :class:`~quantaware.config.LayerOverride` rules, prepare and calibrate it for
   real, and step back until it meets the budget on ``data``.

Choices are switched by swapping weight quantizers on the calibrated model, so a
step costs one evaluation, not one calibration (in the spirit of HAQ/HAWQ-style
searches, Wang et al. 2019, arXiv 1811.08886; Dong et al. 2019, arXiv 1905.03696).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from quantaware._batch import input_args, unpack_batch
from quantaware.analysis.metrics import Outputs, agreement, outputs, sqnr_db
from quantaware.calibrate import calibrate
from quantaware.config import LayerOverride, PerChannel, QuantConfig, QuantSpec
from quantaware.fake_quant import FakeQuantizer
from quantaware.nn.weighted import WeightQuantMixin
from quantaware.prepare import prepare

__all__ = ["Choice", "MixedPrecisionResult", "apply_choices", "search", "weight_bytes"]

log = logging.getLogger(__name__)

Choice = Literal["int8", "low", "float"]
Metric = Callable[[Outputs, Outputs], float]


@dataclass
class MixedPrecisionResult:
    """The chosen per-layer precisions and the config that reproduces them."""

    config: QuantConfig
    choices: dict[str, Choice]
    size_bytes: float
    score: float
    reference_score: float
    max_drop: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def meets_budget(self) -> bool:
        return self.reference_score - self.score <= self.max_drop + 1e-9


def _weighted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, WeightQuantMixin) and isinstance(m.weight_quantizer, FakeQuantizer)}


def weight_bytes(model: nn.Module, choices: dict[str, Choice], base_bits: int,
                 low_bits: int) -> float:
    """Bytes of ``model``'s parameters under ``choices``, each tensor counted once:
    what the search minimises. The weights of the layers it chooses for take their
    choice's bit width, other quantized weights (embedding tables) their
    quantizer's, everything else (layers the config keeps float, biases, norms) its
    float size. The exported ONNX file stores weights of fewer than 8 bits in int8
    (the integer kernels' format), so on disk a low-bit layer takes as much as an
    int8 one.

    Example:
        >>> import torch
        >>> from quantaware import presets, prepare
        >>> net = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 4))
        >>> q = prepare(net, presets.INT8, torch.zeros(1, 3, dtype=torch.long))
        >>> weight_bytes(q, {"1": "low"}, 8, 4)  # table int8, weight 4-bit, bias float
        832.0
    """
    bits = {"int8": base_bits, "low": low_bits, "float": 32}
    chosen = _weighted(model)
    total, seen = 0.0, set()
    for name, module in model.named_modules():
        for kind, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            quantizer = getattr(module, "weight_quantizer", None)
            if kind == "weight" and name in chosen:
                width = bits[choices.get(name, "int8")]
            elif (kind == "weight" and isinstance(quantizer, FakeQuantizer)
                    and bool(quantizer.fake_quant_enabled)):
                width = quantizer.spec.bits
            else:
                width = param.element_size() * 8
            total += param.numel() * width / 8
    return total


def apply_choices(config: QuantConfig, choices: dict[str, Choice],
                  low_spec: QuantSpec) -> QuantConfig:
    """``config`` with a :class:`LayerOverride` per layer that is not at the base precision.

    Example:
        >>> from quantaware import presets
        >>> cfg = apply_choices(presets.INT8, {"fc": "float", "conv": "low"}, presets.W4A8.weight)
        >>> cfg.resolve("fc")[0] is None, cfg.resolve("conv")[0].bits
        (True, 4)
    """
    rules = []
    for name, choice in sorted(choices.items()):
        if choice == "float":  # float weights; the layer's activations stay quantized
            rules.append(LayerOverride(name, weight=None))
        elif choice == "low":
            rules.append(LayerOverride(name, weight=low_spec))
    return config.with_overrides(*rules)


def _on_axis(spec: QuantSpec, axis: int) -> QuantSpec:
    if axis and isinstance(spec.granularity, PerChannel):
        return dataclasses.replace(spec, granularity=PerChannel(axis=axis))
    return spec


class _Toggle:
    """Switch layers of a calibrated model between int8, low-bit and float weights."""

    def __init__(self, model: nn.Module, low_spec: QuantSpec) -> None:
        self.layers = _weighted(model)
        self.base = {n: m.weight_quantizer for n, m in self.layers.items()}
        # as the layer builds its own: per-channel scales along its weight's output
        # axis (1 for transposed convolutions)
        self.low = {n: FakeQuantizer(_on_axis(low_spec, m.weight_axis),
                                     channels=m.weight.shape[m.weight_axis], from_tensor=True)
                    for n, m in self.layers.items()}

    def set(self, choices: dict[str, Choice]) -> None:
        for name, module in self.layers.items():
            choice = choices.get(name, "int8")
            module.weight_quantizer = self.low[name] if choice == "low" else self.base[name]
            module.weight_quantizer.fake_quant_enabled.fill_(0 if choice == "float" else 1)


def search(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any],
    data: Iterable[Any],
    max_drop: float,
    low_spec: QuantSpec,
    *,
    metric: Metric = agreement,
    reference_score: float | None = None,
    example_inputs: torch.Tensor | tuple | None = None,
    always_float: Iterable[str] = (),
    rank_data: Iterable[Any] | None = None,
) -> MixedPrecisionResult:
    """Choose int8 / low-bit weights / float per layer: smallest model within the budget.

    Args:
        model: the float model.
        config: the base config (e.g. ``presets.INT8``); its weight spec is "int8".
        calib_data: calibration batches.
        data: batches the budget is checked on (keep them apart from test data).
        max_drop: largest allowed ``reference_score - score``, in metric units.
        low_spec: the low-bit weight spec (e.g. ``presets.W4A8.weight``).
        metric: ``metric(outputs, float_outputs) -> score``; default agreement in %.
        reference_score: the score to stay within ``max_drop`` of; default the
            float model's score (100 for agreement).
        example_inputs: inputs for ``prepare`` (default: the first calibration batch).
        always_float: layer names to keep in float regardless.
        rank_data: batches for the per-layer steps (ranking by SQNR, choosing
            layers to keep float), which cost one evaluation per layer each;
            default ``data``. A subset makes large models affordable; the
            budget is always checked on ``data``.

    Example:
        >>> import torch
        >>> from quantaware import presets
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
        ...                           torch.nn.Linear(64, 10))
        >>> data = [torch.randn(64, 16)]
        >>> r = search(net, presets.INT8, data, data, max_drop=5.0, low_spec=presets.W4A8.weight)
        >>> r.meets_budget and r.size_bytes <= 16 * 64 + 64 * 10 + 4 * (64 + 10)
        True
    """
    calib_data, data = list(calib_data), list(data)
    if not calib_data or not data:
        raise ValueError(f"mixed-precision search needs calibration data and data to check "
                         f"the budget on; got {len(calib_data)} calibration and {len(data)} "
                         "evaluation batches")
    if example_inputs is None:  # the first calibration batch's inputs, labels dropped
        example: Any = input_args(unpack_batch(calib_data[0])[0], model)
    else:
        example = example_inputs
    base_bits = config.weight.bits if isinstance(config.weight, QuantSpec) else 32
    ref_out = outputs(model, data)
    rank_data = data if rank_data is None else list(rank_data)
    rank_ref = ref_out if rank_data is data else outputs(model, rank_data)
    if reference_score is None:
        reference_score = metric(ref_out, ref_out)
        if not math.isfinite(reference_score):
            raise ValueError(
                f"the metric scores the float model against itself as {reference_score}, so "
                "no budget below it can be met; pass reference_score (e.g. 40.0 dB for "
                "sqnr_db) or use a metric with a finite best score (agreement)")
    qmodel = calibrate(prepare(model, config, example), calib_data)
    toggle = _Toggle(qmodel, low_spec)
    names = list(toggle.layers)
    unknown = [n for n in always_float if n not in toggle.layers]
    if unknown:
        raise ValueError(f"always_float names {unknown[0]!r}, which is not a quantized "
                         f"weighted layer; those are: {', '.join(names) or '(none)'}")
    history: list[dict[str, Any]] = []

    def score(choices: dict[str, Choice], label: str) -> float:
        # Activation ranges calibrated with these weights, as the final config's are:
        # the budget is checked on the model the config reproduces.
        toggle.set(choices)
        calibrate(qmodel, calib_data)
        value = metric(outputs(qmodel, data), ref_out)
        size = weight_bytes(qmodel, choices, base_bits, low_spec.bits)
        history.append({"variant": label, "score": value, "size_bytes": size})
        log.info("mixed precision %s: score %.2f, %.0f bytes", label, value, size)
        return value

    def ok(value: float) -> bool:
        return reference_score - value <= max_drop + 1e-9

    choices: dict[str, Choice] = {n: "float" for n in always_float}
    # Rank: SQNR with only that layer at low bit (others int8), higher is cheaper.
    cost = {}
    for name in names:
        if name in choices:
            continue
        toggle.set({**choices, name: "low"})
        cost[name] = sqnr_db(outputs(qmodel, rank_data), rank_ref)
    current = score(choices, "all int8")
    kept = (current, dict(choices))  # the best score reached, with the fewest float layers
    while not ok(current):
        toggle.set(choices)
        now = metric(outputs(qmodel, rank_data), rank_ref)
        gains = {}
        for name in names:
            if name in choices:
                continue
            toggle.set({**choices, name: "float"})
            gains[name] = metric(outputs(qmodel, rank_data), rank_ref)
        if not gains or max(gains.values()) < now:
            # every layer kept float loses: more float layers would only cost bytes
            # (the budget cannot be met; meets_budget says so)
            break
        best = max(gains, key=gains.get)
        trial = {**choices, best: "float"}
        value = score(trial, f"+float {best}")
        if value < current:  # worse on the budget data (a tie may pay off with the next)
            break
        choices, current = trial, value
        if value > kept[0]:
            kept = (value, dict(choices))
    if not ok(current):  # the budget cannot be met: no float layer that did not pay off
        current, choices = kept
    order = sorted(cost, key=lambda n: (-cost[n], -toggle.layers[n].weight.numel()))
    order = [n for n in order if n not in choices]
    lo, hi = 0, len(order)
    while lo < hi:  # largest k with the top-k at low bit within the budget
        mid = (lo + hi + 1) // 2
        if ok(score({**choices, **{n: "low" for n in order[:mid]}}, f"{mid} layers low-bit")):
            lo = mid
        else:
            hi = mid - 1
    toggle.set({})
    for k in range(lo, -1, -1):
        final = {**choices, **{n: "low" for n in order[:k]}}
        cfg = apply_choices(config, final, low_spec)
        real = calibrate(prepare(model, cfg, example), calib_data)
        value = metric(outputs(real, data), ref_out)
        size = weight_bytes(qmodel, final, base_bits, low_spec.bits)
        history.append({"variant": f"config, {k} layers low-bit", "score": value,
                        "size_bytes": size})
        if ok(value) or k == 0:
            break
    return MixedPrecisionResult(cfg, final, size, value, reference_score, max_drop, history)
