"""A MobileNetV3-Small-shaped network (Hardswish, squeeze-and-excitation gates) with
fixed random weights, for timing quantized deployment of that kind of network:

    quantaware bench --models benchmarks/mobile_v3.py:build --input-shape 3,224,224 \\
        --batches 1 --backend onnxruntime litert

There are no pretrained weights offline, so what is measured is speed, size and
agreement with the float network, not accuracy.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(channels // reduction, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, kernel: int, stride: int,
                 se: bool, hardswish: bool) -> None:
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False),
                                    nn.BatchNorm2d(hidden), act())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), act())
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileV3(nn.Module):
    # (in, hidden, out, kernel, stride, squeeze-excite, hardswish)
    BLOCKS = ((16, 16, 16, 3, 2, True, False), (16, 72, 24, 3, 2, False, False),
              (24, 88, 24, 3, 1, False, False), (24, 96, 40, 5, 2, True, True),
              (40, 240, 40, 5, 1, True, True), (40, 120, 48, 5, 1, True, True),
              (48, 288, 96, 5, 2, True, True), (96, 576, 96, 5, 1, True, True))

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.blocks = nn.Sequential(*(InvertedResidual(*b) for b in self.BLOCKS))
        self.last = nn.Sequential(nn.Conv2d(96, 576, 1, bias=False), nn.BatchNorm2d(576),
                                  nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(576, 1024), nn.Hardswish(),
                                  nn.Linear(1024, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.last(self.blocks(self.stem(x)))))


def build() -> nn.Module:
    """The network with seeded random weights and batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    model = MobileV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()
