"""Independent reference arithmetic for the quantized-module tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

EPS = float(torch.finfo(torch.float32).eps)


def weight_per_channel(w: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric narrow-range per-output-channel fake quantization: (w_deq, scale)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
    scale = torch.clamp(amax / qmax, min=EPS)
    s = scale.reshape([-1] + [1] * (w.dim() - 1))
    return torch.clamp(torch.round(w.detach() / s), -qmax, qmax) * s, scale


def activation_qparams(x: torch.Tensor) -> tuple[float, int]:
    """Asymmetric uint8 qparams for the range of ``x`` widened to include 0."""
    lo = torch.clamp(x.detach().min().float(), max=0.0)
    hi = torch.clamp(x.detach().max().float(), min=0.0)
    scale = (hi - lo) / 255.0
    zp = int(torch.clamp(-torch.round(lo / scale), 0, 255))
    return float(scale), zp


def fake_act(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32)
    return (torch.clamp(torch.round(x / s) + zp, 0, 255) - zp) * s


def bias(b: torch.Tensor, in_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    b_scale = torch.tensor(in_scale, dtype=torch.float32) * w_scale
    return torch.round(b.detach() / b_scale) * b_scale


def observe_then_freeze(module: torch.nn.Module, *batches) -> None:
    """Calibrate every static quantizer of ``module`` on ``batches`` (tuples of inputs)."""
    from quantaware.prepare import quantizers

    static = [q for _, q in quantizers(module) if q.observer is not None]
    for q in static:
        q.observe_only()
    with torch.no_grad():
        for args in batches:
            module(*args)
    for q in static:
        q.freeze()


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    return SimpleNamespace(weight_per_channel=weight_per_channel,
                           activation_qparams=activation_qparams, fake_act=fake_act,
                           bias=bias, observe_then_freeze=observe_then_freeze)
