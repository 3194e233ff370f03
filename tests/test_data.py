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


def _fake_mnist1d(monkeypatch) -> list[int]:
    """mnist1d's generator replaced by a small one; returns the list of calls."""
    import mnist1d.data

    calls: list[int] = []

    def make_dataset(args):
        calls.append(args.seed)
        rng = np.random.default_rng(args.seed)
        return {"x": rng.normal(size=(8, 40)), "y": rng.integers(0, 10, 8),
                "x_test": rng.normal(size=(4, 40)), "y_test": rng.integers(0, 10, 4)}

    monkeypatch.setattr(mnist1d.data, "make_dataset", make_dataset)
    return calls


def _npy() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


def _wrong_shapes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((4, 40)), y=np.zeros(3), x_test=np.zeros((2, 40)),
             y_test=np.zeros(2))
    return buffer.getvalue()


@pytest.mark.parametrize("junk", [b"not a zip", b"PK\x03\x04broken", _npy(), _wrong_shapes()],
                         ids=["junk", "cut-zip", "npy", "wrong-shapes"])
def test_an_unreadable_mnist1d_cache_is_generated_again(tmp_path, monkeypatch, caplog, junk):
    """A corrupt or foreign cache ended every run with a raw BadZipFile, TypeError or
    size mismatch, naming no file."""
    from quantaware.data import load_mnist1d_split

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = _fake_mnist1d(monkeypatch)
    cache = tmp_path / "quantaware" / "mnist1d-seed3.npz"
    cache.parent.mkdir()
    cache.write_bytes(junk)
    with caplog.at_level("WARNING", logger="quantaware.data"):
        train, test = load_mnist1d_split(seed=3)
    assert str(cache) in caplog.text and "generating the data again" in caplog.text
    assert calls == [3] and len(train) == 8 and len(test) == 4
    load_mnist1d_split(seed=3)  # the cache was rewritten: read, not generated
    assert calls == [3]


def test_an_unwritable_mnist1d_cache_only_costs_time(tmp_path, monkeypatch, caplog):
    from quantaware.data import load_mnist1d_split

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file, not a folder
    calls = _fake_mnist1d(monkeypatch)
    with caplog.at_level("WARNING", logger="quantaware.data"):
        train, _ = load_mnist1d_split(seed=1)
    assert len(train) == 8 and calls == [1] and "cannot cache MNIST-1D" in caplog.text
