"""Accuracy analysis: output metrics, per-layer sensitivity, mixed precision under a budget.

Example:
    >>> from quantaware.analysis import agreement, sensitivity, search  # doctest: +SKIP
"""

from quantaware.analysis.metrics import agreement, outputs, sqnr_db
from quantaware.analysis.mixed_precision import MixedPrecisionResult, apply_choices, search
from quantaware.analysis.sensitivity import LayerSensitivity, layer_quantizers, sensitivity

__all__ = [
    "LayerSensitivity",
    "MixedPrecisionResult",
    "agreement",
    "apply_choices",
    "layer_quantizers",
    "outputs",
    "search",
    "sensitivity",
    "sqnr_db",
]
