"""A tiny model and data set for CLI tests, given as module:function specs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def data() -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(384, 1, 16, generator=gen)
    y = (x.mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, :8].std(dim=1) > 1).long()
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(128, 4)).eval()
