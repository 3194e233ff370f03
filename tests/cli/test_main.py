"""The command-line interface."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantaware import presets
from quantaware.cli import main


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "presets"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: quantaware " + command in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--no-such-option"])
    assert exc.value.code == 2


def test_presets_prints_loadable_json(capsys):
    assert main(["presets", "int8"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert presets.INT8.to_dict() == payload["INT8"]


def test_unknown_preset_is_a_usage_error(capsys):
    assert main(["presets", "int3"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "quantaware.cli", "presets", "FP16"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["FP16"]["weight"]["dtype"] == "float16"


def test_demo_command_prints_table(tmp_path, capsys, monkeypatch):
    """The CLI layer: arguments reach run_demo, its rows become the table.

    run_demo itself runs for real in tests/test_demo.py; here it is replaced by a
    double that records its arguments, so the suite does not train twice.
    """
    import quantaware.demo as demo

    calls = {}

    def fake_run_demo(out_dir, *, fast=False, on_step=None):
        calls.update(out_dir=out_dir, fast=fast)
        on_step("training the float baseline")
        rows = [{"variant": v, "accuracy": 99.0, "accuracy_onnxruntime": 99.0,
                 "size_bytes": 1000 // (i + 1), "latency_ms": 2.0 / (i + 1),
                 "verify_top1_agreement": 1.0}
                for i, v in enumerate(demo.VARIANTS)]
        demo.write_json_atomic(tmp_path / "results.json", rows)
        demo.write_json_atomic(tmp_path / "run.json", {"latency_batch": 64})
        return rows

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    assert calls == {"out_dir": str(tmp_path), "fast": True}
    out = capsys.readouterr().out
    for variant in demo.VARIANTS:
        assert variant in out
    assert "5.00x" in out  # qat-int8: 2.0 ms / 0.4 ms speed-up column


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--json", "{tmp}"], "--json: '{tmp}' is a folder; give a file name"),
    (["quantize", "--out", "{file}"], "--out: '{file}' is a file; give a folder name"),
    (["quantize", "--out", "{file}/run"], "--out: cannot write into"),
    (["export", "--out", "{tmp}"], "--out: '{tmp}' is a folder; give a file name"),
    (["evaluate", "--quantized", "q.pt", "--json", "{tmp}"], "--json: '{tmp}' is a folder"),
])
def test_unwritable_outputs_are_usage_errors_before_any_work(argv, message, tmp_path, capsys,
                                                            monkeypatch):
    import quantaware.cli._sources as common

    def never(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(common, "load_model", never)
    (tmp_path / "file").write_text("")
    fill = {"tmp": tmp_path, "file": tmp_path / "file"}
    argv = [a.format(**fill) for a in argv]
    assert main([*argv, "--model", "quantaware.models:DigitsCNN", "--data", "digits"]) == 2
    assert message.format(**fill) in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["export", "--quantized", "{ckpt}", "--input-shape", "1,8,8", "--out", "{ckpt}"],
     "--out {ckpt} is also the --quantized input"),
    (["export", "--input-shape", "1,8,8", "--out", "{tmp}/m.onnx", "--json", "{tmp}/m.onnx"],
     "--json and --out name the same file"),
    (["quantize", "--data", "digits", "--out", "{tmp}/run", "--json", "{tmp}/run/results.json"],
     "--json {tmp}/run/results.json is a file the command writes into --out"),
    (["quantize", "--data", "{tmp}", "--out", "{tmp}/run"],
     "--out {tmp}/run lies inside the --data folder"),
])
def test_outputs_that_would_destroy_inputs_or_each_other_are_refused(argv, message, tmp_path,
                                                                     capsys):
    """`export --out X.pt --quantized X.pt` replaced the checkpoint with ONNX bytes,
    `--json` could overwrite the INT8 file, and a --out inside the image folder was
    read back as images on the next run."""
    ckpt = tmp_path / "model-int8.pt"
    ckpt.write_bytes(b"checkpoint")
    fill = {"tmp": tmp_path, "ckpt": ckpt}
    argv = [a.format(**fill) for a in argv]
    assert main([*argv, "--model", "quantaware.models:DigitsCNN"]) == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert ckpt.read_bytes() == b"checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-int8.pt"]


@pytest.mark.parametrize("argv", [
    ["quantize", "--preset", "W8", "--out", "W8"],
    ["quantize", "--target", "litert", "--out", "litert/run2"],
    ["quantize", "--out", "quantize/run1"],
    ["qat", "--out", "W4A4"],
])
def test_option_values_that_happen_to_name_folders_are_not_inputs(argv, tmp_path, capsys,
                                                                   monkeypatch):
    """Only path options are inputs: a folder named like the preset, the target or the
    command itself (a rerun into the same --out) was refused as an input folder."""
    import quantaware.cli._sources as common
    import quantaware.qat_run as qat_run
    from quantaware.cli import UsageError

    def reached(*_args, **_kwargs):
        raise UsageError("the output checks passed")

    monkeypatch.setattr(common, "load_model", reached)
    monkeypatch.setattr(qat_run, "run_qat", reached)
    monkeypatch.chdir(tmp_path)
    for name in ("W8", "litert", "quantize", "W4A4"):
        (tmp_path / name).mkdir()
    extra = [] if argv[0] == "qat" else ["--model", "quantaware.models:DigitsCNN"]
    assert main([*argv, *extra, "--data", "digits"]) == 2
    assert "the output checks passed" in capsys.readouterr().err


def test_a_report_named_md_is_refused(tmp_path, capsys):
    """The HTML and its .md summary went to the same path: the HTML was lost."""
    (tmp_path / "r.json").write_text('{"rows": [{"variant": "a", "size_bytes": 1}]}')
    assert main(["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "r.md")]) == 2
    assert "ending in .html" in capsys.readouterr().err


def test_export_with_a_wrong_input_shape_names_the_flag(tmp_path, capfd):
    """The float export printed four torch tracebacks and an exporter message."""
    assert main(["export", "--model", "quantaware.models:DigitsCNN", "--input-shape", "3,8,8",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    assert not list(tmp_path.iterdir())
    err = capfd.readouterr().err
    assert "fails on the example inputs ((1, 3, 8, 8))" in err and "--input-shape" in err
    assert "Traceback" not in err


def test_a_missing_weights_file_is_a_usage_error(tmp_path, capsys):
    code = main(["quantize", "--model", "quantaware.models:DigitsCNN", "--data", "digits",
                 "--weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")])
    assert code == 2 and "missing.pt' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["quantize", "--model", "quantaware.models:DigitsCNN", "--data", "digits"],
    ["evaluate", "--model", "{file}", "--quantized", "{file}", "--data", "digits"],
    ["bench", "--models", "mobilenet_v2"],
    ["predict", "--model", "{file}", "--source", "{file}"],
    ["qat", "--data", "digits", "--out", "{out}"]])
def test_thread_counts_beyond_the_limit_are_usage_errors(argv, tmp_path, capsys):
    """--threads 99999 made a runtime create thread pools until the machine stalled."""
    (tmp_path / "m.onnx").write_bytes(b"")
    argv = [a.format(file=tmp_path / "m.onnx", out=tmp_path / "out") for a in argv]
    json_flag = [] if argv[0] == "qat" else ["--json", str(tmp_path / "r.json")]
    assert main([*argv, "--threads", "99999", *json_flag]) == 2
    assert "--threads must be at most 512, got 99999" in capsys.readouterr().err
