"""The QAT runner's checks on its training batches."""

from __future__ import annotations

import pytest
import torch

from quantaware.qat_run import _check_labels


def test_labels_outside_the_models_classes_are_named():
    """A label past the model's classes ended `quantaware qat` in cross-entropy's
    raw 'IndexError: Target 12 is out of bounds'."""
    logits = torch.zeros(4, 3)
    _check_labels(torch.tensor([0, 1, 2, 2]), logits, 1)
    _check_labels(torch.rand(4, 3), logits, 1)  # soft targets are not class indices
    with pytest.raises(ValueError, match=r"batch 7 has label 12, but the model gives 3 class "
                                         r"scores \(labels must be 0 to 2\)"):
        _check_labels(torch.tensor([0, 12, 1, 2]), logits, 7)
    with pytest.raises(ValueError, match="batch 2 has label -1"):
        _check_labels(torch.tensor([0, -1, 1, 2]), logits, 2)
