"""Tests for the bundled digits data set helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantaware.data import (
    DIGITS_MEAN,
    DIGITS_STD,
    NUM_CLASSES,
    load_digits_split,
    make_loaders,
    normalize_digits,
)


@pytest.fixture(scope="module")
def split() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    return load_digits_split()


def test_split_shapes_and_dtypes(split) -> None:
    train, test = split
    assert (len(train), len(test)) == (1437, 360)
    x, y = train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(NUM_CLASSES))


def test_normalisation_constants_match_train_split(split) -> None:
    x = split[0].tensors[0]
    raw = x * DIGITS_STD + DIGITS_MEAN
    assert float(raw.min()) == pytest.approx(0.0, abs=1e-5)
    assert float(raw.max()) == pytest.approx(1.0, abs=1e-5)
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_split_is_stratified_and_deterministic(split) -> None:
    train, test = split
    again_train, _ = load_digits_split()
    assert torch.equal(train.tensors[0], again_train.tensors[0])
    train_freq = torch.bincount(train.tensors[1], minlength=NUM_CLASSES) / len(train)
    test_freq = torch.bincount(test.tensors[1], minlength=NUM_CLASSES) / len(test)
    assert torch.allclose(train_freq, test_freq, atol=0.01)
    other_train, _ = load_digits_split(seed=1)
    assert not torch.equal(train.tensors[1], other_train.tensors[1])


def test_split_rejects_bad_test_size() -> None:
    with pytest.raises(ValueError, match="test_size"):
        load_digits_split(test_size=1.5)


def test_normalize_digits_accepts_flat_and_image_shapes() -> None:
    flat = np.arange(128, dtype=np.float64).reshape(2, 64) % 17
    assert torch.equal(normalize_digits(flat), normalize_digits(flat.reshape(2, 8, 8)))
    with pytest.raises(ValueError, match="64 pixels"):
        normalize_digits(np.zeros((2, 10)))


def test_make_loaders_seeded_shuffle_and_ordered_test(split) -> None:
    train, test = split
    first, test_loader = make_loaders(train, test, batch_size=32, seed=5)
    second, _ = make_loaders(train, test, batch_size=32, seed=5)
    labels_a = torch.cat([y for _, y in first])
    labels_b = torch.cat([y for _, y in second])
    assert torch.equal(labels_a, labels_b)
    assert not torch.equal(labels_a, train.tensors[1])  # shuffled
    assert torch.equal(torch.cat([y for _, y in test_loader]), test.tensors[1])
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(train, test, batch_size=0)
