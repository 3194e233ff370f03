"""``prepare``: turn a float model into a fake-quantized, trainable, calibratable copy.

The model is traced with ``torch.fx`` so that quantizers can be placed per
*tensor*, not per module, which is what an integer runtime needs:

1. BatchNorm after conv/linear is folded (``config.fold_bn``).
2. Supported modules are swapped for quantized ones (:mod:`quantaware.nn`).
3. Tensor-tensor ``+``, ``torch.cat`` and ``@`` become :class:`QuantAdd`,
   :class:`QuantCat` and :class:`QuantMatmul`, so residual adds and concats stay
   integer in the deployed graph.
4. A ReLU/ReLU6 directly after a quantized op is fused into it (quantized after
   the activation, as ONNX Runtime's QLinearConv computes it).
5. Every tensor is quantized once: an op's output quantizer serves all its
   consumers, and value-preserving ops (max pool, flatten, reshape, dropout,
   ReLU) pass their input's quantization through.

Models that ``torch.fx`` cannot trace fall back to swapping modules only, with a
warning (functional adds/concats then stay float).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import logging
import operator
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from quantaware.config import (
    FIRST_LAYER,
    LAST_LAYER,
    ConfigError,
    FloatSpec,
    PerChannel,
    QuantConfig,
    QuantSpec,
)
from quantaware.fake_quant import FakeQuantizer, Float16Quantizer
from quantaware.fusion import can_fold, fold_bn
from quantaware.nn.attention import _batched, _unbatched_like, make_traceable
from quantaware.nn.base import ChannelClip, QuantMixin
from quantaware.nn.conv import _QuantConvNd, _QuantConvTransposeNd
from quantaware.nn.functional import QuantAdd, QuantCat, QuantMatmul, _MultiInputQuant
from quantaware.nn.pool import QuantAdaptiveAvgPool2d, QuantAvgPool2d
from quantaware.nn.registry import quantized_type, supported_types
from quantaware.nn.resize import RESIZE_MODES, QuantUpsample

__all__ = ["UnsupportedLayerError", "prepare", "quantizers"]

log = logging.getLogger(__name__)

_RELU_FUNCS = {F.relu, torch.relu}
_RELU6_FUNCS = {F.relu6}
# Value-preserving ops: their output carries their input's quantization. (An unfused
# ReLU is not one: ONNX Runtime runs DequantizeLinear -> Relu -> Conv in float, so the
# consumer quantizes the ReLU's output itself and Relu -> Q fuses into the Q.)
_PASSTHROUGH_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity,
                        nn.Unflatten)
_PASSTHROUGH_FUNCS = {F.max_pool1d, F.max_pool2d, torch.flatten, F.dropout, torch.reshape,
                      torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                      _batched, _unbatched_like}
_PASSTHROUGH_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous",
                        "squeeze", "unsqueeze"}
_INTERPOLATE_FUNCS = {F.interpolate, F.upsample}
# Set on a quantized layer called on inputs of different grids (see _place_quantizers).
MIXED_INPUT_GRIDS = "_quantaware_mixed_input_grids"
_ADD_FUNCS = {operator.add, torch.add, operator.iadd}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}


class UnsupportedLayerError(ConfigError):
    """A configuration asks to quantize a layer quantaware has no quantized form for."""


def quantizers(model: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    """All ``(name, FakeQuantizer)`` pairs of a prepared model.

    Example:
        >>> import torch
        >>> from quantaware import presets
        >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), presets.INT8,
        ...             (torch.randn(1, 4),))
        >>> [name for name, _ in quantizers(m)]
        ['0.weight_quantizer', '0.input_quantizer', '0.output_quantizer']
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer)]


