"""quantaware.pipeline: validation with paths, fast overrides, resumable steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from quantaware import checkpoint
from quantaware.pipeline import PipelineError, load_pipeline, run_pipeline, validate
from quantaware.sources import SourceError

pytestmark = pytest.mark.usefixtures("single_thread")

MINIMAL = {"model": {"source": "quantaware.models:DigitsCNN"}, "data": {"train": "digits"}}


def _write(tmp_path: Path, data: dict, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("raw", "message"), [
    ({"model": {"source": "a:b"}}, "data.train: required"),
    ({**MINIMAL, "quantisation": {}}, "quantisation: unknown key; allowed here: name, out"),
    ({**MINIMAL, "qat": {"epoch": 2}}, "qat.epoch: unknown key; allowed here: preset, epochs"),
    ({**MINIMAL, "qat": {"epochs": 0}}, "qat.epochs: got 0; expected a positive integer"),
    ({**MINIMAL, "qat": {"lr": "fast"}}, "qat.lr: got 'fast'; expected a positive number"),
    ({**MINIMAL, "quantization": {"method": "max"}},
     "quantization.method: 'max' is not one of minmax, moving_average, percentile"),
    ({**MINIMAL, "deploy": {"targets": ["tensorrt"]}},
     "deploy.targets: got ['tensorrt']; expected a list of distinct formats from onnx, tflite"),
    ({**MINIMAL, "deploy": {"targets": ["onnx", "onnx"]}}, "deploy.targets: got ['onnx', 'onnx']"),
    ({**MINIMAL, "quantization": {"target": "tensorrt"}},
     "quantization.target: 'tensorrt' is not one of onnxruntime, litert"),
    ({**MINIMAL, "quantization": {"target": ["litert"]}},
     "quantization.target: ['litert'] is not one of onnxruntime, litert"),
    ({**MINIMAL, "deploy": {"targets": [["onnx"]]}}, "deploy.targets: got [['onnx']]"),
    ({**MINIMAL, "quantization": {"preset": "W4A4"}, "deploy": {"targets": ["onnx", "tflite"]}},
     "quantization.preset: W4A4: 4-bit activations have no LiteRT form"),
    ({**MINIMAL, "qat": {"preset": "INT8_DYNAMIC"}, "quantization": {"target": "litert"}},
     "qat.preset: INT8_DYNAMIC: dynamic activation quantization"),
    ({**MINIMAL, "deploy": {"targets": "onnx"}}, "deploy.targets: got 'onnx'"),
    ({**MINIMAL, "data": {"train": "digits", "batch_size": True}}, "data.batch_size: got True"),
    ({**MINIMAL, "model": "x"}, "model: expected a mapping"),
    ({**MINIMAL, "version": 2}, "version: 2 is not supported"),
    ({**MINIMAL, "seed": 10**23},
     "seed: got 100000000000000000000000; expected an integer from 0 to 2"),
    ({**MINIMAL, "threads": 99999}, "threads: got 99999; expected an integer from 1 to 512"),
    ({**MINIMAL, "fast": {"qat": {"epochs": -1}}}, "fast: qat.epochs: got -1"),
    ({**MINIMAL, "quantization": {"preset": "INT9"}},
     "quantization.preset: got 'INT9'; expected a preset name: FP16, INT8, INT8_DYNAMIC"),
    ({**MINIMAL, "qat": {"preset": "bogus"}}, "qat.preset: got 'bogus'; expected a preset"),
])
def test_validation_names_the_key_and_the_allowed_values(raw, message):
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(raw)


def test_defaults_optional_sections_and_fast_overrides():
    cfg = validate({**MINIMAL, "baseline": {}, "fast": {"data": {"num_train": 32}}})
    assert cfg["qat"] is None and cfg["baseline"]["train"] is None
    assert cfg["data"]["num_train"] is None and cfg["deploy"]["targets"] == ["onnx"]
    assert validate({**MINIMAL, "fast": {"data": {"num_train": 32}}},
                    fast=True)["data"]["num_train"] == 32


def test_load_pipeline_reports_the_file(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "qat": {"epochz": 1}})
    with pytest.raises(PipelineError, match=r"p\.yaml: qat\.epochz: unknown key"):
        load_pipeline(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_pipeline(bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  source: a:b\nmodel:\n  source: c:d\ndata:\n  train: digits\n")
    with pytest.raises(PipelineError, match="key 'model' is given twice"):
        load_pipeline(twice)  # YAML itself keeps the last one silently
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(PipelineError, match=r"binary\.yaml: not a text file"):
        load_pipeline(binary)
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_pipeline(tmp_path / "missing.yaml")


def _small(tmp_path: Path, **changes) -> Path:
    data = {**MINIMAL,
            "data": {"train": "digits", "num_train": 256, "num_calibration": 32,
                     "num_evaluation": 64, "batch_size": 32},
            "baseline": {"train": {"epochs": 1}},
            "qat": {"epochs": 2, "lr": 1e-4},
            "evaluation": {"latency_runs": 2}, "deploy": {"verify": False}}
    for key, value in changes.items():
        data[key] = value
    return _write(tmp_path, data)


def test_second_run_skips_finished_steps_and_reruns_changed_ones(tmp_path):
    path = _small(tmp_path, qat=None, deploy={"targets": []})
    first, messages = [], []
    results = run_pipeline(path, out=str(tmp_path / "out"), say=first.append)
    assert any("training 1 epoch" in m for m in first)
    state = json.loads((tmp_path / "out" / "pipeline-state.json").read_text())
    assert set(state["steps"]) == {"baseline", "quantization"}
    again = run_pipeline(path, out=str(tmp_path / "out"), say=messages.append)
    assert any("baseline: done before" in m for m in messages)
    assert any("quantization: done before" in m for m in messages)
    assert again["steps"] == results["steps"]
    # A new calibration method reruns quantization, not the baseline.
    changed = _small(tmp_path, qat=None, quantization={"method": "mse"},
                     deploy={"targets": []})
    messages.clear()
    run_pipeline(changed, out=str(tmp_path / "out"), say=messages.append)
    assert any("baseline: done before" in m for m in messages)
    assert any("quantization: calibrating" in m for m in messages)


def test_damaged_saved_steps_are_run_again(tmp_path):
    """A corrupt cached checkpoint ended the run with "truncated or corrupt ...; write
    it again" (a file the user never wrote), and a malformed pipeline-state.json
    with a raw AttributeError."""
    path = _small(tmp_path, qat=None, deploy={"targets": []})
    out = tmp_path / "out"
    first = run_pipeline(path, out=str(out), say=lambda m: None)
    (out / "float.pt").write_bytes(b"PK\x03\x04 cut")
    (out / "ptq-int8.pt").write_bytes(b"")
    messages: list[str] = []
    again = run_pipeline(path, out=str(out), say=messages.append)
    assert any("float.pt cannot be read" in m for m in messages)
    assert any("ptq-int8.pt cannot be read" in m for m in messages)
    assert any("training 1 epoch" in m for m in messages)
    assert again["steps"]["quantization"] == first["steps"]["quantization"]
    for state in ('{"steps": []}', '{"steps": {"baseline": "done"}}', '[1]', "\xff"):
        (out / "pipeline-state.json").write_text(state)
        messages.clear()
        run_pipeline(path, out=str(out), say=messages.append)
        assert any("training 1 epoch" in m for m in messages), state


def test_a_weights_file_changed_under_the_same_name_reruns_the_steps(tmp_path):
    """The fingerprints held paths only: new weights at the same path were reported
    "done before" and the old model was deployed."""
    import os

    import torch

    from quantaware.models import DigitsCNN

    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), weights)
    path = _small(tmp_path, qat=None, deploy={"targets": []}, baseline={"train": None},
                  model={"source": "quantaware.models:DigitsCNN", "weights": "w.pt"})
    run_pipeline(path, out=str(tmp_path / "out"))
    messages: list[str] = []
    run_pipeline(path, out=str(tmp_path / "out"), say=messages.append)
    assert any("quantization: done before" in m for m in messages)
    torch.manual_seed(1)
    torch.save(DigitsCNN().state_dict(), weights)
    later = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(later, later))
    messages.clear()
    run_pipeline(path, out=str(tmp_path / "out"), say=messages.append)
    assert not any("done before" in m for m in messages), messages


def raising_model():
    raise RuntimeError("the weights server is down")


def test_a_failed_run_leaves_no_earlier_results_and_a_file_as_out_is_named(tmp_path):
    """A failing re-run kept the previous results.json beside files it no longer
    described; `out:` naming a file failed with "[Errno 17] File exists"."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    path = _small(tmp_path, model={"source": f"{__name__}:raising_model"})
    with pytest.raises(Exception, match="the weights server is down"):
        run_pipeline(path, out=str(out))
    assert not (out / "results.json").exists()
    (tmp_path / "taken").write_text("")
    with pytest.raises(PipelineError, match=r"out: .*taken' is a file; give a folder"):
        run_pipeline(path, out=str(tmp_path / "taken"))


