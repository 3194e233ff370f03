"""Shared test models and helpers for the core quantaware test suite."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores among the workers: each worker's torch
    gets ``cores // workers`` threads instead of every worker taking them all."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def randomize_batchnorms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


class ResidualCNN(nn.Module):
    """A CNN covering the op patterns quantaware rewrites (about 112k parameters).

    conv+BN+ReLU, depthwise conv+BN+ReLU6, a residual add written with ``+``
    (followed by ``torch.relu``), ``torch.cat``, max pool, adaptive average pool,
    flatten and two linear layers. Input: ``N x 3 x 8 x 8``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(32)
        self.stem_relu = nn.ReLU()
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.dw_bn = nn.BatchNorm2d(32)
        self.dw_relu6 = nn.ReLU6()
        self.pw = nn.Conv2d(32, 32, 1)
        self.branch = nn.Conv2d(32, 32, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(64, 128, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        y = self.dw_relu6(self.dw_bn(self.dw(x)))
        y = self.pw(y)
        x = torch.relu(x + y)
        b = F.relu(self.branch(x))
        x = torch.cat([x, b], dim=1)
        x = self.pool(x)
        x = F.relu(self.head(x))
        x = self.flatten(self.gap(x))
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def make_residual_cnn(seed: int = 0) -> ResidualCNN:
    """A seeded :class:`ResidualCNN` in eval mode with random BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResidualCNN()
    return randomize_batchnorms(model, gen).eval()


def random_batches(shape: tuple[int, ...], count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


@pytest.fixture(scope="module")
def single_thread():
    """Run torch single-threaded for a test module.

    The models here are tiny, so threads buy nothing; on a small (2-core) machine
    torch's thread pool competing with ONNX Runtime's (or another process) slows
    small kernels down by an order of magnitude. One thread also makes float
    reductions run in a fixed order.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def residual_cnn() -> ResidualCNN:
    return make_residual_cnn(0)


@pytest.fixture(scope="session")
def cnn_factory():
    """``factory(seed)`` -> a fresh seeded :class:`ResidualCNN` (usable in any scope)."""
    return make_residual_cnn


@pytest.fixture(scope="session")
def randomize_bn():
    """``randomize_bn(model, generator)``: random BatchNorm statistics and affine params."""
    return randomize_batchnorms


@pytest.fixture(scope="session")
def batches_factory():
    """``factory(shape, count, seed)`` -> a list of seeded random batches."""
    return random_batches


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 12-frame video of real photos (tests/_media.py)."""
    from tests._media import write_video

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path)
    return path


@pytest.fixture
def photo_dir(tmp_path):
    """Three real photos as PNG/JPEG, one in a subfolder."""
    from PIL import Image
    from tests._media import photos

    astronaut, coffee, chelsea = photos()
    root = tmp_path / "photos"
    (root / "more").mkdir(parents=True)
    Image.fromarray(chelsea).save(root / "chelsea.png")
    Image.fromarray(coffee).save(root / "coffee.jpg", quality=95)
    Image.fromarray(astronaut).save(root / "more" / "astronaut.png")
    return root