class _Tracer(fx.Tracer):
    """Treat quantizable and standard torch modules (and fusable clips) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (quantized_type(type(m)) is not None or isinstance(m, ChannelClip)
                or super().is_leaf_module(m, qualname))


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            "example_inputs must be a tensor or a tuple of the model's positional inputs, "
            f"got {type(example_inputs).__name__}"
        )
    return example_inputs


def _check_overrides(model: nn.Module, config: QuantConfig) -> None:
    modules = dict(model.named_modules())
    for rule in config.overrides:
        matched = [n for n in modules if n and rule.matches(n)]
        if rule.skip or rule.output_only or not matched:
            continue
        leaves = [n for n in matched if not any(True for _ in modules[n].children())]
        if leaves and not any(quantized_type(type(modules[n])) for n in leaves):
            kinds = sorted({type(modules[n]).__name__ for n in leaves})
            raise UnsupportedLayerError(
                f"override {rule.pattern!r} asks to quantize {leaves[:3]} ({', '.join(kinds)}), "
                f"which quantaware cannot quantize; supported layers: {supported_types()}. "
                "Remove the override or set skip=True to keep those layers in float"
            )


def _resolve_edge_layers(config: QuantConfig, weighted: list[str]) -> QuantConfig:
    """Replace the :data:`FIRST_LAYER`/:data:`LAST_LAYER` patterns by real module names.

    ``weighted`` lists the quantizable weighted modules in execution order.
    """
    edges = {FIRST_LAYER: weighted[0] if weighted else None,
             LAST_LAYER: weighted[-1] if weighted else None}
    if not any(rule.pattern in edges for rule in config.overrides):
        return config
    rules = tuple(
        dataclasses.replace(rule, pattern=_glob_escape(edges[rule.pattern]))
        if rule.pattern in edges else rule
        for rule in config.overrides
        if rule.pattern not in edges or edges[rule.pattern] is not None
    )
    return dataclasses.replace(config, overrides=rules)


def _glob_escape(name: str) -> str:
    """An ``fnmatch`` pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _weighted_order(gm: fx.GraphModule) -> list[str]:
    names: list[str] = []
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if (module is not None and quantized_type(type(module)) is not None
                and hasattr(module, "weight") and node.target not in names):
            names.append(node.target)
    return names


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _shared_modules(gm: fx.GraphModule) -> set[str]:
    """Modules called at several places (shared weights): none may take in a batch
    norm or an activation that follows only one of its calls."""
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    return {target for target, count in calls.items() if count > 1}


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and "tensor_meta" in node.meta


def _fold_batchnorms(gm: fx.GraphModule) -> None:
    shared = _shared_modules(gm)
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if bn is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        layer = _module(gm, prev)
        if (layer is None or len(prev.users) != 1 or prev.target in shared
                or not can_fold(layer, bn)):
            continue
        gm.add_submodule(prev.target, fold_bn(layer, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)


def _kept_float(name: str, module: nn.Module, weight_spec: Any) -> bool:
    """Layers that stay float (with a warning saying why and what to do):

    - a grouped transposed conv under per-channel weights: its output channels do
      not lie along one axis of its weight (``(in, out / groups, ...)``);
    - an ``nn.Embedding`` with ``max_norm``: it renormalises the rows it looks up,
      in place, at every call, which no int8 or float16 table deployed can do;
    - a layer whose float16 weights would overflow (``|w| > 65504`` becomes ``inf``).
    """
    if (isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d) and module.groups > 1
            and isinstance(weight_spec, QuantSpec)
            and isinstance(weight_spec.granularity, PerChannel)):
        log.warning("%s (%s, groups=%d) stays float: per-channel weight scales of a grouped "
                    "transposed conv are not supported; quantize it with per-tensor weights "
                    "(LayerOverride(%r, weight=...PerTensor())) for ONNX Runtime and "
                    "OpenVINO (LiteRT runs grouped transposed convs in float32 either way)",
                    name, type(module).__name__, module.groups, name)
        return True
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        log.warning("%s (nn.Embedding, max_norm=%s) stays float: max_norm renormalises the "
                    "rows it looks up at every call, which a quantized table cannot do; "
                    "renormalise the table once (and drop max_norm) to quantize it",
                    name, module.max_norm)
        return True
    weight = getattr(module, "weight", None)
    if isinstance(weight_spec, FloatSpec) and isinstance(weight, torch.Tensor):
        largest = float(weight.detach().abs().amax()) if weight.numel() else 0.0
        if largest > float(torch.finfo(torch.float16).max):
            log.warning("%s stays float32: its largest weight (%.4g) overflows float16 "
                        "(65504) and would become inf", name, largest)
            return True
    if (isinstance(module, nn.Embedding) and isinstance(weight_spec, QuantSpec)
            and not weight_spec.symmetric):
        raise ConfigError(
            f"layer {name!r} (nn.Embedding): embedding tables are quantized symmetrically, "
            f"one scale per row, and the weight spec is asymmetric; add "
            f"LayerOverride({name!r}, weight=QuantSpec(symmetric=True)) for an int8 "
            f"table, or LayerOverride({name!r}, weight=None) to keep it float"
        )
    return False


