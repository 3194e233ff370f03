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

Example:
    >>> from quantaware import presets
    >>> from quantaware.config import LayerOverride
    >>> cfg = presets.INT8.with_overrides(LayerOverride("fc", skip=True))
    >>> cfg.resolve("fc") is None
    True
"""

from __future__ import annotations

from quantaware.config import FloatSpec, PerChannel, PerTensor, QuantConfig, QuantSpec

__all__ = ["FP16", "INT8", "INT8_DYNAMIC", "PRESETS", "W4A8", "W8", "get"]

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

PRESETS: dict[str, QuantConfig] = {
    "INT8": INT8, "INT8_DYNAMIC": INT8_DYNAMIC, "FP16": FP16, "W4A8": W4A8, "W8": W8,
}


def get(name: str) -> QuantConfig:
    """Look a preset up by name (case-insensitive).

    Example:
        >>> get("int8").name
        'INT8'
    """
    key = name.upper().replace("-", "_")
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]
