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

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from quantaware._batch import model_device, split_batch, to_device
from quantaware.fake_quant import FakeQuantizer, frozen
from quantaware.nn.linear import QuantLinear
from quantaware.primitives import choose_qparams, fake_quantize

__all__ = ["AUTO_ALPHAS", "smooth_quant"]

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
    # A weight shared with another layer (a tied embedding / output head) cannot take
    # the factor: every other user of the tensor would be scaled too.
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    shared = {k for k, v in found.items() if any(uses.get(id(u.weight), 0) > 1 for u in v[1])}
    if shared:
        log.info("not smoothing %d quantizer(s) whose Linear shares its weight", len(shared))
    return {k: v for k, v in found.items()
            if k not in shared and not v[0].from_tensor
            and all(u.weight_quantizer is not None for u in v[1])}


AUTO_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
# Input rows kept per quantizer for the alpha search.
_SEARCH_ROWS = 2048


def _factor(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = (amax.clamp(min=1e-5) ** alpha) / (wmax.clamp(min=1e-5) ** (1 - alpha))
    return s.clamp(min=1e-5)


def _relative_error(q: FakeQuantizer, linears: list[QuantLinear], rows: torch.Tensor,
                    refs: list[torch.Tensor], s: torch.Tensor) -> float:
    """Relative output MSE of ``linears`` (float outputs ``refs`` on ``rows``) with
    inputs ``rows / s`` quantized per tensor (min-max of the rows) and weights
    ``W * s`` by their own quantizers."""
    xs = rows / s
    lo, hi = torch.aminmax(xs)
    a_scale, a_zp = choose_qparams(lo, hi, q.qmin, q.qmax, q.spec.symmetric)
    xq = fake_quantize(xs, a_scale, a_zp, q.qmin, q.qmax)
    err = 0.0
    for lin, ref in zip(linears, refs, strict=True):
        wq = lin.weight_quantizer
        assert isinstance(wq, FakeQuantizer)
        ws = lin.weight * s
        # A learned quantizer takes its scale from the first weight it sees: score
        # each candidate with its own, and leave the quantizer as it was.
        state = {k: v.clone() for k, v in wq.state_dict().items()}
        w_scale, w_zp = wq.qparams(ws)
        out = xq @ wq.fake_quantize_with(ws, w_scale, w_zp).T
        wq.load_state_dict(state)
        err += float((out - ref).square().sum() / ref.square().sum().clamp(min=1e-30))
    return err


def smooth_quant(model: nn.Module, data: Iterable[Any], alpha: float | str = 0.5,
                 num_batches: int | None = None) -> int:
    """Migrate activation outliers of ``model``'s Linear inputs into their weights.

    Call on a prepared model before :func:`quantaware.calibrate`. Returns the number
    of quantizers smoothed.

    Args:
        model: from :func:`quantaware.prepare`.
        data: calibration batches (per-channel maxima are taken over all of them).
        alpha: migration strength (0: none, 1: all onto the weights); 0.5 is the
            paper's default for BERT-sized models. ``"auto"`` chooses it per
            quantizer from :data:`AUTO_ALPHAS`: the one with the smallest relative
            output error of its Linear layers on up to 2048 recorded input rows
            (input quantized per tensor, weights by their own quantizers).
    """
    auto = alpha == "auto"
    if not auto and not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] or 'auto', got {alpha!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    targets = _targets(model)
    if not targets:
        return 0
    if any("smoothing" in q._buffers for q, _ in targets.values()):
        raise ValueError("smooth_quant was already applied to this model (its weights carry "
                         "the factors); apply it once, to a freshly prepared model")
    amax: dict[int, torch.Tensor] = {}
    rows: dict[int, list[torch.Tensor]] = {}

    def hook(key: int):
        def record(_module, inputs):
            flat = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            x = flat.abs().amax(0)
            amax[key] = x if key not in amax else torch.maximum(amax[key], x)
            if auto:
                kept = rows.setdefault(key, [])
                have = sum(len(r) for r in kept)
                if have < _SEARCH_ROWS:
                    step = max(1, len(flat) // 256)
                    kept.append(flat[::step][:_SEARCH_ROWS - have].float().clone())
        return record
    handles = [q.register_forward_pre_hook(hook(k)) for k, (q, _) in targets.items()]
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    saved = [(q.observer_enabled.clone(), q.fake_quant_enabled.clone()) for q in quantizers]
    for q in quantizers:
        q.disable()  # maxima of the float model
    seen = 0
    try:
        device = model_device(model)
        # eval mode (no dropout): the maxima of the function being quantized
        with torch.no_grad(), frozen(model):
            for batch in itertools.islice(data, num_batches):
                args, kwargs = to_device(*split_batch(batch), device)
                model(*args, **kwargs)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for q, (obs, fq) in zip(quantizers, saved, strict=True):
            q.observer_enabled.copy_(obs)
            q.fake_quant_enabled.copy_(fq)
    if not seen:
        raise ValueError("smooth_quant needs data: pass at least one batch of "
                         "representative inputs (the calibration batches work)")
    done = 0
    with torch.no_grad():
        for key, (q, linears) in targets.items():
            if key not in amax:
                continue
            wmax = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
            chosen = alpha
            if auto:
                sample = torch.cat(rows[key])
                refs = [sample @ lin.weight.T for lin in linears]
                chosen = min(AUTO_ALPHAS, key=lambda a: _relative_error(
                    q, linears, sample, refs, _factor(amax[key], wmax, a)))
                log.debug("smoothing alpha %.2f for %s", chosen,
                          [type(lin).__name__ for lin in linears])
            s = _factor(amax[key], wmax, float(chosen))
            q.set_smoothing(1.0 / s)
            for lin in linears:
                lin.weight.mul_(s)
            done += 1
    log.info("smoothed %d activation quantizers (alpha=%s)", done, alpha)
    return done
