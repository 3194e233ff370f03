"""quantaware.config and quantaware.presets: validation, serialisation, rule resolution."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest

from quantaware import presets
from quantaware.config import (
    INHERIT,
    ConfigError,
    FloatSpec,
    LayerOverride,
    PerChannel,
    PerTensor,
    QuantConfig,
    QuantSpec,
)

pytestmark = pytest.mark.usefixtures("single_thread")

W4 = QuantSpec(bits=4, narrow_range=True, granularity=PerChannel(0))
A16 = QuantSpec(bits=16, signed=True, symmetric=True, observer="percentile", percentile=99.9)

OVERRIDDEN = presets.INT8.with_overrides(
    LayerOverride("features.*", weight=W4),
    LayerOverride("head", skip=True),
    LayerOverride("classifier", weight=None),
    LayerOverride("attn.*", activation=A16),
    LayerOverride("emb", weight=FloatSpec(), activation=None),
)

ALL_CONFIGS = {**presets.PRESETS, "overridden": OVERRIDDEN,
               "moving_average": QuantConfig(
                   weight=QuantSpec(bits=6, signed=False, symmetric=False),
                   activation=QuantSpec(observer="moving_average", averaging_constant=0.25),
                   fold_bn=False, name="custom-ma")}


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_round_trip_through_dict_and_json(name):
    cfg = ALL_CONFIGS[name]
    data = cfg.to_dict()
    assert QuantConfig.from_dict(data) == cfg
    text = json.dumps(data)
    restored = QuantConfig.from_dict(json.loads(text))
    assert restored == cfg
    assert restored.to_dict() == data
    # resolution behaves identically after the round trip
    for module in ("features.3", "head", "classifier", "attn.q", "emb", "other"):
        assert restored.resolve(module) == cfg.resolve(module)


def test_round_trip_preserves_inherit_and_none_distinctly():
    rules = QuantConfig.from_dict(json.loads(json.dumps(OVERRIDDEN.to_dict()))).overrides
    by_pattern = {r.pattern: r for r in rules}
    assert by_pattern["features.*"].activation is INHERIT
    assert by_pattern["features.*"].weight == W4
    assert by_pattern["classifier"].weight is None
    assert by_pattern["classifier"].activation is INHERIT
    assert by_pattern["head"].skip is True
    assert by_pattern["emb"].weight == FloatSpec() and by_pattern["emb"].activation is None
    # INHERIT is not written; None is written as null
    dumped = {r["pattern"]: r for r in OVERRIDDEN.to_dict()["overrides"]}
    assert "activation" not in dumped["features.*"]
    assert dumped["classifier"]["weight"] is None


def test_inherit_is_a_singleton_that_survives_copy_and_pickle():
    assert copy.deepcopy(INHERIT) is INHERIT
    assert pickle.loads(pickle.dumps(INHERIT)) is INHERIT
    restored = pickle.loads(pickle.dumps(OVERRIDDEN))
    assert restored == OVERRIDDEN
    assert restored.overrides[0].activation is INHERIT


def test_to_dict_has_version_and_type_tags():
    data = presets.FP16.to_dict()
    assert data["version"] == 1
    assert data["weight"] == {"type": "float", "dtype": "float16"}
    assert data["activation"] is None
    assert presets.INT8.to_dict()["weight"]["type"] == "int"
    assert presets.INT8.to_dict()["weight"]["granularity"] == {"kind": "per_channel", "axis": 0}


def test_from_dict_defaults():
    cfg = QuantConfig.from_dict({"weight": {"bits": 8}})
    assert cfg.weight == QuantSpec()
    assert cfg.activation is None and cfg.overrides == () and cfg.fold_bn is True
    spec = QuantSpec.from_dict({"granularity": {"kind": "per_channel"}})
    assert spec.granularity == PerChannel(0)


# -- unknown keys ----------------------------------------------------------------------


def _int8_dict() -> dict:
    return presets.INT8.with_overrides(LayerOverride("fc", weight=W4)).to_dict()


def test_unknown_top_level_key_is_named():
    data = _int8_dict()
    data["fold_batchnorm"] = True
    with pytest.raises(ConfigError, match="fold_batchnorm") as info:
        QuantConfig.from_dict(data)
    assert "fold_bn" in str(info.value)  # the allowed keys are listed


def test_unknown_key_in_spec_is_named():
    data = _int8_dict()
    data["weight"]["nbits"] = 4
    with pytest.raises(ConfigError, match="nbits"):
        QuantConfig.from_dict(data)
    data = _int8_dict()
    data["activation"]["symetric"] = True
    with pytest.raises(ConfigError, match="symetric"):
        QuantConfig.from_dict(data)
    with pytest.raises(ConfigError, match="precision"):
        FloatSpec.from_dict({"type": "float", "dtype": "float16", "precision": "half"})


def test_unknown_key_in_override_is_named():
    data = _int8_dict()
    data["overrides"][0]["skp"] = True
    with pytest.raises(ConfigError, match="skp"):
        QuantConfig.from_dict(data)
    data = _int8_dict()
    data["overrides"][0]["weight"]["observr"] = "minmax"
    with pytest.raises(ConfigError, match="observr"):
        QuantConfig.from_dict(data)


def test_unknown_key_in_granularity_is_named():
    data = _int8_dict()
    data["weight"]["granularity"]["axes"] = 1
    with pytest.raises(ConfigError, match="axes"):
        QuantConfig.from_dict(data)
    data = _int8_dict()
    data["activation"]["granularity"]["axis"] = 0  # per_tensor takes no axis
    with pytest.raises(ConfigError, match="axis"):
        QuantConfig.from_dict(data)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"weight": {"type": "bfloat"}}, "bfloat"),
        ({"weight": {"granularity": {"kind": "per_row"}}}, "per_row"),
        ({"weight": {"type": "float", "dtype": "float8"}}, "float8"),
        ({"weight": [8]}, "dict"),
        ({"overrides": {"pattern": "fc"}}, "list"),
        ({"overrides": [{"skip": True}]}, "pattern"),
        ({"overrides": [{"pattern": ""}]}, "pattern"),
        ({"activation": {"type": "float"}}, "float16 activations"),
    ],
)
def test_invalid_structures_raise_config_error(patch, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_dict(patch)


# -- invalid values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 17}, "bits"),
        ({"bits": 8.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"percentile": 50.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": "99"}, "percentile"),
        ({"averaging_constant": 0.0}, "averaging_constant"),
        ({"averaging_constant": 1.5}, "averaging_constant"),
        ({"averaging_constant": -0.1}, "averaging_constant"),
        ({"observer": "histogram"}, "histogram"),
        ({"signed": 1}, "signed"),
        ({"granularity": "per_tensor"}, "granularity"),
        ({"observer": "percentile", "granularity": PerChannel(0)}, "per-tensor"),
        ({"dynamic": True, "signed": True}, "uint8"),
        ({"dynamic": True, "signed": False, "symmetric": False,
          "granularity": PerChannel(0)}, "per-tensor"),
    ],
)
def test_invalid_spec_values_raise(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantSpec(**kwargs)
    # the same values coming from a dict are rejected too
    data = QuantSpec().to_dict()
    data.update({k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in kwargs.items()})
    with pytest.raises(ConfigError):
        QuantSpec.from_dict(data)


@pytest.mark.parametrize("bits", [2, 16])
def test_bit_width_limits_accepted(bits):
    assert QuantSpec(bits=bits).bits == bits
    assert QuantSpec.from_dict({"bits": bits}).bits == bits


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_bad_version_rejected(version):
    data = presets.INT8.to_dict()
    data["version"] = version
    with pytest.raises(ConfigError, match="version"):
        QuantConfig.from_dict(data)


def test_invalid_config_fields():
    with pytest.raises(ConfigError, match="weight"):
        QuantConfig(weight="int8")
    with pytest.raises(ConfigError, match="fold_bn"):
        QuantConfig(fold_bn="yes")
    with pytest.raises(ConfigError, match="overrides"):
        QuantConfig(overrides=({"pattern": "fc"},))
    with pytest.raises(ConfigError, match="skip"):
        LayerOverride("fc", skip="true")
    with pytest.raises(ConfigError, match=r"PerChannel\.axis"):
        PerChannel(axis=1.0)
    with pytest.raises(ConfigError, match=r"LayerOverride\.weight"):
        LayerOverride("fc", weight=8)


def test_configs_are_frozen_and_list_overrides_become_tuples():
    cfg = QuantConfig(weight=QuantSpec(), overrides=[LayerOverride("a", skip=True)])
    assert isinstance(cfg.overrides, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fold_bn = False  # type: ignore[misc]


def test_quant_range_property():
    assert QuantSpec(bits=4).quant_range == (-8, 7)
    assert QuantSpec(bits=8, narrow_range=True).quant_range == (-127, 127)
    assert QuantSpec(bits=8, signed=False).quant_range == (0, 255)
    assert presets.W4A8.weight.quant_range == (-7, 7)


# -- resolve ---------------------------------------------------------------------------


def test_resolve_without_overrides():
    assert presets.INT8.resolve("anything") == (presets.INT8.weight, presets.INT8.activation)
    assert QuantConfig().resolve("x") is None
    assert presets.W8.resolve("fc") == (presets.W8.weight, None)


def test_resolve_last_matching_rule_wins():
    cfg = presets.INT8.with_overrides(
        LayerOverride("features.*", weight=W4),
        LayerOverride("features.1", weight=QuantSpec(bits=6)),
        LayerOverride("*.1", activation=A16),
    )
    assert cfg.resolve("features.1") == (QuantSpec(bits=6), A16)
    assert cfg.resolve("features.0") == (W4, presets.INT8.activation)
    assert cfg.resolve("head.1") == (presets.INT8.weight, A16)
    assert cfg.resolve("head.0") == (presets.INT8.weight, presets.INT8.activation)
    # the same rules in the other order: the broad rule now overrides the narrow one
    flipped = presets.INT8.with_overrides(
        LayerOverride("features.1", weight=QuantSpec(bits=6)),
        LayerOverride("features.*", weight=W4),
    )
    assert flipped.resolve("features.1") == (W4, presets.INT8.activation)


def test_resolve_skip_and_none_specs():
    cfg = presets.INT8.with_overrides(
        LayerOverride("fc", weight=W4),
        LayerOverride("fc", skip=True),
        LayerOverride("conv", weight=None, activation=None),
        LayerOverride("act_only", weight=None),
    )
    assert cfg.resolve("fc") is None
    assert cfg.resolve("conv") is None  # nothing left to quantize
    assert cfg.resolve("act_only") == (None, presets.INT8.activation)
    assert cfg.resolve("fc2") == (presets.INT8.weight, presets.INT8.activation)


def test_resolve_patterns_are_case_sensitive_fnmatch():
    rule = LayerOverride("layer?.conv*")
    assert rule.matches("layer1.conv2")
    assert not rule.matches("layer12.conv2")
    assert not rule.matches("Layer1.conv2")


def test_resolve_later_rule_takes_precedence_over_earlier_skip():
    cfg = presets.INT8.with_overrides(
        LayerOverride("features.*", skip=True),
        LayerOverride("features.3", weight=W4),
    )
    assert cfg.resolve("features.0") is None
    assert cfg.resolve("features.3") == (W4, presets.INT8.activation)


def test_with_overrides_returns_a_copy():
    cfg = presets.INT8.with_overrides(LayerOverride("fc", skip=True))
    assert presets.INT8.overrides == ()
    assert cfg.overrides == (LayerOverride("fc", skip=True),)
    assert cfg.name == "INT8" and cfg.weight == presets.INT8.weight


# -- presets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [("INT8", presets.INT8), ("int8", presets.INT8), ("int8-dynamic", presets.INT8_DYNAMIC),
     ("Int8_Dynamic", presets.INT8_DYNAMIC), ("fp16", presets.FP16), ("w4a8", presets.W4A8),
     ("W8", presets.W8)],
)
def test_presets_get(query, expected):
    assert presets.get(query) is expected


def test_presets_get_unknown_lists_choices():
    with pytest.raises(KeyError, match="INT8_DYNAMIC"):
        presets.get("int4")


def test_preset_contents():
    assert set(presets.PRESETS) == {"INT8", "INT8_DYNAMIC", "FP16", "W4A8", "W8", "W4A4", "W2A2"}
    for name, cfg in presets.PRESETS.items():
        assert cfg.name == name
    assert presets.INT8.weight.granularity == PerChannel(0)
    assert presets.INT8.weight.quant_range == (-127, 127)
    assert presets.INT8.activation.quant_range == (0, 255)
    assert presets.INT8.activation.granularity == PerTensor()
    assert presets.INT8_DYNAMIC.activation.dynamic
    assert presets.FP16.weight == FloatSpec() and presets.FP16.activation is None
    assert presets.W8.activation is None


def test_integer_output_rules_round_trip_and_leave_specs_alone():
    cfg = presets.INT8.with_overrides(LayerOverride("head", skip=True),
                                      LayerOverride("*", integer_output=True),
                                      LayerOverride("*.key", integer_output=False))
    assert cfg.integer_output("layer.0.query") and not cfg.integer_output("layer.0.key")
    # a rule that sets only integer_output neither un-skips nor re-specs a layer
    assert cfg.resolve("head") is None
    assert cfg.resolve("layer.0.query") == presets.INT8.resolve("layer.0.query")
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert "integer_output" not in LayerOverride("x").to_dict()
    with pytest.raises(ConfigError, match="integer_output"):
        LayerOverride("x", integer_output="yes")
