"""Looking presets up by name."""

from __future__ import annotations

import pytest

from quantaware import presets


def test_names_are_case_insensitive_and_accept_dashes():
    assert presets.get("int8") is presets.get("INT8") is presets.INT8
    assert presets.get("int8-dynamic") is presets.get("INT8_DYNAMIC")


def test_unknown_and_non_string_names_are_refused_clearly():
    with pytest.raises(KeyError, match=r"unknown preset 'INT9'; choose one of \["):
        presets.get("INT9")
    with pytest.raises(TypeError, match=r"a preset name must be a string, e\.g\. 'INT8'; got None"):
        presets.get(None)
