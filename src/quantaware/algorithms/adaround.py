"""AdaRound: adaptive rounding of weights (Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization", ICML, arXiv 2004.10568).

Rounding each weight to the nearest grid point is not optimal for the layer's
output. AdaRound learns, per weight, whether to round down or up: the weight is
``s * clip(floor(w / s) + h(V), qmin, qmax)`` with ``h`` a rectified sigmoid of a
learned ``V`` (eq. 23), trained layer by layer to reproduce the float layer's
output,

    min_V || f(W x) - f(W~(V) x~) ||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)

where ``x`` is the float model's input to the layer, ``x~`` the quantized model's
(earlier layers already rounded, section 5 "asymmetric reconstruction"), ``f``
the fused activation, and the regulariser, with ``beta`` annealed from 20 to 2,
pushes ``h`` to 0 or 1. Afterwards ``h`` is rounded and the weights are written
back on the grid, with the weight quantizer's scale pinned.

To stay cheap on CPU the objective is evaluated on a random sample of output
positions (conv patches gathered from the captured inputs), not on whole
feature maps. One float pass captures every layer's float input; each layer's
quantized input is captured after every earlier layer has been rounded (a
layer trained on inputs from before its predecessors were rounded compensates
errors that are no longer there: on MobileNetV2 W4A8 that made AdaRound worse
than nearest rounding). The last quarter of the
samples (from the last batches, i.e. other images) is held out: if the learned
rounding reconstructs worse than nearest rounding there, nearest is kept for
that layer, so AdaRound never loses on its own objective measured on data it
did not fit (with few images, a large layer such as a classifier can otherwise
overfit its rounding to them).
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantaware.algorithms._layers import capture, float_reference, weighted_layers
from quantaware.fake_quant import FakeQuantizer

__all__ = ["LayerResult", "apply", "unsupported"]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (paper, eq. 23)


@dataclass(frozen=True)
class LayerResult:
    """Reconstruction error of one layer (mean over the held-out samples of the
    squared output error summed over channels) with nearest rounding and with
    AdaRound's choice."""

    nearest: float
    adaround: float
    kept_nearest: bool


