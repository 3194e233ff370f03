"""`quantaware predict` end to end: a video of real photos, FP32 vs INT8, and bad inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.cli import main
from quantaware.images import image_crops

cv2 = pytest.importorskip("cv2")
PIL = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

SIZE = 32
FRAMES = 12
WIDTH, HEIGHT = 160, 120


def _photo(i: int) -> np.ndarray:
    photo = (skdata.astronaut, skdata.coffee, skdata.chelsea)[(i // 4) % 3]()
    return cv2.resize(photo, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """12 frames of real photos (4 each of astronaut, coffee, chelsea), MPEG-4 in .mp4."""
    path = tmp_path_factory.mktemp("video") / "photos.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(FRAMES):
        writer.write(cv2.cvtColor(_photo(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, single_thread):
    """A tiny CNN exported as FP32 and as INT8 (PTQ on real photo crops)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    example = torch.zeros(1, 3, SIZE, SIZE)
    calib = list(image_crops(32, size=SIZE, seed=1).split(16))
    int8 = quantaware.quantize(model, presets.INT8, calib, example)
    out = tmp_path_factory.mktemp("models")
    return (str(quantaware.export_onnx(model, out / "tiny-fp32.onnx", example)),
            str(quantaware.export_onnx(int8, out / "tiny-int8.onnx", example)))


