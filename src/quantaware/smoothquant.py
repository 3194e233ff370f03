"""SmoothQuant scale migration (Xiao et al. 2023, arXiv 2211.10438) for quantized Linear layers.

Transformer activations have a few channels with values 10-100x larger than the
rest; one per-tensor uint8 scale then leaves the other channels with a handful
of levels. SmoothQuant divides each input channel ``j`` by

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)

and multiplies the weights' column ``j`` by ``s_j``: ``X W^T = (X / s)(W s)^T``
exactly in float, but ``X / s`` is much easier to quantize per tensor and the
weights are quantized per output channel anyway.

Here the division is a per-channel multiply inside the activation quantizer
(exported as one ``Mul`` before ``QuantizeLinear``), so it works for any input,
also one that feeds a residual path (BERT's post-LayerNorm blocks) or comes out
of GELU. Quantizers shared by several Linears (query/key/value) get one factor
from all their weights.

Example:
    >>> import torch
    >>> from quantaware import presets, prepare, calibrate
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> x = torch.randn(32, 8); x[:, 0] *= 50  # an outlier channel
    >>> q = prepare(net, presets.INT8, x[:1])
    >>> smooth_quant(q, [x]) >= 1
    True
    >>> q = calibrate(q, [x])
    >>> bool(torch.allclose(q(x), net(x), atol=0.5))
    True
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from quantaware._batch import model_device, split_batch, to_device
from quantaware.fake_quant import FakeQuantizer
from quantaware.nn.linear import QuantLinear

__all__ = ["smooth_quant"]

log = logging.getLogger(__name__)


def _targets(model: nn.Module) -> dict[int, tuple[FakeQuantizer, list[QuantLinear]]]:
    """Static activation quantizers whose every consumer is a QuantLinear."""
    found: dict[int, tuple[FakeQuantizer, list[QuantLinear]]] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear) and isinstance(module.input_quantizer, FakeQuantizer):
            found[id(module.input_quantizer)] = (module.input_quantizer, [module])
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            if node.op != "call_module":
                continue
            q = model.get_submodule(node.target)
            if not isinstance(q, FakeQuantizer):
                continue
            users = [model.get_submodule(u.target) if u.op == "call_module" else None
                     for u in node.users]
            if users and all(isinstance(u, QuantLinear) and u.input_source is q for u in users):
                found[id(q)] = (q, users)
    return {k: v for k, v in found.items()
            if not v[0].from_tensor and all(u.weight_quantizer is not None for u in v[1])}


def smooth_quant(model: nn.Module, data: Iterable[Any], alpha: float = 0.5,
                 num_batches: int | None = None) -> int:
    """Migrate activation outliers of ``model``'s Linear inputs into their weights.

    Call on a prepared model before :func:`quantaware.calibrate`. Returns the number
    of quantizers smoothed.

    Args:
        model: from :func:`quantaware.prepare`.
        data: calibration batches (per-channel maxima are taken over all of them).
        alpha: migration strength (0: none, 1: all onto the weights); 0.5 is the
            paper's default for BERT-sized models.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    targets = _targets(model)
    if not targets:
        return 0
    amax: dict[int, torch.Tensor] = {}

    def hook(key: int):
        def record(_module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            amax[key] = x if key not in amax else torch.maximum(amax[key], x)
        return record

    handles = [q.register_forward_pre_hook(hook(k)) for k, (q, _) in targets.items()]
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    saved = [(q.observer_enabled.clone(), q.fake_quant_enabled.clone()) for q in quantizers]
    for q in quantizers:
        q.disable()  # maxima of the float model
    try:
        device = model_device(model)
        with torch.no_grad():
            for i, batch in enumerate(data):
                if num_batches is not None and i >= num_batches:
                    break
                args, kwargs = to_device(*split_batch(batch), device)
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for q, (obs, fq) in zip(quantizers, saved, strict=True):
            q.observer_enabled.copy_(obs)
            q.fake_quant_enabled.copy_(fq)
    done = 0
    with torch.no_grad():
        for key, (q, linears) in targets.items():
            if key not in amax:
                continue
            wmax = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
            s = (amax[key].clamp(min=1e-5) ** alpha) / (wmax.clamp(min=1e-5) ** (1 - alpha))
            s = s.clamp(min=1e-5)
            q.set_smoothing(1.0 / s)
            for lin in linears:
                lin.weight.mul_(s)
            done += 1
    log.info("smoothed %d activation quantizers (alpha=%.2f)", done, alpha)
    return done
