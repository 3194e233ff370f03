"""``quantaware export``: a user's model from a .py file (float or quantized) to ONNX."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from tests._helpers import Exploit, run_cli

from quantaware.cli import main

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("single_thread")

USER_FILE = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build():
    return Net()


def calibration():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(3)]
"""


def ort_outputs(path, batches) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x.numpy()})[0] for x in batches])


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def user(single_thread, tmp_path_factory):
    """A model in the user's own file, its trained weights, and ``quantize`` run on it."""
    root = tmp_path_factory.mktemp("user")
    (root / "mynet.py").write_text(USER_FILE)
    spec = importlib.util.spec_from_file_location("mynet_for_export_tests", root / "mynet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(3)
    original = module.build().eval()
    with torch.no_grad():
        original.bn.running_mean.uniform_(-1, 1)
        original.bn.running_var.uniform_(0.5, 2)
    torch.save(original.state_dict(), root / "weights.pt")
    model = ["--model", f"{root / 'mynet.py'}:build", "--weights", str(root / "weights.pt")]
    data = ["--data", f"{root / 'mynet.py'}:calibration"]
    code, _, stderr = run_cli(["quantize", *model, *data, "--no-verify", "--threads", "1",
                               "--out", str(root / "out")])
    assert code == 0, stderr
    return {"root": root, "out": root / "out", "model": model, "data": data,
            "original": original, "batches": module.calibration()}


def test_export_quantized_checkpoint_reproduces_the_int8_file(user, tmp_path):
    path = tmp_path / "again" / "model-int8.onnx"
    code, stdout, stderr = run_cli([
        "export", *user["model"], *user["data"], "--quantized",
        str(user["out"] / "model-int8.pt"), "--out", str(path), "--json",
        str(tmp_path / "summary.json")])
    assert code == 0, stderr
    assert f"wrote {path}" in " ".join(stdout.split()) and "quantized)" in stdout
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(path)
    want = ort_outputs(user["out"] / "model-int8.onnx", user["batches"])
    np.testing.assert_array_equal(ort_outputs(path, user["batches"]), want)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"model": user["model"][1], "quantized": str(user["out"] / "model-int8.pt"),
                       "format": "onnx", "path": str(path),
                       "size_bytes": path.stat().st_size}


