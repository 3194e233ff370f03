"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV, arXiv 1906.04721, section 4.1).

For two layers in a row, ``y = W2 f(W1 x + b1) + b2`` with ``f`` positive
homogeneous (ReLU, identity), scaling output channel ``i`` of the first layer by
``1 / s_i`` and input channel ``i`` of the second by ``s_i`` leaves the function
unchanged. Choosing ``s_i = sqrt(r1_i * r2_i) / r2_i`` (``r`` the per-channel weight
ranges) gives both layers the same per-channel ranges, which is what per-tensor
weight quantization needs: depthwise convs otherwise have channels whose range
is a thousand times smaller than the tensor's (MobileNetV2's collapse).
Chains (conv -> depthwise -> conv) are equalized by repeating over all pairs.

ReLU6 is not positive homogeneous (the clip at 6 does not scale). With
``relu6="replace"`` (default) the ReLU6 between equalized layers becomes ReLU, as
Nagel et al. do for MobileNetV2 (this changes the float function);
``relu6="scale"`` keeps the clip and moves it with the channel: a channel whose
output was multiplied by ``m`` is clipped at ``6 m``
(:class:`quantaware.nn.base.ChannelClip`), so the float function is exactly
unchanged; ``relu6="skip"`` leaves such pairs alone (also exact);
``relu6="keep"`` equalizes and keeps the ReLU6 at 6 (an approximation; see
:func:`apply`).

BatchNorm is folded first (equalization acts on the folded weights), so the
result is a ``torch.fx.GraphModule`` with the original module names and no BN,
ready for :func:`quantaware.prepare`.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantaware.nn.base import ChannelClip

__all__ = ["apply", "find_pairs"]

log = logging.getLogger(__name__)

_HOMOGENEOUS_MODULES = (nn.ReLU, nn.Identity, nn.Dropout)
_HOMOGENEOUS_FUNCS = {F.relu, torch.relu}


def _conv(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if type(module) in (nn.Conv1d, nn.Conv2d) else None


def _activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'homogeneous', 'relu6' or None (breaks the pair)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _HOMOGENEOUS_MODULES):
            return "homogeneous"
        if isinstance(module, nn.ReLU6) or (
            isinstance(module, nn.Hardtanh) and module.min_val == 0.0 and module.max_val == 6.0
        ):
            return "relu6"
    if node.op == "call_function":
        if node.target in _HOMOGENEOUS_FUNCS:
            return "homogeneous"
        if node.target is F.relu6:
            return "relu6"
    if node.op == "call_method" and node.target == "relu":
        return "homogeneous"
    return None


def find_pairs(gm: fx.GraphModule) -> list[tuple[str, str, list[fx.Node]]]:
    """Conv pairs ``(first, second, activations between)`` that can be equalized.

    The first conv's output must feed only the second conv (through at most
    elementwise positive-homogeneous activations or ReLU6), and the second conv
    must be ungrouped or depthwise.
    """
    pairs = []
    for node in gm.graph.nodes:
        first = _conv(gm, node)
        if first is None:
            continue
        between: list[fx.Node] = []
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if _conv(gm, nxt) is not None and nxt.args[0] is cur:
                second = _conv(gm, nxt)
                if (second.groups in (1, second.in_channels)
                        and second.in_channels == first.out_channels):
                    pairs.append((node.target, nxt.target, between))
                break
            if _activation_kind(gm, nxt) is None or nxt.args[0] is not cur:
                break
            between.append(nxt)
            cur = nxt
    return pairs


def _input_channel_ranges(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach()
    g = conv.groups
    cout_g, cin_g = w.shape[0] // g, w.shape[1]
    return w.abs().reshape(g, cout_g, cin_g, -1).amax(dim=(1, 3)).reshape(-1)


def _equalize(first: nn.Conv2d, second: nn.Conv2d,
              scales: dict[int, torch.Tensor] | None = None) -> float:
    """Equalize one pair in place; returns the largest change of scale (for convergence).

    ``scales`` maps ``id(conv)`` to the factor its output channels carry
    (relative to the original model); the first layer's entry is updated.
    """
    r1 = first.weight.detach().abs().reshape(first.out_channels, -1).amax(1)
    r2 = _input_channel_ranges(second)
    s = torch.sqrt(r1 * r2) / r2
    s = torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(s), s, torch.ones_like(s))
    with torch.no_grad():
        shape = [-1] + [1] * (first.weight.dim() - 1)
        first.weight.div_(s.reshape(shape))
        if first.bias is not None:
            first.bias.div_(s)
        g = second.groups
        w = second.weight
        cout_g, cin_g = w.shape[0] // g, w.shape[1]
        w.copy_((w.reshape(g, cout_g, cin_g, -1) * s.reshape(g, 1, cin_g, 1)).reshape(w.shape))
    if scales is not None:  # the second layer's output is unchanged
        scales[id(first)] = scales.get(id(first), torch.ones(first.out_channels)) / s
    return float((s - 1).abs().max())


