"""Export a prepared (or float) model to ONNX with QuantizeLinear/DequantizeLinear.

The exported graph follows ONNX Runtime's QDQ format
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html):
weights are int8 (or narrower) initializers behind ``DequantizeLinear``, biases are
int32 with scale ``input_scale * weight_scale``, and every activation quantizer is a
``QuantizeLinear -> DequantizeLinear`` pair. ONNX Runtime fuses these into integer
kernels (QLinearConv, QGemm, QLinearAdd, QLinearConcat, ...).

The scales written are the model's own (calibrated or learned): nothing is
recalibrated, so the ONNX model computes what the torch model computes, up to
integer-vs-float accumulation (checked by :func:`quantaware.verify`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxscript.optimizer
import torch
import torch.nn.functional as F
from torch import nn

from quantaware._files import atomic_path
from quantaware._native import quiet_loggers
from quantaware.fake_quant import FakeQuantizer
from quantaware.nn.base import QuantMixin
from quantaware.nn.embedding import QuantEmbedding
from quantaware.nn.weighted import WeightQuantMixin

__all__ = ["ExportError", "export_onnx"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 21
_FOLD_INPUT_SIZE_LIMIT = 8


class ExportError(RuntimeError):
    """The model could not be exported; the message says why and what to change."""


# What an exported quantizer reads; its flags and observer (a 2048-bin histogram) are
# not, and every buffer torch.export lifts costs it time per graph node (MobileNetV2's
# export copy held 985 buffers, 501 of them read).
_EXPORTED_STATE = {"scale", "zero_point", "smoothing"}


def _keep_only_exported_state(quantizer: nn.Module) -> None:
    """Turn a quantizer's other buffers and its observer into plain attributes: still
    readable (``bool(q.calibrated)``), no longer state that export lifts."""
    for name in [k for k in quantizer._buffers if k not in _EXPORTED_STATE]:
        object.__setattr__(quantizer, name, quantizer._buffers.pop(name))
    observer = quantizer._modules.pop("observer", None)
    object.__setattr__(quantizer, "observer", observer)


def _export_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` whose quantized modules call the export ops."""
    from quantaware.export import ops  # noqa: F401  (registers them before any runs)

    model = copy.deepcopy(model).eval()
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            if not module.from_tensor and bool(module.fake_quant_enabled) and not bool(
                module.calibrated
            ):
                raise ExportError(
                    f"quantizer {name!r} has no calibrated range; run quantaware.calibrate "
                    "(PTQ) or train with observers on (QAT) before exporting"
                )
            module.exporting = bool(module.fake_quant_enabled)
            _keep_only_exported_state(module)
    for module in model.modules():
        if isinstance(module, WeightQuantMixin | QuantEmbedding):
            module.freeze_for_export()
        elif isinstance(module, QuantMixin):
            module.exporting = True
    return model


_AVG_POOLS = {F.avg_pool2d, F.avg_pool3d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d}


def _unique_value_names(graph: Any) -> int:
    """Rename values that reuse a name already declared in ``graph`` (an ``onnx_ir``
    graph): the exporter names an op's output after the op, so a buffer called
    ``mean`` and a ``.mean()`` call both declared ``mean``, a file no reader
    accepts; a buffer named like an input became that input's default. Returns the
    values renamed."""
    inputs = {v.name for v in graph.inputs}
    declared = {*graph.initializers.keys(), *inputs}
    renamed = 0
    # A buffer named like forward's input (self.x beside x): an initializer of an
    # input's name is that input's default, so the file read the buffer for it.
    for name in [n for n in graph.initializers if n in inputs]:
        value = graph.initializers.pop(name)
        k = 1
        while f"{name}_{k}" in declared:
            k += 1
        value.name = f"{name}_{k}"
        declared.add(value.name)
        graph.register_initializer(value)
        renamed += 1
    for node in graph:
        for value in node.outputs:
            if value.name in declared:
                base, k = value.name, 1
                while f"{base}_{k}" in declared:
                    k += 1
                value.name = f"{base}_{k}"
                renamed += 1
            declared.add(value.name)
    return renamed


def _check_types(proto: onnx.ModelProto, model: nn.Module, example_inputs: tuple) -> None:
    """Refuse a graph whose operand types do not fit (ONNX Runtime would not load it),
    naming an example input of another float type than float32 (a float64 NumPy
    example made the file's input float64, read by a float32 QuantizeLinear)."""
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        odd = [f"example input {i} is {str(x.dtype).removeprefix('torch.')}"
               for i, x in enumerate(example_inputs)
               if isinstance(x, torch.Tensor) and x.is_floating_point()
               and x.dtype != torch.float32]
        hint = (f" ({odd[0]}: the file takes the example's types; pass it as x.float())"
                if odd else "")
        raise ExportError(f"the exported graph of {type(model).__name__} does not type-check"
                          f"{hint}: {str(exc)[:1000]}") from exc


