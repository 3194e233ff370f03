"""`quantaware verify` and `quantaware bench` end to end (quick settings)."""

from __future__ import annotations

import json

import torch

from quantaware.cli import main


def tiny_cnn() -> torch.nn.Module:
    """A small CNN for `--model test_cli_deploy:tiny_cnn`."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )


def test_verify_command_reports_layers(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["verify", "--model", f"{__name__}:tiny_cnn", "--input-shape", "3,16,16",
                 "--num-calib", "32", "--num-eval", "32", "--out", str(tmp_path),
                 "--json", str(out), "--min-agreement", "0.9"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "layers" in text and "top-1 agreement" in text
    report = json.loads(out.read_text())
    assert report["layers_checked"] >= 4 and report["cosine"] >= 0.99
    # Against the integer reference the export matches bit for bit.
    assert "integer arithmetic" in text and report["reference"] == "integer"
    assert report["top1_agreement"] == 1.0 and report["max_error_lsb"] == 0.0
    assert report["first_divergent_layer"] is None


def test_verify_command_rejects_unknown_model(capsys):
    assert main(["verify", "--model", "nosuchmodel"]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err


def test_bench_quick_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["bench", "--quick", "--models", "resnet18", "--batches", "2",
                 "--distill", "2", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["fp32", "quantaware-int8", "ort-static-int8",
                                            "ort-dynamic-int8", "quantaware-int8-distilled"]
    assert rows[4]["verify_top1"] >= 0.9
    assert abs(rows[4]["size_bytes"] - rows[1]["size_bytes"]) < 0.01 * rows[1]["size_bytes"]
    assert {"model", "batch", "variant", "latency_ms", "ratio_vs_fp32", "size_bytes",
            "fidelity", "agreement_confident", "verify_top1", "verify_cosine"} <= set(rows[0])
    assert rows[0]["verify_top1"] is None and rows[1]["verify_top1"] >= 0.9
    assert rows[0]["ratio_vs_fp32"] == 1.0 and rows[1]["size_bytes"] < rows[0]["size_bytes"]
    assert "quantaware-int8" in capsys.readouterr().out
