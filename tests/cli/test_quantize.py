"""``quantaware quantize`` end to end (a trained CNN, a tiny BERT folder) and its bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests._helpers import Exploit, run_cli, write_bert_folder
from torch.utils.data import DataLoader

from quantaware.cli import main
from quantaware.data import load_digits_split
from quantaware.models import DigitsCNN
from quantaware.train import fit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("single_thread")

DIGITS = ["--model", "quantaware.models:DigitsCNN", "--data", "digits"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "cat", "dog", "sat", "on", "mat",
         "model", "small", "fast", "quantization", "keeps", "runs", "is", "good", "and",
         "##s", ".", ","]
SENTENCES = ["The cat sat on the mat.", "A small model runs fast.", "",
             "Quantization keeps models small.", "the dog is good", "a cat and a dog",
             "zebra crossing"]


@pytest.fixture(scope="module")
def digits_run(single_thread, tmp_path_factory):
    """DigitsCNN trained for one epoch, quantized through the CLI with --json."""
    root = tmp_path_factory.mktemp("digits")
    train, test = load_digits_split()
    torch.manual_seed(0)
    model = DigitsCNN()
    fit(model, DataLoader(train, batch_size=32, shuffle=True,
                          generator=torch.Generator().manual_seed(0)), epochs=1, seed=0)
    torch.save(model.state_dict(), root / "digits.pt")
    out = root / "out"
    code, stdout, stderr = run_cli([
        "quantize", *DIGITS, "--weights", str(root / "digits.pt"), "--num-calib", "128",
        "--num-eval", "180", "--batch-size", "60", "--threads", "1", "--out", str(out),
        "--json", str(root / "copy.json")])
    assert code == 0, stderr
    x, y = test.tensors
    with torch.no_grad():
        torch_accuracy = 100.0 * float((model.eval()(x[:180]).argmax(1) == y[:180]).float().mean())
    return {"out": out, "stdout": stdout, "stderr": stderr, "torch_accuracy": torch_accuracy,
            "results": json.loads((out / "results.json").read_text()),
            "copy": root / "copy.json"}


def test_quantize_writes_the_files(digits_run):
    out = digits_run["out"]
    assert {p.name for p in out.iterdir()} >= {"model-fp32.onnx", "model-int8.onnx",
                                               "model-int8.pt", "results.json"}
    assert not (out / "report.html").exists()  # only with --report
    results = digits_run["results"]
    assert set(results) == {"model", "calibration", "config", "target", "evaluation", "files",
                            "verify"}
    assert results["files"] == {
        "float_onnx": str(out / "model-fp32.onnx"), "int8_onnx": str(out / "model-int8.onnx"),
        "quantized_checkpoint": str(out / "model-int8.pt"),
        "results": str(out / "results.json")}
    assert json.loads(digits_run["copy"].read_text()) == results


def test_quantize_results_are_sane(digits_run):
    results = digits_run["results"]
    assert results["model"] == "quantaware.models:DigitsCNN"
    assert results["calibration"] == {"data": "digits", "samples": 128}
    assert results["config"]["name"] == "INT8_CNN"
    evaluation = results["evaluation"]
    assert evaluation["data"] == "digits" and evaluation["samples"] == 180
    assert evaluation["labeled"] and evaluation["threads"] == 1
    fp32, int8 = evaluation["models"]
    # --weights reached the model: ONNX Runtime scores what the trained torch model scores.
    assert fp32["accuracy"] == pytest.approx(digits_run["torch_accuracy"])
    assert fp32["accuracy"] > 85.0
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 3.0
    assert 95.0 <= int8["top1_agreement"] <= 100.0
    assert 0.99 < int8["cosine"] <= 1.0 + 1e-6
    assert int8["size_bytes"] < 0.5 * fp32["size_bytes"]
    assert fp32["batch"] == int8["batch"] == 60
    verify = results["verify"]
    assert verify["passed"] is True and verify["reference"] == "integer"
    assert verify["top1_agreement"] >= 0.99 and verify["max_error_lsb"] <= 1.0 + 1e-3


def test_quantize_prints_the_table_and_files(digits_run):
    stdout = digits_run["stdout"]
    assert "INT8_CNN in ONNX Runtime on 180 samples of digits" in " ".join(stdout.split())
    lines = stdout.splitlines()
    assert any("FP32" in line for line in lines) and any("INT8" in line for line in lines)
    verify = next(line for line in lines if line.startswith("verify:"))
    assert verify.startswith("verify: ONNX Runtime vs torch top-1 ") and "LSB -> PASS" in verify
    assert f"int8_onnx: {digits_run['out'] / 'model-int8.onnx'}" in stdout
    assert "calibrating on 128 samples from digits" in digits_run["stderr"]


def test_int8_onnx_runs_with_integer_weights(digits_run):
    import onnx

    path = digits_run["out"] / "model-int8.onnx"
    graph = onnx.load(str(path)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = load_digits_split()[1].tensors[0][:7].numpy()
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (7, 10)


# -- a Hugging Face model folder on a text file ------------------------------------------




@pytest.fixture(scope="module")
def bert_run(single_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    original = write_bert_folder(root / "tiny-bert", VOCAB, layers=1)
    (root / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")
    out = root / "out"
    code, stdout, stderr = run_cli([
        "--verbose", "quantize", "--model", str(root / "tiny-bert"), "--data",
        str(root / "sentences.txt"), "--batch-size", "4", "--threads", "1", "--out", str(out),
        "--report"])
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "original": original,
            "results": json.loads((out / "results.json").read_text())}


def test_quantize_text_model(bert_run):
    results = bert_run["results"]
    assert results["config"]["name"] == "INT8_TRANSFORMER"
    assert results["calibration"]["samples"] == 6  # the blank line is skipped
    evaluation = results["evaluation"]
    assert not evaluation["labeled"] and evaluation["samples"] == 6
    fp32, int8 = evaluation["models"]
    assert "accuracy" not in fp32 and "accuracy" not in int8
    assert 0.0 <= int8["top1_agreement"] <= 100.0
    assert 0.99 < int8["cosine"] <= 1.0 + 1e-6
    assert int8["size_bytes"] < fp32["size_bytes"] and fp32["batch"] == 4
    assert results["verify"]["passed"] is True and results["verify"]["cosine"] >= 0.99
    assert "INT8_TRANSFORMER in ONNX Runtime on 6 samples" in " ".join(bert_run["stdout"].split())
    # Embeddings are float outputs: the error is absolute, not in output steps.
    assert "(float output) -> PASS" in bert_run["stdout"] and "None LSB" not in bert_run["stdout"]


def test_report_for_a_text_model(bert_run):
    out = bert_run["out"]
    assert bert_run["results"]["files"]["report"] == str(out / "report.html")
    assert f"report: {out / 'report.html'}" in bert_run["stdout"]
    html = (out / "report.html").read_text()
    assert f"{out.parent / 'tiny-bert'} (INT8_TRANSFORMER, ONNX Runtime)" in html
    assert "FP32" in html and "INT8" in html and "<img" in html


def test_text_model_onnx_files_take_token_ids(bert_run):
    from quantaware.zoo.minilm import MiniLMTokenizer

    folder = bert_run["out"].parent / "tiny-bert"
    ids, mask = MiniLMTokenizer(16, model_dir=folder)([s for s in SENTENCES if s])
    with torch.no_grad():
        want = bert_run["original"](ids, mask).numpy()
    outputs = {}
    for name in ("model-fp32.onnx", "model-int8.onnx"):
        session = ort.InferenceSession(str(bert_run["out"] / name),
                                       providers=["CPUExecutionProvider"])
        assert [(i.name, i.type) for i in session.get_inputs()] == [
            ("input_ids", "tensor(int64)"), ("attention_mask", "tensor(int64)")]
        outputs[name] = session.run(None, {"input_ids": ids.numpy(),
                                           "attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(outputs["model-fp32.onnx"], want, atol=1e-5)
    cosine = (outputs["model-int8.onnx"] * want).sum(1)  # unit-length embeddings
    assert cosine.min() > 0.98 and not np.array_equal(outputs["model-int8.onnx"], want)


# -- bad inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "-3"], "--batch-size must be a positive integer, got -3"),
    (["--num-calib", "0"], "--num-calib must be a positive integer, got 0"),
    (["--num-calib", "-8"], "--num-calib must be a positive integer, got -8"),
    (["--num-eval", "0"], "--num-eval must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--size", "0"], "--size must be a positive integer"),
    (["--method", "median"], "unknown --method 'median'; choose one of minmax"),
    (["--preset", "INT3"], "unknown preset 'INT3'"),
    (["--preset", "FP16", "--method", "mse"], "FP16 quantizes no activations"),
    (["--skip", "fc2", "--skip", "clasifier"],
     "--skip 'clasifier' matches no layer of DigitsCNN; its layers are named like stem.0"),
])
def test_bad_options_are_usage_errors(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["quantize", *DIGITS, "--num-calib", "32", "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    ([*DIGITS, "--num-calib", "many"], "argument --num-calib: invalid int value: 'many'"),
    ([*DIGITS, "--batch-size", "1.5"], "argument --batch-size: invalid int value: '1.5'"),
    ([*DIGITS, "--method"], "argument --method: expected one argument"),
    (["--model", "quantaware.models:DigitsCNN"], "the following arguments are required: --data"),
])
def test_malformed_options_are_rejected_by_the_parser(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", *argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def not_a_module():
    return "DigitsCNN"


def no_batches():
    return []


def wrong_shape():
    return [torch.randn(4, 3, 32, 32)]


def test_weights_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"stem.0.weight": Exploit(marker)}, tmp_path / "evil.pt")
    assert main(["quantize", *DIGITS, "--weights", str(tmp_path / "evil.pt"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "would run code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights, message", [
    ("truncated", "truncated"),
    ("other model", "do not fit the model (missing ['stem.0.weight'"),
])
def test_weights_that_cannot_be_used(tmp_path, capsys, weights, message):
    path = tmp_path / "w.pt"
    if weights == "truncated":
        torch.save(DigitsCNN().state_dict(), path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    assert main(["quantize", *DIGITS, "--weights", str(path), "--out",
                 str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_bad_model_sources(tmp_path, capsys):
    def quantize(model: str, *extra: str) -> tuple[int, str]:
        code = main(["quantize", "--model", model, "--data", "digits", "--num-calib", "8",
                     "--out", str(tmp_path / "out"), *extra])
        return code, capsys.readouterr().err

    (tmp_path / "page.onnx").write_text("<html>not a model</html>")
    code, err = quantize(str(tmp_path / "page.onnx"))
    assert code == 2 and "is not a readable ONNX model" in err
    code, err = quantize(str(tmp_path / "missing.onnx"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "broken.py").write_text("import torch\n1 / 0\n")
    code, err = quantize(f"{tmp_path / 'broken.py'}:build")
    assert code == 2 and "failed while importing: ZeroDivisionError" in err
    code, err = quantize(f"{__name__}:not_a_module")
    assert code == 2 and "returned str, expected a torch.nn.Module" in err
    code, err = quantize("resnet18")
    assert code == 2 and "unknown model 'resnet18'" in err
    code, err = quantize("quantaware.models:DigitsCNN", "--weights", str(tmp_path / "no.pt"))
    assert code == 2 and "no.pt' does not exist" in err
    assert not (tmp_path / "out").exists()


def test_exported_onnx_file_cannot_be_quantized(digits_run, tmp_path, capsys):
    code = main(["quantize", "--model", str(digits_run["out"] / "model-fp32.onnx"),
                 "--data", "digits", "--num-calib", "8", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "quantization needs the PyTorch model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_data_sources(tmp_path, capsys):
    def quantize(data: str) -> tuple[int, str]:
        code = main(["quantize", "--model", "quantaware.models:DigitsCNN", "--data", data,
                     "--out", str(tmp_path / "out")])
        return code, capsys.readouterr().err

    code, err = quantize(str(tmp_path / "photos"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "s.txt").write_text("a sentence\n")
    code, err = quantize(str(tmp_path / "s.txt"))
    assert code == 2 and "need the model's tokenizer" in err
    code, err = quantize(f"{__name__}:no_batches")
    assert code == 2 and "yielded no batches" in err
    code, err = quantize(f"{__name__}:wrong_shape")
    assert code == 2 and "fails on the data" in err and "(1, 3, 32, 32)" in err
    assert not (tmp_path / "out").exists()


def test_model_with_two_positional_inputs(tmp_path):
    """Batches of ((signal, side), labels) from a MODULE:FUNCTION source: calibrated,
    exported with two inputs, compared and verified; the spec's ":two" is printed
    as text, not as an emoji."""
    out = tmp_path / "out"
    code, stdout, stderr = run_cli([
        "quantize", "--model", "tests.cli._tiny:two", "--data", "tests.cli._tiny:two_batches",
        "--threads", "1", "--out", str(out)])
    assert code == 0, stderr
    assert "tests.cli._tiny:two:" in stdout
    results = json.loads((out / "results.json").read_text())
    int8 = results["evaluation"]["models"][1]
    assert int8["top1_agreement"] >= 90.0
    assert results["verify"]["max_error_lsb"] == 0.0, results["verify"]
    session = ort.InferenceSession(str(out / "model-int8.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [tuple(i.shape[1:]) for i in session.get_inputs()] == [(1, 16), (3,)]
    assert int8["batch"] == 16  # the function's own batches
    json_path = tmp_path / "eval.json"
    code, _, stderr = run_cli([  # --batch-size regroups them
        "evaluate", "--model", str(out / "model-fp32.onnx"), "--quantized",
        str(out / "model-int8.onnx"), "--data", "tests.cli._tiny:two_batches",
        "--batch-size", "24", "--threads", "1", "--json", str(json_path)])
    assert code == 0, stderr
    regrouped = json.loads(json_path.read_text())
    assert regrouped["models"][1]["batch"] == 24 and regrouped["samples"] == 64


def test_quantize_for_litert_keeps_the_linear_before_gelu_integer(tmp_path):
    """--target litert: the linear read only by GELU keeps its int8 output (recorded in
    the config), so it runs as an int8 kernel in the .tflite file the command writes,
    evaluates and verifies in LiteRT; the default target's checkpoint exported to
    LiteRT leaves it float32 there."""
    pytest.importorskip("litert_torch")
    from quantaware.export.tflite import tflite_ops

    fcs, results = {}, {}
    out = tmp_path / "out"  # one folder: the litert run replaces the ONNX Runtime run's files
    for target in ("onnxruntime", "litert"):
        code, stdout, stderr = run_cli([
            "quantize", "--model", "tests.cli._tiny:gelu_mlp", "--data", "tests.cli._tiny:batches",
            "--num-calib", "128", "--num-eval", "64", "--threads", "1", "--target", target,
            "--out", str(out)])
        assert code == 0, stderr
        results[target] = json.loads((out / "results.json").read_text())
        rules = results[target]["config"]["overrides"]
        assert [r.get("integer_output") for r in rules] == ([True] if target == "litert" else [])
        if target == "litert":
            assert sorted(p.name for p in out.iterdir()) == [
                "model-fp32.tflite", "model-int8.pt", "model-int8.tflite", "results.json"]
            assert "in LiteRT on 64 samples" in stdout and "LiteRT vs torch" in stdout
            path = out / "model-int8.tflite"
        else:
            code, _, stderr = run_cli([
                "export", "--model", "tests.cli._tiny:gelu_mlp", "--input-shape", "1,16",
                "--quantized", str(out / "model-int8.pt"), "--format", "tflite",
                "--out", str(tmp_path / "m.tflite")])
            assert code == 0, stderr
            path = tmp_path / "m.tflite"
        fcs[target] = [d[0] for name, d in tflite_ops(path) if name == "FULLY_CONNECTED"]
    assert fcs == {"onnxruntime": ["float32", "int8"], "litert": ["int8", "int8"]}
    litert = results["litert"]
    assert litert["evaluation"]["backend"] == "litert"
    assert litert["verify"]["backend"] == "litert" and litert["verify"]["passed"]
    assert litert["evaluation"]["models"][1]["top1_agreement"] >= 90.0
    assert results["onnxruntime"]["evaluation"]["backend"] == "onnxruntime"
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "tests.cli._tiny:gelu_mlp", "--data",
              "tests.cli._tiny:batches", "--target", "tensorrt"])


def test_a_forward_branching_on_tensor_values_is_named_in_one_line(tmp_path):
    """torch.export cannot record `if h.mean() > 0:`; the error names that line instead
    of dumping ~140 lines of exported graphs, and no empty --out folder is left."""
    out = tmp_path / "out" / "run"
    code, _, stderr = run_cli([
        "quantize", "--model", "tests.cli._tiny:branching", "--data", "tests.cli._tiny:batches",
        "--num-calib", "32", "--num-eval", "32", "--threads", "1", "--out", str(out)])
    assert code == 1
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "branches on a tensor's value" in error[0]
    assert "_tiny.py\", line" in error[0] and "`if h.mean() > 0:`" in error[0]
    assert "def forward" not in stderr and "GraphModule" not in stderr
    assert not (tmp_path / "out").exists()


def test_skipped_layers_stay_float_in_the_int8_file(tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run_cli(["quantize", *DIGITS, "--num-calib", "32", "--num-eval", "32",
                               "--skip", "fc2", "--skip", "branch_*", "--threads", "1",
                               "--out", str(out)])
    assert code == 0, stderr
    graph = onnx.load(str(out / "model-int8.onnx")).graph
    dtypes = {i.name: i.data_type for i in graph.initializer}
    float32, int8 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT8
    assert dtypes["fc2.weight"] == float32 and dtypes["branch_b.3.0.weight"] == float32
    assert dtypes["fc1._qweight"] == int8 and dtypes["stem.0._qweight"] == int8
    results = json.loads((out / "results.json").read_text())
    assert {"pattern": "fc2", "skip": True} in results["config"]["overrides"]
    assert results["verify"]["passed"]