def _swap_modules(gm: fx.GraphModule, config: QuantConfig) -> None:
    done: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in done:
            continue
        module = gm.get_submodule(node.target)
        qtype = quantized_type(type(module))
        specs = config.resolve(node.target)
        if qtype is None or specs is None:
            continue
        weight_spec, act_spec = specs
        if isinstance(act_spec, QuantSpec) and isinstance(act_spec.granularity, PerChannel):
            raise ConfigError(
                f"per-channel activation quantization (layer {node.target!r}) is not "
                "supported; use PerTensor() for activations"
            )
        if not hasattr(module, "weight") and (act_spec is None or act_spec.dynamic):
            continue  # pooling only makes sense with static activations
        if _kept_float(node.target, module, weight_spec):
            continue
        gm.add_submodule(node.target, qtype.from_float(module, weight_spec, act_spec))
        done.add(node.target)


# The functional pools' arguments after the input, in order: their modules' own.
_FUNCTIONAL_POOLS: dict[Any, tuple[type[nn.Module], tuple[str, ...]]] = {
    F.avg_pool2d: (nn.AvgPool2d, QuantAvgPool2d._ARGS),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, QuantAdaptiveAvgPool2d._ARGS),
}


def _pools_as_modules(gm: fx.GraphModule) -> None:
    """``F.avg_pool2d`` and ``F.adaptive_avg_pool2d`` on 4-d tensors become the
    equivalent modules, which quantaware quantizes like ``nn.AvgPool2d`` (left
    functional, the pool and the layer before it stayed float)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _FUNCTIONAL_POOLS:
            continue
        cls, names = _FUNCTIONAL_POOLS[node.target]
        if not node.args or len(node.args) > 1 + len(names) or \
                not set(node.kwargs) <= set(names):
            continue
        settings = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
        source = node.args[0]
        meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
        if (meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4
                or any(isinstance(v, fx.Node) for v in settings.values())):
            continue
        name = _unique_name(gm, node.name)
        gm.add_submodule(name, cls(**settings))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args=(source,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _unique_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _make_cat(spec: QuantSpec, num_inputs: int, dim: int) -> QuantCat:
    return QuantCat(spec, num_inputs, dim)


def _dtype(node: Any) -> torch.dtype | None:
    """The dtype of a node that computes one tensor (``None`` otherwise: tuples of
    tensors, numbers, shapes)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    dtype = getattr(meta, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


# What an attention mask passes through between the add that applies it and the
# softmax: further masks, scaling, casts and reshapes.
_MASK_PATH_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                    torch.sub, torch.mul, torch.div, torch.masked_fill}
_MASK_PATH_METHODS = {"add", "sub", "mul", "div", "float", "to", "type_as", "view", "reshape",
                      "contiguous", "masked_fill"}
_SOFTMAX = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}


def _feeds_softmax(gm: fx.GraphModule, node: fx.Node, depth: int = 4) -> bool:
    for user in node.users:
        if ((user.op == "call_function" and user.target in _SOFTMAX)
                or (user.op == "call_method" and user.target in ("softmax", "log_softmax"))
                or (user.op == "call_module" and isinstance(
                    _module(gm, user), nn.Softmax | nn.LogSoftmax))):
            return True
        on_path = ((user.op == "call_function" and user.target in _MASK_PATH_FUNCS)
                   or (user.op == "call_method" and user.target in _MASK_PATH_METHODS))
        if on_path and depth > 0 and _feeds_softmax(gm, user, depth - 1):
            return True
    return False


def _mask_adds(gm: fx.GraphModule) -> set[fx.Node]:
    """Adds that apply to attention scores a mask computed in ``forward`` from integer
    or bool inputs and constants only (an additive mask built from
    ``attention_mask``, a causal mask of ``-inf`` made with ``torch.full``): an add
    with such an operand whose result goes on to a softmax. Quantizing it either
    collapses the mask's range to what calibration happened to see (all zeros
    without padding, so padding is ignored) or spends every int8 step on the -1e4
    offset; a ``-inf`` mask fails calibration. Only tensor-valued arguments count
    (a shape read with ``x.size()`` does not); a float input, a layer or a stored
    tensor behind an operand makes it an activation."""
    from_activations: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dtype = _dtype(node)
            from_activations[node] = dtype is None or dtype.is_floating_point
        elif node.op in ("call_module", "get_attr"):
            from_activations[node] = True
        elif node.op in ("call_function", "call_method"):
            from_activations[node] = any(from_activations.get(a, True)
                                         for a in node.all_input_nodes if _is_tensor(a))
    masks = {n for n, act in from_activations.items()
             if not act and (_dtype(n) is not None and _dtype(n).is_floating_point)}
    return {n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in _ADD_FUNCS
            and any(a in masks for a in (*n.args, *n.kwargs.values()))
            and _feeds_softmax(gm, n)}


