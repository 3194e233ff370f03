"""The built-in demo model: a small CNN for 1x8x8 digit images.

:class:`DigitsCNN` is deliberately built to exercise every op pattern quantaware
must handle, while staying fast enough to train on two CPU cores in seconds:

* ``Conv2d + BatchNorm2d + ReLU`` blocks (the classic fusion pattern),
* a depthwise ``Conv2d`` (``groups == channels``) ``+ BatchNorm2d + ReLU6``,
* a residual add written with ``+`` (``out = relu(block(x) + x)``),
* a ``torch.cat`` of two branches along the channel axis,
* ``MaxPool2d``, ``AdaptiveAvgPool2d(1)`` and ``Flatten``,
* ``Linear + ReLU`` followed by a ``Linear`` producing the logits.

The add and the cat are plain tensor expressions inside ``forward`` (not modules),
and ``forward`` has no data-dependent control flow, so the model is traceable by
:func:`torch.fx.symbolic_trace`; the quantizer rewrites those nodes in the graph.

Example:
    >>> import torch
    >>> from quantaware.models import DigitsCNN, count_parameters
    >>> model = DigitsCNN()
    >>> model(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    >>> count_parameters(model) >= 100_000
    True
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MNIST1DCNN", "DigitsCNN", "count_parameters"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """``Conv2d`` (same padding, no bias: BN follows) ``+ BatchNorm2d + ReLU``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class DigitsCNN(nn.Module):
    """A compact CNN for 1x8x8 images covering conv/BN/ReLU(6), add, cat, pool, linear.

    Shapes (batch ``N``)::

        input                                              N x   1 x 8 x 8
        stem       conv3x3+BN+ReLU                         N x  32 x 8 x 8
        residual   relu(conv3x3+BN+ReLU+conv3x3+BN + x)    N x  32 x 8 x 8
        branch_a   conv1x1+BN+ReLU                         N x  32 x 8 x 8
        branch_b   dw3x3+BN+ReLU6, pw1x1+BN+ReLU           N x  32 x 8 x 8
        cat        torch.cat along channels                N x  64 x 8 x 8
        pool       MaxPool2d(2)                            N x  64 x 4 x 4
        head_conv  conv3x3+BN+ReLU                         N x 128 x 4 x 4
        gap        AdaptiveAvgPool2d(1) + Flatten          N x 128
        fc1        Linear+ReLU                             N x 256
        fc2        Linear                                  N x num_classes

    About 131k parameters.

    Args:
        num_classes: Number of output logits.

    Example:
        >>> import torch
        >>> DigitsCNN(num_classes=3)(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        width = 32
        self.stem = _conv_bn_relu(1, width, 3)
        # Residual block: its output is added to its input, then passed through ReLU.
        self.res_block = nn.Sequential(
            _conv_bn_relu(width, width, 3),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.res_relu = nn.ReLU()
        # Two parallel branches concatenated along channels.
        self.branch_a = _conv_bn_relu(width, width, 1)
        self.branch_b = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),  # depthwise
            nn.BatchNorm2d(width),
            nn.ReLU6(),
            _conv_bn_relu(width, width, 1),  # pointwise
        )
        self.pool = nn.MaxPool2d(2)
        self.head_conv = _conv_bn_relu(2 * width, 4 * width, 3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4 * width, 256)
        self.fc1_relu = nn.ReLU()
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 1, 8, 8)`` images to ``(N, num_classes)`` logits."""
        x = self.stem(x)
        x = self.res_relu(self.res_block(x) + x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.pool(x)
        x = self.head_conv(x)
        x = self.flatten(self.gap(x))
        x = self.fc1_relu(self.fc1(x))
        return self.fc2(x)


class MNIST1DCNN(nn.Module):
    """A 1D CNN for MNIST-1D sequences ``(N, 1, 40)``, after the data set's reference CNN.

    Three ``Conv1d + BatchNorm1d + ReLU`` layers (the middle ones stride 2) and a
    linear classifier; about 12k parameters (Greydanus 2020 report 94% for a CNN
    of this size).

    Example:
        >>> import torch
        >>> MNIST1DCNN()(torch.randn(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        if num_classes < 1 or width < 1:
            raise ValueError(
                f"num_classes and width must be positive integers, got {num_classes}, {width}"
            )

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(cin, cout, 5, stride, 2, bias=False),
                                 nn.BatchNorm1d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, width, 1), block(width, width, 2),
                                      block(width, width, 2))
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(width * 10, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 1, 40)`` sequences to ``(N, num_classes)`` logits."""
        return self.classifier(self.flatten(self.features(x)))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameter elements in ``model``.

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad=True``.

    Example:
        >>> from torch import nn
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
