"""Your own photos as model inputs: a folder of class subfolders, or of unlabelled images.

Layout of a labelled folder (the classes are the sorted subfolder names)::

    photos/
        cat/  a.jpg b.png ...
        dog/  c.jpg ...

An unlabelled folder (calibration data) holds images at any depth. Each image is
read with Pillow, converted to RGB, its shorter side resized to ``resize``
(bilinear, antialiased), centre-cropped to ``size`` and normalised with
``mean``/``std`` (ImageNet statistics by default): the evaluation transform of
torchvision's ImageNet models.

Example:
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> root = tempfile.mkdtemp()
    >>> for name in ("cat", "dog"):
    ...     os.makedirs(os.path.join(root, name))
    ...     Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(os.path.join(root, name, "a.png"))
    >>> folder = ImageFolder(root, size=32, resize=36)
    >>> folder.classes, len(folder), folder[1][0].shape, folder[1][1]
    (['cat', 'dog'], 2, torch.Size([3, 32, 32]), 1)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from quantaware.images import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "ImageFolderError", "preprocess"]

# What Pillow reads without plugins.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def rgb8(image: Any) -> np.ndarray:
    """An opened PIL image as ``(H, W, 3)`` uint8 RGB. 16-bit greyscale (PNG/TIFF,
    modes ``I;16*`` and ``I``) is scaled by 255/65535 and float greyscale (mode
    ``F``) in [0, 1] by 255: converting them to RGB directly clips (16-bit photos
    turn white, [0, 1] floats black)."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    elif image.mode == "F":  # float greyscale (TIFF): [0, 1], or [0, 255] when above 1
        grey = np.asarray(image, dtype=np.float64)
        grey = np.nan_to_num(grey, nan=0.0, posinf=255.0, neginf=0.0)
        if grey.max(initial=0.0) <= 1.0:
            grey = grey * 255.0
    else:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


class ImageFolderError(ValueError):
    """An image folder that cannot be used; the message names the file and the fix."""


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def preprocess(pixels: np.ndarray, size: int = 224, resize: int | None = None,
               mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """An RGB ``uint8`` image ``(H, W, 3)`` as a normalised model input ``(3, size, size)``.

    The shorter side is resized to ``resize`` (default ``size * 8 / 7``; bilinear,
    antialiased), the centre ``size x size`` is cropped and each channel is
    normalised as ``(value / 255 - mean) / std``: what :meth:`ImageFolder.load`
    does after decoding a file, so frames from another decoder (OpenCV: convert its
    BGR to RGB first) give the same model inputs.

    Example:
        >>> image = np.zeros((40, 60, 3), np.uint8)
        >>> x = preprocess(image, size=32, resize=36)
        >>> x.shape, x.dtype
        (torch.Size([3, 32, 32]), torch.float32)
        >>> round(float(x[0, 0, 0]), 4)  # (0 - 0.485) / 0.229
        -2.1179
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ImageFolderError(f"expected an RGB uint8 image of shape (H, W, 3), got "
                               f"{pixels.dtype} {pixels.shape}; convert it first")
    resize = round(size * 8 / 7) if resize is None else resize
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255).unsqueeze(0)
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True,
                      align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, top:top + size, left:left + size]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t


class ImageFolder(Dataset):
    """Images from a folder, preprocessed for an ImageNet-style model.

    Args:
        root: the folder.
        labeled: ``True``: one subfolder per class, items are ``(image, label)``;
            ``False``: every image below ``root``, items are images.
        size: side of the square model input.
        resize: the shorter side is resized to this before the centre crop
            (default ``size * 8 / 7``, i.e. 256 for 224).
        mean, std: per-channel normalisation of the 0..1 pixel values.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ImageFolderError: no images, files that are not images, images outside
            class subfolders of a labelled folder, or bad options.
    """

    def __init__(self, root: str | os.PathLike, *, labeled: bool = True, size: int = 224,
                 resize: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is "
                                    "not a folder")
        resize = round(size * 8 / 7) if resize is None else resize
        if size < 1 or resize < size:
            raise ImageFolderError(f"need 1 <= size <= resize, got size={size}, "
                                   f"resize={resize}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ImageFolderError(f"mean and std need 3 values each, std > 0; got {mean}, "
                                   f"{std}")
        self.size, self.resize, self.labeled = size, resize, labeled
        self.mean, self.std = tuple(mean), tuple(std)
        self.classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        if labeled:
            self._scan_labeled()
        else:
            self.samples = [(p, -1) for p in self._images_below(self.root)]
        if not self.samples:
            raise ImageFolderError(
                f"no images in {str(self.root)!r}: expected {', '.join(IMAGE_EXTENSIONS)} "
                "files" + (" in one subfolder per class" if labeled else ""))

    def _images_below(self, folder: Path) -> list[Path]:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p)
                       and not any(part.startswith(".") for part in
                                   p.relative_to(folder).parts))
        unsupported = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if unsupported:
            raise ImageFolderError(
                f"{len(unsupported)} file(s) in {str(folder)!r} are not images quantaware "
                f"reads, e.g. {str(unsupported[0])!r}; supported: "
                f"{', '.join(IMAGE_EXTENSIONS)}. Move them out of the folder.")
        return files

    def _scan_labeled(self) -> None:
        loose = [p for p in self.root.iterdir() if p.is_file() and _visible(p)]
        if loose:
            raise ImageFolderError(
                f"{str(self.root)!r} has files outside class subfolders (e.g. "
                f"{loose[0].name!r}): put each image in a subfolder named after its class, "
                "or use the folder as unlabelled data")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and _visible(p))
        for label, name in enumerate(self.classes):
            images = self._images_below(self.root / name)
            if not images:
                raise ImageFolderError(f"class folder {str(self.root / name)!r} has no images")
            self.samples.extend((p, label) for p in images)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: Path) -> torch.Tensor:
        """One preprocessed image ``(3, size, size)``."""
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError as exc:
            raise ImportError("reading image folders needs Pillow: pip install pillow") from exc
        try:
            with Image.open(path) as image:
                pixels = rgb8(image)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError,
                SyntaxError) as exc:  # Pillow: SyntaxError for a broken PNG chunk
            raise ImageFolderError(f"cannot read image {str(path)!r}: {exc}. Replace or "
                                   "remove the file.") from exc
        return preprocess(pixels, self.size, self.resize, self.mean, self.std)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = self.load(path)
        return (image, label) if self.labeled else image

    def batches(self, batch_size: int = 32, limit: int | None = None
                ) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        """The images as a list of batches: tensors, or ``(images, labels)`` for a
        labelled folder.

        ``limit`` takes that many images spread evenly over the sorted list (not
        its first ones, which in a labelled folder are the first classes only), so
        every class contributes in proportion to its size.
        """
        if batch_size < 1:
            raise ImageFolderError(f"batch_size must be >= 1, got {batch_size}")
        count = len(self) if limit is None else min(limit, len(self))
        chosen = [i * len(self) // count for i in range(count)]
        out = []
        for start in range(0, count, batch_size):
            items = [self[i] for i in chosen[start:start + batch_size]]
            if self.labeled:
                out.append((torch.stack([x for x, _ in items]),
                            torch.tensor([y for _, y in items])))
            else:
                out.append(torch.stack(items))
        return out
