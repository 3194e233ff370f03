"""quantaware run: exit codes and messages for pipeline files."""

from __future__ import annotations

import json

import pytest
import yaml

from quantaware.cli import main


def test_wrong_key_is_a_usage_error_naming_its_path(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "quantaware.models:DigitsCNN"},
                                    "data": {"train": "digits"},
                                    "quantization": {"preset": "INT8", "metod": "mse"}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "quantization.metod: unknown key" in err and "method" in err


def test_missing_file_and_bad_value(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
    path = tmp_path / "p.yaml"
    path.write_text("model: {source: 'quantaware.models:DigitsCNN'}\ndata: {train: digits}\n"
                    "qat: {epochs: many}\n")
    assert main(["run", str(path)]) == 2
    assert "qat.epochs: got 'many'; expected a positive integer" in capsys.readouterr().err


def test_check_prints_resolved_settings(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("model: {source: 'quantaware.models:DigitsCNN'}\ndata: {train: digits}\n"
                    "fast: {qat: {epochs: 1}}\nqat: {epochs: 5}\n")
    assert main(["run", str(path), "--check", "--fast"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["qat"]["epochs"] == 1 and settings["deploy"]["verify"] is True


@pytest.mark.parametrize("source", ["missing_module_xyz:build", "no_such_file.py:build"])
def test_unusable_model_source_is_a_usage_error(tmp_path, capsys, source):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": source}, "data": {"train": "digits"}}))
    assert main(["run", str(path)]) in (1, 2)
    assert source.split(":")[0] in capsys.readouterr().err
