"""Conv + BatchNorm folded during quantization-aware training.

References:
    Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", arXiv 1712.05877, section 3.2 and figure C.8.
    Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient
    inference: A whitepaper", arXiv 1806.08342, section 3.2.

The deployed model runs a conv whose weight and bias have the batch norm folded
in, so QAT quantizes that folded weight, ``w * gamma / sqrt(running_var + eps)``.
While batch statistics are still being learned, the conv output is divided back
by the same factor and normalised with the batch statistics (the correction of
Krishnamoorthi's figure 15, as torch.ao's ``ConvBn`` modules do), so training
sees batch-norm behaviour while the weight is quantized as deployed. Once the
statistics are frozen (:func:`quantaware.qat.freeze_bn_stats`), training and
evaluation both run the folded conv itself: exactly what is exported, a plain
conv with a folded, quantized weight and an int32 bias.

:class:`ConvBn1d`/:class:`ConvBn2d` are float containers that
:func:`quantaware.qat.prepare_qat` puts in place of conv + BN pairs;
``prepare`` swaps them for :class:`QuantConvBn1d`/:class:`QuantConvBn2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantaware.fake_quant import FakeQuantizer
from quantaware.nn.conv import QuantConv1d, QuantConv2d
from quantaware.nn.registry import register

__all__ = ["ConvBn1d", "ConvBn2d", "QuantConvBn1d", "QuantConvBn2d"]


class _ConvBn(nn.Module):
    """A conv followed by its batch norm, kept apart so QAT can fold them itself."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        if conv.out_channels != bn.num_features:
            raise ValueError(
                f"cannot pair {conv!r} with {bn!r}: the batch norm must have one feature "
                "per conv output channel"
            )
        self.conv, self.bn = conv, bn

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ConvBn1d(_ConvBn):
    """``Conv1d`` + ``BatchNorm1d`` (float container for QAT folding).

    Example:
        >>> m = ConvBn1d(torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4))
        >>> m(torch.randn(2, 1, 8)).shape
        torch.Size([2, 4, 6])
    """


class ConvBn2d(_ConvBn):
    """``Conv2d`` + ``BatchNorm2d`` (float container for QAT folding).

    Example:
        >>> m = ConvBn2d(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> m(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 4, 6, 6])
    """


