"""Typed, serialisable quantization configuration.

A :class:`QuantSpec` describes one integer number format and how its range is
estimated; a :class:`FloatSpec` describes a reduced float format (float16). A
:class:`QuantConfig` says which spec applies to weights and to activations, with
per-layer :class:`LayerOverride` rules matched by module-name pattern
(``fnmatch`` syntax, e.g. ``"features.0*"`` or ``"classifier"``).

Every object is a frozen dataclass, validated on creation, with
``to_dict``/``from_dict`` that round-trip through JSON. Unknown keys are rejected
with the list of allowed ones, so a typo never silently changes a model.

Example:
    >>> from quantaware.config import QuantConfig, QuantSpec, PerChannel, LayerOverride
    >>> cfg = QuantConfig(
    ...     weight=QuantSpec(bits=8, granularity=PerChannel(axis=0)),
    ...     activation=QuantSpec(bits=8, signed=False, symmetric=False),
    ...     overrides=(LayerOverride("classifier", skip=True),),
    ... )
    >>> QuantConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

__all__ = [
    "FIRST_LAYER",
    "INHERIT",
    "LAST_LAYER",
    "ConfigError",
    "FloatSpec",
    "LayerOverride",
    "PerChannel",
    "PerTensor",
    "QuantConfig",
    "QuantSpec",
]

CONFIG_VERSION = 1
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")
# Observers that build a per-tensor histogram.
HISTOGRAM_OBSERVERS = ("percentile", "mse", "entropy")
#: :class:`LayerOverride` pattern standing for the first quantizable weighted layer
#: of the traced graph (resolved by :func:`quantaware.prepare`).
FIRST_LAYER = "<first>"
#: :class:`LayerOverride` pattern standing for the last quantizable weighted layer.
LAST_LAYER = "<last>"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


def _reject_unknown(cls_name: str, data: dict[str, Any], allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{cls_name} must be given as a dict, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {cls_name}; allowed keys are {sorted(allowed)}"
        )


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""

    kind: ClassVar[str] = "per_tensor"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per slice along ``axis`` (0 = output channels of a weight)."""

    axis: int = 0
    kind: ClassVar[str] = "per_channel"

    def __post_init__(self) -> None:
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise ConfigError(f"PerChannel.axis must be an int, got {self.axis!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "axis": self.axis}


Granularity = PerTensor | PerChannel


def _granularity_from_dict(data: Any) -> Granularity:
    _reject_unknown("granularity", data, {"kind", "axis"})
    kind = data.get("kind")
    if kind == PerTensor.kind:
        _reject_unknown("per_tensor granularity", data, {"kind"})
        return PerTensor()
    if kind == PerChannel.kind:
        return PerChannel(axis=data.get("axis", 0))
    raise ConfigError(
        f"unknown granularity kind {kind!r}; use 'per_tensor' or 'per_channel'"
    )


@dataclass(frozen=True)
class QuantSpec:
    """An integer quantization format and its range estimation.

    Args:
        bits: 2 to 16.
        signed: int (True) or uint (False) storage.
        symmetric: zero point fixed at the middle of the range (0 for signed).
        narrow_range: drop the most negative level (int8 -> [-127, 127]).
        granularity: :class:`PerTensor` or :class:`PerChannel`.
        observer: ``"minmax"``, ``"moving_average"``, ``"percentile"``, ``"mse"``
            (range minimising the expected squared quantization error) or
            ``"entropy"`` (TensorRT's KL-divergence method); the last three are
            histogram-based and per-tensor.
        averaging_constant: weight of the newest batch for ``moving_average``.
        percentile: upper percentile kept by the ``percentile`` observer (e.g. 99.99).
        dynamic: activations only; ranges are computed from each tensor at run time,
            no calibration needed (per-tensor, asymmetric uint8 as ONNX's
            ``DynamicQuantizeLinear``).
        learned: the scale is a trained parameter, learned step size quantization
            (LSQ, Esser et al. 2019), initialised from calibration (activations) or
            from the weight itself (weights); see :mod:`quantaware.fake_quant`.
        learned_offset: also learn the zero point (LSQ+, Bhalgat et al. 2020);
            asymmetric activations only, rounded to an integer in every forward.

    Example:
        >>> QuantSpec(bits=4).quant_range
        (-8, 7)
        >>> QuantSpec(bits=8, narrow_range=True).quant_range
        (-127, 127)
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    averaging_constant: float = 0.01
    percentile: float = 99.99
    dynamic: bool = False
    learned: bool = False
    learned_offset: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise ConfigError(f"bits must be an int from 2 to 16, got {self.bits!r}")
        if not 2 <= self.bits <= 16:
            raise ConfigError(f"bits must be from 2 to 16, got {self.bits}")
        for name in ("signed", "symmetric", "narrow_range", "dynamic", "learned",
                     "learned_offset"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.granularity, PerTensor | PerChannel):
            raise ConfigError(
                f"granularity must be PerTensor() or PerChannel(axis), got {self.granularity!r}"
            )
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}; choose one of {OBSERVERS}")
        if not (isinstance(self.averaging_constant, int | float)
                and 0.0 < self.averaging_constant <= 1.0):
            raise ConfigError(
                f"averaging_constant must be in (0, 1], got {self.averaging_constant!r}"
            )
        if not (isinstance(self.percentile, int | float) and 50.0 < self.percentile <= 100.0):
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.observer in HISTOGRAM_OBSERVERS and isinstance(self.granularity, PerChannel):
            raise ConfigError(
                f"the {self.observer} observer is per-tensor only; use observer='minmax' "
                "for per-channel ranges"
            )
        if self.dynamic:
            if isinstance(self.granularity, PerChannel):
                raise ConfigError("dynamic quantization is per-tensor; use granularity=PerTensor()")
            if self.bits != 8 or self.signed or self.symmetric or self.narrow_range:
                raise ConfigError(
                    "dynamic activations are asymmetric uint8 (ONNX DynamicQuantizeLinear): "
                    "use QuantSpec(bits=8, signed=False, symmetric=False, dynamic=True)"
                )
            if self.learned:
                raise ConfigError(
                    "dynamic quantization computes its scale at run time, it cannot be "
                    "learned; set learned=False or dynamic=False"
                )
        if self.learned_offset and not (self.learned and not self.symmetric):
            raise ConfigError(
                "learned_offset (LSQ+) needs learned=True and symmetric=False; a symmetric "
                "format has a fixed zero point"
            )

    @property
    def quant_range(self) -> tuple[int, int]:
        """The (qmin, qmax) integer range of this format."""
        from quantaware.primitives import quant_range

        return quant_range(self.bits, self.signed, self.narrow_range)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "int",
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "narrow_range": self.narrow_range,
            "granularity": self.granularity.to_dict(),
            "observer": self.observer,
            "averaging_constant": self.averaging_constant,
            "percentile": self.percentile,
            "dynamic": self.dynamic,
            # Written only when set, so configs without them stay readable everywhere.
            **({"learned": True} if self.learned else {}),
            **({"learned_offset": True} if self.learned_offset else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        allowed = {f.name for f in fields(cls)} | {"type"}
        _reject_unknown("QuantSpec", data, allowed)
        kwargs = {k: v for k, v in data.items() if k != "type"}
        if "granularity" in kwargs:
            kwargs["granularity"] = _granularity_from_dict(kwargs["granularity"])
        return cls(**kwargs)


@dataclass(frozen=True)
class FloatSpec:
    """A reduced-precision float format (values rounded to it, stored in it on export).

    Example:
        >>> FloatSpec().dtype
        'float16'
    """

    dtype: Literal["float16"] = "float16"

    def __post_init__(self) -> None:
        if self.dtype != "float16":
            raise ConfigError(f"FloatSpec.dtype must be 'float16', got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "float", "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FloatSpec:
        _reject_unknown("FloatSpec", data, {"type", "dtype"})
        return cls(**{k: v for k, v in data.items() if k != "type"})


Spec = QuantSpec | FloatSpec


def _spec_from_dict(data: Any) -> Spec | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"a spec must be a dict or null, got {type(data).__name__}")
    kind = data.get("type", "int")
    if kind == "int":
        return QuantSpec.from_dict(data)
    if kind == "float":
        return FloatSpec.from_dict(data)
    raise ConfigError(f"unknown spec type {kind!r}; use 'int' or 'float'")


def _check_spec(name: str, spec: Any) -> None:
    if spec is not None and not isinstance(spec, QuantSpec | FloatSpec):
        raise ConfigError(f"{name} must be a QuantSpec, FloatSpec or None, got {spec!r}")


class _Inherit:
    """Sentinel: a :class:`LayerOverride` field that keeps the config's value."""

    _instance: ClassVar[_Inherit | None] = None

    def __new__(cls) -> _Inherit:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self) -> str:
        return "INHERIT"


