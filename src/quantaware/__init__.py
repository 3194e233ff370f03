"""quantaware: quantize PyTorch models (PTQ, QAT) and deploy INT8 ONNX that
provably computes what you trained.

Example:
    >>> import torch, quantaware
    >>> from quantaware import presets
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> data = [torch.randn(16, 4) for _ in range(4)]
    >>> qnet = quantaware.quantize(net, presets.INT8, data, example_inputs=data[0][:1])
    >>> qnet(data[0]).shape
    torch.Size([16, 2])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantaware import presets
from quantaware.calibrate import calibrate, quantize
from quantaware.config import (
    ConfigError,
    FloatSpec,
    LayerOverride,
    PerChannel,
    PerTensor,
    QuantConfig,
    QuantSpec,
)
from quantaware.prepare import UnsupportedLayerError, prepare

if TYPE_CHECKING:
    from quantaware.export.integer import integer_arithmetic
    from quantaware.export.onnx import export_onnx
    from quantaware.export.tflite import export_tflite
    from quantaware.export.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FloatSpec",
    "LayerOverride",
    "PerChannel",
    "PerTensor",
    "QuantConfig",
    "QuantSpec",
    "UnsupportedLayerError",
    "VerifyReport",
    "__version__",
    "calibrate",
    "export_onnx",
    "export_tflite",
    "integer_arithmetic",
    "prepare",
    "presets",
    "quantize",
    "verify",
]

_LAZY = {
    "export_onnx": "quantaware.export.onnx",
    "export_tflite": "quantaware.export.tflite",
    "integer_arithmetic": "quantaware.export.integer",
    "verify": "quantaware.export.verify",
    "VerifyReport": "quantaware.export.verify",
}


def __getattr__(name: str) -> Any:
    # onnx/onnxruntime/onnxscript load only when export or verify is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantaware' has no attribute {name!r}")
