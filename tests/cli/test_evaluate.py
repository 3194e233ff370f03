"""``quantaware evaluate``: float vs INT8 on photos in class folders, and the bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tests._helpers import run_cli, save_photo
from torch import nn

from quantaware.sources import load_data, read_labels

PIL = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL = f"{__name__}:image_cnn"
LABELS = ["person", "cat", "cup", "rocket"]


def image_cnn() -> nn.Module:
    """3 x 32 x 32 photos -> 4 classes (in the order of ``LABELS``)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, len(LABELS))).eval()


@pytest.fixture(scope="module")
def quantized(single_thread, tmp_path_factory):
    """Photos in class folders, a labels file, and ``quantaware quantize`` run on them
    (calibrated on other, unlabelled photos)."""
    root = tmp_path_factory.mktemp("photos")
    calib = root / "calibration"
    save_photo(skdata.immunohistochemistry(), calib / "stain.png")
    save_photo(skdata.coffee()[::-1], calib / "more" / "coffee-upside-down.jpg")
    save_photo(skdata.camera(), calib / "camera.png")
    photos = root / "photos"
    save_photo(skdata.chelsea(), photos / "cat" / "chelsea.jpg")
    save_photo(skdata.chelsea()[:, ::-1], photos / "cat" / "chelsea-mirrored.png")
    save_photo(skdata.coffee(), photos / "cup" / "coffee.jpg")
    save_photo(skdata.astronaut(), photos / "person" / "astronaut.png")
    save_photo(skdata.rocket(), photos / "rocket" / "rocket.jpg")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    out = root / "out"
    code, _, stderr = run_cli(["quantize", "--model", MODEL, "--data", str(calib),
                               "--eval-data", str(photos), "--labels", str(root / "labels.txt"),
                               "--size", "32", "--preset", "INT8", "--method", "mse",
                               "--no-verify", "--threads", "1", "--out", str(out)])
    assert code == 0, stderr
    return {"root": root, "calibration": calib, "photos": photos,
            "labels": root / "labels.txt", "out": out,
            "results": json.loads((out / "results.json").read_text())}


def evaluate(quantized, *extra: str, model: str | None = None,
             int8: str | None = None) -> tuple[int, str, str]:
    return run_cli(["evaluate", "--model", model or str(quantized["out"] / "model-fp32.onnx"),
                    "--quantized", int8 or str(quantized["out"] / "model-int8.onnx"),
                    "--size", "32", "--runs", "3", "--threads", "1", *extra])


def torch_accuracy(quantized) -> float:
    data = load_data(str(quantized["photos"]), size=32,
                     class_names=read_labels(quantized["labels"]))
    assert data.labels.tolist() == [1, 1, 2, 0, 3]  # folders matched by name to LABELS
    with torch.no_grad():
        predictions = torch.cat([image_cnn()(x).argmax(1) for x in data.inputs])
    return 100.0 * float((predictions == data.labels).float().mean())