def _rewrite_functional(gm: fx.GraphModule, config: QuantConfig) -> None:
    mask_adds = _mask_adds(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ADD_FUNCS and len(node.args) == 2 and not node.kwargs:
            args, make = node.args, QuantAdd
        elif node.target in _MATMUL_FUNCS and len(node.args) == 2 and not node.kwargs:
            args, make = node.args, QuantMatmul
        elif node.target is torch.cat and node.args and isinstance(node.args[0], list | tuple):
            args = tuple(node.args[0])
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            make = functools.partial(_make_cat, num_inputs=len(args), dim=dim)
        else:
            continue
        if not all(_is_tensor(a) for a in args) or not _is_tensor(node):
            continue
        if not node.meta["tensor_meta"].dtype.is_floating_point:
            continue
        if node in mask_adds:
            log.debug("%s stays float: it applies a mask computed from integer inputs "
                      "to attention scores", node.name)
            continue
        specs = config.resolve(node.name)
        act_spec = specs[1] if specs else None
        if not isinstance(act_spec, QuantSpec) or act_spec.dynamic:
            continue
        name = _unique_name(gm, node.name)
        gm.add_submodule(name, make(act_spec))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args=tuple(args))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _rewrite_resizes(gm: fx.GraphModule, config: QuantConfig) -> None:
    """Upsampling becomes a :class:`QuantUpsample` (resizing on its input's grid), so
    the layer before it, the resize and the layer after it all stay integer."""
    swapped: set[str] = set()
    # Read every resize before swapping any: an nn.Upsample may be used at several nodes.
    for node, resize in [(n, _interpolation(gm, n)) for n in gm.graph.nodes]:
        if (resize is None or resize["mode"] not in RESIZE_MODES or resize["antialias"]
                or not node.args or not _is_tensor(node.args[0]) or not _is_tensor(node)
                or not node.meta["tensor_meta"].dtype.is_floating_point):
            continue
        if any(isinstance(resize[k], fx.Node) for k in ("scale_factor", "mode", "align_corners")):
            continue
        specs = config.resolve(node.target if node.op == "call_module" else node.name)
        act_spec = specs[1] if specs else None
        if not isinstance(act_spec, QuantSpec) or act_spec.dynamic:
            continue
        size = resize["size"]
        dynamic_size = isinstance(size, fx.Node) or (
            isinstance(size, list | tuple) and any(isinstance(s, fx.Node) for s in size))
        module = QuantUpsample(act_spec, None if dynamic_size else size,
                               resize["scale_factor"], resize["mode"], resize["align_corners"],
                               resize["recompute_scale_factor"])
        if node.op == "call_module" and node.target not in swapped:
            gm.add_submodule(node.target, module)  # an nn.Upsample: swapped in place
            swapped.add(node.target)
            continue
        # A functional resize, or an nn.Upsample used again (a decoder's one upsampling
        # module at every level): a module per use, each on its own input's grid.
        name = _unique_name(gm, node.name)
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args=(node.args[0],),
                                       kwargs={"size": size} if dynamic_size else {})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _activation_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    module = _module(gm, node)
    if isinstance(module, nn.ReLU) or (node.op == "call_method" and node.target == "relu"):
        return nn.ReLU()
    if isinstance(module, nn.ReLU6) or (node.op == "call_function" and node.target in _RELU6_FUNCS):
        return nn.ReLU6()
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return nn.ReLU()
    if (isinstance(module, nn.Hardtanh) and module.min_val == 0.0 and module.max_val == 6.0):
        return nn.ReLU6()
    if isinstance(module, ChannelClip):
        return copy.deepcopy(module)
    return None


