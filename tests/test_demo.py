"""The built-in demo end to end, in its fast mode."""

from __future__ import annotations

import json

import pytest

from quantaware.demo import VARIANTS, run_demo

ROW_KEYS = {"variant", "accuracy", "accuracy_onnxruntime", "size_bytes", "latency_ms"}


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    steps: list[str] = []
    rows = run_demo(out, fast=True, on_step=steps.append)
    return out, rows, steps


def test_demo_writes_results_json_with_every_variant(demo_rows):
    out, rows, _ = demo_rows
    saved = json.loads((out / "results.json").read_text())
    assert saved == rows
    assert [r["variant"] for r in saved] == list(VARIANTS)
    for row in saved:
        assert set(row) >= ROW_KEYS
        assert 0.0 <= row["accuracy"] <= 100.0
        assert row["size_bytes"] > 0 and row["latency_ms"] > 0
        assert (out / f"{row['variant']}.onnx").is_file()


def test_demo_onnx_runtime_matches_torch(demo_rows):
    _, rows, _ = demo_rows
    for row in rows:
        assert abs(row["accuracy_onnxruntime"] - row["accuracy"]) <= 0.3, row
        assert row["verify_top1_agreement"] >= 0.99, row
        if row["variant"] in ("ptq-int8", "qat-int8"):
            assert row["verify_max_error_lsb"] <= 1.0, row


def test_demo_int8_is_smaller_and_learns(demo_rows):
    _, rows, _ = demo_rows
    by_name = {r["variant"]: r for r in rows}
    assert by_name["ptq-int8"]["size_bytes"] <= 0.30 * by_name["fp32"]["size_bytes"]
    assert by_name["fp16"]["size_bytes"] <= 0.55 * by_name["fp32"]["size_bytes"]
    # Even the fast mode trains far beyond chance (10%) on digits.
    assert by_name["fp32"]["accuracy"] > 80.0
    assert by_name["ptq-int8"]["accuracy"] > 80.0


def test_demo_reports_progress(demo_rows):
    _, _, steps = demo_rows
    assert any("float baseline" in s for s in steps)
    assert any("quantization-aware" in s for s in steps)
    assert sum("export to ONNX" in s for s in steps) == len(VARIANTS)