def unsupported(module: nn.Module) -> str | None:
    """Why AdaRound cannot round ``module``'s weight, or ``None`` when it can."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution"
    if getattr(module, "bn", None) is not None:
        return ("a QAT conv + batch norm, whose quantized weight is folded with live "
                "statistics; run AdaRound on the model from quantaware.quantize/prepare")
    if isinstance(module, nn.Conv3d):
        return "a 3-d convolution"
    return None


def _patches(module: nn.Module, x: torch.Tensor, count: int, gen: torch.Generator
             ) -> torch.Tensor:
    """``count`` random input rows: conv patches ``(count, groups, K)`` or linear rows."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        idx = torch.randperm(rows.shape[0], generator=gen)[:count]  # distinct rows
        return rows[idx].unsqueeze(1)
    # The padding the conv itself applies ('same', reflect, ...), then a 1-d conv
    # as a 2-d one of height 1.
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    xp = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if x.dim() == 3:
        xp = xp.unsqueeze(2)
        (kh, kw), (sh, sw), (dh, dw) = ((1, *module.kernel_size), (1, *module.stride),
                                        (1, *module.dilation))
    else:
        kh, kw = module.kernel_size
        sh, sw = module.stride
        dh, dw = module.dilation
    n, c, h, w = xp.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    bi = torch.randint(n, (count,), generator=gen)
    ri = torch.randint(oh, (count,), generator=gen) * sh
    ci = torch.randint(ow, (count,), generator=gen) * sw
    taps = [xp[bi, :, ri + i * dh, ci + j * dw] for i in range(kh) for j in range(kw)]
    patches = torch.stack(taps, dim=-1)  # (count, C, kh*kw)
    g = module.groups
    return patches.reshape(count, g, (c // g) * kh * kw)


def _layer_out(module: nn.Module, patches: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's (activated) output at the sampled positions, ``(count, Cout)``."""
    g = patches.shape[1]
    w = weight.reshape(g, weight.shape[0] // g, -1)
    out = torch.einsum("pgk,gok->pgo", patches, w).reshape(patches.shape[0], -1)
    if module.bias is not None:
        out = out + module.bias.detach()
    act = getattr(module, "activation", None)
    return act(out) if act is not None else out


def _recon(module: nn.Module, xq: torch.Tensor, target: torch.Tensor,
           weight: torch.Tensor, chunk: int = 4096) -> float:
    total = 0.0
    for i in range(0, xq.shape[0], chunk):
        diff = _layer_out(module, xq[i:i + chunk], weight) - target[i:i + chunk]
        total += float(diff.pow(2).sum())
    return total / xq.shape[0]


def _optimise(module: nn.Module, xq: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
              zp: torch.Tensor, qmin: int, qmax: int, iterations: int, batch_size: int,
              lr: float, reg_weight: float, warmup: float, gen: torch.Generator
              ) -> tuple[torch.Tensor, LayerResult]:
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    s = scale.reshape(-1, 1).expand(w.shape[0], 1)
    z = zp.reshape(-1, 1).expand(w.shape[0], 1).to(w.dtype)
    floor = torch.floor(w / s)
    rest = (w / s - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)

    def soft(v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def weight_from(q: torch.Tensor) -> torch.Tensor:
        return ((torch.clamp(q + z, qmin, qmax) - z) * s).reshape(module.weight.shape)

    held = xq.shape[0] // 4 if xq.shape[0] >= 8 else 0
    train = xq.shape[0] - held
    opt = torch.optim.Adam([v], lr=lr)
    start = int(warmup * iterations)
    for it in range(iterations):
        idx = torch.randint(train, (min(batch_size, train),), generator=gen)
        h = soft(v)
        pred = _layer_out(module, xq[idx], weight_from(floor + h))
        loss = (pred - target[idx]).pow(2).sum(1).mean()
        if it >= start:
            progress = (it - start) / max(1, iterations - start)
            beta = 2 + (20 - 2) * (1 - progress)
            loss = loss + reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = weight_from(floor + (v >= 0).to(w.dtype))
        nearest = weight_from(torch.round(w / s))
        check = slice(train, None) if held else slice(None)
        err_ada = _recon(module, xq[check], target[check], hard)
        err_near = _recon(module, xq[check], target[check], nearest)
    keep = err_near < err_ada
    return (nearest if keep else hard), LayerResult(err_near, min(err_ada, err_near), keep)


def apply(
    model: nn.Module,
    data: Iterable[Any],
    *,
    iterations: int = 500,
    num_samples: int = 2048,
    batch_size: int = 256,
    lr: float = 1e-2,
    reg_weight: float = 0.01,
    warmup: float = 0.2,
    layers: Iterable[str] | None = None,
    seed: int = 0,
) -> dict[str, LayerResult]:
    """Learn the rounding of every integer-weight layer of a calibrated model, in place.

    Weight scales are the weight quantizers' current ones (min-max per channel,
    or pinned ones, e.g. from :func:`quantaware.algorithms.weight_range.apply`);
    they stay as they are and get pinned. Run it after :func:`quantaware.calibrate`.

    Args:
        model: a calibrated model from :func:`quantaware.prepare`.
        data: batches (as for :func:`quantaware.calibrate`); a few dozen images suffice.
        iterations: optimisation steps per layer (the paper uses 10k; a few hundred
            with ``lr=1e-2`` gets most of the gain at a fraction of the cost).
        num_samples: output positions sampled per layer to reconstruct.
        batch_size: positions per optimisation step.
        lr: Adam learning rate for ``V``.
        reg_weight: ``lambda`` of the rounding regulariser.
        warmup: fraction of iterations without the regulariser.
        layers: names of the layers to round (default: all integer-weight layers).
        seed: seed of the position sampling and batches.

    Returns:
        Per layer name, the reconstruction error with nearest and AdaRound rounding.

    Example:
        >>> import torch
        >>> from quantaware import presets, quantize
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 8, 3, groups=8))
        >>> data = [torch.randn(8, 3, 12, 12)]
        >>> q = quantize(net, presets.W4A8, data, data[0][:1])
        >>> result = apply(q, data, iterations=50, num_samples=256)
        >>> all(r.adaround <= r.nearest for r in result.values())
        True
    """
    data = list(data)
    if not data:
        raise ValueError("AdaRound needs data: pass at least one batch")
    if iterations < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError("iterations, num_samples and batch_size must be >= 1")
    order = weighted_layers(model, data)
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - {n for n, _ in order}
        if unknown:
            raise ValueError(f"unknown or non-integer-weight layer(s) {sorted(unknown)[:3]}")
        order = [(n, m) for n, m in order if n in wanted]
        refused = [(n, unsupported(m)) for n, m in order if unsupported(m)]
        if refused:
            name, why = refused[0]
            raise ValueError(f"AdaRound cannot round layer {name!r}: it is {why}; leave it "
                             "out of layers (it keeps nearest rounding)")
    skipped = [n for n, m in order if unsupported(m)]
    if skipped:
        log.warning("AdaRound: %d layer(s) keep nearest rounding (%s): %s", len(skipped),
                    unsupported(dict(order)[skipped[0]]), ", ".join(skipped[:5]))
        order = [(n, m) for n, m in order if n not in skipped]
    if not order:
        log.warning("AdaRound: no integer-weight layer to round")
        return {}
    reference = copy.deepcopy(model)
    ref_modules = dict(reference.named_modules())
    per_batch = math.ceil(num_samples / len(data))

    def sampler(kind: str, captured: dict[str, list[torch.Tensor]],
                names: dict[int, str]) -> Any:
        calls: dict[str, int] = {}

        def record(mod: nn.Module, x: torch.Tensor) -> None:
            name = names[id(mod)]
            k = calls.get(name, 0)
            calls[name] = k + 1
            if kind == "q":
                x = mod._quantize_input(x)
            # The same positions in the float and the quantized pass.
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode())
                                                + 7919 * k)
            captured.setdefault(name, []).append(_patches(mod, x, per_batch, gen))

        return record

    # The float model does not change: one pass captures every layer's float input.
    fp_inputs: dict[str, list[torch.Tensor]] = {}
    ref_group = [ref_modules[n] for n, _ in order]
    with float_reference(reference):
        capture(reference, ref_group, data,
                sampler("fp", fp_inputs, {id(m): n for (n, _), m in zip(order, ref_group,
                                                                          strict=True)}))
    results: dict[str, LayerResult] = {}
    for name, module in order:
        # The quantized input after every earlier layer has been rounded: each layer
        # compensates the error its inputs really carry, not a stale one.
        q_inputs: dict[str, list[torch.Tensor]] = {}
        capture(model, [module], data, sampler("q", q_inputs, {id(module): name}))
        wq = module.weight_quantizer
        assert isinstance(wq, FakeQuantizer)
        scale, zp = wq.qparams(module.weight)
        xfp = torch.cat(fp_inputs.pop(name))
        xq = torch.cat(q_inputs[name])
        ref_module = ref_modules[name]
        with torch.no_grad(), float_reference(reference):
            target = _layer_out(ref_module, xfp, ref_module.weight.detach())
        gen = torch.Generator().manual_seed(seed)
        weight, result = _optimise(module, xq, target, scale, zp, wq.qmin, wq.qmax,
                                   iterations, batch_size, lr, reg_weight, warmup, gen)
        with torch.no_grad():
            module.weight.copy_(weight)
        wq.load_qparams(scale, zp)
        results[name] = result
        log.info("AdaRound %s: reconstruction %.4g -> %.4g%s", name, result.nearest,
                 result.adaround, " (kept nearest)" if result.kept_nearest else "")
    return results
