"""Training and evaluation helpers for float and quantization-aware models.

Batches follow quantaware's batch convention, with labels where needed:

* a tensor ``x`` (inputs only, no labels),
* a tuple or list ``(x, y, ...)``: the model input first, the labels second
  (``(x,)`` has no labels; further elements are ignored), or
* a dict of keyword inputs, ``model(**inputs)``; its label entry, one of
  ``"label"``, ``"labels"``, ``"target"``, ``"targets"`` or ``"y"``, is taken out.

NumPy arrays are accepted wherever tensors are.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from quantaware.train import evaluate_accuracy, fit
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(64, 4)
    >>> y = (x[:, 0] > 0).long()
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=16)
    >>> model = torch.nn.Linear(4, 2)
    >>> losses = fit(model, loader, epochs=20, lr=0.05)
    >>> losses[-1] < losses[0]
    True
    >>> evaluate_accuracy(model, loader) > 90.0
    True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from quantaware._batch import LABEL_KEYS, check_class_labels, check_finite, unpack_batch

__all__ = ["LABEL_KEYS", "evaluate_accuracy", "fit", "predict_logits", "unpack_batch"]

logger = logging.getLogger(__name__)

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _forward(model: nn.Module, inputs: Inputs, device: torch.device) -> torch.Tensor:
    if isinstance(inputs, dict):
        return model(**{k: v.to(device) for k, v in inputs.items()})
    if isinstance(inputs, tuple):
        return model(*(x.to(device) for x in inputs))
    return model(inputs.to(device))


def _class_targets(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels for cross-entropy: class probabilities shaped like ``logits`` as they
    are, else one class index per sample (``(N, 1)`` and integral float labels
    accepted) as int64. Dense outputs (``(N, C, H, W)`` with ``(N, H, W)`` labels)
    go to cross-entropy as they are."""
    if logits.ndim != 2:
        return labels
    if logits.shape[1] == 1:
        raise ValueError(
            "the model gives one score per sample, which cross-entropy reads as a single "
            "class (a loss of 0 that trains nothing); for two classes give two outputs, "
            "or pass loss_fn=torch.nn.functional.binary_cross_entropy_with_logits")
    if labels.shape == logits.shape and labels.is_floating_point():
        return labels  # soft targets
    if labels.numel() != logits.shape[0]:
        raise ValueError(
            f"cross-entropy needs one class index per sample, shaped (N,), or class "
            f"probabilities shaped like the logits {tuple(logits.shape)}; the labels have "
            f"shape {tuple(labels.shape)} (pass loss_fn for another target)")
    check_class_labels(labels, logits.shape[1])
    return labels.reshape(-1).long()