@pytest.fixture
def labels(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("tench\ngoldfish\ngreat white shark\ntiger shark\nhammerhead\n")
    return str(path)


def test_fp32_vs_int8_on_a_video_prints_fps_and_writes_annotated_frames(
        models, video, labels, tmp_path, capsys):
    out, report = tmp_path / "frames", tmp_path / "run.json"
    code = main(["predict", "--model", models[0], "--model", models[1], "--source", str(video),
                 "--labels", labels, "--save", str(out), "--json", str(report),
                 "--threads", "1", "--warmup", "2"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "model FPS" in text and "end-to-end FPS" in text and "x first model" in text
    assert "tiny-fp32 (FP32): model-only" in text and "tiny-int8 (INT8): model-only" in text
    assert "p50" in text and "p90" in text
    assert "tiny-int8 (INT8) vs tiny-fp32 (FP32): model-only FPS" in text
    assert "top-1 agreement:" in text and f"/{FRAMES} frames" in text

    files = sorted(p.name for p in out.iterdir())
    assert files == [f"frame_{i:06d}.jpg" for i in range(FRAMES)]
    annotated = cv2.imread(str(out / "frame_000004.jpg"))  # the coffee photo
    original = cv2.cvtColor(_photo(4), cv2.COLOR_RGB2BGR).astype(int)
    assert annotated.shape == (HEIGHT, WIDTH, 3)
    # Six lines (top-3 of two models) are drawn at the top left; the rest is the frame.
    text_band = np.abs(annotated[:30, :60].astype(int) - original[:30, :60]).mean()
    rest = np.abs(annotated[105:].astype(int) - original[105:]).mean()
    assert text_band > 20 > 8 > rest

    data = json.loads(report.read_text())
    assert data["frames"] == FRAMES and data["source_kind"] == "video"
    assert data["source"] == str(video) and data["input_size"] == SIZE
    assert [m["precision"] for m in data["models"]] == ["FP32", "INT8"]
    fp32, int8 = data["models"]
    assert fp32["model_fps"] > 0 and set(fp32["latency_ms"]) == {"mean", "p50", "p90"}
    assert int8["model_fps_ratio_vs_first"] == pytest.approx(
        int8["model_fps"] / fp32["model_fps"])
    assert data["model_fps_ratio"] == pytest.approx(int8["model_fps_ratio_vs_first"])
    agree = sum(p["top"]["tiny-fp32"][0]["index"] == p["top"]["tiny-int8"][0]["index"]
                for p in data["predictions"])
    assert data["top1_agreement"] == pytest.approx(agree / FRAMES)
    assert f"top-1 agreement: {agree / FRAMES:.4f} ({agree}/{FRAMES} frames)" in text
    top = data["predictions"][0]["top"]["tiny-int8"]
    with open(labels) as handle:
        assert len(top) == 3 and top[0]["label"] in handle.read().splitlines()
    assert data["saved"] == str(out)


def test_one_model_on_an_image_folder_saves_a_video(models, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    PIL.fromarray(skdata.chelsea()).save(photos / "cat.png")
    PIL.fromarray(skdata.coffee()).save(photos / "coffee.jpg")
    out = tmp_path / "annotated.avi"
    assert main(["predict", "--model", models[1], "--source", str(photos), "--save", str(out),
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "tiny-int8 (INT8): model-only" in text and "FPS" in text
    assert "x first model" not in text and "agreement" not in text
    capture = cv2.VideoCapture(str(out))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    capture.release()


def test_frames_saved_into_the_source_folder_are_refused(models, tmp_path, capsys):
    """The annotated frames went into the folder being read: the next run read them."""
    photos = tmp_path / "photos"
    photos.mkdir()
    PIL.fromarray(skdata.chelsea()).save(photos / "cat.png")
    for save in (photos, photos / "annotated"):
        assert main(["predict", "--model", models[1], "--source", str(photos), "--save",
                     str(save), "--threads", "1"]) == 2
        assert "lies inside the --source folder" in capsys.readouterr().err
    assert [p.name for p in photos.iterdir()] == ["cat.png"]


def test_same_model_twice_agrees_on_every_frame(models, video, tmp_path, capsys):
    report = tmp_path / "run.json"
    assert main(["predict", "--model", models[0], "--model", models[0], "--source", str(video),
                 "--max-frames", "5", "--json", str(report), "--threads", "1"]) == 0
    data = json.loads(report.read_text())
    assert data["frames"] == 5 and data["top1_agreement"] == 1.0
    assert [m["name"] for m in data["models"]] == ["tiny-fp32", "tiny-fp32'"]


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_missing_model_file(video, tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "none.onnx"), "--source", str(video)]) == 2
    assert "none.onnx" in (err := _error(capsys)) and "does not exist" in err


def test_file_that_is_not_onnx(video, tmp_path, capsys):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("not a model")
    assert main(["predict", "--model", str(bogus), "--source", str(video)]) == 1
    assert "cannot load" in (err := _error(capsys)) and "model.onnx" in err


def test_missing_source(models, tmp_path, capsys):
    assert main(["predict", "--model", models[0], "--source", str(tmp_path / "gone")]) == 2
    assert "gone" in (err := _error(capsys)) and "does not exist" in err


def test_unsupported_file_in_the_image_folder(models, tmp_path, capsys):
    PIL.fromarray(skdata.coffee()).save(tmp_path / "coffee.png")
    (tmp_path / "clip.flv.txt").write_text("?")
    assert main(["predict", "--model", models[0], "--source", str(tmp_path)]) == 1
    assert "clip.flv.txt" in (err := _error(capsys)) and "supported:" in err


def test_unreadable_video(models, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0\0\0\x18ftypmp42" + bytes(500))
    assert main(["predict", "--model", models[0], "--source", str(broken)]) == 1
    assert "broken.mp4" in (err := _error(capsys)) and "as a video" in err


def test_unsupported_source_format(models, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert main(["predict", "--model", models[0], "--source", str(notes)]) == 1
    assert "notes.txt" in (err := _error(capsys)) and "'.txt'" in err


def test_camera_that_does_not_open(models, capsys):
    assert main(["predict", "--model", models[0], "--source", "97"]) == 1
    assert "cannot open camera 97" in _error(capsys)


def test_labels_count_must_match_the_model(models, video, tmp_path, capsys):
    path = tmp_path / "imagenet.txt"
    path.write_text("tench\ngoldfish\nshark\n")
    assert main(["predict", "--model", models[0], "--source", str(video), "--labels",
                 str(path)]) == 1
    err = _error(capsys)
    assert "imagenet.txt" in err and "has 3 lines" in err and "outputs 5 classes" in err


def test_model_without_an_image_input(video, tmp_path, capsys):
    path = quantaware.export_onnx(nn.Linear(4, 2), tmp_path / "linear.onnx", torch.zeros(1, 4))
    assert main(["predict", "--model", str(path), "--source", str(video)]) == 1
    assert "(1, 3, H, W)" in _error(capsys)


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_bad_max_frames_is_a_usage_error(models, video, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", models[0], "--source", str(video), "--max-frames", value])
    assert exc.value.code == 2
    assert "--max-frames" in (err := _error(capsys)) and "positive integer" in err


@pytest.mark.parametrize("extra, message", [
    (["--model", "c.onnx", "--model", "d.onnx"], "one model, or two"),
    (["--std", "0.2", "0", "0.2"], "--std"),
    (["--size", "64", "--resize", "32"], "--resize"),
    (["--save", "out.png"], "--save"),
    (["--mean", "0.5", "nan", "0.5"], "--mean values must be finite"),
    (["--std", "inf", "0.2", "0.2"], "--std values must be finite"),
    (["--save", "{file}/frames"], "--save: cannot write into"),
    (["--save", "{file}/out.mp4"], "--save: cannot write"),
])
def test_bad_options_are_usage_errors(models, video, extra, message, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    extra = [a.format(file=tmp_path / "file", dir=tmp_path) for a in extra]
    argv = ["predict", "--model", models[0], "--source", str(video), *extra]
    assert main(argv) == 2
    assert message in _error(capsys)


def test_show_without_a_display_fails_clearly(models, video, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    assert main(["predict", "--model", models[0], "--source", str(video), "--show"]) == 1
    assert "display" in _error(capsys)


def test_progress_bar_appears_only_after_the_delay():
    from rich.console import Console

    from quantaware.cli.predict import _LazyProgress

    quiet = io.StringIO()
    progress = _LazyProgress(Console(file=quiet, force_terminal=True), delay=60.0)
    progress(0, 3)
    progress(3, 3)
    progress.close()
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    progress = _LazyProgress(Console(file=shown, force_terminal=True, width=80), delay=0.0)
    progress(0, 3)
    progress(3, 3)
    progress.close()
    assert "3/3" in shown.getvalue()
