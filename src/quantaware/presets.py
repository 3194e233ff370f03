"""Named quantization presets.

Each preset is a :class:`~quantaware.config.QuantConfig`; derive variants with
``dataclasses.replace`` or :meth:`QuantConfig.with_overrides`.

- ``INT8``: int8 weights (per-channel, symmetric, narrow range), uint8 activations
  (per-tensor, asymmetric, calibrated). u8s8 is what ONNX Runtime's integer kernels
  run fastest on x86 CPUs.
- ``INT8_DYNAMIC``: int8 weights, activations quantized at run time from each tensor.
- ``FP16``: float16 weights, float activations (half the size, no calibration).
- ``W4A8``: 4-bit weights (per-channel, symmetric), uint8 activations.
- ``W8``: int8 weight-only (activations stay float).
- ``W4A4``, ``W2A2``: low-bit QAT presets with learned step sizes (LSQ) for
  weights (per-channel, symmetric) and activations (uint, per-tensor), scales
  initialised at the least squared quantization error (activations: the ``mse``
  observer over the calibration data; weights: a grid search per channel); the first
  and last weighted layers stay at 8 bits (weights and activations), as in the
  LSQ paper. Change that with overrides for ``FIRST_LAYER``/``LAST_LAYER``, e.g.
  ``dataclasses.replace(W4A4, overrides=())`` quantizes them at 4 bits too.

Example:
    >>> from quantaware import presets
    >>> from quantaware.config import LayerOverride
    >>> cfg = presets.INT8.with_overrides(LayerOverride("fc", skip=True))
    >>> cfg.resolve("fc") is None
    True
"""

from __future__ import annotations

from quantaware.config import (
    FIRST_LAYER,
    LAST_LAYER,
    FloatSpec,
    LayerOverride,
    PerChannel,
    PerTensor,
    QuantConfig,
    QuantSpec,
)

__all__ = ["FP16", "INT8", "INT8_DYNAMIC", "PRESETS", "W2A2", "W4A4", "W4A8", "W8", "get"]

_W8 = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, granularity=PerChannel(0))
_A8 = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor())

INT8 = QuantConfig(weight=_W8, activation=_A8, name="INT8")
INT8_DYNAMIC = QuantConfig(
    weight=_W8,
    activation=QuantSpec(bits=8, signed=False, symmetric=False, dynamic=True),
    name="INT8_DYNAMIC",
)
FP16 = QuantConfig(weight=FloatSpec("float16"), activation=None, name="FP16")
W4A8 = QuantConfig(
    weight=QuantSpec(bits=4, signed=True, symmetric=True, narrow_range=True,
                     granularity=PerChannel(0)),
    activation=_A8,
    name="W4A8",
)
W8 = QuantConfig(weight=_W8, activation=None, name="W8")


def _learned_low_bit(bits: int, name: str) -> QuantConfig:
    weight = QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=True,
                       granularity=PerChannel(0), learned=True)
    # LSQ starts from the MSE-optimal clipping: at 2 to 4 bits a min-max range
    # leaves most activations in the zero bin and the scale far from where it ends.
    activation = QuantSpec(bits=bits, signed=False, symmetric=False, learned=True,
                           observer="mse")
    edge_weight = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True,
                            granularity=PerChannel(0), learned=True)
    edge_activation = QuantSpec(bits=8, signed=False, symmetric=False, learned=True)
    edges = tuple(LayerOverride(p, weight=edge_weight, activation=edge_activation)
                  for p in (FIRST_LAYER, LAST_LAYER))
    return QuantConfig(weight=weight, activation=activation, overrides=edges, name=name)


W4A4 = _learned_low_bit(4, "W4A4")
W2A2 = _learned_low_bit(2, "W2A2")

PRESETS: dict[str, QuantConfig] = {
    "INT8": INT8, "INT8_DYNAMIC": INT8_DYNAMIC, "FP16": FP16, "W4A8": W4A8, "W8": W8,
    "W4A4": W4A4, "W2A2": W2A2,
}


def get(name: str) -> QuantConfig:
    """Look a preset up by name (case-insensitive).

    Example:
        >>> get("int8").name
        'INT8'
    """
    if not isinstance(name, str):
        raise TypeError(f"a preset name must be a string, e.g. 'INT8'; got {name!r}")
    key = name.upper().replace("-", "_")
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]
