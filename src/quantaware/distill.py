"""Label-free quantization-aware fine-tuning: distil the float model into its INT8 copy.

When post-training quantization moves too many predictions (MobileNetV2's depthwise
layers are the classic case), the fake-quantized model can be fine-tuned to
reproduce the float model's outputs on *unlabelled* inputs: the loss is the
KL divergence between the float teacher's and the quantized student's softened
class distributions (Hinton et al. 2015, arXiv 1503.02531; used for QAT without
labels by e.g. Mishra & Marr 2017, arXiv 1711.05852). No labels are needed, so
any images of the deployment domain will do.

Activation ranges stay as calibrated (frozen); the float master weights learn
through the straight-through estimator and weight scales follow them. The
result exports like any prepared model.

Example:
    >>> import torch
    >>> from quantaware import presets, quantize
    >>> teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
    ...                               torch.nn.Linear(16, 4)).eval()
    >>> x = torch.randn(64, 8)
    >>> student = quantize(teacher, presets.INT8, [x], x[:1])
    >>> student = distill(student, teacher, [x[:32], x[32:]], steps=4)
    >>> student(x).shape
    torch.Size([64, 4])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["distill", "distillation_loss"]

log = logging.getLogger(__name__)


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    """``data``'s batches over and over, read afresh each pass (a loader is not held
    in memory)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("distill needs at least one batch of inputs")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, scaled by ``T**2``.

    Example:
        >>> logits = torch.randn(4, 10)
        >>> float(distillation_loss(logits, logits))
        0.0
    """
    t = float(temperature)
    log_student = F.log_softmax(student_logits / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * t * t


def distill(student: nn.Module, teacher: nn.Module, data: Iterable[Any],
            steps: int = 200, lr: float = 1e-5, temperature: float = 1.0,
            on_step: Callable[[int, float], None] | None = None) -> nn.Module:
    """Fine-tune a calibrated ``student`` (from :func:`quantaware.quantize`) towards ``teacher``.

    Args:
        student: the prepared, calibrated model (trained in place and returned).
        teacher: the float model it was prepared from.
        data: input batches, cycled for ``steps`` optimizer steps: tensors,
            ``(inputs, ...)`` tuples or dicts of keyword inputs (labels are not
            used, so a labelled loader works too).
        lr: Adam learning rate (small: PTQ is already close).
        temperature: softmax temperature of the distillation loss.
        on_step: called with ``(step, loss)`` after every step.

    Both models run in eval mode (folded batch norms, no dropout: the targets are
    the float model's predictions); each module's mode is given back after.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if iter(data) is data:  # a one-shot iterator (a generator): kept to cycle over
        data = list(data)
    from quantaware._batch import check_finite, model_device, split_batch, to_device
    from quantaware.train import _logits

    modes = [(m, m.training) for model in (teacher, student) for m in model.modules()]
    teacher.eval()
    # Eval mode: BatchNorm is folded and dropout would only add noise to the targets.
    student.eval()
    device = model_device(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        for step, batch in zip(range(steps), _cycle(data), strict=False):
            args, kwargs = split_batch(batch)
            check_finite(args, kwargs, f"distillation batch {step}")
            args, kwargs = to_device(args, kwargs, device)
            with torch.no_grad():
                target = _logits(teacher(*args, **kwargs))
            loss = distillation_loss(_logits(student(*args, **kwargs)), target, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if on_step is not None:
                on_step(step, value)
            if step % 50 == 0:
                log.info("distill step %d: loss %.5f", step, value)
    finally:
        for module, training in modes:
            module.train(training)
    return student