def _fuse_activations(gm: fx.GraphModule) -> None:
    shared = _shared_modules(gm)
    for node in list(gm.graph.nodes):
        module = _module(gm, node)
        if (not isinstance(module, QuantMixin) or module.output_quantizer is None
                or isinstance(module, QuantUpsample)):  # no backend fuses one into a resize
            continue
        if len(node.users) != 1 or module.activation is not None or node.target in shared:
            continue
        user = next(iter(node.users))
        act = _activation_of(gm, user)
        if act is None or user.args[0] is not node:
            continue
        module.activation = act
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)


def _interpolation(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    """The ``F.interpolate`` arguments (``input`` aside) of an upsampling node
    (``F.interpolate``/``F.upsample`` or an ``nn.Upsample`` module), else ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Upsample):
            return None
        return {"size": module.size, "scale_factor": module.scale_factor, "mode": module.mode,
                "align_corners": module.align_corners,
                "recompute_scale_factor": module.recompute_scale_factor, "antialias": False}
    if node.op != "call_function" or node.target not in _INTERPOLATE_FUNCS:
        return None
    try:
        bound = inspect.signature(F.interpolate).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("input")
    return args


def _is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCS
    return node.op == "call_method" and node.target in _PASSTHROUGH_METHODS


def _place_quantizers(gm: fx.GraphModule, config: QuantConfig) -> None:
    """Quantize every tensor once: drop input quantizers of already-quantized inputs."""
    source: dict[fx.Node, nn.Module | None] = {}
    visited: set[str] = set()
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, _MultiInputQuant):
            for i, arg in enumerate(node.args):
                src = source.get(arg)
                if src is not None and src.spec == module.input_quantizers[i].spec:
                    module.drop_input_quantizer(i, src)
            source[node] = module.output_quantizer
        elif isinstance(module, QuantMixin):
            src = source.get(node.args[0]) if node.args else None
            own = module.input_quantizer
            first = node.target not in visited
            if not first and own is None and src is not module.input_source:
                # One layer called on tensors of different grids (a head shared by the
                # levels of a feature pyramid): each call reads its own input's grid.
                module.__dict__[MIXED_INPUT_GRIDS] = True
            visited.add(node.target)
            # A layer used again keeps the input quantizer its first call needs.
            if (first and src is not None and isinstance(own, FakeQuantizer)
                    and src.spec == own.spec):
                module.input_quantizer = None
                module.set_input_source(src)
            # A nearest resize copies codes: its output is on its input's grid.
            source[node] = (module.input_source if isinstance(module, QuantUpsample)
                            and module.output_quantizer is None else module.output_quantizer)
        elif _is_passthrough(gm, node) and node.args:
            source[node] = source.get(node.args[0])
        else:
            source[node] = None
    _drop_unused_output_quantizers(gm, source, config)


def _graph_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    outputs: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            fx.node.map_arg(node.args, outputs.append)
    return outputs


def _drop_unused_output_quantizers(gm: fx.GraphModule,
                                   source: dict[fx.Node, nn.Module | None],
                                   config: QuantConfig) -> None:
    """An output quantizer whose tensor only feeds float ops (softmax, GELU, LayerNorm,
    a float residual add) would add a Q/DQ pair that nothing integer consumes: it
    costs time and precision, so it goes. Quantizers that reach a graph output stay,
    and so do those of layers the config gives ``integer_output``."""
    used = {id(q) for q in (source.get(n) for n in _graph_outputs(gm)) if q is not None}
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, _MultiInputQuant):
            for i, arg in enumerate(node.args):
                if isinstance(module.input_quantizers[i], nn.Identity) and source.get(arg):
                    used.add(id(source[arg]))
        elif isinstance(module, QuantMixin) and module.input_quantizer is None and node.args:
            src = source.get(node.args[0])
            if src is not None:
                used.add(id(src))
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, QuantUpsample) and not _feeds_integer_op(gm, node):
            # Nothing integer reads the resized tensor (a segmentation model's
            # full-size output): resize the dequantized input in float instead of
            # quantizing and dequantizing the largest tensor of the model.
            module.output_quantizer = None
            module.requantize_output = False
        elif (isinstance(module, QuantMixin)
              and isinstance(module.output_quantizer, FakeQuantizer)
              and id(module.output_quantizer) not in used
              and not isinstance(module, _QuantConvNd | _QuantConvTransposeNd | QuantCat)
              and not (node.op == "call_module" and config.integer_output(node.target))):
            # A conv keeps its output quantizer: backends run a conv as an integer
            # kernel only when its output is quantized (ONNX Runtime has no int8 conv
            # with float output), so before a float activation (Hardswish, SiLU) or
            # a squeeze-excitation multiply the conv would otherwise run in float.
            # So does a concatenation: LiteRT's converter puts every input of a
            # concatenation on one grid even where the model concatenates in float,
            # so it computes the model's values only when that grid is the model's.
            module.output_quantizer = None


def _feeds_integer_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a quantized layer reads ``node``'s output on its grid (directly or
    through value-preserving ops) rather than quantizing it itself."""
    for user in node.users:
        module = _module(gm, user)
        if isinstance(module, _MultiInputQuant):
            if any(arg is node and isinstance(module.input_quantizers[i], nn.Identity)
                   for i, arg in enumerate(user.args)):
                return True
        elif isinstance(module, QuantMixin):
            if user.args and user.args[0] is node and module.input_quantizer is None:
                return True
        elif _is_passthrough(gm, user) and _feeds_integer_op(gm, user):
            return True
    return False


def _share_input_quantizers(gm: fx.GraphModule) -> None:
    """A float tensor feeding several quantized layers (the query, key and value
    projections of one LayerNorm output) is quantized once, by a quantizer node of
    its own, instead of once per consumer."""
    consumers: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if (isinstance(module, QuantMixin) and not isinstance(module, _MultiInputQuant)
                and isinstance(module.input_quantizer, FakeQuantizer) and node.args
                and isinstance(node.args[0], fx.Node)):
            consumers.setdefault(node.args[0], []).append(node)
    for arg, users in consumers.items():
        specs = [gm.get_submodule(u.target).input_quantizer.spec for u in users]
        if len(users) < 2 or any(spec != specs[0] for spec in specs):
            continue
        shared = gm.get_submodule(users[0].target).input_quantizer
        name = _unique_name(gm, f"{arg.name}_quantizer")
        gm.add_submodule(name, shared)
        with gm.graph.inserting_after(arg):
            qnode = gm.graph.call_module(name, args=(arg,))
        qnode.meta = dict(arg.meta)
        for user in users:
            module = gm.get_submodule(user.target)
            module.input_quantizer = None
            module.set_input_source(shared)
            user.replace_input_with(arg, qnode)


def _set_quantizer_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None):
    """Save (``state is None``) or restore the quantizers' enable flags."""
    saved = {}
    for name, q in quantizers(model):
        if state is None:
            saved[name] = (q.observer_enabled.clone(), q.fake_quant_enabled.clone())
            q.disable()
        else:
            q.observer_enabled.copy_(state[name][0])
            q.fake_quant_enabled.copy_(state[name][1])
    return saved


