"""Shared behaviour of quantized modules: quantizer slots, fused activation, export.

A quantized module holds up to three kinds of quantizers, named so they can be
found with ``grep``/``named_modules``:

- ``weight_quantizer``: the module's weight (qparams follow the current weight);
- ``input_quantizer`` (``input_quantizers`` for several inputs): quantizes an input
  that is not already quantized by the module that produced it;
- ``output_quantizer``: quantizes the output, after the fused activation
  (ReLU/ReLU6), so ONNX Runtime fuses the activation into its integer kernel.

Which slots are filled is decided by :func:`quantaware.prepare`, which looks at
the whole graph so that every tensor is quantized exactly once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantaware.fake_quant import FakeQuantizer

FUSABLE_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


class QuantMixin:
    """Helpers for modules with ``input_quantizer``/``output_quantizer``/``activation``."""

    input_quantizer: nn.Module | None
    output_quantizer: nn.Module | None
    activation: nn.Module | None

    def _init_activation_slots(self) -> None:
        self.input_quantizer = None
        self.output_quantizer = None
        self.activation = None
        # The quantizer that quantized this module's input when another module
        # owns it (kept out of the module tree: it is registered where it lives).
        self.__dict__["_input_source"] = None

    def set_input_source(self, quantizer: nn.Module | None) -> None:
        """Record the producer's quantizer that already quantizes this module's input."""
        self.__dict__["_input_source"] = quantizer

    @property
    def input_source(self) -> nn.Module | None:
        """The quantizer whose qparams this module's input carries, if any."""
        return self.input_quantizer or self.__dict__.get("_input_source")

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        act, out = self.activation, self.output_quantizer
        if act is not None:
            if (type(out) is FakeQuantizer and type(act) in _CLAMP_UPPER
                    and _without_hooks(act, out)):
                # The output range clamps at the zero point already: ReLU/ReLU6 and
                # the quantizer in one pass (same values and gradients).
                fused = out.fake_quantize_activated(y, _CLAMP_UPPER[type(act)])
                if fused is not None:
                    return fused
            y = act(y)
        return y if out is None else out(y)


# Fused activations that clamp to [0, upper].
_CLAMP_UPPER: dict[type, float] = {nn.ReLU: math.inf, nn.ReLU6: 6.0}


def release_parameter(module: nn.Module, name: str) -> None:
    """Take parameter ``name`` out of ``module``'s state for export, keeping its float
    tensor as a plain attribute.

    The module's own forward reads its integer constants instead; code elsewhere
    that reads the parameter (``F.linear(x, emb.weight)``, a functional head tied
    to a table) keeps the float value the torch model used. Unread, a plain
    attribute is not part of the exported graph, so the file does not grow.
    """
    tensor = module._parameters.pop(name)
    object.__setattr__(module, name, None if tensor is None else tensor.detach())


def _without_hooks(*modules: nn.Module) -> bool:
    """Whether calling these modules runs only their ``forward`` (no hooks that
    would expect to see each module's own input and output)."""
    from torch.nn.modules import module as _m

    if (_m._global_forward_hooks or _m._global_forward_pre_hooks
            or _m._global_backward_hooks or _m._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   or m._backward_pre_hooks for m in modules)


class ChannelClip(nn.Module):
    """``clamp(x, 0, upper[c])`` with a per-channel upper bound (channel axis 1).

    ReLU6 after cross-layer equalization: a channel scaled by ``m`` is clipped
    at ``6 m``, so the equalized model computes exactly the float function.
    Fused into the producing layer by ``prepare`` like ReLU/ReLU6 (applied
    before its output quantizer).

    Example:
        >>> clip = ChannelClip(torch.tensor([1.0, 6.0]))
        >>> clip(torch.full((1, 2, 1, 1), 3.0)).flatten().tolist()
        [1.0, 3.0]
    """

    def __init__(self, upper: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.minimum(torch.clamp(x, min=0.0), self.upper.reshape(shape).to(x.dtype))


def static_scale(quantizer: nn.Module | None) -> torch.Tensor | None:
    """The fixed input scale of a calibrated static quantizer, else ``None``."""
    if (
        isinstance(quantizer, FakeQuantizer)
        and not quantizer.from_tensor
        and bool(quantizer.fake_quant_enabled)
        and bool(quantizer.calibrated)
    ):
        return quantizer.effective_scale()
    return None
