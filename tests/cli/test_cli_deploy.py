"""`quantaware verify` and `quantaware bench` end to end (quick settings)."""

from __future__ import annotations

import json

import pytest
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
    """The model named by its file's absolute path: the export lands in --out (an
    absolute spec used to replace the folder in the joined path)."""
    out = tmp_path / "report.json"
    code = main(["verify", "--model", f"{__file__}:tiny_cnn", "--input-shape", "3,16,16",
                 "--num-calib", "32", "--num-eval", "32", "--out", str(tmp_path / "files"),
                 "--json", str(out), "--min-agreement", "0.9"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert [p.name for p in (tmp_path / "files").iterdir()] == [
        "test_cli_deploy-tiny_cnn-int8.onnx"]
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


@pytest.mark.parametrize("backend,package", [("openvino", "openvino"),
                                             ("litert", "litert_torch")])
def test_verify_command_on_another_backend(tmp_path, capsys, backend, package):
    pytest.importorskip(package)
    out = tmp_path / "report.json"
    code = main(["verify", "--model", f"{__name__}:tiny_cnn", "--input-shape", "3,16,16",
                 "--num-calib", "32", "--num-eval", "32", "--out", str(tmp_path),
                 "--json", str(out), "--min-agreement", "0.9", "--backend", backend])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads(out.read_text())
    assert report["backend"] == backend and f"in {backend}" in text
    assert report["top1_agreement"] >= 0.9 and report["max_error_lsb"] is not None
    assert report["layers_checked"] + report["layers_unavailable"] >= 4
    if backend == "litert":
        assert list(tmp_path.glob("*-int8.tflite"))
        assert report["reference"] == "integer" and report["layers_checked"] >= 3


def _bench_tiny_cnn(tmp_path, *backends: str) -> list[dict]:
    """The rows of a quick ``bench`` of the tiny CNN at batches 1 and 4 on ``backends``."""
    out = tmp_path / "rows.json"
    code = main(["bench", "--quick", "--models", f"{__name__}:tiny_cnn", "--input-shape",
                 "3,16,16", "--batches", "1", "4", "--backend", *backends, "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_bench_quick_on_both_backends(tmp_path, capsys):
    """`--backend onnxruntime openvino`: the FP32 and quantaware files in both, ORT's
    quantizer outputs in ONNX Runtime only (a tiny CNN keeps this fast)."""
    pytest.importorskip("openvino")
    rows = _bench_tiny_cnn(tmp_path, "onnxruntime", "openvino")
    per_batch = [(r["backend"], r["variant"]) for r in rows if r["batch"] == 4]
    assert per_batch == [("onnxruntime", "fp32"), ("onnxruntime", "quantaware-int8"),
                         ("onnxruntime", "ort-static-int8"), ("onnxruntime", "ort-dynamic-int8"),
                         ("openvino", "fp32"), ("openvino", "quantaware-int8")]
    ov_fp32, ov_int8 = rows[-2], rows[-1]
    assert ov_fp32["ratio_vs_fp32"] == 1.0 and ov_fp32["fidelity"] == 1.0  # float32, not bf16
    assert ov_int8["verify_top1"] >= 0.9 and ov_int8["verify_reference"] == "integer"
    assert ov_int8["size_bytes"] == rows[1]["size_bytes"]
    text = capsys.readouterr().out
    assert "openvino" in text and "backend" in text


def test_bench_quick_on_litert(tmp_path, capsys):
    """`--backend onnxruntime litert`: the FP32 and quantaware models also as LiteRT
    files (batch 1; a batch of 4 is four invocations)."""
    pytest.importorskip("litert_torch")
    rows = _bench_tiny_cnn(tmp_path, "onnxruntime", "litert")
    lite = [r for r in rows if r["backend"] == "litert"]
    assert [(r["batch"], r["variant"]) for r in lite] == [
        (1, "fp32"), (1, "quantaware-int8"), (4, "fp32"), (4, "quantaware-int8")]
    assert lite[0]["ratio_vs_fp32"] == 1.0 and lite[0]["fidelity"] == 1.0
    assert lite[1]["verify_top1"] >= 0.9 and lite[1]["verify_reference"] == "integer"
    assert lite[1]["size_bytes"] < lite[0]["size_bytes"]
    assert "litert" in capsys.readouterr().out


def test_bench_takes_the_input_shape_of_your_own_model(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["bench", "--quick", "--models", f"{__name__}:tiny_cnn", "--input-shape",
                 "3,16,16", "--batches", "2", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows][:2] == ["fp32", "quantaware-int8"]
    assert main(["bench", "--quick", "--models", f"{__name__}:tiny_cnn",
                 "--input-shape", "3,x"]) == 2
    assert "--input-shape must be comma-separated ints" in capsys.readouterr().err


def test_bench_rejects_unknown_backend(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--models", "resnet18", "--backend", "tensorrt"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batches", "0"], "--batches must be a positive integer, got 0"),
    (["--batches", "1", "-1"], "--batches must be a positive integer, got -1"),
    (["--runs", "0"], "--runs must be a positive integer, got 0"),
    (["--warmup", "-1"], "--warmup must be a non-negative integer, got -1"),
])
def test_bench_rejects_counts_out_of_range(flags, message, capsys):
    """--batches 0 reported a batch of zero samples as fidelity 1.0; --runs 0 NaN
    latencies. Both are usage errors now, before any model is built."""
    assert main(["bench", "--quick", "--models", "resnet18", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--min-agreement", "2"], "--min-agreement must be between 0 and 1, got 2.0"),
    (["--min-agreement", "nan"], "--min-agreement must be between 0 and 1, got nan"),
    (["--preset", "INT9"], "unknown preset 'INT9'"),
])
def test_verify_command_rejects_bad_settings(flags, message, capsys):
    assert main(["verify", "--model", f"{__name__}:tiny_cnn", "--input-shape", "3,16,16",
                 *flags]) == 2
    assert message in capsys.readouterr().err


def test_benchmark_api_rejects_counts_out_of_range():
    from quantaware.deploy_bench import benchmark

    for kwargs in ({"batches": []}, {"batches": (1, 0)}, {"runs": 0}, {"warmup": -1},
                   {"threads": 0}):
        with pytest.raises(ValueError, match="must be"):
            benchmark(["resnet18"], quick=True, **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--models", "foo"], "--models: unknown model 'foo'"),
    (["--models", f"{__name__}:tiny_cnn"], "pass the per-sample input shape"),
    (["--models", "no_such_module:build", "--input-shape", "3,8,8"],
     "--models: cannot import module 'no_such_module'"),
])
def test_bench_model_mistakes_are_usage_errors(argv, message, capsys):
    """They exited 1 (a failure) like a crash while benchmarking, not 2."""
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
