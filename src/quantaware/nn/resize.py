"""Quantized upsampling (``F.interpolate``, ``nn.Upsample``; nearest and (bi)linear).

The input is quantized (usually by the layer that produced it, which then runs as
an integer kernel). Nearest upsampling copies codes: its output keeps the input's
grid, and ONNX Runtime and LiteRT resize the int8 codes. An interpolating resize
(bilinear, ...) computes new values, which are quantized onto a grid of their own:
ONNX Runtime and OpenVINO interpolate the dequantized input in float and quantize
the result, exactly this module's forward; LiteRT's converter puts the layer before
on the resize's output grid and interpolates int8 codes (see
:func:`quantaware.export.integer.integer_arithmetic`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quantaware.config import QuantSpec
from quantaware.fake_quant import FakeQuantizer, make_quantizer
from quantaware.nn.base import QuantMixin

__all__ = ["NEAREST_MODES", "RESIZE_MODES", "QuantUpsample"]

# F.interpolate's modes that copy values.
NEAREST_MODES = frozenset({"nearest", "nearest-exact"})
# The modes quantized ("area" is average pooling; bicubic and trilinear stay float:
# LiteRT has no int8 kernel for them).
RESIZE_MODES = NEAREST_MODES | {"linear", "bilinear"}


class QuantUpsample(QuantMixin, nn.Module):
    """``F.interpolate`` with a quantized input and output.

    ``prepare`` puts one in place of ``nn.Upsample``, ``nn.UpsamplingBilinear2d``,
    ``nn.UpsamplingNearest2d`` and ``F.interpolate`` calls. In a nearest mode the
    module has no output quantizer: the output carries the input's qparams (and is
    marked as quantized on them in an exported graph). When no quantized layer reads
    the output (an upsampled model output), ``prepare`` drops the output's
    quantization: the resize then runs in float on the dequantized input.

    Args:
        activation_spec: the quantization of the input (when no earlier layer
            quantizes it) and, in interpolating modes, of the output.
        size, scale_factor, mode, align_corners, recompute_scale_factor: as in
            :func:`torch.nn.functional.interpolate`.

    Example:
        >>> from quantaware import presets
        >>> up = QuantUpsample(presets.INT8.activation, scale_factor=2, mode="bilinear")
        >>> for q in up.modules():
        ...     if hasattr(q, "observe_only"): q.observe_only()
        >>> up(torch.ones(1, 1, 2, 2)).shape
        torch.Size([1, 1, 4, 4])
    """

    def __init__(self, activation_spec: QuantSpec, size=None, scale_factor=None,
                 mode: str = "nearest", align_corners: bool | None = None,
                 recompute_scale_factor: bool | None = None) -> None:
        super().__init__()
        if mode not in RESIZE_MODES:
            raise ValueError(f"mode must be one of {sorted(RESIZE_MODES)}, got {mode!r}")
        self._init_activation_slots()
        self.size, self.scale_factor, self.mode = size, scale_factor, mode
        self.align_corners, self.recompute_scale_factor = align_corners, recompute_scale_factor
        self.input_quantizer = make_quantizer(activation_spec)
        # False when nothing integer reads the output (prepare decides): a nearest
        # resize then leaves its copies unmarked, and the exported resize runs in float.
        self.requantize_output = True
        if mode not in NEAREST_MODES:
            self.output_quantizer = make_quantizer(activation_spec)

    def resize(self, x: torch.Tensor, size=None) -> torch.Tensor:
        """The float resize of ``x`` (already quantized). A 1-d linear resize runs as
        a bilinear one over a height of one (the same values), the form LiteRT has
        an int8 kernel for."""
        size = self.size if size is None else size
        if self.mode != "linear":
            return F.interpolate(x, size=size, scale_factor=self.scale_factor, mode=self.mode,
                                 align_corners=self.align_corners,
                                 recompute_scale_factor=self.recompute_scale_factor)
        y = F.interpolate(
            x.unsqueeze(-2), size=None if size is None else (1, _single(size)),
            scale_factor=None if self.scale_factor is None else (1.0,
                                                                  _single(self.scale_factor)),
            mode="bilinear", align_corners=self.align_corners,
            recompute_scale_factor=self.recompute_scale_factor)
        return y.squeeze(-2)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        """``size`` (when given) replaces the stored size: a size read from another
        tensor's shape at run time, as in ``F.interpolate(x, size=y.shape[-2:])``."""
        y = self.resize(self._quantize_input(x), size)
        if self.mode not in NEAREST_MODES:
            return self._finish(y)
        grid = self.input_source  # the codes are copied: a no-op but in an exported graph
        if self.requantize_output and isinstance(grid, FakeQuantizer):
            return grid.requantize(y)
        return y

    def extra_repr(self) -> str:
        what = f"size={self.size}" if self.size is not None else \
            f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}, align_corners={self.align_corners}"


def _single(value):
    """The one entry of a 1-d size or scale factor given as a sequence."""
    return value[0] if isinstance(value, list | tuple | torch.Size) else value