def _unpassed_defaults(model: nn.Module, example_inputs: tuple) -> dict[str, Any]:
    """``forward``'s parameters after the example's positional inputs that have a
    default (``mask=None``, ``return_features=False``), with those defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[len(example_inputs):]
            if p.kind in kinds and p.default is not inspect.Parameter.empty}


def _trace_with(model: nn.Module, example_inputs: tuple,
                concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model, concrete_args=concrete_args)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    # ShapeProp prints the traceback of a failing node itself; the failure is
    # reported below (bad example inputs) or as the warning, not as a dump.
    with contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(*example_inputs)
    return gm


def _keep_default_names(gm: fx.GraphModule, defaults: dict[str, Any]) -> fx.GraphModule:
    """Give the inputs traced at their defaults their own names back (fx renames them
    ``mask_1``, so ``model(x, mask=m)`` failed as an unexpected keyword) and the
    checks that they keep those defaults a message naming the fix."""
    renamed = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        base = str(node.target).rsplit("_", 1)[0]
        if node.target not in defaults and base in defaults:
            renamed[node.target] = base
            node.target = base
    for node in gm.graph.nodes:
        if node.op != "call_function" or len(node.args) != 2 or not isinstance(node.args[1], str):
            continue
        message = node.args[1]
        for name, value in defaults.items():
            if message.startswith(f"{name} has been specialized"):
                node.args = (node.args[0], (
                    f"{name} was traced at its default {value!r}, as quantaware.prepare's "
                    f"example inputs left it out; give {name} in the example inputs to "
                    "prepare a model that takes it"))
    gm.recompile()
    return gm


def _trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule | None:
    try:
        try:
            return _trace_with(model, example_inputs, None)
        except Exception:
            defaults = _unpassed_defaults(model, example_inputs)
            if not defaults:
                raise
        # An optional input the example leaves out (mask=None) branched the trace:
        # traced at its default, which the graph then asserts it keeps.
        return _keep_default_names(_trace_with(model, example_inputs, defaults), defaults)
    except Exception as exc:  # torch.fx raises many exception types
        _check_runs(model, example_inputs)  # the inputs may be what failed, not tracing
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "quantizing its modules only, so functional adds/concats stay float. Make "
            "forward() free of data-dependent control flow for full integer deployment.",
            stacklevel=3,
        )
        return None


def _weighted_layers_run(model: nn.Module, example_inputs: tuple) -> list[str]:
    """The quantizable weighted layers a forward on ``example_inputs`` calls, in the
    order it first calls them."""
    names = {id(m): n for n, m in model.named_modules()
             if n and quantized_type(type(m)) is not None and hasattr(m, "weight")}
    order: list[str] = []

    def record(module: nn.Module, _inputs: Any) -> None:
        if names[id(module)] not in order:
            order.append(names[id(module)])

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if id(m) in names]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _prepare_eager(model: nn.Module, config: QuantConfig) -> nn.Module:
    for name, module in list(model.named_modules()):
        qtype = quantized_type(type(module))
        specs = config.resolve(name)
        if (qtype is None or specs is None or not name or not hasattr(module, "weight")
                or _kept_float(name, module, specs[0])):
            continue
        qmod = qtype.from_float(module, *specs)
        qmod.output_quantizer = None  # each consumer quantizes its own input
        model.set_submodule(name, qmod)
    return model


def _check_binds(model: nn.Module, example_inputs: tuple) -> None:
    """Refuse example inputs ``forward`` cannot take (an ``(x, y)`` batch given as
    the example): a graph traced for one input ignored the second, and the check
    after tracing failed with a bare TypeError."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*example_inputs)
    except TypeError as exc:
        names = [p.name for p in signature.parameters.values()]
        raise ValueError(
            f"the example inputs are {len(example_inputs)} tensors, but "
            f"{type(model).__name__}.forward takes ({', '.join(names)}): {exc}. Pass the "
            "model's inputs only, not a whole batch with its labels (x[:1], not (x, y))"
        ) from exc


