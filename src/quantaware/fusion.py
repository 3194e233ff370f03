"""Batch-norm folding (Jacob et al. 2018, section 3.2; Krishnamoorthi 2018).

An inference-mode ``BatchNorm`` after a conv or linear layer is an affine map per
output channel, so it folds into the layer's weight and bias:

    w' = w * gamma / sqrt(var + eps)        b' = (b - mean) * gamma / sqrt(var + eps) + beta

Example:
    >>> import torch
    >>> conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()
    >>> bn.running_mean.uniform_(); bn.running_var.uniform_(0.5, 2.0)  # doctest: +ELLIPSIS
    tensor(...)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(fold_bn(conv, bn)(x), bn(conv(x)), atol=1e-5)
    True
"""

from __future__ import annotations

import copy

import torch
from torch import nn

TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *TRANSPOSED)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` (with running statistics) can fold into ``layer``."""
    if not isinstance(layer, FOLDABLE) or not isinstance(bn, BATCH_NORMS):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return out == bn.num_features


def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` with ``bn``'s inference-mode transform folded in."""
    if not can_fold(layer, bn):
        raise ValueError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) into {layer!r}: it must "
            "directly follow a conv/linear layer with the same number of output channels "
            "and track running statistics"
        )
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
        factor = gamma * inv_std
        if isinstance(layer, TRANSPOSED):
            # (in, out / groups, *kernel): output channel g * (out / groups) + j is
            # column j of group g's rows.
            w = layer.weight.double()
            groups, per_group = layer.groups, w.shape[1]
            kernel = [1] * (w.dim() - 2)
            weight = (w.reshape(groups, -1, per_group, *w.shape[2:])
                      * factor.reshape(groups, 1, per_group, *kernel)).reshape(w.shape)
        else:
            shape = [-1] + [1] * (layer.weight.dim() - 1)
            weight = layer.weight.double() * factor.reshape(shape)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(inv_std)
        bias = (bias - bn.running_mean.double()) * factor + beta
        folded.weight = nn.Parameter(weight.to(layer.weight.dtype),
                                     requires_grad=layer.weight.requires_grad)
        folded.bias = nn.Parameter(bias.to(layer.weight.dtype))
    return folded