def test_export_float_model_from_a_file_with_weights(user, tmp_path):
    path = tmp_path / "float.onnx"
    code, stdout, stderr = run_cli(["export", *user["model"], "--input-shape", "3,8,8",
                                    "--out", str(path)])
    assert code == 0, stderr
    assert "float)" in stdout
    assert "QuantizeLinear" not in op_types(path)
    got = ort_outputs(path, user["batches"])  # batches of 8 through a batch-1 example
    with torch.no_grad():
        want = torch.cat([user["original"](x) for x in user["batches"]]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, ort_outputs(user["out"] / "model-fp32.onnx",
                                                user["batches"]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, ort_outputs(user["out"] / "model-int8.onnx", user["batches"]),
                           rtol=0, atol=1e-7)


@pytest.mark.parametrize("extra, message", [
    ([], "give exactly one of --data"),
    (["--input-shape", "3,8,8", "--data", "digits"], "give exactly one of --data"),
    (["--input-shape", "3,x,8"], "--input-shape must be comma-separated ints, got '3,x,8'"),
    (["--input-shape", ""], "--input-shape must be comma-separated ints"),
    (["--input-shape", "0,8,8"], "--input-shape needs positive sizes"),
])
def test_bad_example_inputs(user, tmp_path, extra, message):
    code, _, stderr = run_cli(["export", *user["model"], "--out", str(tmp_path / "m.onnx"),
                               *extra])
    assert code == 2 and message in stderr
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoints_that_are_not_quantized_models(user, tmp_path):
    def export(ckpt, *model: str) -> tuple[int, str]:
        code, _, stderr = run_cli(["export", *(model or user["model"]), "--input-shape",
                                   "3,8,8", "--quantized", str(ckpt), "--out",
                                   str(tmp_path / "m.onnx")])
        return code, stderr

    code, err = export(user["root"] / "weights.pt")  # a float state dict
    assert code == 2 and "is not a quantized model written by `quantaware quantize`" in err
    code, err = export(tmp_path / "missing.pt")
    assert code == 2 and "does not exist" in err
    marker = tmp_path / "ran"
    torch.save({"format": "quantaware-quantized-v1", "config": Exploit(marker)},
               tmp_path / "evil.pt")
    code, err = export(tmp_path / "evil.pt")
    assert code == 2 and "refusing to load" in err and not marker.exists()
    data = (user["out"] / "model-int8.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 3])
    code, err = export(tmp_path / "cut.pt")
    assert code == 2 and "truncated or corrupt" in err
    # the ONNX file beside the checkpoint is named as such, not called corrupt
    code, err = export(user["out"] / "model-int8.onnx")
    assert code == 2 and "is an ONNX model, not a quantaware checkpoint" in err
    code, err = export(user["out"] / "model-int8.pt", "--model", "torch.nn:Identity")
    assert code == 2 and "does not fit model torch.nn:Identity" in err
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_that_is_not_a_torch_file(user, tmp_path):
    (tmp_path / "notes.pt").write_text("hello world")  # the unpickler raises KeyError
    code, _, stderr = run_cli(["export", *user["model"], "--input-shape", "3,8,8",
                               "--quantized", str(tmp_path / "notes.pt"), "--out",
                               str(tmp_path / "m.onnx")])
    assert code == 2 and "notes.pt" in stderr


def test_export_quantized_checkpoint_to_litert(user, tmp_path):
    """--format tflite: a full-integer LiteRT file of the same checkpoint; it computes
    what the INT8 ONNX file computes, within an output step or two."""
    pytest.importorskip("litert_torch")
    from quantaware.backends import LiteRTSession
    from quantaware.export.tflite import output_scale

    path = tmp_path / "model-int8.tflite"
    code, _, stderr = run_cli([
        "export", *user["model"], "--input-shape", "3,8,8", "--quantized",
        str(user["out"] / "model-int8.pt"), "--format", "tflite", "--out", str(path), "--json",
        str(tmp_path / "summary.json")])
    assert code == 0, stderr
    assert json.loads((tmp_path / "summary.json").read_text())["format"] == "tflite"
    session = LiteRTSession(path, threads=1)
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: x.numpy()})[0] for x in user["batches"]])
    want = ort_outputs(user["out"] / "model-int8.onnx", user["batches"])
    assert np.abs(got - want).max() <= 2 * output_scale(path) + 1e-6


def test_onnx_model_cannot_be_exported(user, tmp_path):
    code, _, stderr = run_cli(["export", "--model", str(user["out"] / "model-fp32.onnx"),
                               "--input-shape", "3,8,8", "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "export needs the PyTorch model" in stderr


def test_parser_rejects_unknown_format_and_missing_out(user, tmp_path):
    for extra in (["--format", "coreml", "--out", str(tmp_path / "m.mlmodel")], []):
        with pytest.raises(SystemExit) as exc:
            main(["export", *user["model"], "--input-shape", "3,8,8", *extra])
        assert exc.value.code == 2


@pytest.mark.parametrize("fmt, name", [("tflite", "m.onnx"), ("onnx", "m.tflite")])
def test_out_suffix_of_the_other_format_is_refused(user, tmp_path, fmt, name):
    code, _, stderr = run_cli(["export", *user["model"], "--input-shape", "3,8,8",
                               "--format", fmt, "--out", str(tmp_path / name)])
    assert code == 2 and f"a {fmt} file is written; name it m.{fmt}" in stderr
    assert not list(tmp_path.iterdir())