def _check_runs(model: nn.Module, example_inputs: tuple) -> None:
    """Run the float model once after a tracing failure, so wrong example inputs are
    reported as such rather than as a tracing problem."""
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as exc:  # whatever the model raises
        shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor)
                           else type(t).__name__ for t in example_inputs)
        raise ValueError(
            f"the float model fails on the example inputs ({shapes}): {type(exc).__name__}: "
            f"{str(exc)[:500]}. Pass example inputs the model accepts, e.g. one batch of "
            "its data") from exc


def _check_float_model(model: nn.Module) -> None:
    """Refuse a model that is already prepared or quantized, or whose weights are not finite
    (calibration would otherwise fail later with a message about the data)."""
    found = quantizers(model)
    if found:
        raise ValueError(
            f"the model is already prepared for quantization (it holds {len(found)} "
            f"quantizers, e.g. {found[0][0]!r}); pass the original float model to prepare "
            "or quantize, or calibrate/train this one as it is")
    # The fake-quant arithmetic and the exported file are float32: a half-precision
    # model would round its scales (bfloat16: more than a step off the deployed grid)
    # and overflow the int32 bias bounds (float16).
    other = [(name, t.dtype) for name, t in model.named_parameters()
             if t.is_floating_point() and t.dtype != torch.float32]
    if other:
        raise ValueError(
            f"the model's parameter {other[0][0]!r} is {str(other[0][1]).replace('torch.', '')}; "
            "quantaware quantizes float32 models (its fake-quant arithmetic and the exported "
            "file are float32): call model.float() first, and feed float32 inputs")
    # Buffers may hold -inf on purpose (attention masks); parameters may not.
    broken = [name for name, t in model.named_parameters() if not bool(torch.isfinite(t).all())]
    broken += [name for name, t in model.named_buffers()
               if t.is_floating_point() and bool(torch.isnan(t).any())]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise ValueError(
            f"the float model holds NaN or Inf values in {', '.join(map(repr, broken[:3]))}"
            f"{more}, so it cannot be quantized; load or train finite weights first")


