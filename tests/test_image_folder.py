"""Image folders: real photos in class subfolders or unlabelled, and the bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantaware.image_folder import ImageFolder, ImageFolderError
from quantaware.images import IMAGENET_MEAN, IMAGENET_STD

PIL = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")


@pytest.fixture
def photo_folder(tmp_path):
    """Two classes of real photos, in PNG and JPEG, one in a nested folder."""
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "rocket" / "more").mkdir(parents=True)
    PIL.fromarray(skdata.chelsea()).save(root / "cat" / "chelsea.png")
    PIL.fromarray(skdata.coffee()).save(root / "cat" / "coffee.jpg", quality=95)
    PIL.fromarray(skdata.rocket()).save(root / "rocket" / "rocket.png")
    PIL.fromarray(skdata.camera()).save(root / "rocket" / "more" / "camera.png")  # grey
    return root


def test_labeled_folder_classes_labels_and_shapes(photo_folder):
    folder = ImageFolder(photo_folder, size=64)
    assert folder.classes == ["cat", "rocket"]
    assert [label for _, label in folder.samples] == [0, 0, 1, 1]
    image, label = folder[3]
    assert image.shape == (3, 64, 64) and label == 1  # a grey photo comes out as RGB
    batches = folder.batches(3)
    assert [x.shape[0] for x, _ in batches] == [3, 1]
    assert batches[0][1].tolist() == [0, 0, 1]


def test_preprocessing_is_resize_centre_crop_normalise(photo_folder):
    folder = ImageFolder(photo_folder, size=64, resize=80)
    pixels = torch.from_numpy(skdata.chelsea().copy()).permute(2, 0, 1).float() / 255
    h, w = pixels.shape[-2:]  # 300 x 451: shorter side 300 -> 80
    new_w = round(w * 80 / h)
    want = F.interpolate(pixels[None], size=(80, new_w), mode="bilinear", antialias=True,
                         align_corners=False)[0]
    left = (new_w - 64) // 2
    want = want[:, 8:72, left:left + 64]
    want = (want - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(folder[0][0], want)


def test_unlabeled_folder_reads_every_image_below(photo_folder):
    folder = ImageFolder(photo_folder, labeled=False, size=32)
    assert len(folder) == 4 and folder.classes == []
    assert folder[0].shape == (3, 32, 32)
    assert [b.shape[0] for b in folder.batches(2, limit=3)] == [2, 1]


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")


def test_empty_folder_and_empty_class(tmp_path):
    with pytest.raises(ImageFolderError, match="no images"):
        ImageFolder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ImageFolderError, match="has no images"):
        ImageFolder(tmp_path)


def test_files_that_are_not_images_are_named(photo_folder):
    (photo_folder / "cat" / "notes.txt").write_text("not a photo")
    with pytest.raises(ImageFolderError, match=r"notes\.txt.*supported: \.bmp"):
        ImageFolder(photo_folder)


def test_hidden_files_are_ignored(photo_folder):
    (photo_folder / "cat" / ".DS_Store").write_bytes(b"\0\1")
    assert len(ImageFolder(photo_folder)) == 4


def test_corrupt_image_is_named_when_read(photo_folder):
    bad = photo_folder / "cat" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    folder = ImageFolder(photo_folder)
    index = [p.name for p, _ in folder.samples].index("broken.jpg")
    with pytest.raises(ImageFolderError, match=r"cannot read image .*broken\.jpg"):
        folder[index]


def test_png_with_a_broken_chunk_is_named_when_read(photo_folder):
    """Pillow raises SyntaxError ("broken PNG file") for a damaged chunk: it went
    through as a raw traceback."""
    import io
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
                    ).save(buffer, "PNG")
    png = buffer.getvalue()
    at = png.index(b"IDAT")
    pixels = png[at + 4:at + 4 + int.from_bytes(png[at - 4:at], "big")]
    half = len(pixels) // 2  # the pixel data split over two chunks, the second garbled
    data = (png[:at - 4] + chunk(b"IDAT", pixels[:half])
            + chunk(b"\xc1\xa2\xc7\x93", pixels[half:]) + chunk(b"IEND", b""))
    (photo_folder / "cat" / "broken.png").write_bytes(bytes(data))
    folder = ImageFolder(photo_folder)
    index = [p.name for p, _ in folder.samples].index("broken.png")
    with pytest.raises(ImageFolderError, match=r"cannot read image .*broken\.png.*broken PNG"):
        folder[index]


def test_images_outside_class_folders_of_a_labeled_folder(photo_folder):
    PIL.fromarray(skdata.coffee()).save(photo_folder / "loose.png")
    with pytest.raises(ImageFolderError, match="outside class subfolders"):
        ImageFolder(photo_folder)
    assert len(ImageFolder(photo_folder, labeled=False)) == 5


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": 64, "resize": 32},
                                    {"mean": (0.5, 0.5)}, {"std": (1.0, 0.0, 1.0)}])
def test_bad_options(photo_folder, kwargs):
    with pytest.raises(ImageFolderError):
        ImageFolder(photo_folder, **kwargs)


def test_a_limit_takes_images_from_every_class(tmp_path):
    """The first N sorted images are the first classes only: calibration on 256 images
    of a 100-class folder saw two classes. A limit spreads over the list."""
    for c in range(4):
        (tmp_path / f"c{c}").mkdir()
        for i in range(5):
            PIL.fromarray(np.full((8, 8, 3), 40 * c + i, np.uint8)).save(
                tmp_path / f"c{c}" / f"{i}.png")
    folder = ImageFolder(tmp_path, size=8)
    labels = torch.cat([y for _, y in folder.batches(3, limit=8)]).tolist()
    assert sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.cat([y for _, y in folder.batches(7)]).tolist() == [
        label for _, label in folder.samples]  # no limit: all, in order


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """Converting a 16-bit PNG to RGB clips at 255: a 0..65535 ramp came out white."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    PIL.fromarray(ramp).save(tmp_path / "ramp16.png")
    PIL.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "ramp8.png")
    folder = ImageFolder(tmp_path, labeled=False, size=32)
    names = [path.name for path, _ in folder.samples]
    sixteen, eight = (folder[names.index(n)] for n in ("ramp16.png", "ramp8.png"))
    torch.testing.assert_close(sixteen, eight, atol=0.02, rtol=0)


def test_float_greyscale_in_zero_one_is_scaled_not_clipped(tmp_path):
    """A float TIFF (mode F) in [0, 1] came out black."""
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    PIL.fromarray(ramp, mode="F").save(tmp_path / "ramp.tiff")
    PIL.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(tmp_path / "ramp8.png")
    folder = ImageFolder(tmp_path, labeled=False, size=32)
    names = [path.name for path, _ in folder.samples]
    floats, eight = (folder[names.index(n)] for n in ("ramp.tiff", "ramp8.png"))
    torch.testing.assert_close(floats, eight, atol=0.02, rtol=0)