def apply(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    iterations: int = 20,
    relu6: Literal["replace", "scale", "keep", "skip"] = "replace",
) -> fx.GraphModule:
    """A BN-folded, cross-layer-equalized copy of a float ``model``.

    Args:
        model: a float model (left unchanged); must be traceable by ``torch.fx``.
        example_inputs: a tensor or tuple of inputs (for tracing).
        iterations: passes over all pairs (chains converge in a few).
        relu6: ``"replace"`` turns ReLU6 between equalized layers into ReLU
            (Nagel et al. 2019); ``"scale"`` keeps the clip but moves it with each
            channel's scale (exact; the clip becomes per channel);
            ``"skip"`` leaves pairs with ReLU6 unequalized;
            ``"keep"`` equalizes and keeps ReLU6, so channel ``i`` is clipped at
            ``6 * s_i`` instead of 6 (an approximation that is exact for channels
            whose pre-activations stay below ``6 * min(1, s_i)``).

    Returns:
        A ``torch.fx.GraphModule`` to pass to :func:`quantaware.prepare`.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8).eval(), torch.nn.ReLU(),
        ...     torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.ReLU(),
        ...     torch.nn.Conv2d(8, 4, 1)).eval()
        >>> x = torch.randn(2, 3, 16, 16)
        >>> eq = apply(net, x)
        >>> torch.allclose(eq(x), net(x), atol=1e-4)
        True
    """
    from quantaware.prepare import _as_tuple, _fold_batchnorms, _trace, _unique_name

    if relu6 not in ("replace", "scale", "keep", "skip"):
        raise ValueError(f"relu6 must be 'replace', 'scale', 'keep' or 'skip', got {relu6!r}")
    example_inputs = _as_tuple(example_inputs)
    model = copy.deepcopy(model).eval()
    gm = _trace(model, example_inputs)
    if gm is None:
        raise ValueError(
            f"cross-layer equalization needs a torch.fx-traceable model; "
            f"{type(model).__name__} could not be traced (see the warning above)"
        )
    _fold_batchnorms(gm)
    pairs = []
    replaced = 0
    clips: list[tuple[fx.Node, str]] = []  # ReLU6 nodes to move with the first conv's scale
    for first, second, between in find_pairs(gm):
        kinds = [_activation_kind(gm, n) for n in between]
        if "relu6" in kinds and relu6 == "scale":
            clips += [(n, first) for n, k in zip(between, kinds, strict=True) if k == "relu6"]
        elif "relu6" in kinds and relu6 != "keep":
            if relu6 == "skip":
                continue
            for node, kind in zip(between, kinds, strict=True):
                if kind != "relu6":
                    continue
                if node.op == "call_module":
                    gm.add_submodule(node.target, nn.ReLU())
                else:
                    node.target = F.relu
                replaced += 1
        pairs.append((gm.get_submodule(first), gm.get_submodule(second)))
    gm.recompile()
    passes = 0
    scales: dict[int, torch.Tensor] = {}
    while passes < iterations:
        passes += 1
        if max((_equalize(a, b, scales) for a, b in pairs), default=0.0) < 1e-6:
            break
    for node, first in clips:
        conv = gm.get_submodule(first)
        clip = ChannelClip(6.0 * scales.get(id(conv), torch.ones(conv.out_channels)))
        name = node.target if node.op == "call_module" else _unique_name(gm, f"{node.name}_clip")
        gm.add_submodule(name, clip)
        node.op, node.target, node.args, node.kwargs = "call_module", name, node.args[:1], {}
        replaced += 1
    gm.recompile()
    log.info("cross-layer equalization: %d pairs, %d ReLU6 replaced (relu6=%s), %d passes",
             len(pairs), replaced, relu6, passes)
    return gm