class _QuantConvBnMixin:
    """Folded-BN behaviour shared by the 1d and 2d modules."""

    bn: nn.Module
    bn_frozen: torch.Tensor

    @classmethod
    def from_float(cls, module: _ConvBn, weight_spec, activation_spec):
        new = super().from_float(module.conv, weight_spec, activation_spec)
        new.bn = module.bn
        new.register_buffer("bn_frozen", torch.tensor(0, dtype=torch.uint8))
        new.train(module.training)  # prepare() checks the swap with an eval-mode forward
        return new

    def _bn_factor(self) -> torch.Tensor:
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(
            self.bn.running_var)
        return gamma * torch.rsqrt(self.bn.running_var + self.bn.eps)

    def _channel_shape(self, dims: int) -> list[int]:
        return [-1] + [1] * (dims - 1)

    @staticmethod
    def _fold_commutes(wq: nn.Module | None, dims: int) -> bool:
        """Whether fake-quantizing the folded weight and dividing by the fold factor
        is fake-quantizing the raw weight: symmetric per-channel (output axis)
        scales taken from the weight's own range, zero points at 0, and no
        learned scale (a learned scale is the folded weight's)."""
        return (type(wq) is FakeQuantizer and wq.from_tensor and not wq.spec.dynamic
                and wq.spec.symmetric and wq.axis in (0, -dims) and not bool(wq.calibrated)
                and (wq.qmin + wq.qmax + 1) // 2 == 0)

    def _fold_sign_commutes(self, wq: FakeQuantizer) -> bool:
        """A negative fold factor mirrors the grid: ``quantize(-w) == -quantize(w)``
        needs an integer range symmetric about 0 (``[-127, 127]``, not ``[-128, 127]``)."""
        return wq.qmin == -wq.qmax or bool((self._bn_factor() > 0).all())

    def float_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conv weight and bias with the batch norm's running statistics folded in."""
        if getattr(self, "bn", None) is None:  # already folded for export
            return self.weight, self.bias
        factor = self._bn_factor()
        weight = self.weight * factor.reshape(self._channel_shape(self.weight.dim()))
        bias = -self.bn.running_mean * factor
        if self.bias is not None:
            bias = bias + self.bias * factor
        if self.bn.bias is not None:
            bias = bias + self.bn.bias
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        # bn.eval() (the usual way to freeze batch norm) freezes it here as well
        if not (self.training and self.bn.training and not bool(self.bn_frozen)):
            weight, bias = self.quantized_params()
            return self._finish(self._conv_forward(x, weight, bias))
        # Batch statistics still live: quantize the weight folded with the running
        # statistics, then undo the fold and apply batch norm with batch statistics.
        wq = self.weight_quantizer
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self._fold_commutes(wq, self.weight.dim()) and self._fold_sign_commutes(wq):
            # Symmetric per-channel scales from the weight's own range scale with the
            # channel: quantize(w * f) / f == quantize(w) (the folded weight's grid
            # is the raw weight's grid times |f|; a negative f needs a grid symmetric
            # about 0), so the fold and its undoing cancel.
            # Same values up to float rounding, and the same straight-through
            # gradients as undoing the fold with a non-detached factor.
            y = self._conv_forward(x, wq(self.weight), None)
        else:
            factor = self._bn_factor()
            weight = self.weight * factor.reshape(self._channel_shape(self.weight.dim()))
            if isinstance(wq, FakeQuantizer) and bool(wq.fake_quant_enabled):
                scale, zero_point = wq.qparams(weight)
                weight = wq.fake_quantize_with(weight, scale, zero_point)
            y = self._conv_forward(x, weight, None)
            # Undo the fold. Batch norm with batch statistics is invariant to a
            # per-channel scale of its input (up to eps), so this path carries no
            # gradient to the factor worth two extra passes over the activations:
            # detach it, and multiply by the reciprocal (training's arithmetic only).
            y = y * torch.reciprocal(factor.detach()).reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        bn = self.bn
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
        if momentum is None:  # cumulative average, as torch's batch norm keeps it
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.num_batches_tracked is not None \
                else 0.0
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                         momentum, bn.eps)
        return self._finish(y)

    def freeze_bn_stats(self) -> None:
        """Stop updating batch statistics; train on the folded conv from now on."""
        self.bn_frozen.fill_(1)

    def freeze_for_export(self) -> None:
        """Fold the batch norm into the weight and bias, then freeze like a plain conv."""
        with torch.no_grad():
            weight, bias = self.float_params()
            self.weight = nn.Parameter(weight.detach().clone())
            self.bias = nn.Parameter(bias.detach().clone())
        del self.bn
        self.bn = None
        super().freeze_for_export()

    def to_float(self) -> nn.Module:
        """The plain conv with the batch norm folded in (running statistics)."""
        conv = super().to_float()
        with torch.no_grad():
            weight, bias = self.float_params()
            conv.weight = nn.Parameter(weight.detach().clone())
            conv.bias = nn.Parameter(bias.detach().clone())
        return conv


@register(ConvBn1d)
class QuantConvBn1d(_QuantConvBnMixin, QuantConv1d):
    """Quantized ``Conv1d`` + ``BatchNorm1d``, folded during training.

    Example:
        >>> from quantaware import presets
        >>> m = ConvBn1d(torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4))
        >>> QuantConvBn1d.from_float(m, presets.W8.weight, None)(torch.randn(2, 1, 8)).shape
        torch.Size([2, 4, 6])
    """

    _float_type = nn.Conv1d


@register(ConvBn2d)
class QuantConvBn2d(_QuantConvBnMixin, QuantConv2d):
    """Quantized ``Conv2d`` + ``BatchNorm2d``, folded during training.

    Example:
        >>> from quantaware import presets
        >>> m = ConvBn2d(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> QuantConvBn2d.from_float(m, presets.W8.weight, None)(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 4, 6, 6])
    """

    _float_type = nn.Conv2d