def _refuse_divisor_override(model: nn.Module) -> None:
    """ONNX's AveragePool has no divisor: torch's exporter drops ``divisor_override``
    and the file divides by the window size instead (63 LSB off on a 2x2 pool with
    divisor 3)."""
    found = [name for name, m in model.named_modules()
             if getattr(m, "divisor_override", None) and "Pool" in type(m).__name__]
    graphs = [m.graph for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    if not graphs:  # a plain module: its functional calls are seen by tracing it
        try:
            graphs = [torch.fx.symbolic_trace(copy.deepcopy(model)).graph]  # no side effects
        except Exception:  # untraceable: the check is skipped
            graphs = []
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _AVG_POOLS and (
                    node.kwargs.get("divisor_override")
                    or (len(node.args) > 6 and node.args[6])):
                found.append(node.name)
    if found:
        raise ExportError(
            f"average pooling with divisor_override ({', '.join(found[:3])}) cannot be "
            "exported to ONNX: AveragePool has no divisor and torch's exporter drops it. "
            "Write the pool as a sum times a constant instead, e.g. "
            "F.avg_pool2d(x, k) * (k * k / divisor) (exact without padding), or export "
            "to LiteRT (export_tflite), which keeps the divisor")


def _output_key_names(outputs: object) -> list[str] | None:
    """Dotted key paths of a model's outputs (``logits``, ``aux.emb``, ``hidden.0``) when
    they hold dict keys, else None (plain tensors and tuples keep the exporter's names)."""
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten_with_path(outputs)
    if not any(isinstance(k, pytree.MappingKey) for path, _ in leaves for k in path):
        return None
    names = []
    for path, _ in leaves:
        parts = [str(k.key) if isinstance(k, pytree.MappingKey)
                 else str(k.idx) if isinstance(k, pytree.SequenceKey)
                 else str(getattr(k, "name", k)) for k in path]
        names.append(".".join(parts))
    return names


def _name_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    """Rename the graph outputs to ``names`` (the model's dict keys); an output that is a
    graph input passed through, or a name already taken, keeps its name."""
    graph = proto.graph
    if len(names) != len(graph.output):
        return
    taken = {t for n in graph.node for t in (*n.input, *n.output)}
    taken |= {i.name for i in graph.input} | {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input}
    for output, new in zip(graph.output, names, strict=True):
        old = output.name
        if old == new or old in inputs or new in taken or not new:
            continue
        for node in graph.node:
            node.output[:] = [new if t == old else t for t in node.output]
            node.input[:] = [new if t == old else t for t in node.input]
        for info in graph.value_info:
            if info.name == old:
                info.name = new
        output.name = new
        taken.add(new)


def _strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop what the exporter adds for debugging: node metadata (stack traces with
    local paths, FX dumps) and intermediate shape annotations. For an int8 model
    they can weigh as much as a fifth of the weights; ONNX Runtime infers shapes."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    del proto.graph.metadata_props[:]


def _fold_float_biases(proto: onnx.ModelProto) -> int:
    """Store biases that feed a plain float ``Add`` as float32 constants.

    A Linear whose output stays float runs in ONNX Runtime as
    ``MatMulIntegerToFloat`` followed by ``Add(bias)``. With the bias behind a
    ``DequantizeLinear`` (which ONNX Runtime never constant-folds) the add cannot
    fuse into the following GELU or residual add + LayerNorm
    (``BiasGelu``/``SkipLayerNormalization``). ``DequantizeLinear`` of an int32
    constant with zero point 0 is ``float32(q) * scale``; the same float32
    product is stored instead, so the values are bit-identical. Biases that feed
    Conv/Gemm (the integer kernels' int32 bias input) are left as they are.
    Returns the number of biases folded.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}
    folded, keep = 0, []
    for node in proto.graph.node:
        if (node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx")
                and len(node.input) >= 2 and node.input[0] in inits and node.input[1] in inits
                and inits[node.input[0]].data_type == onnx.TensorProto.INT32
                and node.output[0] not in outputs
                and (len(node.input) < 3 or node.input[2] in ("", *inits))
                and all(c.op_type == "Add" for c in consumers.get(node.output[0], []))):
            q = numpy_helper.to_array(inits[node.input[0]])
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            zero = (numpy_helper.to_array(inits[node.input[2]])
                    if len(node.input) > 2 and node.input[2] else 0)
            # Per-tensor scale, or one scale per element of a 1-D bias.
            if np.any(zero != 0) or not (scale.size == 1 or (q.ndim == 1
                                                             and scale.shape == q.shape)):
                keep.append(node)
                continue
            value = q.astype(np.float32) * scale.reshape(() if scale.size == 1 else q.shape)
            proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    if folded:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
        used = {name for node in proto.graph.node for name in node.input}
        kept = [i for i in proto.graph.initializer if i.name in used
                or i.name in outputs]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    return folded


_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_ORDER_OPS = ("MaxPool", "Transpose")


def _quantize_constants(proto: onnx.ModelProto) -> int:
    """Store the integer codes of a quantized float constant instead of quantizing it
    at run time: ``QuantizeLinear(constant)`` becomes an integer initializer.

    A learned tensor that is an activation of the graph (a transformer's position
    embedding added to the token embeddings) reaches the export as a float
    constant behind a quantizer. The codes are computed with the same
    ``QuantizeLinear`` arithmetic, so the values are identical; the file stores
    them in their integer type, and OpenVINO, which fails to compile a
    ``QuantizeLinear`` of a constant feeding an integer ``Add``, runs it.
    Returns the number of constants quantized.
    """
    from onnx import numpy_helper

    from quantaware.primitives import quantize

    inits = {i.name: i for i in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    used = [name for n in proto.graph.node for name in n.input]
    folded, keep, new_inits = 0, [], []
    for node in proto.graph.node:
        if (node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx")
                and len(node.input) == 3 and all(name in inits for name in node.input)
                and inits[node.input[0]].data_type == onnx.TensorProto.FLOAT
                and node.output[0] not in outputs):
            x, scale, zero_point = (numpy_helper.to_array(inits[n]) for n in node.input)
            if zero_point.dtype.kind in "iu" and zero_point.dtype.itemsize <= 2:
                info = np.iinfo(zero_point.dtype)
                axis = _attr(node, "axis", 1) % max(x.ndim, 1) if scale.ndim == 1 else None
                codes = quantize(torch.from_numpy(x.copy()), torch.from_numpy(scale.copy()),
                                 torch.from_numpy(zero_point.astype(np.int64)),
                                 int(info.min), int(info.max), axis=axis)
                new_inits.append(numpy_helper.from_array(
                    codes.numpy().astype(zero_point.dtype), node.output[0]))
                folded += 1
                continue
        keep.append(node)
    if folded:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
        proto.graph.initializer.extend(new_inits)
        still_used = {name for n in keep for name in n.input} | outputs
        unused = [i for i in proto.graph.initializer
                  if i.name not in still_used and i.name in used]
        for init in unused:
            proto.graph.initializer.remove(init)
    return folded


def _sink_dequantize_through_reshapes(proto: onnx.ModelProto) -> int:
    """Reshape quantized tensors before dequantizing them: ``DQ -> Reshape`` becomes
    ``Reshape -> DQ`` (exact: a per-tensor ``DequantizeLinear`` is elementwise).

    ONNX Runtime does this itself when it optimizes a QDQ graph, but for int8
    activations its own rewrite of a flatten before a classifier meets its
    int8-to-uint8 conversion and the model fails to load ("output_dtype INT8 does
    not match y_zero_point type UINT8"). Done here, the integer kernel after the
    reshape sees its ``DequantizeLinear`` directly. Returns the number of moves.
    """
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    graph_outputs = {o.name for o in proto.graph.output}
    nodes: list[onnx.NodeProto] = []
    moved = 0

    def signed(dq: onnx.NodeProto) -> bool:
        return len(dq.input) > 2 and consts.get(dq.input[2], np.zeros(0, np.uint8)).dtype == \
            np.int8

    for node in proto.graph.node:
        dq = producers.get(node.input[0]) if node.input else None
        # max pooling and transposes keep the values too (a DequantizeLinear is
        # increasing): moved for int8 codes, which meet the same conversion
        movable = node.op_type in _SHAPE_OPS or (
            node.op_type in _ORDER_OPS and len(node.output) == 1 and dq is not None
            and signed(dq))
        if (movable and node.domain in ("", "ai.onnx") and dq is not None
                and dq.op_type == "DequantizeLinear" and dq.domain in ("", "ai.onnx")
                and dq.input[1] in consts and consts[dq.input[1]].size == 1
                and node.output[0] not in graph_outputs):
            reshaped = f"{node.output[0]}_quantized"
            shape_node = onnx.NodeProto()
            shape_node.CopyFrom(node)
            shape_node.input[0] = dq.input[0]
            shape_node.output[0] = reshaped
            new_dq = onnx.helper.make_node("DequantizeLinear", [reshaped, *dq.input[1:]],
                                           [node.output[0]], name=f"{node.name}_dequantize")
            nodes.extend([shape_node, new_dq])
            producers[node.output[0]] = new_dq  # a shape op after it may move on too
            moved += 1
        else:
            nodes.append(node)
    if moved:
        used = {name for n in nodes for name in n.input} | graph_outputs
        # A DequantizeLinear left without consumers goes.
        nodes = [n for n in nodes if n.op_type != "DequantizeLinear"
                 or any(o in used for o in n.output)]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return moved


# A strided conv on this few input channels runs faster on its space-to-depth input.
_SPACE_TO_DEPTH_MAX_CHANNELS = 4


def _reduce_mean_keeping_dims(proto: onnx.ModelProto) -> int:
    """Write each ``ReduceMean(keepdims=0)`` as ``ReduceMean(keepdims=1)`` and a
    ``Squeeze`` of the same axes: the same values and shape.

    OpenVINO 2026.4 computes a ``ReduceMean(keepdims=0)`` followed by a
    ``QuantizeLinear`` (directly, or through a per-channel ``Mul``) wrongly on the
    CPU, up to 192 codes off ONNX Runtime on a mean over the tokens; with the
    dimension kept and squeezed it agrees (0 codes). Returns the nodes rewritten.
    """
    from onnx import helper, numpy_helper

    nodes, rewritten = [], 0
    names = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        nodes.append(node)
        if (node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx")
                or _attr(node, "keepdims", 1) != 0 or _attr(node, "noop_with_empty_axes", 0)):
            continue
        axes_attr = _attr(node, "axes")
        if axes_attr is not None:  # opset < 18: axes is an attribute
            axes = f"{node.name or node.output[0]}_axes"
            while axes in names:
                axes += "_"
            names.add(axes)
            proto.graph.initializer.append(
                numpy_helper.from_array(np.asarray(axes_attr, np.int64), axes))
            squeeze_inputs = [axes]
        else:
            squeeze_inputs = [node.input[1]] if len(node.input) > 1 and node.input[1] else []
        out = node.output[0]
        kept = f"{out}_kept"
        for a in node.attribute:
            if a.name == "keepdims":
                a.i = 1
        node.output[0] = kept
        nodes.append(helper.make_node("Squeeze", [kept, *squeeze_inputs], [out],
                                      name=f"{node.name or out}_squeeze"))
        rewritten += 1
    if rewritten:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return rewritten


def _reduce_before_flatten(proto: onnx.ModelProto) -> int:
    """Write a mean over the trailing dimensions a ``Reshape`` merged (``x.flatten(2)
    .mean(-1)``, ``x.view(n, c, -1).mean(2)``) as the mean over those dimensions of
    the unmerged tensor and a ``Reshape`` of the result: the same values and shape.

    OpenVINO 2026.4 computes ``QuantizeLinear -> Reshape -> DequantizeLinear ->
    ReduceMean`` wrongly on the CPU when the zero point is not 0 and the reshaped
    tensor has few rows (16 x 3 channels: 155 codes off ONNX Runtime); the mean
    over the unmerged dimensions agrees. Runs after the ``DequantizeLinear`` moved
    after reshapes and ``ReduceMean`` keeps its dimensions. Returns the means
    rewritten.
    """
    from onnx import helper, numpy_helper

    shapes = _inferred_shapes(proto)
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    names = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node
                                                          for o in n.output}
    producers = {o: n for n in proto.graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    rewritten = 0

    def fresh(name: str) -> str:
        while name in names:
            name += "_"
        names.add(name)
        return name

    for node in proto.graph.node:
        nodes.append(node)
        if (node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx")
                or _attr(node, "keepdims", 1) != 1 or not node.input):
            continue
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1] in consts:
            axes = consts[node.input[1]].reshape(-1).tolist()
        dq, reshape = None, producers.get(node.input[0])
        if (reshape is not None and reshape.op_type == "DequantizeLinear"
                and reshape.input[1] in consts and consts[reshape.input[1]].size == 1):
            dq, reshape = reshape, producers.get(reshape.input[0])
        if (not axes or len(axes) != 1 or reshape is None or reshape.op_type != "Reshape"
                or reshape.domain not in ("", "ai.onnx")):
            continue
        merged, to = shapes.get(reshape.input[0]), shapes.get(reshape.output[0])
        if not merged or not to or len(to) < 2 or len(merged) <= len(to):
            continue
        k = len(to) - 1
        if k < 2:  # only a mean over the positions of each sample's channels: OpenVINO
            continue  # computed a mean over channels and positions wrongly either way
        tail = merged[k:]
        if (axes[0] % len(to) != k or any(d is None for d in (*tail, *to[1:]))
                or merged[1:k] != to[1:k] or int(np.prod(tail)) != to[k]):
            continue
        data = reshape.input[0]
        if dq is not None:
            data = fresh(f"{data}_dequantized")
            nodes.insert(len(nodes) - 1, helper.make_node(
                "DequantizeLinear", [reshape.input[0], *dq.input[1:]], [data],
                name=fresh(f"{node.name or node.output[0]}_dequantize")))
        out, unmerged = node.output[0], list(range(k, len(merged)))
        node.input[0] = data
        node.output[0] = fresh(f"{out}_unmerged")
        if _attr(node, "axes") is not None:
            for a in node.attribute:
                if a.name == "axes":
                    a.ints[:] = unmerged
        else:
            axes_name = fresh(f"{node.name or out}_axes")
            proto.graph.initializer.append(
                numpy_helper.from_array(np.asarray(unmerged, np.int64), axes_name))
            node.input[1] = axes_name
        shape_name = fresh(f"{node.name or out}_shape")
        proto.graph.initializer.append(numpy_helper.from_array(
            np.asarray([-1, *to[1:k], 1], np.int64), shape_name))
        nodes.append(helper.make_node("Reshape", [node.output[0], shape_name], [out],
                                      name=fresh(f"{node.name or out}_reshape")))
        rewritten += 1
    if rewritten:
        graph_outputs = {o.name for o in proto.graph.output}
        while True:  # the reshapes and dequantizations no longer read go
            used = {name for n in nodes for name in n.input} | graph_outputs
            kept = [n for n in nodes if n.op_type not in ("Reshape", "DequantizeLinear")
                    or any(o in used for o in n.output)]
            if len(kept) == len(nodes):
                break
            nodes = kept
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return rewritten


# Initializers smaller than this are not worth comparing for duplicates.
_SHARE_MIN_BYTES = 1024


def _share_identical_initializers(proto: onnx.ModelProto) -> int:
    """Store identical large initializers once: a tied embedding table and LM head
    (``head.weight = emb.weight``) each got its own float16 or int8 copy. Returns
    the initializers dropped."""
    import hashlib

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in proto.graph.node for a in node.attribute):
        return 0  # subgraphs may read initializers by name: left as they are
    groups: dict[tuple, list[onnx.TensorProto]] = {}
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        data = init.raw_data
        if len(data) < _SHARE_MIN_BYTES:
            continue
        key = (init.data_type, tuple(init.dims), hashlib.sha256(data).digest())
        groups.setdefault(key, []).append(init)
    alias: dict[str, str] = {}
    for same in groups.values():
        for init in same[1:]:
            if init.raw_data == same[0].raw_data:
                alias[init.name] = same[0].name
    if not alias:
        return 0
    for node in proto.graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]
    kept = [i for i in proto.graph.initializer if i.name not in alias]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return len(alias)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _float_weights_between_qdq(proto: onnx.ModelProto) -> list[str]:
    """Conv/Gemm nodes with a float32 weight initializer, a per-tensor dequantized
    input and an unbranched path (through Relu/Clip) to a QuantizeLinear: the
    layers ONNX Runtime's ``WeightBiasQuantization`` rewrite quantizes itself."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
            continue
        scale = inits.get(dq.input[1])
        if scale is not None and numpy_helper.to_array(scale).size != 1:
            continue
        current = node
        while len(current.output) == 1 and len(consumers.get(current.output[0], [])) == 1:
            current = consumers[current.output[0]][0]
            if current.op_type == "QuantizeLinear":
                found.append(node.input[1].removesuffix(".weight"))
                break
            if current.op_type not in ("Relu", "Clip"):
                break
    return found


def _weight_only_matmuls(proto: onnx.ModelProto) -> list[str]:
    """MatMul nodes with int8 weights (``DequantizeLinear`` of an integer initializer,
    possibly transposed) on a float input: ONNX Runtime turns them into
    ``MatMulNBits``, which by default quantizes that float input to int8."""
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    found = []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        weight = producers.get(node.input[1])
        if weight is not None and weight.op_type == "Transpose":
            weight = producers.get(weight.input[0])
        if (weight is None or weight.op_type != "DequantizeLinear"
                or weight.input[0] not in inits):
            continue
        activation = producers.get(node.input[0])
        # a quantized input reshaped or transposed on its way is still quantized
        while activation is not None and activation.op_type in (*_SHAPE_OPS, "Transpose"):
            activation = producers.get(activation.input[0])
        name = weight.input[0].removesuffix("._qweight")
        if (activation is None or activation.op_type != "DequantizeLinear") and \
                name not in found:  # one initializer may serve several layers
            found.append(name)
    return found


def _inferred_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's inferred shape (``None`` for a dynamic dimension)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _explicit_ceil_pooling(proto: onnx.ModelProto) -> int:
    """Write ``AveragePool(ceil_mode=1)`` as a floor-mode pool with the overhang as
    end padding left out of the count.

    torch (and ONNX Runtime's float AveragePool) divide a window that hangs over
    the input's end by the values it covers; ONNX Runtime's integer
    ``QLinearAveragePool``, which it fuses from DequantizeLinear -> AveragePool ->
    QuantizeLinear, divides it by the full kernel size (AvgPool2d(2,
    ceil_mode=True) on 9x9: the last row and column come out halved). Explicit
    end padding with ``count_include_pad=0`` means the same average to both
    kernels. Padding the pool counts (torch's divisor includes it, but not the
    overhang) becomes a zero ``Pad`` in front of it. Needs static spatial sizes.
    Returns the number of pools rewritten.
    """
    pools = [n for n in proto.graph.node
             if n.op_type == "AveragePool" and _attr(n, "ceil_mode", 0)]
    if not pools:
        return 0
    shapes = _inferred_shapes(proto)
    done = 0
    for node in pools:
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        kernel = list(_attr(node, "kernel_shape"))
        rank = len(kernel)
        strides = list(_attr(node, "strides", [1] * rank))
        pads = list(_attr(node, "pads", [0] * (2 * rank)))
        dilations = list(_attr(node, "dilations", [1] * rank))
        spatial = (shapes.get(node.input[0]) or [])[2:]
        if len(spatial) != rank or None in spatial or any(d != 1 for d in dilations):
            continue
        if any(pads) and _attr(node, "count_include_pad", 0):
            # Counted padding: real zeros in front of the pool.
            name = f"{node.name or node.output[0]}_counted_padding"
            widths = onnx.numpy_helper.from_array(
                np.array([0, 0, *pads[:rank], 0, 0, *pads[rank:]], np.int64), f"{name}_pads")
            proto.graph.initializer.append(widths)
            pad = onnx.helper.make_node("Pad", [node.input[0], widths.name], [f"{name}_out"],
                                        name=name, mode="constant")
            proto.graph.node.insert(list(proto.graph.node).index(node), pad)
            node.input[0] = pad.output[0]
            spatial = [n + b + e for n, b, e in zip(spatial, pads[:rank], pads[rank:],
                                                    strict=True)]
            pads = [0] * (2 * rank)
        ends = []
        for n, k, s, begin, end in zip(spatial, kernel, strides, pads[:rank], pads[rank:],
                                       strict=True):
            out = -(-(n + begin + end - k) // s) + 1
            if (out - 1) * s >= n + begin:  # the last window must start inside
                out -= 1
            ends.append(end + max(0, (out - 1) * s + k - (n + begin + end)))
        keep = [a for a in node.attribute
                if a.name not in ("ceil_mode", "pads", "count_include_pad")]
        del node.attribute[:]
        node.attribute.extend([*keep, onnx.helper.make_attribute("ceil_mode", 0),
                               onnx.helper.make_attribute("pads", pads[:rank] + ends),
                               onnx.helper.make_attribute("count_include_pad", 0)])
        done += 1
    return done


def _space_to_depth_stems(proto: onnx.ModelProto) -> int:
    """Run stride-2 integer convs on few input channels (a CNN's stem: 3x224x224
    into a 7x7 or 3x3 conv) as stride-1 convs on a space-to-depth input.

    ``conv(x, W, stride 2)`` equals ``conv(s2d(pad(x)), W', stride 1)`` where
    ``s2d`` moves each 2x2 block of pixels into channels and ``W'`` holds the same
    int8 weights rearranged (zeros where the kernel ends): the same products, so
    the int32 sums and outputs are identical. ONNX Runtime's integer conv gathers
    3-channel pixels slowly; on 12 channels the ResNet-18 stem runs 1.4x faster
    (38 -> 27 ms at batch 16, with its quantize/dequantize). The padding uses the
    input's zero point, so it dequantizes to 0.0 like the conv's own padding.
    Returns the number of convs rewritten.
    """
    shapes = _inferred_shapes(proto)
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    nodes, done = [], 0
    for node in proto.graph.node:
        rewritten = _space_to_depth_conv(node, producers, inits, shapes)
        if rewritten is None:
            nodes.append(node)
            continue
        new_nodes, new_inits = rewritten
        nodes.extend(new_nodes)
        proto.graph.initializer.extend(new_inits)
        done += 1
    if done:
        outputs = {o.name for o in proto.graph.output}
        used = {name for n in nodes for name in n.input} | outputs
        nodes = [n for n in nodes if n.op_type != "DequantizeLinear"
                 or any(o in used for o in n.output)]
        used = {name for n in nodes for name in n.input}
        kept = [i for i in proto.graph.initializer if i.name in used]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    return done


def _space_to_depth_conv(node, producers, inits, shapes):
    """The replacement nodes and initializers for one conv, or ``None``."""
    from onnx import helper, numpy_helper

    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
    if x_dq is None or w_dq is None:
        return None
    if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    if (_attr(node, "group", 1) != 1 or list(_attr(node, "strides", [1, 1])) != [2, 2]
            or list(_attr(node, "dilations", [1, 1])) != [1, 1]
            or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    if w_dq.input[0] not in inits or len(x_dq.input) < 3 or x_dq.input[2] not in inits:
        return None
    if len(w_dq.input) > 2 and w_dq.input[2] and w_dq.input[2] not in inits:
        return None
    weight = numpy_helper.to_array(inits[w_dq.input[0]])
    shape = shapes.get(x_dq.input[0])
    if weight.ndim != 4 or not shape or len(shape) != 4 or None in shape[1:]:
        return None
    _, channels, height, width = shape
    out_channels, _, kh, kw = weight.shape
    if channels > _SPACE_TO_DEPTH_MAX_CHANNELS or min(kh, kw) < 3 or weight.shape[1] != channels:
        return None
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    top, left, bottom, right = pads
    out_h = (height + top + bottom - kh) // 2 + 1
    out_w = (width + left + right - kw) // 2 + 1
    kh2, kw2 = (kh + 1) // 2, (kw + 1) // 2
    new_bottom = 2 * (out_h + kh2 - 1) - height - top
    new_right = 2 * (out_w + kw2 - 1) - width - left
    if new_bottom < 0 or new_right < 0:
        return None
    zero_point = numpy_helper.to_array(inits[x_dq.input[2]])
    if zero_point.size != 1 or zero_point.dtype.itemsize != 1:  # no 16-bit integer Pad
        return None
    # W'[o, (by * 2 + bx) * C + c, ky, kx] = W[o, c, 2 ky + by, 2 kx + bx]; the new
    # taps hold the code of weight 0: the weight zero point (per output channel)
    weight_zp = (numpy_helper.to_array(inits[w_dq.input[2]])
                 if len(w_dq.input) > 2 and w_dq.input[2] else None)
    if weight_zp is None:
        zero_code = np.zeros((out_channels, 1, 1, 1), dtype=weight.dtype)
    elif weight_zp.size in (1, out_channels):
        zero_code = np.broadcast_to(weight_zp.reshape(-1, 1, 1, 1), (out_channels, 1, 1, 1))
    else:
        return None
    padded = np.broadcast_to(zero_code, (out_channels, channels, 2 * kh2, 2 * kw2)).astype(
        weight.dtype).copy()
    padded[:, :, :kh, :kw] = weight
    rearranged = padded.reshape(out_channels, channels, kh2, 2, kw2, 2).transpose(0, 3, 5, 1, 2, 4)
    rearranged = np.ascontiguousarray(rearranged.reshape(out_channels, 4 * channels, kh2, kw2))
    base = node.name or node.output[0]
    names = {k: f"{base}_s2d_{k}" for k in ("pads", "padded", "blocks", "x", "w", "wq")}
    pad_values = np.array([0, 0, top, left, 0, 0, new_bottom, new_right], dtype=np.int64)
    new_inits = [numpy_helper.from_array(pad_values, names["pads"]),
                 numpy_helper.from_array(rearranged, names["wq"])]
    conv = onnx.NodeProto()
    conv.CopyFrom(node)
    conv.input[0], conv.input[1] = names["x"], names["w"]
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("strides", [1, 1]),
                           helper.make_attribute("pads", [0, 0, 0, 0]),
                           helper.make_attribute("kernel_shape", [kh2, kw2]),
                           helper.make_attribute("dilations", [1, 1]),
                           helper.make_attribute("group", 1)])
    new_nodes = [
        helper.make_node("Pad", [x_dq.input[0], names["pads"], x_dq.input[2]], [names["padded"]],
                         mode="constant", name=f"{base}_s2d_pad"),
        helper.make_node("SpaceToDepth", [names["padded"]], [names["blocks"]], blocksize=2,
                         name=f"{base}_s2d"),
        helper.make_node("DequantizeLinear", [names["blocks"], *x_dq.input[1:]], [names["x"]],
                         name=f"{base}_s2d_dequantize"),
        helper.make_node("DequantizeLinear", [names["wq"], *w_dq.input[1:]], [names["w"]],
                         name=f"{base}_s2d_weight", axis=_attr(w_dq, "axis", 1)),
        conv,
    ]
    return new_nodes, new_inits


def _dynamic_shapes(example_inputs: tuple, model: nn.Module | None = None) -> tuple:
    """A dynamic batch for every tensor input, shaped like ``forward``'s parameters
    (``forward(self, x, *rest)`` takes the inputs after ``x`` as one tuple)."""
    dim = torch.export.Dim.AUTO
    shapes = tuple({0: dim} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                   for x in example_inputs)
    try:
        params = list(inspect.signature(model.forward).parameters.values()) if model else []
    except (TypeError, ValueError):  # no signature to read
        params = []
    for index, param in enumerate(params):
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return (*shapes[:index], shapes[index:]) if index < len(shapes) else shapes
        if param.kind not in (inspect.Parameter.POSITIONAL_ONLY,
                              inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
    return shapes


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours parts of its messages

# torch.export's errors for Python control flow on tensor values
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException")


def _export_failure(exc: BaseException) -> str:
    """The root cause of a failed ``torch.onnx.export``, without the exporter's advice."""
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    message = _ANSI.sub("", str(root)).strip() or type(root).__name__
    branching = (type(root).__name__ in _DATA_DEPENDENT
                 or "data-dependent expression" in message
                 # torch.export's UserError covers much else (a dynamic_shapes mismatch)
                 or (type(root).__name__ == "UserError"
                     and re.search(r"control flow|data.dependent", message, re.I) is not None))
    if branching:
        call = re.search(r"The following call raised this error:\n\s*(File .*?, line \d+), "
                         r"in \w+\n\s*(.+)", message)
        where = f" ({call.group(1)}: `{call.group(2).strip()}`)" if call else ""
        return (f"forward() branches on a tensor's value{where}, which an exported graph "
                "cannot hold; compute both branches and pick with torch.where, or make the "
                "decision outside forward()")
    if root is exc:
        return message[:2000]
    context = (_ANSI.sub("", str(exc)).splitlines() or [""])[0][:300]
    return f"{type(root).__name__}: {message[:1500]} (while exporting: {context})"


def _batch_of_two(example_inputs: tuple) -> tuple | None:
    """The example inputs repeated to batch 2 when every one has batch 1, else None.

    ``torch.export`` specializes a dimension of size 1: traced at batch 1, a
    reshape inside the model (``nn.MultiheadAttention``'s head split, for one) can
    keep the batch as the constant 1 while the file's input is dynamic, and the
    file then fails at any other batch size.
    """
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors or any(x.shape[0] != 1 for x in tensors):
        return None
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                 for x in example_inputs)


def _batch_is_dynamic(proto: onnx.ModelProto) -> bool:
    """Whether every input of rank >= 1 has a symbolic first dimension."""
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_param:
            return False
    return True


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | tuple,
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    space_to_depth: bool = True,
) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically) and return the path.

    A prepared model is exported with Q/DQ nodes and integer weights; a float
    model is exported as float.

    Args:
        model: a model from :func:`quantaware.prepare` (calibrated or trained), or float.
        path: the ``.onnx`` file to write; its folder is created if needed.
        example_inputs: a tensor or tuple of positional inputs.
        dynamic_batch: make the first dimension of every input dynamic.
        opset: ONNX opset (21 or newer).
        space_to_depth: run stride-2 integer convs on at most 4 input channels (a
            CNN's stem) as stride-1 convs on a space-to-depth input: identical
            results, faster in ONNX Runtime.

    Example:
        >>> import torch, tempfile, os
        >>> from quantaware import presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(16, 4)
        >>> q = quantize(net, presets.INT8, [x], x[:1])
        >>> out = export_onnx(q, os.path.join(tempfile.mkdtemp(), "m.onnx"), x[:1])
        >>> out.suffix
        '.onnx'
    """
    from quantaware.export import ops

    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be >= {DEFAULT_OPSET} (int16/int4 Q/DQ), got {opset}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    path = Path(path)
    _refuse_divisor_override(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model = _export_copy(model)
    kwargs = {
        "dynamo": True,
        "opset_version": opset,
        "custom_translation_table": ops.TRANSLATION_TABLE,
        "verbose": False,
        "optimize": False,
    }
    traced_inputs = [example_inputs]
    if dynamic_batch:
        kwargs["dynamic_shapes"] = _dynamic_shapes(example_inputs, export_model)
        two = _batch_of_two(example_inputs)
        if two is not None:
            traced_inputs.insert(0, two)
    program = None
    for attempt, inputs in enumerate(traced_inputs):
        last = attempt == len(traced_inputs) - 1
        try:
            # the exporter prints its progress and, on a failure, graph dumps; the
            # failure is reported below
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()), \
                    quiet_loggers("torch.onnx", "torch.fx.experimental.symbolic_shapes"):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(export_model, inputs, **kwargs)
        except Exception as exc:
            if not last:
                continue
            raise ExportError(
                f"torch.onnx.export failed for {type(model).__name__}: "
                f"{type(exc).__name__}: {_export_failure(exc)}"
            ) from exc
        _unique_value_names(program.model.graph)
        # Traced at batch 2, a model that pins its batch size exports with a
        # fixed batch of 2: trace the given example instead.
        if last or _batch_is_dynamic(program.model_proto):
            break
    # The default optimizer folds Cast(float16 weight) into a float32 initializer
    # for small weights; fold only scalar constants (zero-point casts, shapes) and
    # leave the rest to ONNX Runtime's own constant folding at load time.
    try:
        proto = onnxscript.optimizer.optimize(program.model_proto,
                                              input_size_limit=_FOLD_INPUT_SIZE_LIMIT)
    except Exception as exc:
        cause = f"{exc}; {exc.__cause__}" if exc.__cause__ is not None else str(exc)
        raise ExportError(f"torch.onnx.export wrote an invalid graph for "
                          f"{type(model).__name__}: {type(exc).__name__}: {cause[:2000]}") from exc
    _fold_float_biases(proto)
    _quantize_constants(proto)
    _reduce_mean_keeping_dims(proto)
    _sink_dequantize_through_reshapes(proto)
    _reduce_before_flatten(proto)
    _explicit_ceil_pooling(proto)
    _share_identical_initializers(proto)
    if space_to_depth:
        _space_to_depth_stems(proto)
    with torch.no_grad():
        names = _output_key_names(export_model(*example_inputs))
    if names is not None:
        _name_outputs(proto, names)
    _strip_debug_info(proto)
    proto.producer_name = "quantaware"
    config = getattr(model, "quantaware_config", None)
    meta = {"quantaware.config": config.name if config is not None else "float"}
    float_between = _float_weights_between_qdq(proto)
    if float_between:
        from quantaware.bench import DISABLED_OPTIMIZERS

        meta["quantaware.disabled_optimizers"] = ",".join(DISABLED_OPTIMIZERS)
        log.warning(
            "%d layer(s) keep float weights between quantized activations (%s). ONNX "
            "Runtime's default session quantizes such weights to per-tensor int8 itself; "
            "quantaware's sessions switch that off, in your own pass "
            "disabled_optimizers=%s to onnxruntime.InferenceSession",
            len(float_between), ", ".join(float_between[:3]), list(DISABLED_OPTIMIZERS))
    weight_only = _weight_only_matmuls(proto)
    if weight_only:
        meta["quantaware.session_config"] = "session.qdq_matmulnbits_accuracy_level=1"
        log.warning(
            "%d layer(s) multiply float inputs by int8 weights (%s). ONNX Runtime runs "
            "them as MatMulNBits, which by default quantizes those float inputs to int8; "
            "quantaware's sessions compute them in float32 as trained. In your own "
            "session: options.add_session_config_entry("
            "'session.qdq_matmulnbits_accuracy_level', '1')",
            len(weight_only), ", ".join(weight_only[:3]))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    _check_types(proto, model, example_inputs)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    log.info("exported %s to %s (%d bytes)", type(model).__name__, path, path.stat().st_size)
    return path
