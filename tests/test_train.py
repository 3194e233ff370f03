"""Tests for the training and evaluation helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from quantaware.data import load_digits_split
from quantaware.models import DigitsCNN
from quantaware.train import evaluate_accuracy, fit, predict_logits, unpack_batch


@pytest.fixture(scope="module")
def tiny_loader() -> DataLoader:
    train, _ = load_digits_split()
    return DataLoader(Subset(train, range(128)), batch_size=32, shuffle=False)


def test_fit_reduces_loss_and_reports_progress(tiny_loader: DataLoader) -> None:
    torch.manual_seed(0)
    model = DigitsCNN()
    seen: list[tuple[int, float]] = []
    losses = fit(model, tiny_loader, epochs=4, progress=lambda e, loss: seen.append((e, loss)))
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    assert seen == list(enumerate(losses, start=1))
    assert model.training  # mode restored


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fit_optimizers_and_seed_reproducible(tiny_loader: DataLoader, optimizer: str) -> None:
    def run() -> list[float]:
        torch.manual_seed(1)
        model = DigitsCNN()
        return fit(model, tiny_loader, epochs=2, lr=0.01, seed=3, optimizer=optimizer)

    assert run() == run()


def test_fit_rejects_bad_arguments(tiny_loader: DataLoader) -> None:
    model = nn.Linear(64, 10)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, tiny_loader, epochs=0)
    with pytest.raises(ValueError, match="optimizer"):
        fit(model, tiny_loader, epochs=1, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labelled batches"):
        fit(model, [torch.zeros(4, 64)], epochs=1)
    with pytest.raises(ValueError, match="no batches"):
        fit(model, [], epochs=1)


def test_unpack_batch_conventions() -> None:
    x, y = torch.zeros(2, 3), torch.tensor([1, 0])
    assert unpack_batch(x) == (x, None)
    assert unpack_batch([x, y]) == (x, y)
    assert unpack_batch((x,)) == (x, None)
    inputs, labels = unpack_batch({"x": x, "target": y})
    assert inputs == {"x": x} and labels is y
    with pytest.raises(ValueError, match="several label entries"):
        unpack_batch({"x": x, "y": y, "label": y})
    with pytest.raises(ValueError, match="no input entries"):
        unpack_batch({"label": y})
    assert unpack_batch((x, y, "extra")) == (x, y)
    arr_x, arr_y = unpack_batch((np.ones((2, 3), np.float32), np.array([0, 1])))
    assert isinstance(arr_x, torch.Tensor) and arr_y.tolist() == [0, 1]
    with pytest.raises(TypeError, match="cannot use a batch"):
        unpack_batch(())
    with pytest.raises(TypeError, match="cannot use a batch"):
        unpack_batch("x")
    extra = torch.ones(2, 5)
    inputs, labels = unpack_batch([[x, extra], y])  # as a DataLoader collates ((x, e), y)
    assert isinstance(inputs, tuple) and inputs[0] is x and inputs[1] is extra and labels is y
    with pytest.raises(ValueError, match="empty tuple"):
        unpack_batch(((), y))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(extra)


def test_positional_inputs_train_and_evaluate() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [((torch.randn(8, 3, generator=gen), torch.randn(8, 5, generator=gen)),
             torch.randint(0, 2, (8,), generator=gen)) for _ in range(4)]
    model = _TwoInputs()
    history = fit(model, data, epochs=2, lr=1e-2)
    assert len(history) == 2
    logits, labels = predict_logits(model, data)
    with torch.no_grad():
        expected = torch.cat([model(*inputs) for inputs, _ in data])
    assert torch.equal(logits, expected) and labels.shape == (32,)


class _KwargModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_evaluate_accuracy_and_predict_logits() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, 1, 1])
    model = nn.Identity()
    assert evaluate_accuracy(model, [(logits[:2], labels[:2]), (logits[2:], labels[2:])]) == 75.0
    assert evaluate_accuracy(_KwargModel(), [{"x": logits, "labels": labels}]) == 75.0
    out, got = predict_logits(model, [logits])
    assert torch.equal(out, logits) and got is None
    with pytest.raises(ValueError, match="labelled batches"):
        evaluate_accuracy(model, [logits])


def test_evaluation_uses_eval_mode_and_restores_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.train()
    before = model[1].running_mean.clone()
    predict_logits(model, [TensorDataset(torch.randn(8, 4)).tensors])
    assert torch.equal(model[1].running_mean, before)
    assert model.training


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 3]), "label 3, but the model gives 3 class scores"),
    (torch.tensor([-1, 0]), "label -1"),
    (torch.tensor([0.0, 0.5]), "a label is 0.5"),
    (torch.tensor([True, False]), "integer class-index labels, got bool"),
])
def test_accuracy_refuses_labels_that_are_not_class_indices(labels, message) -> None:
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=message):
        evaluate_accuracy(model, [(torch.zeros(2, 2), labels)])
    whole = torch.tensor([0.0, 2.0])  # integral floats are class indices too
    assert 0.0 <= evaluate_accuracy(model, [(torch.zeros(2, 2), whole)]) <= 100.0


def test_evaluate_accuracy_refuses_labels_that_are_not_one_index_per_sample():
    """One-hot labels of one sample read as 200% accuracy (more: a raw broadcast error)."""
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3)
    for n in (1, 5):
        with pytest.raises(ValueError, match=rf"labels have shape \({n}, 3\).*argmax\(1\)"):
            evaluate_accuracy(model, [(x[:n], onehot[:n])])


def test_evaluate_accuracy_reads_logits_from_dicts_and_refuses_nan_inputs():
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"hidden": x, "logits": self.fc(x)}

    torch.manual_seed(0)
    model, x = Dict(), torch.randn(8, 4)
    labels = model.fc(x).argmax(1).detach()
    assert evaluate_accuracy(model, [(x, labels)]) == 100.0
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="batch 0 contains 1 NaN/Inf"):
        evaluate_accuracy(model, [(x, labels)])


def test_fit_takes_n_by_1_and_integral_float_labels_and_names_a_one_shot_loader():
    """(N, 1) and float labels failed inside cross-entropy with torch's raw error; a
    generator trained one epoch, then 'loader yielded no batches'."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    losses = []
    for labels in (y, y[:, None], y.float()):
        torch.manual_seed(1)
        model = nn.Linear(3, 2)
        losses.append(fit(model, [(x, labels)], epochs=2, seed=0))
    assert losses[0] == losses[1] == losses[2]
    soft = torch.softmax(torch.randn(16, 2), 1)  # class probabilities stay as they are
    assert len(fit(nn.Linear(3, 2), [(x, soft)], epochs=1)) == 1
    with pytest.raises(ValueError, match=r"label is 0.5"):
        fit(nn.Linear(3, 2), [(x, torch.full((16,), 0.5))], epochs=1)
    with pytest.raises(ValueError, match="no batches in epoch 2: it is a one-shot iterator"):
        fit(nn.Linear(3, 2), (b for b in [(x, y)]), epochs=2)


def test_fit_gives_a_loss_fn_of_its_own_the_whole_output_and_refuses_one_column_logits():
    """A custom loss got only the first tensor of a (main, aux) output; one-column
    logits with 0/1 labels trained nothing (cross-entropy of one class is 0)."""
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main, self.aux = nn.Linear(3, 2), nn.Linear(3, 1)

        def forward(self, x):
            return self.main(x), self.aux(x)

    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))

    def loss(out, labels):
        main, aux = out
        return F.cross_entropy(main, labels) + aux.pow(2).mean()

    assert len(fit(TwoHeads(), [(x, y)], epochs=1, loss_fn=loss)) == 1
    with pytest.raises(ValueError, match=r"one score per sample.*binary_cross_entropy"):
        fit(nn.Linear(3, 1), [(x, y[:, None].float())], epochs=1)


def test_fit_trains_a_dense_model_with_per_pixel_labels():
    """Per-pixel class labels (N, H, W) for (N, C, H, W) logits go to cross-entropy as
    they are."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 5, 5), torch.randint(0, 2, (4, 5, 5))
    losses = fit(nn.Conv2d(3, 2, 1), [(x, y)], epochs=3, lr=0.1)
    assert losses[-1] < losses[0]