def test_a_model_that_does_not_fit_its_data_fails_before_anything_is_saved(tmp_path):
    """It failed with a raw conv2d shape error after writing float.pt."""
    path = _small(tmp_path, qat=None, baseline={"train": None},
                  model={"source": "quantaware.models:MNIST1DCNN"})
    with pytest.raises(SourceError, match=r"fails on the data from digits.*data\.image_size"):
        run_pipeline(path, out=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "float.pt").exists()


def test_killed_qat_resumes_to_the_same_weights(tmp_path, monkeypatch):
    path = _small(tmp_path, deploy={"targets": []})
    run_pipeline(path, out=str(tmp_path / "whole"))
    whole = checkpoint.load_checkpoint(tmp_path / "whole" / "qat-final.pt")["model"]

    real_save = checkpoint.save_checkpoint

    def save_then_die(target, payload):
        written = real_save(target, payload)
        if Path(target).name == "epoch_001.pt":
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint
        return written

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path, out=str(tmp_path / "killed"))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    messages: list[str] = []
    run_pipeline(path, out=str(tmp_path / "killed"), say=messages.append)
    assert any("resuming QAT after epoch 1" in m for m in messages)
    resumed = checkpoint.load_checkpoint(tmp_path / "killed" / "qat-final.pt")["model"]
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_unlabelled_training_data_is_refused_for_training(tmp_path):
    def unlabeled():
        return [torch.randn(8, 1, 8, 8)]

    import sys
    import types

    module = types.ModuleType("pipeline_test_data")
    module.unlabeled = unlabeled
    sys.modules["pipeline_test_data"] = module
    path = _small(tmp_path, data={"train": "pipeline_test_data:unlabeled"},
                  deploy={"targets": []})
    with pytest.raises(PipelineError, match=r"baseline\.train needs labelled data"):
        run_pipeline(path, out=str(tmp_path / "out"))


