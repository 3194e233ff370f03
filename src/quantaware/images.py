"""Real photos that ship with installed packages, cut into ImageNet-style crops.

Sources (offline): scikit-image's bundled photos (``skimage.data``) and
scikit-learn's ``load_sample_images``. Crops are taken at random scales,
positions and flips from a seeded generator, resized to ``size`` and normalised
with ImageNet statistics, so they can calibrate and evaluate ImageNet models.

Example:
    >>> crops = image_crops(4, size=64, seed=0)  # doctest: +SKIP
    >>> crops.shape  # doctest: +SKIP
    torch.Size([4, 3, 64, 64])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "image_crops", "sample_photos"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bundled with scikit-image's wheel (no download).
_SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "coffee", "rocket", "coins", "moon",
                   "clock", "horse", "hubble_deep_field", "immunohistochemistry",
                   "colorwheel", "retina", "brick", "grass", "gravel", "stereo_motorcycle",
                   "page", "text")


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image / max(float(image.max()), 1e-8) * 255, 0, 255).astype(np.uint8)
    return image


def sample_photos() -> list[np.ndarray]:
    """The bundled photos as HxWx3 uint8 arrays (needs scikit-image and scikit-learn)."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ImportError(
            "real photos come from scikit-image and scikit-learn: "
            "pip install scikit-image scikit-learn"
        ) from exc
    photos = []
    for name in _SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        photos.append(_rgb(image[0] if isinstance(image, tuple) else image))
    photos.extend(_rgb(img) for img in load_sample_images().images)
    return photos


def image_crops(num: int, size: int = 224, seed: int = 0,
                min_scale: float = 0.35) -> torch.Tensor:
    """``num`` normalised crops ``(num, 3, size, size)`` from the bundled photos.

    Each crop is a random square covering ``min_scale``..1 of the photo's shorter
    side, randomly flipped, resized with antialiasing. Different seeds give
    different crops (use one seed for calibration and another for evaluation).
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(num, 3, size, size)
    for i in range(num):
        photo = photos[i % len(photos)] if i < len(photos) else photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(min_scale, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = torch.from_numpy(np.ascontiguousarray(photo[top:top + side, left:left + side]))
        crop = crop.permute(2, 0, 1).float().div_(255).unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop - mean) / std
    return out
