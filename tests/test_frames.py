"""quantaware.frames: frame sources, preprocessing parity, annotated output files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantaware.image_folder import ImageFolder, ImageFolderError, preprocess
from quantaware.predict import (
    FrameSource,
    FrameSourceError,
    FrameWriter,
    annotate,
)

cv2 = pytest.importorskip("cv2")
PIL = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

from tests._media import VIDEO_FRAMES, photos  # noqa: E402

SIZE = 32
CLASSES = 5


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
    # a shorter run into the same folder: the earlier run's third frame goes, other
    # files stay
    (tmp_path / "frames" / "notes.txt").write_text("mine")
    with FrameWriter(tmp_path / "frames") as writer:
        for f in frames[:2]:
            writer.write(f)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [
        "frame_000000.jpg", "frame_000001.jpg", "notes.txt"]


def test_frame_writer_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), FrameWriter(tmp_path / "out.mp4") as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_frame_writer_rejects_image_file_targets(tmp_path):
    with pytest.raises(ValueError, match=r"out\.png.*give a folder"):
        FrameWriter(tmp_path / "out.png")
