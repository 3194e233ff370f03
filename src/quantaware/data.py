"""The built-in demo data set: scikit-learn's bundled 8x8 handwritten digits.

``load_digits`` ships inside scikit-learn, so the demo works fully offline. Images
are scaled to ``[0, 1]`` (the raw pixels are integers in ``0..16``) and then
standardised with fixed constants, :data:`DIGITS_MEAN` and :data:`DIGITS_STD`,
measured on the training split of the default split (``test_size=0.2, seed=0``).
Fixed constants keep the preprocessing identical between training, calibration
and deployment, whatever split a caller asks for.

Example:
    >>> from quantaware.data import load_digits_split, make_loaders
    >>> train, test = load_digits_split()
    >>> len(train), len(test)
    (1437, 360)
    >>> x, y = train[0]
    >>> tuple(x.shape), x.dtype, y.dtype
    ((1, 8, 8), torch.float32, torch.int64)
    >>> train_loader, test_loader = make_loaders(train, test, batch_size=32)
    >>> tuple(next(iter(test_loader))[0].shape)
    (32, 1, 8, 8)
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from quantaware._files import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "NUM_CLASSES",
    "load_digits_split",
    "load_mnist1d_split",
    "make_loaders",
    "normalize_digits",
]

#: Number of digit classes (0-9).
NUM_CLASSES = 10
#: Mean pixel value of the ``[0, 1]``-scaled training images (default split).
DIGITS_MEAN = 0.30538338
#: Standard deviation of the ``[0, 1]``-scaled training images (default split).
DIGITS_STD = 0.37611917

_RAW_PIXEL_MAX = 16.0


def normalize_digits(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn raw digit pixels (integers ``0..16``) into model-ready float32 images.

    Accepts ``(N, 64)`` flat rows as returned by :func:`sklearn.datasets.load_digits`,
    or ``(N, 8, 8)`` / ``(N, 1, 8, 8)`` images, and returns an ``(N, 1, 8, 8)``
    float32 tensor scaled to ``[0, 1]`` and standardised with
    :data:`DIGITS_MEAN` / :data:`DIGITS_STD`.

    Example:
        >>> import numpy as np
        >>> normalize_digits(np.zeros((2, 64))).shape
        torch.Size([2, 1, 8, 8])
    """
    images = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
    if images.ndim < 2 or images[0].numel() != 64:
        raise ValueError(
            f"expected digit images with 64 pixels each, shaped (N, 64), (N, 8, 8) or "
            f"(N, 1, 8, 8); got shape {tuple(images.shape)}. Pass a batch of 8x8 images."
        )
    images = images.reshape(-1, 1, 8, 8) / _RAW_PIXEL_MAX
    return (images - DIGITS_MEAN) / DIGITS_STD


def load_digits_split(test_size: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Load the bundled digits data set and split it into stratified train/test sets.

    Args:
        test_size: Fraction of the 1797 images held out for testing, in ``(0, 1)``.
        seed: ``random_state`` of the split; the same seed always gives the same split.

    Returns:
        ``(train, test)`` datasets of ``(image, label)`` pairs: images are float32
        ``(1, 8, 8)`` tensors (see :func:`normalize_digits`), labels int64 scalars.

    Example:
        >>> train, test = load_digits_split(test_size=0.5, seed=1)
        >>> len(train) + len(test)
        1797
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(
            f"test_size must be a fraction strictly between 0 and 1, got {test_size!r}"
        )
    bunch = load_digits()
    data = np.asarray(bunch.data)
    target = np.asarray(bunch.target)
    x_train, x_test, y_train, y_test = train_test_split(
        data, target, test_size=test_size, random_state=seed, stratify=target
    )
    return (
        TensorDataset(normalize_digits(x_train), torch.as_tensor(y_train, dtype=torch.int64)),
        TensorDataset(normalize_digits(x_test), torch.as_tensor(y_test, dtype=torch.int64)),
    )


def make_loaders(
    train: TensorDataset,
    test: TensorDataset,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Wrap the datasets in loaders: train shuffled reproducibly, test in order.

    The train loader shuffles with its own ``torch.Generator`` seeded by ``seed``,
    so the batch order does not depend on (or disturb) the global RNG.

    Example:
        >>> train, test = load_digits_split()
        >>> a, _ = make_loaders(train, test, seed=3)
        >>> b, _ = make_loaders(train, test, seed=3)
        >>> bool((next(iter(a))[1] == next(iter(b))[1]).all())
        True
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False)
    return train_loader, test_loader


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "quantaware"


def _check_mnist1d(data: dict[str, np.ndarray]) -> None:
    """Raise ``ValueError`` unless ``data`` holds MNIST-1D-shaped splits."""
    for x, y in (("x", "y"), ("x_test", "y_test")):
        if data[x].ndim != 2 or data[y].shape != (len(data[x]),) or not len(data[x]):
            raise ValueError(f"{x} {data[x].shape} and {y} {data[y].shape} are not a split")


def load_mnist1d_split(seed: int = 42) -> tuple[TensorDataset, TensorDataset]:
    """MNIST-1D (Greydanus 2020, arXiv 2011.14439): 4000 train / 1000 test sequences.

    Generated offline by the ``mnist1d`` package (``make_dataset(get_dataset_args())``,
    about ten seconds), then cached as ``~/.cache/quantaware/mnist1d-seed<seed>.npz``
    (written atomically) so later calls load it in milliseconds.

    Returns:
        ``(train, test)`` datasets of ``(x, y)``: ``x`` float32 ``(1, 40)``, ``y`` int64.

    Example:
        >>> train, test = load_mnist1d_split()  # doctest: +SKIP
        >>> len(train), len(test), tuple(train[0][0].shape)  # doctest: +SKIP
        (4000, 1000, (1, 40))
    """
    cache = _cache_dir() / f"mnist1d-seed{seed}.npz"
    data = None
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as arrays:
                data = {k: arrays[k] for k in ("x", "y", "x_test", "y_test")}
            _check_mnist1d(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile,
                EOFError) as exc:  # TypeError/AttributeError: an .npy array, not an archive
            data = None
            log.warning("the MNIST-1D cache %s is unreadable (%s: %s); generating the data "
                        "again", cache, type(exc).__name__, exc)
    if data is None:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:
            raise ImportError(
                "MNIST-1D needs the mnist1d package: pip install mnist1d"
            ) from exc
        args = get_dataset_args()
        args.seed = seed
        made = make_dataset(args)
        data = {k: np.asarray(made[k]) for k in ("x", "y", "x_test", "y_test")}
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.savez(f, **data)
        except (OSError, ValueError) as exc:  # the cache only saves time: the data is here
            log.warning("cannot cache MNIST-1D at %s (%s); it will be generated again next "
                        "time", cache, exc)

    def dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.as_tensor(x, dtype=torch.float32).reshape(len(x), 1, -1),
                             torch.as_tensor(y, dtype=torch.int64))

    return dataset(data["x"], data["y"]), dataset(data["x_test"], data["y_test"])
