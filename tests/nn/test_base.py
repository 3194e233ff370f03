"""quantaware.nn.base: fused activation + output quantizer equals the two applied in turn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantaware import calibrate, presets
from quantaware.fake_quant import FakeQuantizer
from quantaware.models import DigitsCNN
from quantaware.nn.base import QuantMixin
from quantaware.qat import prepare_qat

pytestmark = pytest.mark.usefixtures("single_thread")


def _outputs_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_fused_activation_matches_activation_then_quantizer(monkeypatch):
    """ReLU and ReLU6 fused into the output quantizer (the default) give the same
    outputs and gradients as calling the activation and the quantizer as modules
    (which a hook on the quantizer forces)."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    model = prepare_qat(DigitsCNN(), presets.INT8, x[:1])
    calibrate(model, [x])
    model.train()
    acts = {type(m.activation) for m in model.modules()
            if isinstance(m, QuantMixin) and m.activation is not None}
    assert {nn.ReLU, nn.ReLU6} <= acts
    fused_calls = []
    original = FakeQuantizer.fake_quantize_activated

    def counting(self, y, upper):
        out = original(self, y, upper)
        fused_calls.append((upper, out is not None))
        return out

    monkeypatch.setattr(FakeQuantizer, "fake_quantize_activated", counting)
    fused = _outputs_and_grads(model, x)
    assert {(float("inf"), True), (6.0, True)} <= set(fused_calls)
    seen = []
    handles = [m.register_forward_hook(lambda mod, i, o: seen.append(mod))
               for m in model.modules() if isinstance(m, FakeQuantizer)]
    try:
        unfused = _outputs_and_grads(model, x)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(fused[0], unfused[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], unfused[1], strict=True))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))


def test_hooks_on_the_output_quantizer_see_the_activated_tensor():
    """Analysis hooks on a quantizer get its real input (after ReLU), not the
    pre-activation tensor."""
    torch.manual_seed(1)
    x = torch.randn(4, 1, 8, 8)
    model = calibrate(prepare_qat(DigitsCNN(), presets.INT8, x[:1]), [x])
    inputs = []
    stem = next(m for m in model.modules() if isinstance(m, QuantMixin)
                and isinstance(m.activation, nn.ReLU) and m.output_quantizer is not None)
    handle = stem.output_quantizer.register_forward_pre_hook(
        lambda mod, args: inputs.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert inputs and float(inputs[0].min()) >= 0.0