def test_model_with_two_positional_inputs(tmp_path):
    """Baseline training, PTQ, QAT and deploy of a model whose batches are
    ((signal, side), labels)."""
    path = _write(tmp_path, {
        "model": {"source": "tests.cli._tiny:two"},
        "data": {"train": "tests.cli._tiny:two_batches", "num_calibration": 32,
                 "num_evaluation": 32, "batch_size": 16},
        "baseline": {"train": {"epochs": 1}}, "qat": {"epochs": 1, "lr": 1e-4},
        "evaluation": {"latency_runs": 2}, "deploy": {"verify": True}})
    results = run_pipeline(path, out=str(tmp_path / "out"), say=lambda message: None)
    assert results["steps"]["baseline"]["trained"]
    for step in ("ptq", "qat"):
        report = results["evaluation"][step]["verify"]
        assert report["passed"] and report["max_error_lsb"] == 0.0, report
    assert Path(results["files"]["qat_onnx"]).is_file()


def test_deploy_to_litert_quantized_for_it(tmp_path):
    """quantization.target: litert keeps the int8 output of the linear before GELU, QAT
    keeps that choice (also when it is loaded as done before), and deploy.targets
    [onnx, tflite] evaluates and verifies PTQ and QAT in ONNX Runtime and LiteRT."""
    pytest.importorskip("litert_torch")
    from quantaware.export.tflite import tflite_ops

    path = _write(tmp_path, {
        "model": {"source": "tests.cli._tiny:gelu_mlp"},
        "data": {"train": "tests.cli._tiny:batches", "num_calibration": 64,
                 "num_evaluation": 64, "batch_size": 32},
        "quantization": {"target": "litert"},
        "baseline": {"train": {"epochs": 1}}, "qat": {"epochs": 1, "lr": 1e-4},
        "evaluation": {"latency_runs": 2}, "deploy": {"targets": ["onnx", "tflite"]}})
    out = tmp_path / "out"
    results = run_pipeline(path, out=str(out), say=lambda message: None)
    assert set(results["evaluation"]) == {"ptq", "qat", "ptq_tflite", "qat_tflite"}
    for key, result in results["evaluation"].items():
        backend = "litert" if key.endswith("tflite") else "onnxruntime"
        assert result["backend"] == backend and result["verify"]["backend"] == backend
        assert result["verify"]["passed"], (key, result["verify"])
    assert sorted(results["files"]) == ["float_onnx", "float_tflite", "ptq_onnx", "ptq_tflite",
                                        "qat_onnx", "qat_tflite", "results"]
    for step in ("ptq", "qat"):
        fcs = [d[0] for name, d in tflite_ops(results["files"][f"{step}_tflite"])
               if name == "FULLY_CONNECTED"]
        assert fcs == ["int8", "int8"], (step, fcs)
    messages: list[str] = []
    again = run_pipeline(path, out=str(out), say=messages.append)
    assert any("QAT: done before" in m for m in messages)
    assert again["evaluation"]["qat_tflite"]["verify"]["passed"]