def _require_labels(labels: torch.Tensor | None, what: str) -> torch.Tensor:
    if labels is None:
        raise ValueError(
            f"{what} needs labelled batches, but the loader yielded inputs only; yield "
            f"(x, y) tuples or dicts with one of {list(LABEL_KEYS)}"
        )
    return labels


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    epochs: int,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    loss_fn: LossFn | None = None,
    progress: Callable[[int, float], None] | None = None,
    seed: int | None = None,
    optimizer: Literal["adamw", "sgd"] = "adamw",
) -> list[float]:
    """Train ``model`` in place with a cosine learning-rate schedule.

    The learning rate decays from ``lr`` towards zero over all steps
    (``epochs * len(loader)``; per epoch when the loader has no length).
    The model's train/eval mode is restored afterwards.

    Args:
        model: The module to train (float or fake-quantized).
        loader: Labelled batches, see the module docstring.
        epochs: Number of passes over ``loader``.
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (AdamW) or L2 penalty (SGD).
        loss_fn: ``loss_fn(logits, labels)``; defaults to cross-entropy.
        progress: Called as ``progress(epoch, mean_loss)`` after each epoch
            (``epoch`` counts from 1), e.g. to drive a progress bar.
        seed: If given, seeds torch's global RNG first (dropout, unseeded shuffling).
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov momentum 0.9).

    Returns:
        The sample-weighted mean training loss of each epoch.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(8, 3), torch.tensor([0, 1] * 4))
        >>> len(fit(torch.nn.Linear(3, 2), DataLoader(data, batch_size=4), epochs=2))
        2
    """
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    if seed is not None:
        torch.manual_seed(seed)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
        per_step = steps_per_epoch > 0
    except TypeError:
        steps_per_epoch, per_step = 1, False
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    default_loss = loss_fn is None
    loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
    device = _model_device(model)
    was_training = model.training
    model.train()
    history: list[float] = []
    try:
        for epoch in range(1, epochs + 1):
            total = torch.zeros((), dtype=torch.float64)
            count = 0
            for batch in loader:
                inputs, labels = unpack_batch(batch)
                labels = _require_labels(labels, "fit").to(device)
                out = _forward(model, inputs, device)
                if default_loss:  # a loss_fn of the caller's gets the output as it is
                    out = _logits(out)
                    labels = _class_targets(labels, out)
                loss = loss_fn(out, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if per_step:
                    schedule.step()
                total += loss.detach().double().cpu() * labels.shape[0]
                count += labels.shape[0]
            if count == 0 and epoch > 1:
                raise ValueError(
                    f"the loader gave no batches in epoch {epoch}: it is a one-shot iterator "
                    "(a generator?); pass one that can be read again (a DataLoader or a "
                    "list) to train for several epochs")
            if count == 0:
                raise ValueError("loader yielded no batches; check the dataset is not empty")
            if not per_step:
                schedule.step()
            mean_loss = float(total) / count
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"training loss became {mean_loss} in epoch {epoch}; lower lr "
                    f"(currently {lr}) or check the inputs for NaN/inf"
                )
            history.append(mean_loss)
            logger.debug("epoch %d/%d: mean loss %.4f", epoch, epochs, mean_loss)
            if progress is not None:
                progress(epoch, mean_loss)
    finally:
        model.train(was_training)
    return history


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable[Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``model`` in eval mode over ``loader``; return ``(logits, labels)`` on CPU.

    ``labels`` is None when the batches carry no labels. Quantizers do not observe
    the data; each module's train/eval mode is restored afterwards.

    Example:
        >>> import torch
        >>> logits, labels = predict_logits(torch.nn.Linear(3, 2), [torch.zeros(5, 3)])
        >>> tuple(logits.shape), labels
        ((5, 2), None)
    """
    from quantaware.fake_quant import frozen

    device = _model_device(model)
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    with frozen(model):  # observers off too: evaluating leaves the ranges alone
        for index, batch in enumerate(loader):
            inputs, labels = unpack_batch(batch)
            if isinstance(inputs, dict):
                check_finite((), inputs, f"batch {index}")
            else:
                check_finite(inputs if isinstance(inputs, tuple) else (inputs,), {},
                             f"batch {index}")
            outputs.append(_logits(_forward(model, inputs, device)).detach().cpu())
            if labels is not None:
                targets.append(torch.as_tensor(labels).cpu())
    if not outputs:
        raise ValueError("loader yielded no batches; check the dataset is not empty")
    if targets and len(targets) != len(outputs):
        raise ValueError("some batches carry labels and some do not; make them consistent")
    return torch.cat(outputs), (torch.cat(targets) if targets else None)


def _logits(out: Any) -> torch.Tensor:
    """The class scores in a model's output: the tensor itself, a dict's (or model
    output object's) ``logits``, or a tuple's first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out:
            return out["logits"]
        raise ValueError(f"the model returned a dict with keys {list(out.keys())} and no "
                         "'logits'; return the class scores as a tensor or under 'logits'")
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"the model returned {type(out).__name__}; return the class scores "
                     "as an (N, num_classes) tensor")


def evaluate_accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy of ``model`` on the labelled ``loader``, in percent.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> _ = model.weight.data.copy_(torch.eye(2))
        >>> evaluate_accuracy(model, [(torch.eye(2), torch.tensor([0, 1]))])
        100.0
    """
    logits, labels = predict_logits(model, loader)
    labels = _require_labels(labels, "evaluate_accuracy")
    if logits.ndim != 2:
        raise ValueError(f"expected (N, num_classes) logits, got shape {tuple(logits.shape)}; "
                         "the model must return one row of class scores per sample")
    if labels.numel() != logits.shape[0]:
        raise ValueError(
            f"the labels have shape {tuple(labels.shape)} for {logits.shape[0]} samples; give "
            "one class index per sample, shaped (N,) (labels.argmax(1) for one-hot labels; "
            "batches with several inputs as ((x1, x2), y))")
    check_class_labels(labels, logits.shape[1])
    correct = (logits.argmax(dim=1) == labels.reshape(-1)).sum().item()
    return 100.0 * correct / logits.shape[0]
