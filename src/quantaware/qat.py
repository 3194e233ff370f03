"""Quantization-aware training helpers for your own training loop.

References:
    Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network",
    arXiv 1503.02531 (soft targets at temperature T, loss scaled by T^2).
    Jacob et al. 2018, arXiv 1712.05877, and Krishnamoorthi 2018, arXiv 1806.08342
    (section 3.2 and 3.3: fold batch norm during QAT, freeze its statistics and
    then the quantizer ranges late in training).
    Esser et al. 2019, "Learned Step Size Quantization", arXiv 1902.08153
    (learned scales, :class:`quantaware.fake_quant.LearnableFakeQuantizer`).

QAT in quantaware is ``prepare`` (or :func:`prepare_qat`, which also keeps batch
norm trainable and folds it the way the deployed model does) followed by your
loop; these helpers add distillation from the float model and a schedule that
freezes batch-norm statistics and then observers after given steps.

Example:
    >>> import torch
    >>> from quantaware import presets
    >>> from quantaware.qat import DistillationLoss, QATSchedule, prepare_qat
    >>> float_model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
    ...                                   torch.nn.ReLU(), torch.nn.Flatten(),
    ...                                   torch.nn.Linear(144, 3))
    >>> x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    >>> model = prepare_qat(float_model, presets.W4A4, x[:1])
    >>> distill = DistillationLoss(float_model, temperature=4.0, weight=0.5)
    >>> schedule = QATSchedule(model, freeze_bn_step=2, freeze_observer_step=3)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> for _ in range(3):
    ...     loss = distill(model(x), x, y)
    ...     opt.zero_grad(); loss.backward(); opt.step(); schedule.step()
    >>> bool(model.get_submodule("0").bn_frozen)
    True
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantaware._batch import input_args
from quantaware.config import QuantConfig
from quantaware.fake_quant import FakeQuantizer
from quantaware.fusion import can_fold
from quantaware.nn.conv_bn import ConvBn1d, ConvBn2d, _QuantConvBnMixin

__all__ = [
    "DistillationLoss",
    "QATSchedule",
    "distillation_loss",
    "freeze_bn_stats",
    "freeze_observers",
    "prepare_qat",
]

log = logging.getLogger(__name__)

_CONV_BN = {(nn.Conv1d, nn.BatchNorm1d): ConvBn1d, (nn.Conv2d, nn.BatchNorm2d): ConvBn2d}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 4.0,
    weight: float = 0.5,
) -> torch.Tensor:
    """Knowledge distillation loss (Hinton et al. 2015).

    ``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` plus
    ``(1 - weight) * cross_entropy(student, labels)`` when labels are given
    (otherwise the KL term alone, unweighted).

    Example:
        >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
        >>> float(distillation_loss(s, t))
        0.0
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; distil from a teacher with "
            "the same outputs"
        )
    t = float(temperature)
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=-1),
                  F.log_softmax(teacher_logits.detach() / t, dim=-1),
                  reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return kd
    return weight * kd + (1.0 - weight) * F.cross_entropy(student_logits, labels)


class DistillationLoss(nn.Module):
    """Distil a frozen float teacher into the quantized student, from your own loop.

    The teacher runs in eval mode without gradients on the same inputs.

    Args:
        teacher: the float model (not modified; a reference is kept).
        temperature: softening temperature T.
        weight: share of the distillation term (the rest is cross-entropy).

    Example:
        >>> teacher = torch.nn.Linear(4, 3)
        >>> student = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> DistillationLoss(teacher)(student(x), x, y).shape
        torch.Size([])
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, weight: float = 0.5) -> None:
        super().__init__()
        self.__dict__["teacher"] = teacher  # not a submodule: not trained, not saved
        self.temperature, self.weight = temperature, weight

    def forward(self, student_logits: torch.Tensor, inputs: Any,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        teacher = self.__dict__["teacher"]
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad():
            teacher_logits = (teacher(**inputs) if isinstance(inputs, dict)
                              else teacher(*input_args(inputs)))
        teacher.train(was_training)
        return distillation_loss(student_logits, teacher_logits, labels,
                                 self.temperature, self.weight)


def freeze_bn_stats(model: nn.Module) -> int:
    """Stop batch-norm statistics updates in QAT conv+BN modules; returns how many.

    From then on those layers train on exactly the folded conv that is exported.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _QuantConvBnMixin):
            module.freeze_bn_stats()
            count += 1
    return count


def freeze_observers(model: nn.Module) -> int:
    """Fix every observing quantizer's qparams at its current range; returns how many."""
    count = 0
    for module in model.modules():
        if (isinstance(module, FakeQuantizer) and module.observer is not None
                and bool(module.observer_enabled)):
            module.freeze()
            count += 1
    return count


class QATSchedule:
    """Freeze batch-norm statistics, then observers, after given optimizer steps.

    Call :meth:`step` once per training step. ``state_dict``/``load_state_dict``
    let a resumed run continue the schedule.

    Args:
        model: the prepared model.
        freeze_bn_step: step after which BN statistics stop updating (None: never).
        freeze_observer_step: step after which observing quantizers freeze (None: never).

    Example:
        >>> s = QATSchedule(torch.nn.Linear(2, 2), freeze_bn_step=1)
        >>> s.step(); s.state_dict()
        {'steps': 1}
    """

    def __init__(self, model: nn.Module, freeze_bn_step: int | None = None,
                 freeze_observer_step: int | None = None) -> None:
        for name, value in (("freeze_bn_step", freeze_bn_step),
                            ("freeze_observer_step", freeze_observer_step)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        self.model = model
        self.freeze_bn_step, self.freeze_observer_step = freeze_bn_step, freeze_observer_step
        self.steps = 0
        self._apply()

    def _apply(self) -> None:
        if self.freeze_bn_step is not None and self.steps >= self.freeze_bn_step:
            freeze_bn_stats(self.model)
        if self.freeze_observer_step is not None and self.steps >= self.freeze_observer_step:
            freeze_observers(self.model)

    def step(self) -> None:
        """Count one training step and apply whatever freezes are due."""
        self.steps += 1
        self._apply()

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])


def _pair_conv_bn(model: nn.Module, example_inputs: tuple) -> nn.Module:
    """A traced copy of ``model`` with each conv -> BN pair replaced by a ConvBn module."""
    from quantaware.prepare import _module, _shared_modules, _trace

    gm = _trace(copy.deepcopy(model).eval(), example_inputs)
    if gm is None:
        return model
    paired = 0
    shared = _shared_modules(gm)
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if bn is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        conv = _module(gm, prev)
        container = next((c for (ct, bt), c in _CONV_BN.items()
                          if type(conv) is ct and type(bn) is bt), None)
        if (container is None or len(prev.users) != 1 or prev.target in shared
                or not can_fold(conv, bn)):
            continue
        gm.add_submodule(prev.target, container(conv, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        paired += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    log.info("QAT: %d conv+BN pairs fold during training", paired)
    return gm


def prepare_qat(
    model: nn.Module,
    config: QuantConfig,
    example_inputs: torch.Tensor | tuple | list,
) -> nn.Module:
    """Like :func:`quantaware.prepare`, but batch norms after convs stay trainable.

    Each conv + BN pair becomes a :class:`~quantaware.nn.QuantConvBn2d` (or 1d)
    that quantizes the BN-folded weight during training and exports as a plain
    folded conv (Jacob et al. 2018). Use :class:`QATSchedule` (or
    :func:`freeze_bn_stats`) to freeze the statistics late in training.

    Example:
        >>> from quantaware import presets
        >>> net = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4))
        >>> type(prepare_qat(net, presets.INT8, torch.randn(1, 1, 8)).get_submodule("0")).__name__
        'QuantConvBn1d'
    """
    from quantaware.prepare import _as_tuple, prepare

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example = _as_tuple(example_inputs)
    training = model.training
    paired = _pair_conv_bn(model, example)
    prepared = prepare(paired, config, example)
    prepared.train(training)
    return prepared