def test_a_failing_target_keeps_the_other_targets_results(tmp_path, monkeypatch):
    """The LiteRT export fails: the ONNX results are still written to results.json, with
    the failure, and the run ends in an error naming the target."""
    from quantaware import workflow
    from quantaware.export.onnx import ExportError

    real = workflow.export_model

    def export_model(module, path, example, file_format="onnx"):
        if file_format == "tflite":
            raise ExportError("LiteRT conversion failed for Sequential: no lowering")
        return real(module, path, example, file_format)

    monkeypatch.setattr(workflow, "export_model", export_model)
    path = _small(tmp_path, qat=None, deploy={"targets": ["tflite", "onnx"], "verify": False})
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=r"deploy.targets: tflite failed \(ExportError: "
                                            r"LiteRT conversion failed"):
        run_pipeline(path, out=str(out), say=lambda message: None)
    results = json.loads((out / "results.json").read_text())
    assert set(results["evaluation"]) == {"ptq"}
    assert results["failed_targets"]["tflite"].startswith("ExportError: LiteRT conversion")
    assert Path(results["files"]["ptq_onnx"]).is_file()


def test_quantization_skip_keeps_layers_float_in_ptq_and_qat(tmp_path):
    typo = _small(tmp_path, baseline={"train": None}, quantization={"skip": ["fc9"]})
    with pytest.raises(SourceError, match=r"quantization\.skip 'fc9' matches no layer"):
        run_pipeline(typo, out=str(tmp_path / "typo"))
    assert not (tmp_path / "typo" / "float.pt").exists()
    path = _small(tmp_path, baseline={"train": None}, quantization={"skip": ["fc2"]},
                  qat={"epochs": 1}, deploy={"targets": []})
    run_pipeline(path, out=str(tmp_path / "out"))
    from quantaware.checkpoint import load_checkpoint

    payload = load_checkpoint(tmp_path / "out" / "ptq-int8.pt")
    assert {"pattern": "fc2", "skip": True} in payload["config"]["overrides"]
    qat = load_checkpoint(tmp_path / "out" / "qat-final.pt")["model"]
    assert any(k.startswith("fc1.weight_quantizer") for k in qat)
    assert not any(k.startswith("fc2.") and "quantizer" in k for k in qat)
    with pytest.raises(PipelineError, match=r"quantization\.skip"):
        load_pipeline(_small(tmp_path, quantization={"skip": "fc2"}))


def test_qat_trains_the_ptq_config_unless_given_a_preset():
    """QAT took presets.INT8 with min-max ranges whatever the quantization step used:
    the calibration method, the measured default and transformer rules were lost."""
    from quantaware import presets
    from quantaware.deploy import default_config
    from quantaware.pipeline import _qat_config
    from quantaware.zoo.minilm import MiniLMConfig, minilm

    cfg = validate({**MINIMAL, "quantization": {"method": "mse", "skip": ["fc"]},
                    "qat": {}})
    ptq = default_config(minilm(MiniLMConfig(vocab_size=40, hidden_size=32, num_layers=1,
                                             num_heads=4, intermediate_size=64)))
    assert _qat_config(cfg, ptq) is ptq
    cfg["qat"]["preset"] = "W4A4"
    config = _qat_config(cfg, ptq)
    assert config.activation.observer == "mse" and config.activation.bits == 4
    assert config.resolve("fc") is None and config.resolve("fc.0") is None
    assert config.resolve("head") == presets.W4A4.resolve("head")


def test_a_data_folder_stamp_sees_files_rewritten_in_place(tmp_path):
    """Only each folder's time and file count were read: an image rewritten under its
    own name left the stamp unchanged, and the finished steps were reused."""
    import os

    from quantaware.pipeline import _stamp

    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"first")
    (folder / "b.png").write_bytes(b"second")
    before = _stamp(str(tmp_path / "photos"))
    assert before == _stamp(str(tmp_path / "photos"))
    os.utime(tmp_path / "photos" / "cat", ns=(1, 1))
    pinned = _stamp(str(tmp_path / "photos"))
    (folder / "a.png").write_bytes(b"FIRST")  # same size, same folder entries
    os.utime(folder, ns=(1, 1))
    later = (folder / "a.png").stat().st_mtime_ns + 10**9
    os.utime(folder / "a.png", ns=(later, later))
    assert _stamp(str(tmp_path / "photos")) != pinned