def prepare(
    model: nn.Module,
    config: QuantConfig,
    example_inputs: torch.Tensor | tuple | list,
) -> nn.Module:
    """A copy of ``model`` with quantizers inserted, ready to calibrate or train.

    The copy runs fake quantization in the forward pass with straight-through
    gradients and float master weights, so it can be trained in your own loop
    (QAT) or calibrated with :func:`quantaware.calibrate` (PTQ). Until it is
    calibrated, activation quantizers observe and quantize each batch with the
    ranges seen so far.

    Args:
        model: the float model (left unchanged).
        config: a :class:`~quantaware.config.QuantConfig`, e.g. ``presets.INT8``.
        example_inputs: a tensor or tuple of positional inputs of the right shape.

    Example:
        >>> import torch
        >>> from quantaware import presets
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> qmodel = prepare(model, presets.INT8, torch.randn(1, 3, 16, 16))
        >>> type(qmodel.get_submodule("0")).__name__
        'QuantConv2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig (e.g. quantaware.presets.INT8), got "
            f"{type(config).__name__}"
        )
    example_inputs = _as_tuple(example_inputs)
    _check_binds(model, example_inputs)
    _check_float_model(model)
    _check_overrides(model, config)
    model = make_traceable(copy.deepcopy(model))
    if quantized_type(type(model)) is not None and hasattr(model, "weight"):
        # A bare layer: tracing would inline its forward and leave no module to swap.
        model = nn.Sequential(model)
    training = model.training
    model.eval()
    user_config = config
    gm = _trace(model, example_inputs)
    if gm is None:
        # Every layer is swapped (the structure must not depend on the example); the
        # first/last-layer rules follow the order the example runs them in.
        config = _resolve_edge_layers(config, _weighted_layers_run(model, example_inputs))
        prepared = _prepare_eager(model, config)
    else:
        config = _resolve_edge_layers(config, _weighted_order(gm))
        if config.fold_bn:
            _fold_batchnorms(gm)
        _pools_as_modules(gm)
        _swap_modules(gm, config)
        if isinstance(config.activation, QuantSpec) or any(
            isinstance(r.activation, QuantSpec) for r in config.overrides
        ):
            _rewrite_functional(gm, config)
            _rewrite_resizes(gm, config)
        _fuse_activations(gm)
        _place_quantizers(gm, config)
        _share_input_quantizers(gm)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        prepared = gm
    for _, q in quantizers(prepared):
        q.observe_and_quantize()
    saved = _set_quantizer_state(prepared)
    with torch.no_grad():
        prepared(*example_inputs)  # fails early, with the float path, if the rewrite broke
    _set_quantizer_state(prepared, saved)
    prepared.train(training)
    prepared.quantaware_config = user_config
    if not quantizers(prepared) and not isinstance(config.weight, FloatSpec):
        log.warning("no layer of %s was quantized; check the config's overrides",
                    type(model).__name__)
    _warn_unquantizable(prepared)
    return prepared


# Layers with weights that deploy in float by design: normalizations (their statistics
# and affine run in float in every backend) and the quantized modules' own parts.
_FLOAT_BY_DESIGN = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                    nn.LocalResponseNorm, nn.PReLU)


def _warn_unquantizable(prepared: nn.Module) -> None:
    """Say which layers with weights have no quantized form and stay float (an LSTM,
    a 3-d conv): the size and speed figures then include their float32 weights."""
    kept = [f"{n} ({type(m).__name__})" for n, m in prepared.named_modules()
            if n and type(m) is not nn.Module  # a traced graph's bare weight holders
            and quantized_type(type(m)) is None  # else float by choice (skip, edges)
            and not isinstance(m, (QuantMixin, FakeQuantizer, Float16Quantizer,
                                   *_FLOAT_BY_DESIGN))
            and any(p.dim() >= 2 for p in m.parameters(recurse=False))  # not a scale
            and not any(isinstance(c, QuantMixin) for c in m.modules())]
    if kept:
        log.warning("%d layer(s) with weights have no quantized form and stay float: %s%s",
                    len(kept), ", ".join(kept[:5]), " ..." if len(kept) > 5 else "")


def iter_quant_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(name, module)`` of every quantized module (weights or activations)."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantMixin))
