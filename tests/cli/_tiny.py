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


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 3, padding=1)
        self.side = nn.Linear(3, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, signal: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(signal)).mean(2) + torch.relu(self.side(side)))


def two() -> nn.Module:
    """A model with two positional inputs (named like a rich emoji code, ``:two:``)."""
    torch.manual_seed(0)
    return _TwoInputs().eval()


def two_batches() -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [((torch.randn(16, 1, 16, generator=gen), torch.randn(16, 3, generator=gen)),
             torch.randint(0, 4, (16,), generator=gen)) for _ in range(4)]


class _TwoInputSet(torch.utils.data.Dataset):
    """Samples ``((signal, side), label)``."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.signal = torch.randn(n, 1, 16, generator=gen)
        self.side = torch.randn(n, 3, generator=gen)
        self.label = (self.signal.mean((1, 2)) > 0).long() + 2 * (self.side[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        return (self.signal[i], self.side[i]), self.label[i]


def two_datasets() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    return _TwoInputSet(128, 0), _TwoInputSet(64, 1)


def gelu_mlp() -> nn.Module:
    """A linear layer read only by GELU: float32 in LiteRT unless quantized for it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training samples of :func:`data` in batches of 32."""
    x, y = data()[0].tensors
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]


class _Branching(nn.Module):
    """A forward that branches on a tensor's value: no exported graph can hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(1, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if h.mean() > 0:
            h = h * 2
        return self.head(h.mean(2))


def branching() -> nn.Module:
    torch.manual_seed(0)
    return _Branching().eval()
