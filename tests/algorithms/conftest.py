"""A small CNN with depthwise convs, BN, ReLU6 and a residual add (MobileNetV2-like)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyDepthwiseNet(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  act())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), act(),
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), act(),
            nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32), act(),
            nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16),
        )
        self.head = nn.Conv2d(16, 24, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        x = torch.relu(self.head(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_net(act: type[nn.Module] = nn.ReLU6, seed: int = 0) -> TinyDepthwiseNet:
    torch.manual_seed(seed)
    net = TinyDepthwiseNet(act)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                # Very unequal channel ranges, as in trained depthwise nets.
                m.weight.copy_(torch.rand(m.num_features) ** 3 * 3 + 0.01)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def net_factory():
    return make_net


@pytest.fixture
def net() -> TinyDepthwiseNet:
    return make_net()


@pytest.fixture
def images() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(8, 3, 16, 16) for _ in range(2)]