@pytest.fixture(scope="module")
def onnx_pair(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate") / "pair.json"
    code, stdout, stderr = evaluate(quantized, "--data", str(quantized["photos"]), "--labels",
                                    str(quantized["labels"]), "--json", str(path))
    assert code == 0, stderr
    return stdout, json.loads(path.read_text())


def test_evaluate_onnx_files_prints_both_rows(onnx_pair):
    stdout, _ = onnx_pair
    title = " ".join(stdout.split())  # the table title wraps on narrow consoles
    assert "model-fp32.onnx vs model-int8.onnx in ONNX Runtime on 5 samples of" in title
    rows = [line for line in stdout.splitlines() if "FP32" in line or "INT8" in line]
    assert len(rows) == 2 and "1.00x" in rows[0]
    assert "results written to" in stdout


def test_quantize_calibrated_on_unlabelled_photos(quantized):
    results = quantized["results"]
    assert results["calibration"] == {"data": str(quantized["calibration"]), "samples": 3}
    assert results["evaluation"]["data"] == str(quantized["photos"])
    assert results["evaluation"]["samples"] == 5 and results["evaluation"]["labeled"]
    assert results["config"]["name"] == "INT8"
    assert results["config"]["activation"]["observer"] == "mse"
    assert "verify" not in results  # --no-verify


def test_evaluate_json_matches_torch_and_quantize(quantized, onnx_pair):
    _, result = onnx_pair
    assert result["float_model"] == str(quantized["out"] / "model-fp32.onnx")
    assert result["samples"] == 5 and result["labeled"] and result["threads"] == 1
    fp32, int8 = result["models"]
    assert fp32["accuracy"] == pytest.approx(torch_accuracy(quantized))
    assert int8["path"] == str(quantized["out"] / "model-int8.onnx")
    assert 0.0 <= int8["top1_agreement"] <= 100.0 and 0.9 < int8["cosine"] <= 1.0 + 1e-6
    assert int8["size_bytes"] < fp32["size_bytes"]
    # quantize evaluated the same files on the same photos: the same figures.
    before = quantized["results"]["evaluation"]["models"]
    for key in ("accuracy", "size_bytes"):
        assert [r[key] for r in result["models"]] == [r[key] for r in before]
    assert int8["top1_agreement"] == before[1]["top1_agreement"]
    assert int8["cosine"] == pytest.approx(before[1]["cosine"])


def test_evaluate_exports_a_pytorch_model_first(quantized, onnx_pair, tmp_path):
    code, stdout, stderr = evaluate(quantized, "--data", str(quantized["photos"]), "--labels",
                                    str(quantized["labels"]), "--json",
                                    str(tmp_path / "r.json"), model=MODEL)
    assert code == 0, stderr
    assert "exporting the float model to ONNX" in stderr
    assert f"{MODEL} vs model-int8.onnx" in " ".join(stdout.split())
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["float_model"] == MODEL
    want = onnx_pair[1]["models"]
    for got, row in zip(result["models"], want, strict=True):
        assert got["accuracy"] == row["accuracy"]
    assert result["models"][1]["top1_agreement"] == want[1]["top1_agreement"]
    assert result["models"][1]["cosine"] == pytest.approx(want[1]["cosine"], abs=1e-6)


def test_evaluate_onnx_files_in_openvino(quantized, onnx_pair, tmp_path):
    pytest.importorskip("openvino")
    code, stdout, stderr = evaluate(quantized, "--data", str(quantized["photos"]), "--labels",
                                    str(quantized["labels"]), "--backend", "openvino",
                                    "--json", str(tmp_path / "r.json"))
    assert code == 0, stderr
    assert "model-int8.onnx in OpenVINO on 5 samples" in " ".join(stdout.split())
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["backend"] == "openvino"
    fp32, int8 = result["models"]
    assert fp32["accuracy"] == onnx_pair[1]["models"][0]["accuracy"]
    assert int8["cosine"] > 0.9 and int8["size_bytes"] < fp32["size_bytes"]


def test_quantize_and_evaluate_in_litert(quantized, tmp_path):
    """--target litert writes .tflite files and evaluates them in LiteRT; evaluate runs a
    .tflite file in LiteRT beside the torch model exported to LiteRT, with the same
    figures; a .tflite file needs the torch model and the litert backend."""
    pytest.importorskip("litert_torch")
    out = tmp_path / "out"
    data = ["--data", str(quantized["photos"]), "--labels", str(quantized["labels"])]
    code, stdout, stderr = run_cli([
        "quantize", "--model", MODEL, "--data", str(quantized["calibration"]),
        "--eval-data", str(quantized["photos"]), "--labels", str(quantized["labels"]),
        "--size", "32", "--target", "litert", "--threads", "1", "--out", str(out)])
    assert code == 0, stderr
    before = json.loads((out / "results.json").read_text())
    assert before["target"] == "litert" and before["evaluation"]["backend"] == "litert"
    assert before["verify"]["backend"] == "litert" and before["verify"]["passed"]
    int8 = str(out / "model-int8.tflite")
    code, stdout, stderr = evaluate(quantized, *data, "--json", str(tmp_path / "r.json"),
                                    model=MODEL, int8=int8)
    assert code == 0, stderr
    assert "exporting the float model to LiteRT" in stderr
    assert "model-int8.tflite in LiteRT on 5 samples" in " ".join(stdout.split())
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["backend"] == "litert" and result["models"][0]["path"] is None
    fp32, q = result["models"]
    assert fp32["accuracy"] == pytest.approx(torch_accuracy(quantized))
    assert q["accuracy"] == before["evaluation"]["models"][1]["accuracy"]
    assert q["cosine"] == pytest.approx(before["evaluation"]["models"][1]["cosine"], abs=1e-6)
    assert q["size_bytes"] == (out / "model-int8.tflite").stat().st_size < fp32["size_bytes"]
    code, _, stderr = evaluate(quantized, *data, "--backend", "openvino", model=MODEL, int8=int8)
    assert code == 2 and "--backend openvino runs ONNX files" in stderr
    code, _, stderr = evaluate(quantized, *data, int8=int8)  # the float model is ONNX
    assert code == 2 and "pass the torch model as --model" in stderr
    (tmp_path / "bad.tflite").write_bytes(b"not a flatbuffer")
    (tmp_path / "empty.tflite").write_bytes(b"")
    for bad, message in (("bad.tflite", "is not a loadable LiteRT model"),
                         ("empty.tflite", "the LiteRT model is empty (0 bytes)")):
        code, _, stderr = evaluate(quantized, *data, model=MODEL, int8=str(tmp_path / bad))
        assert code == 2 and message in stderr
        assert "exporting the float model" not in stderr  # refused before any work


def test_evaluate_unlabelled_photos(quantized, tmp_path):
    code, stdout, stderr = evaluate(quantized, "--data", str(quantized["photos"] / "cat"),
                                    "--json", str(tmp_path / "r.json"))
    assert code == 0, stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert not result["labeled"] and result["samples"] == 2
    assert all("accuracy" not in row for row in result["models"])
    assert "on 2 samples" in " ".join(stdout.split())


def test_labels_beyond_the_models_classes(quantized, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(quantized["photos"], photos)
    save_photo(skdata.astronaut()[::-1], photos / "zebra" / "upside-down.png")
    (tmp_path / "labels.txt").write_text("\n".join([*LABELS, "horse", "zebra"]))
    code, _, stderr = evaluate(quantized, "--data", str(photos), "--labels",
                               str(tmp_path / "labels.txt"))
    assert code == 2
    assert "the labels file has 6 class names but model-fp32.onnx has 4 outputs" in stderr
    numbered = tmp_path / "numbered"
    save_photo(skdata.coffee(), numbered / "1" / "coffee.png")
    save_photo(skdata.rocket(), numbered / "7" / "rocket.png")
    code, _, stderr = evaluate(quantized, "--data", str(numbered))
    assert code == 2 and "has label 7, but the model gives 4 class scores" in stderr


def test_class_folders_not_in_the_labels_file(quantized, tmp_path):
    (tmp_path / "labels.txt").write_text("person\ncat\ndog\nrocket\n")
    code, _, stderr = evaluate(quantized, "--data", str(quantized["photos"]), "--labels",
                               str(tmp_path / "labels.txt"))
    assert code == 2 and "class folder(s) ['cup'] of" in stderr
    assert "not in the labels file" in stderr
    code, _, stderr = evaluate(quantized, "--data", str(quantized["photos"]), "--labels",
                               str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt' does not exist" in stderr


def test_image_folder_with_a_file_that_is_not_an_image(quantized, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(quantized["photos"], photos)
    (photos / "cup" / "notes.txt").write_text("taken on a Tuesday")
    code, _, stderr = evaluate(quantized, "--data", str(photos), "--labels",
                               str(quantized["labels"]))
    assert code == 2 and "notes.txt" in stderr and "are not images" in stderr


def test_quantized_file_problems(quantized, tmp_path):
    data = ["--data", str(quantized["photos"] / "cat")]
    code, _, stderr = evaluate(quantized, *data, int8=str(tmp_path / "missing.onnx"))
    assert code == 2 and "does not exist" in stderr
    (tmp_path / "model.onnx").write_text("not an onnx file")
    code, _, stderr = evaluate(quantized, *data, int8=str(tmp_path / "model.onnx"))
    assert code == 2 and "is not a loadable ONNX model" in stderr
    code, _, stderr = evaluate(quantized, *data, model=str(tmp_path / "model.onnx"))
    assert code == 2 and "is not a readable ONNX model" in stderr


@pytest.mark.parametrize("extra, message", [
    (["--runs", "0"], "--runs must be a positive integer"),
    (["--num-eval", "0"], "--num-eval must be a positive integer"),
    (["--threads", "-1"], "--threads must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--resize", "16"], "need 1 <= size <= resize"),
])
def test_bad_options_are_usage_errors(quantized, extra, message):
    code, _, stderr = evaluate(quantized, "--data", str(quantized["photos"]), *extra)
    assert code == 2 and message in stderr


def test_text_data_needs_a_tokenizer(quantized, tmp_path):
    (tmp_path / "s.txt").write_text("a photo of a cat\n")
    code, _, stderr = evaluate(quantized, "--data", str(tmp_path / "s.txt"))
    assert code == 2 and "need the model's tokenizer" in stderr
