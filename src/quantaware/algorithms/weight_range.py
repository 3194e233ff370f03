"""Weight range setting: pin each weight quantizer's scale to the range with the least
squared quantization error instead of the weight's min-max.

At 8 bits min-max is close to optimal; at 4 bits clipping the largest weights
of a channel lowers the total error markedly, and it is the starting point
AdaRound assumes (Nagel et al. 2020, section 5; Banner et al. 2019, "Post
training 4-bit quantization of convolutional networks for rapid-deployment",
NeurIPS, arXiv 1810.05723, analyse the same trade-off).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from quantaware.fake_quant import FakeQuantizer
from quantaware.nn.weighted import WeightQuantMixin
from quantaware.primitives import choose_qparams
from quantaware.ranges import mse_weight_range

__all__ = ["apply"]

log = logging.getLogger(__name__)


def apply(model: nn.Module, layers: Iterable[str] | None = None, max_bits: int = 16,
          candidates: int = 100) -> nn.Module:
    """Pin MSE-optimal weight scales on a prepared model, in place.

    Args:
        model: a model from :func:`quantaware.prepare`.
        layers: names of layers to set (default: every integer-weight layer).
        max_bits: only set layers whose weight format has at most this many bits
            (e.g. 4 to leave int8 layers on min-max).
        candidates: clipping ratios tried per channel.

    Returns:
        ``model``; its weight quantizers use the pinned scales from now on
        (call ``weight_quantizer.follow_tensor()`` to undo).

    Example:
        >>> import torch
        >>> from quantaware import prepare, presets
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 8))
        >>> q = apply(prepare(net, presets.W4A8, torch.randn(1, 64)))
        >>> bool(q.get_submodule("0").weight_quantizer.calibrated)
        True
    """
    wanted = None if layers is None else set(layers)
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, WeightQuantMixin) or (wanted is not None and name not in wanted):
            continue
        wq = module.weight_quantizer
        if not isinstance(wq, FakeQuantizer) or wq.spec.bits > max_bits:
            continue
        # The weight the quantizer sees: a QAT conv's is folded with its batch norm.
        weight = module.float_params()[0].detach()
        lo, hi = mse_weight_range(weight, wq.qmin, wq.qmax, wq.spec.symmetric,
                                  axis=wq.axis, candidates=candidates)
        wq.load_qparams(*choose_qparams(lo, hi, wq.qmin, wq.qmax, wq.spec.symmetric))
        count += 1
    log.info("weight range setting (MSE): %d layers", count)
    return model
