"""quantaware.predict: deployed models, labels, timing and the frame loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.bench import OnnxModelError, onnx_session
from quantaware.image_folder import ImageFolder
from quantaware.images import image_crops
from quantaware.predict import (
    DeployedModel,
    model_precision,
    predict,
)
from quantaware.sources import LabelsError, read_labels

cv2 = pytest.importorskip("cv2")
PIL = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

from tests._media import VIDEO_FRAMES  # noqa: E402

SIZE = 32
CLASSES = 5


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, single_thread):
    """``{"fp32": path, "int8": path}``: the tiny CNN exported float and INT8."""
    out = tmp_path_factory.mktemp("models")
    model = tiny_cnn()
    example = torch.zeros(1, 3, SIZE, SIZE)
    calib = list(image_crops(32, size=SIZE, seed=1).split(16))
    int8 = quantaware.quantize(model, presets.INT8, calib, example)
    return {"fp32": quantaware.export_onnx(model, out / "tiny-fp32.onnx", example),
            "int8": quantaware.export_onnx(int8, out / "tiny-int8.onnx", example)}


# ---------------------------------------------------------------- models and labels


def test_precision_is_detected_from_the_graph(exported):
    assert model_precision(exported["fp32"]) == "FP32"
    assert model_precision(exported["int8"]) == "INT8"


def test_deployed_model_input_and_classes(exported):
    model = DeployedModel(exported["int8"], threads=1)
    assert model.input_side == SIZE and model.warm_up(SIZE, runs=1) == CLASSES


def test_model_that_is_not_an_image_classifier(tmp_path):
    path = quantaware.export_onnx(nn.Linear(4, 2), tmp_path / "linear.onnx", torch.zeros(1, 4))
    with pytest.raises(OnnxModelError, match=r"shape \['.*', 4\].*\(1, 3, H, W\)"):
        DeployedModel(path)


def test_labels_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("tench\ngoldfish\n\n")
    assert read_labels(path) == ["tench", "goldfish"]
    path.write_text("tench\n\ngoldfish\n")
    with pytest.raises(LabelsError, match=r"line 2 .* is empty"):
        read_labels(path)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LabelsError, match="not UTF-8"):
        read_labels(path)
    with pytest.raises(FileNotFoundError, match="labels file"):
        read_labels(tmp_path / "none.txt")


# ---------------------------------------------------------------- predict


def test_predict_matches_onnx_runtime_on_image_folder_inputs(exported, photo_dir):
    result = predict(exported["fp32"], photo_dir, warmup=1, top_k=CLASSES)
    folder = ImageFolder(photo_dir, labeled=False, size=SIZE)
    session = onnx_session(exported["fp32"], threads=1)
    for i, prediction in enumerate(result.predictions):
        logits = session.run(None, {"input": folder[i][None].numpy()})[0][0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        scores = prediction.top[0]
        assert [s.index for s in scores] == np.argsort(-probs, kind="stable").tolist()
        np.testing.assert_allclose([s.probability for s in scores], np.sort(probs)[::-1],
                                   rtol=1e-5)


def test_predict_two_models_on_a_video(exported, video, tmp_path):
    names = ["tench", "goldfish", "shark", "ray", "hen"]
    result = predict([exported["fp32"], exported["int8"]], video, labels=names, warmup=2,
                     threads=1, save=tmp_path / "annotated.mp4")
    assert result.frames == VIDEO_FRAMES and result.input_size == SIZE
    assert [m.precision for m in result.models] == ["FP32", "INT8"]
    assert [m.name for m in result.models] == ["tiny-fp32", "tiny-int8"]
    assert all(len(m.latency_ms) == VIDEO_FRAMES and m.fps > 0 for m in result.models)
    assert all(e > r for m in result.models for e, r in zip(m.end_to_end_ms, m.latency_ms,
                                                            strict=True))
    top1 = [[p.top[i][0].index for p in result.predictions] for i in range(2)]
    agree = sum(a == b for a, b in zip(*top1, strict=True))
    assert result.agreeing_frames == agree and result.top1_agreement == agree / VIDEO_FRAMES
    assert result.fps_ratio() == pytest.approx(result.models[1].fps / result.models[0].fps)
    assert result.predictions[0].top[1][0].label in names
    assert result.saved == str(tmp_path / "annotated.mp4")
    data = result.to_dict()
    assert data["frames"] == VIDEO_FRAMES and len(data["predictions"]) == VIDEO_FRAMES
    assert set(data["predictions"][0]["top"]) == {"tiny-fp32", "tiny-int8"}


def test_predict_labels_must_match_the_classes(exported, photo_dir):
    with pytest.raises(LabelsError, match=r"has 3 lines but model .* outputs 5 classes"):
        predict(exported["fp32"], photo_dir, labels=["a", "b", "c"], warmup=0)


def test_predict_size_must_match_a_static_model_input(exported, photo_dir):
    with pytest.raises(OnnxModelError, match=r"image size 64 .* does not match the model "
                                             r"input 32"):
        predict(exported["fp32"], photo_dir, size=64, warmup=0)


def test_predict_takes_one_or_two_models(exported, photo_dir):
    with pytest.raises(ValueError, match="one ONNX model, or two"):
        predict([exported["fp32"]] * 3, photo_dir)
