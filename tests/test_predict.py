"""quantaware.predict: frame sources, preprocessing parity, models, labels, output files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.bench import OnnxModelError, onnx_session
from quantaware.image_folder import ImageFolder, ImageFolderError, preprocess
from quantaware.images import image_crops
from quantaware.predict import (
    DeployedModel,
    FrameSource,
    FrameSourceError,
    FrameWriter,
    annotate,
    model_precision,
    predict,
)
from quantaware.sources import LabelsError, read_labels

cv2 = pytest.importorskip("cv2")
PIL = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

SIZE = 32
CLASSES = 5
VIDEO_FRAMES = 12


def photos() -> list[np.ndarray]:
    """Real RGB photos bundled with scikit-image."""
    return [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]


def write_video(path, frames: int = VIDEO_FRAMES, size: tuple[int, int] = (160, 120),
                fourcc: str = "mp4v") -> None:
    """A short video cycling through the photos (each shown for 4 frames)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, size)
    assert writer.isOpened()
    for i in range(frames):
        rgb = cv2.resize(photos()[(i // 4) % 3], size, interpolation=cv2.INTER_AREA)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


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


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path)
    return path


@pytest.fixture
def photo_dir(tmp_path):
    root = tmp_path / "photos"
    (root / "more").mkdir(parents=True)
    PIL.fromarray(skdata.chelsea()).save(root / "chelsea.png")
    PIL.fromarray(skdata.coffee()).save(root / "coffee.jpg", quality=95)
    PIL.fromarray(skdata.astronaut()).save(root / "more" / "astronaut.png")
    return root


# ---------------------------------------------------------------- preprocessing


def test_preprocess_is_what_image_folder_loads(photo_dir):
    folder = ImageFolder(photo_dir, labeled=False, size=48, resize=60)
    for i, (path, _) in enumerate(folder.samples):
        pixels = np.asarray(PIL.open(path).convert("RGB"))
        torch.testing.assert_close(preprocess(pixels, 48, 60), folder[i], rtol=0, atol=0)


def test_video_frames_preprocess_like_the_same_image_read_by_pillow(video, tmp_path):
    """OpenCV's BGR frames are converted to RGB: a frame saved losslessly and read
    back through ImageFolder gives the same model input."""
    with FrameSource(video, max_frames=5) as source:
        frame = list(source)[4]
    (tmp_path / "f").mkdir()
    PIL.fromarray(frame.rgb).save(tmp_path / "f" / "frame.png")
    folder = ImageFolder(tmp_path / "f", labeled=False, size=SIZE)
    torch.testing.assert_close(preprocess(frame.rgb, SIZE), folder[0], rtol=0, atol=0)
    # The second photo (coffee) is mostly warm: red above blue, not swapped.
    assert frame.rgb[..., 0].mean() > frame.rgb[..., 2].mean()


def test_preprocess_rejects_non_rgb_arrays():
    with pytest.raises(ImageFolderError, match=r"RGB uint8 image of shape \(H, W, 3\)"):
        preprocess(np.zeros((8, 8), np.uint8))


# ---------------------------------------------------------------- sources


def test_image_folder_source_lists_images_below_in_order(photo_dir):
    with FrameSource(photo_dir) as source:
        frames = list(source)
        assert source.kind == "images" and source.total == 3
    assert [f.name for f in frames] == ["chelsea.png", "coffee.jpg", "more/astronaut.png"]
    assert frames[0].rgb.shape == skdata.chelsea().shape and frames[0].decode_seconds > 0


def test_video_source_frames_and_max_frames(video):
    with FrameSource(video) as source:
        assert source.kind == "video" and source.fps == pytest.approx(10.0)
        frames = list(source)
    assert len(frames) == VIDEO_FRAMES and frames[0].rgb.shape == (120, 160, 3)
    with FrameSource(str(video), max_frames=3) as source:
        assert source.total == 3 and [f.index for f in source] == [0, 1, 2]


def test_single_image_file_is_a_source(photo_dir):
    with FrameSource(photo_dir / "coffee.jpg") as source:
        assert [f.name for f in source] == ["coffee.jpg"]


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.mp4.*does not exist.*camera index"):
        FrameSource(tmp_path / "nope.mp4")


def test_unsupported_file_in_image_folder_is_named(photo_dir):
    (photo_dir / "more" / "notes.txt").write_text("not a photo")
    with pytest.raises(ImageFolderError, match=r"notes\.txt.*supported: \.bmp"):
        FrameSource(photo_dir)


def test_unreadable_video_and_unsupported_format(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(FrameSourceError,
                       match=r"cannot read .*broken\.mp4.* as a video.*Re-encode"):
        FrameSource(bad)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(FrameSourceError, match=r"notes\.txt.*files of type '\.txt'"):
        FrameSource(notes)


def test_corrupt_image_is_named_when_read(photo_dir):
    (photo_dir / "zz.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with FrameSource(photo_dir) as source, pytest.raises(FrameSourceError, match=r"zz\.jpg"):
        list(source)


def test_camera_that_does_not_open():
    with pytest.raises(FrameSourceError, match="cannot open camera 97"):
        FrameSource(97)


def test_bad_max_frames(video):
    with pytest.raises(ValueError, match="max_frames"):
        FrameSource(video, max_frames=0)


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


# ---------------------------------------------------------------- output


def test_annotate_draws_on_the_top_left_only():
    frame = np.full((120, 160, 3), 200, np.uint8)
    out = annotate(frame, ["0.91 tabby", "0.05 tiger cat", "0.01 lynx"])
    assert out.shape == frame.shape and (out[:20, :40] != 200).any()
    assert (out[-40:] == 200).all() and (out[:, -20:] == 200).all()


def test_frame_writer_folder_and_video(tmp_path):
    frames = [cv2.cvtColor(cv2.resize(p, (64, 48)), cv2.COLOR_RGB2BGR) for p in photos()]
    with FrameWriter(tmp_path / "frames") as writer:
        for f in frames:
            writer.write(f)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [
        "frame_000000.jpg", "frame_000001.jpg", "frame_000002.jpg"]
    with FrameWriter(tmp_path / "out.avi", fps=5) as writer:
        for f in [*frames, cv2.resize(frames[0], (30, 40))]:  # a different size is letterboxed
            writer.write(f)
    capture = cv2.VideoCapture(str(tmp_path / "out.avi"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    assert capture.read()[1].shape == (48, 64, 3)
    capture.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "out.avi"]


def test_frame_writer_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), FrameWriter(tmp_path / "out.mp4") as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_frame_writer_rejects_image_file_targets(tmp_path):
    with pytest.raises(ValueError, match=r"out\.png.*give a folder"):
        FrameWriter(tmp_path / "out.png")


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
