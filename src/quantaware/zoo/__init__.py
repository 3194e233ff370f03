"""Reference networks with torchvision-compatible parameter names (no torchvision needed).

Example:
    >>> from quantaware.zoo import mobilenet_v2, resnet18
    >>> sum(p.numel() for p in mobilenet_v2().parameters())
    3504872
"""

from quantaware.zoo.mobilenet import MobileNetV2, load_mobilenet_v2_imagenet, mobilenet_v2
from quantaware.zoo.resnet import ResNet, resnet18

__all__ = ["MobileNetV2", "ResNet", "load_mobilenet_v2_imagenet", "mobilenet_v2", "resnet18"]