INHERIT = _Inherit()


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer rule, matched against module names with ``fnmatch`` patterns.

    Args:
        pattern: e.g. ``"classifier"``, ``"features.0.*"``, ``"*.attention.*"``, or
            :data:`FIRST_LAYER` / :data:`LAST_LAYER` for the first / last quantizable
            weighted layer in execution order.
        weight: spec for matching layers' weights (``None``: float weights).
        activation: spec for matching layers' activations (``None``: float).
        skip: keep matching layers entirely in float.
        integer_output: ``True`` keeps a matching layer's output quantized even
            where only float ops read it (a Linear before GELU or softmax), so a
            backend that has no integer kernel with a float output (LiteRT) still
            runs the layer as an integer kernel; ``False`` lets such an output
            quantizer go (the default); ``None`` leaves it to earlier rules. A rule
            that sets only this leaves the layer's specs and ``skip`` as they are.

    Example:
        >>> LayerOverride("features.0", skip=True).matches("features.0")
        True
        >>> LayerOverride("*.query", integer_output=True).to_dict()["integer_output"]
        True
    """

    pattern: str
    weight: Spec | _Inherit | None = INHERIT
    activation: Spec | _Inherit | None = INHERIT
    skip: bool = False
    integer_output: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(
                f"LayerOverride.pattern must be a non-empty string, got {self.pattern!r}"
            )
        if not isinstance(self.skip, bool):
            raise ConfigError(f"LayerOverride.skip must be true or false, got {self.skip!r}")
        if self.integer_output is not None and not isinstance(self.integer_output, bool):
            raise ConfigError(f"LayerOverride.integer_output must be true, false or null, got "
                              f"{self.integer_output!r}")
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if value is not INHERIT:
                _check_spec(f"LayerOverride.{name}", value)

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    @property
    def output_only(self) -> bool:
        """Whether the rule sets nothing but ``integer_output``."""
        return (self.integer_output is not None and not self.skip
                and self.weight is INHERIT and self.activation is INHERIT)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pattern": self.pattern, "skip": self.skip}
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if value is not INHERIT:
                out[name] = None if value is None else value.to_dict()
        if self.integer_output is not None:
            out["integer_output"] = self.integer_output
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerOverride:
        _reject_unknown("LayerOverride", data,
                        {"pattern", "weight", "activation", "skip", "integer_output"})
        if "pattern" not in data:
            raise ConfigError("LayerOverride needs a 'pattern' (a module-name glob)")
        kwargs: dict[str, Any] = {"pattern": data["pattern"], "skip": data.get("skip", False),
                                  "integer_output": data.get("integer_output")}
        for name in ("weight", "activation"):
            if name in data:
                kwargs[name] = _spec_from_dict(data[name])
        return cls(**kwargs)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Args:
        weight: spec for weights of quantizable layers (``None``: float weights).
        activation: spec for activations (``None``: weight-only quantization).
        overrides: per-layer rules; the last matching rule wins.
        fold_bn: fold BatchNorm into the preceding conv/linear before quantizing.
        name: a label carried into reports.

    Example:
        >>> from quantaware import presets
        >>> presets.INT8.weight.bits, presets.INT8.activation.signed
        (8, False)
    """

    weight: Spec | None = None
    activation: Spec | None = None
    overrides: tuple[LayerOverride, ...] = ()
    fold_bn: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        _check_spec("weight", self.weight)
        _check_spec("activation", self.activation)
        if isinstance(self.activation, FloatSpec):
            raise ConfigError(
                "float16 activations are not supported; use activation=None with a "
                "FloatSpec weight for float16 deployment"
            )
        if isinstance(self.overrides, list):
            object.__setattr__(self, "overrides", tuple(self.overrides))
        for rule in self.overrides:
            if not isinstance(rule, LayerOverride):
                raise ConfigError(f"overrides must hold LayerOverride objects, got {rule!r}")
        if not isinstance(self.fold_bn, bool):
            raise ConfigError(f"fold_bn must be true or false, got {self.fold_bn!r}")

    def with_overrides(self, *rules: LayerOverride) -> QuantConfig:
        """A copy with ``rules`` appended (they take precedence over earlier ones)."""
        return QuantConfig(self.weight, self.activation, self.overrides + rules,
                           self.fold_bn, self.name)

    def resolve(self, module_name: str) -> tuple[Spec | None, Spec | None] | None:
        """The (weight, activation) specs for a module, or ``None`` if it stays float."""
        weight, activation = self.weight, self.activation
        skipped = False
        for rule in self.overrides:  # in order: a later matching rule overrides an earlier one
            if not rule.matches(module_name) or rule.output_only:
                continue
            skipped = rule.skip
            if rule.weight is not INHERIT:
                weight = rule.weight
            if rule.activation is not INHERIT:
                activation = rule.activation
        if skipped or (weight is None and activation is None):
            return None
        return weight, activation

    def integer_output(self, module_name: str) -> bool:
        """Whether ``module_name`` keeps its output quantized where only float ops read
        it: the last matching rule that sets ``integer_output`` decides (default no).

        Example:
            >>> from quantaware import presets
            >>> cfg = presets.INT8.with_overrides(LayerOverride("*.query", integer_output=True))
            >>> cfg.integer_output("layer.0.query"), cfg.integer_output("layer.0.key")
            (True, False)
        """
        keep = False
        for rule in self.overrides:
            if rule.integer_output is not None and rule.matches(module_name):
                keep = rule.integer_output
        return keep

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "name": self.name,
            "weight": None if self.weight is None else self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "overrides": [rule.to_dict() for rule in self.overrides],
            "fold_bn": self.fold_bn,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        _reject_unknown(
            "QuantConfig", data, {"version", "name", "weight", "activation", "overrides", "fold_bn"}
        )
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(
                f"config version {version!r} is not supported (this quantaware reads "
                f"version {CONFIG_VERSION}); re-save the config with this version"
            )
        overrides = data.get("overrides", [])
        if not isinstance(overrides, list):
            raise ConfigError("overrides must be a list of rules")
        return cls(
            weight=_spec_from_dict(data.get("weight")),
            activation=_spec_from_dict(data.get("activation")),
            overrides=tuple(LayerOverride.from_dict(r) for r in overrides),
            fold_bn=data.get("fold_bn", True),
            name=data.get("name", "custom"),
        )

