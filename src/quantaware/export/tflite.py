"""Export a prepared model to a full-integer LiteRT (TFLite) file with its own scales.

Every route from a QDQ ONNX file to an int8 ``.tflite`` recalibrates or drops the
quantization parameters, which throws away what calibration and QAT learned. Here
the torch program of the model is rewritten into the PT2E quantized form that
``litert-torch`` lowers to integer LiteRT kernels, carrying quantaware's scales and
zero points as they are:

- activations: ``quantize_per_tensor -> dequantize_per_tensor`` with the
  quantizer's scale; unsigned 8-bit codes become int8 with the zero point moved
  by -128 (the same real values: LiteRT's integer kernels are int8);
- weights: ``quantize_per_channel``/``quantize_per_tensor`` of the dequantized
  integer weights with their scales (symmetric, zero point 0) -- the integers come
  back unchanged;
- biases: the dequantized int32 bias; the converter quantizes it with scale
  ``input_scale * weight_scale``, the scale quantaware already used, so the same
  integers;
- ops that keep their input's grid (max pooling, reshapes, dropout) get a
  quantize/dequantize pair with their input's qparams, as LiteRT's kernels
  require, so they run on int8 too;
- average pooling whose padding counts as zeros becomes an explicit zero pad and
  an unpadded pool, which LiteRT runs on the input's grid before requantizing
  onto the pool's (lowered as one op, the padded input itself was requantized
  onto the narrower output grid and clipped).

The file's interface is float32 by default (a ``QUANTIZE`` op after each input
and a ``DEQUANTIZE`` before each output, as LiteRT's own converter writes for
float I/O); ``int8_io=True`` keeps the int8 tensors as the interface.

Needs ``pip install 'quantaware[litert]'`` (litert-torch and ai-edge-litert).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from quantaware._batch import dtype_hint
from quantaware._files import write_bytes
from quantaware._native import native_stderr_filtered, quiet_loggers
from quantaware.export.integer import int8_code
from quantaware.export.onnx import (
    ExportError,
    _export_copy,
    _export_failure,
)
from quantaware.fake_quant import frozen
from quantaware.nn.pool import ceil_mode_matters
from quantaware.primitives import dequantize

__all__ = ["export_tflite", "litert_problem", "output_scale", "output_scales", "tflite_ops"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'quantaware[litert]'"

# aten ops whose output stays on their input's integer grid: LiteRT runs them on
# int8 only with the same qparams on both sides.
_SAME_GRID = {
    "max_pool1d", "max_pool2d", "max_pool3d", "flatten", "view", "reshape", "_unsafe_view",
    "permute", "transpose", "squeeze", "unsqueeze", "clone", "contiguous", "dropout", "alias",
    "pad", "constant_pad_nd",
}


def _import_litert() -> tuple[Any, Any, Any]:
    try:
        # importing them logs optional kernels torchao lacks, a torch deprecation
        # and absl's start-up lines: none concerns the export. The converter's own
        # INFO lines are switched off at the source (unless the user set the level),
        # so a crash inside it still prints its message.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        with warnings.catch_warnings(), native_stderr_filtered(), \
                quiet_loggers("absl", "torchao", "torch.utils._pytree"):
            warnings.simplefilter("ignore")
            import litert_torch
            from litert_torch.quantize.pt2e_quantizer import (
                PT2EQuantizer,
                get_symmetric_quantization_config,
            )
            from litert_torch.quantize.quant_config import QuantConfig
    except ImportError as exc:
        raise ImportError(
            f"LiteRT export needs litert-torch and ai-edge-litert: {_INSTALL_HINT} ({exc})"
        ) from exc
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    # The quantizer only tells the converter that the graph holds static Q/DQ
    # pairs; nothing is observed or annotated with it.
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return litert_torch, QuantConfig(pt2e_quantizer=quantizer), quantizer


def _value(gm: fx.GraphModule, node: Any) -> torch.Tensor:
    """The constant behind a ``get_attr`` node (qparams, integer weights)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise ExportError(f"expected a constant in the exported graph, got {node}")
    value: Any = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value.detach()


def _groups(node: fx.Node) -> int:
    """The ``groups`` of a transposed convolution node."""
    aten = torch.ops.aten
    index = 8 if node.target is aten.convolution.default else 6
    return int(node.args[index]) if len(node.args) > index else 1


def _transposed_conv(node: fx.Node) -> bool:
    """Whether ``node`` is a transposed convolution in an exported graph."""
    aten = torch.ops.aten
    if node.target in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                       aten.conv_transpose3d.input):
        return True
    return node.target is aten.convolution.default and len(node.args) > 6 and bool(
        node.args[6])


class _Rewriter:
    """Turns the quantaware export ops of ``gm`` into PT2E quantize/dequantize ops."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.qd = torch.ops.quantized_decomposed
        self.count = 0
        # Transposed convs whose weight scales the converter recomputes:
        # (layer, channels whose codes stay below 127, channels).
        self.rescaled: list[tuple[str, int, int]] = []
        # Quantized layers LiteRT will run in float32: (layer, why).
        self.float_layers: list[tuple[str, str]] = []

    def constant(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        name = f"_litert_{hint}_{self.count}"
        self.count += 1
        self.gm.register_buffer(name, tensor.contiguous())
        return self.graph.get_attr(name)

    def activation(self, node: fx.Node) -> fx.Node:
        x, scale, zero_point, _axis, qmin, qmax = node.args
        s, z = _value(self.gm, scale), _value(self.gm, zero_point)
        if s.numel() != 1:
            raise ExportError("per-channel activation quantizers have no LiteRT form; use "
                              "PerTensor() activations")
        zp, lo, hi = _int8_grid(int(z.reshape(-1)[0]), qmin, qmax)
        args = (float(s.reshape(-1)[0]), zp, lo, hi, torch.int8)
        q = self.graph.call_function(self.qd.quantize_per_tensor.default, (x, *args))
        return self.graph.call_function(self.qd.dequantize_per_tensor.default, (q, *args))

    def weight(self, node: fx.Node) -> fx.Node:
        q, scale, zero_point, axis = node.args
        qv, s, z = (_value(self.gm, n) for n in (q, scale, zero_point))
        if qv.dtype != torch.int8:
            raise ExportError(f"{qv.dtype} weights have no LiteRT integer kernel; use weights "
                              "of 8 bits or fewer")
        if bool((z != 0).any()):
            raise ExportError("LiteRT's integer kernels need signed symmetric weights (zero "
                              "point 0); use a symmetric, signed weight spec (as in INT8)")
        per_channel = s.dim() == 1
        w = self.constant(dequantize(qv, s, z, axis if per_channel else None), "weight")
        users = [user for user in node.users if _transposed_conv(user)
                 and isinstance(user.args[0], fx.Node)
                 and user.args[0].target is self.qd.dequantize_per_tensor.default]
        if users:  # an integer transposed conv (weight-only ones keep DEQUANTIZE'd weights)
            # The converter has no int8 TRANSPOSE_CONV for dequantized weights; it
            # quantizes float weights itself (scale max|w| / 127 per output channel,
            # also for per-tensor weights), which gives back the model's codes where
            # they reach +-127.
            layer = str(q.target).rsplit(".", 1)[0]
            if _groups(users[0]) > 1:
                self.float_layers.append((layer, "a grouped transposed conv (its converter "
                                                 "splits it into float32 convs)"))
                return w
            peak = qv.abs().amax(dim=[d for d in range(qv.dim()) if d != 1])
            short = int(((peak < 127) & (peak > 0)).sum())
            if short:
                self.rescaled.append((layer, short, peak.numel()))
            return w
        if not per_channel:
            args = (float(s), 0, -128, 127, torch.int8)
            wq = self.graph.call_function(self.qd.quantize_per_tensor.default, (w, *args))
            return self.graph.call_function(self.qd.dequantize_per_tensor.default, (wq, *args))
        scales = self.constant(s.to(torch.float32), "scale")
        zps = self.constant(torch.zeros_like(s, dtype=torch.int64), "zero_point")
        args = (scales, zps, axis, -128, 127, torch.int8)
        wq = self.graph.call_function(self.qd.quantize_per_channel.default, (w, *args))
        return self.graph.call_function(self.qd.dequantize_per_channel.default, (wq, *args))

    def run(self) -> None:
        ops = torch.ops.quantaware
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            target = node.target
            with self.graph.inserting_before(node):
                if target is ops.quantize_dequantize.default:
                    new = self.activation(node)
                elif target is ops.dequantize.default:
                    new = self.weight(node)
                elif target is ops.dequantize_symmetric.default:
                    q, scale, axis = node.args
                    s = _value(self.gm, scale)
                    new = self.constant(dequantize(_value(self.gm, q), s, torch.zeros(
                        (), dtype=torch.int32), axis if s.dim() == 1 else None), "bias")
                elif target is ops.global_average_pool.default:
                    (x,) = node.args
                    rank = len(node.meta["val"].shape)
                    new = self.graph.call_function(torch.ops.aten.mean.dim,
                                                   (x, list(range(2, rank)), True))
                elif target is ops.cast_float.default:
                    new = self.constant(_value(self.gm, node.args[0]).to(torch.float32), "f16")
                elif target is ops.dynamic_quantize_dequantize.default:
                    raise ExportError(
                        "dynamic activation quantization has no full-integer LiteRT form; "
                        "quantize with a static preset (INT8, W4A8) for LiteRT")
                elif target is ops.gather_dequantize.default:
                    table, row_scale, ids = node.args
                    rows = _value(self.gm, table).to(torch.float32) * _value(
                        self.gm, row_scale).reshape(-1, 1)
                    new = self.graph.call_function(
                        torch.ops.aten.embedding.default, (self.constant(rows, "table"), ids))
                else:
                    continue
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
        self.transposed_conv_form()
        self.pools_1d_as_2d()
        self.pad_before_pooling()
        self.same_grid()
        self.dequantize_per_user()
        self.graph.eliminate_dead_code()
        self.gm.recompile()

    def shape_of(self, node: Any) -> tuple[int, ...] | None:
        """The traced shape of ``node``, looking through the quantize/dequantize pairs
        this rewriter inserts (they carry no shape); ``None`` if unknown."""
        qdq = (self.qd.quantize_per_tensor.default, self.qd.dequantize_per_tensor.default)
        while isinstance(node, fx.Node) and "val" not in node.meta and node.target in qdq:
            node = node.args[0]
        if isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor):
            return tuple(node.meta["val"].shape)
        return None

    def pad_before_pooling(self) -> None:
        """An average pool whose padding counts as zeros becomes an explicit zero pad
        (on the input's grid) and an unpadded pool. Lowered as it is, the converter
        pads and then requantizes the padded input onto the pool's output grid,
        clipping values before the average; unpadded, it averages on the input's
        grid and requantizes the result. A ``ceil_mode`` pool with no window hanging
        over the input (:func:`quantaware.nn.pool.ceil_mode_matters`) is the same
        pool in floor mode, and is written as one."""
        for node in list(self.graph.nodes):
            if node.op != "call_function" or _aten_name(node.target) != "avg_pool2d":
                continue
            names = ("input", "kernel_size", "stride", "padding", "ceil_mode",
                     "count_include_pad", "divisor_override")
            args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
            padding = args.get("padding", 0)
            ph, pw = (padding, padding) if isinstance(padding, int) else (
                (padding[0], padding[0]) if len(padding) == 1 else padding)
            size = self.shape_of(args["input"])
            counted = not (ph or pw) or args.get("count_include_pad", True)
            if args.get("ceil_mode", False) and counted and size is not None and \
                    not ceil_mode_matters(args["kernel_size"], args.get("stride"), padding, size):
                # No window hangs over the input, so floor mode is the same pool, which
                # the converter lowers without ceil mode's pad and rescaling MUL. With
                # no padding, leaving padding out of the count changes nothing either.
                # (Padding left out of the count stays as written: the converter
                # lowers that to an int8 pool in ceil mode only.)
                args["ceil_mode"] = False
                if not (ph or pw):
                    args["count_include_pad"] = True
                node.args = tuple(args.get(n, d) for n, d in zip(
                    names, (None, None, [], 0, False, True, None), strict=True))
                node.kwargs = {}
            if not (ph or pw) or not args.get("count_include_pad", True) or \
                    args.get("ceil_mode", False):
                continue
            with self.graph.inserting_before(node):
                padded = self.graph.call_function(torch.ops.aten.constant_pad_nd.default,
                                                  (args["input"], [pw, pw, ph, ph], 0.0))
            node.args = (padded, args["kernel_size"], args.get("stride") or args["kernel_size"],
                         [0, 0], False, True, args.get("divisor_override"))
            node.kwargs = {}

    def transposed_conv_form(self) -> None:
        """Give each transposed conv the form the converter turns into an int8
        ``TRANSPOSE_CONV``: a (zero) bias, and no ReLU/ReLU6 where its output
        quantizer's saturation already applies it (zero point at the lowest code and,
        for ReLU6, a top of at most 6). The values are the same; with a missing bias
        or such an activation the converter wrote a float32 TRANSPOSE_CONV."""
        aten = torch.ops.aten
        q_op = self.qd.quantize_per_tensor.default
        clamps = {aten.relu.default: 0.0, aten.relu_.default: 0.0,
                  aten.hardtanh.default: 6.0, aten.hardtanh_.default: 6.0,
                  aten.relu6.default: 6.0}
        for node in list(self.graph.nodes):
            if node.op != "call_function" or not _transposed_conv(node):
                continue
            if len(node.args) > 2 and node.args[2] is None:
                weight = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) \
                    else None
                weight = weight if isinstance(weight, torch.Tensor) else None
                if weight is None and isinstance(node.args[1], fx.Node) and \
                        node.args[1].op == "get_attr":
                    weight = _value(self.gm, node.args[1])
                if weight is not None:
                    with self.graph.inserting_before(node):
                        bias = self.constant(torch.zeros(weight.shape[1] * _groups(node)),
                                             "bias")
                    node.args = (node.args[0], node.args[1], bias, *node.args[3:])
            if len(node.users) != 1:
                continue
            act = next(iter(node.users))
            if act.target not in clamps or not act.users:
                continue
            if act.target in (aten.hardtanh.default, aten.hardtanh_.default) and \
                    tuple(act.args[1:3]) != (0.0, 6.0):
                continue
            top = clamps[act.target]
            if not all(u.target is q_op for u in act.users):
                continue
            grids = {tuple(u.args[1:5]) for u in act.users}
            if len(grids) != 1:
                continue
            scale, zero_point, qmin, qmax = next(iter(grids))
            if zero_point != qmin or (top and (qmax - zero_point) * scale > top):
                continue
            act.replace_all_uses_with(node)
            self.graph.erase_node(act)

    def pools_1d_as_2d(self) -> None:
        """Write each quantized 1-d average pool as the 2-d pool over ``(1, L)`` it is,
        quantized right after the pool. Lowered as ``avg_pool1d``, the converter
        requantized the pool's input onto the (often narrower) output grid before
        averaging, clipping it; as a 2-d pool it averages on the input's grid and
        then requantizes, as the model does."""
        q_op = self.qd.quantize_per_tensor.default
        for node in list(self.graph.nodes):
            if node.op != "call_function" or _aten_name(node.target) != "avg_pool1d":
                continue
            quantized = [u for u in node.users if u.target is q_op]
            if not quantized:
                continue
            names = ("input", "kernel_size", "stride", "padding", "ceil_mode",
                     "count_include_pad")
            args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
            kernel = list(args["kernel_size"])
            stride = list(args.get("stride") or kernel)
            padding = list(args.get("padding") or [0])
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            out_val = node.meta.get("val")
            with self.graph.inserting_before(node):
                wide = self.graph.call_function(torch.ops.aten.unsqueeze.default,
                                                (args["input"], -2))
                pool = self.graph.call_function(
                    torch.ops.aten.avg_pool2d.default,
                    (wide, [1, *kernel], [1, *stride], [0, *padding],
                     args.get("ceil_mode", False), args.get("count_include_pad", True)))
                q = self.graph.call_function(q_op, (pool, *quantized[0].args[1:]))
                dq = self.graph.call_function(self.qd.dequantize_per_tensor.default,
                                              (q, *quantized[0].args[1:]))
                flat = self.graph.call_function(torch.ops.aten.squeeze.dim, (dq, -2))
            if isinstance(val, torch.Tensor):  # shapes for pad_before_pooling
                wide.meta["val"] = torch.empty((*val.shape[:-1], 1, val.shape[-1]),
                                               device="meta")
            if isinstance(out_val, torch.Tensor):
                pool.meta["val"] = torch.empty(
                    (*out_val.shape[:-1], 1, out_val.shape[-1]), device="meta")
                flat.meta["val"] = torch.empty(tuple(out_val.shape), device="meta")
            node.replace_all_uses_with(flat)
            self.graph.erase_node(node)

    def same_grid(self) -> None:
        """Quantize the outputs of grid-preserving ops with their input's qparams."""
        dq_ops = (self.qd.dequantize_per_tensor.default,)
        for node in list(self.graph.nodes):
            if node.op != "call_function" or _aten_name(node.target) not in _SAME_GRID:
                continue
            source = node.args[0] if node.args else None
            if not isinstance(source, fx.Node) or source.target not in dq_ops:
                continue
            if all(u.target is self.qd.quantize_per_tensor.default for u in node.users):
                continue
            args = tuple(source.args[1:])
            with self.graph.inserting_after(node):
                q = self.graph.call_function(self.qd.quantize_per_tensor.default, (node, *args))
            with self.graph.inserting_after(q):
                dq = self.graph.call_function(self.qd.dequantize_per_tensor.default, (q, *args))
            node.replace_all_uses_with(dq, delete_user_cb=lambda user, q=q: user is not q)


    def dequantize_per_user(self) -> None:
        """Give every user of a shared DEQUANTIZE its own copy (PT2E's form, as
        ``convert_pt2e`` writes it). With one DEQUANTIZE shared by two flattens of
        a conv output, the converted file read one of them in the wrong layout
        (77 LSB off)."""
        for node in list(self.graph.nodes):
            if node.target is not self.qd.dequantize_per_tensor.default or \
                    len(node.users) < 2:
                continue
            for user in list(node.users)[1:]:
                with self.graph.inserting_after(node):
                    copy = self.graph.call_function(node.target, node.args, node.kwargs)
                copy.meta = dict(node.meta)
                user.replace_input_with(node, copy)


def _aten_name(target: Any) -> str | None:
    name = getattr(target, "__name__", "")  # e.g. "max_pool2d.default"
    return name.split(".")[0] if getattr(target, "namespace", None) == "aten" else None


def litert_problem(config: Any) -> str | None:
    """Why a model quantized with ``config`` (a :class:`~quantaware.QuantConfig`) has
    no full-integer LiteRT file, or ``None``: checked before any calibration, so a
    workflow that ends in LiteRT fails at once rather than at its export.

    Example:
        >>> from quantaware import presets
        >>> litert_problem(presets.INT8) is None, litert_problem(presets.W4A8) is None
        (True, True)
        >>> print(litert_problem(presets.W4A4))  # doctest: +ELLIPSIS
        W4A4: 4-bit activations have no LiteRT form: ... (INT8, W4A8) for LiteRT, or export to ONNX
    """
    from quantaware.config import FloatSpec, QuantSpec

    if isinstance(config.weight, FloatSpec):
        return (f"{config.name}: float16 weights have no LiteRT integer form (the file "
                "would hold float32); quantize to INT8 or W4A8 for LiteRT, or export the "
                "FP16 model to ONNX")
    specs = [("", config.weight, config.activation)]
    specs += [(f" (rule {rule.pattern!r})", rule.weight, rule.activation)
              for rule in config.overrides if not rule.skip]
    for where, weight, activation in specs:
        if isinstance(activation, QuantSpec) and activation.dynamic:
            return (f"{config.name}{where}: dynamic activation quantization has no "
                    "full-integer LiteRT form; quantize with a static preset (INT8, W4A8) "
                    "for LiteRT")
        if isinstance(activation, QuantSpec) and activation.bits != 8:
            return (f"{config.name}{where}: {activation.bits}-bit activations have no "
                    "LiteRT form: its integer kernels saturate at the int8 limits, so only "
                    "8-bit activations keep their meaning; quantize activations to 8 bits "
                    "(INT8, W4A8) for LiteRT, or export to ONNX")
        if isinstance(weight, QuantSpec) and weight.bits > 8:
            return (f"{config.name}{where}: {weight.bits}-bit weights have no LiteRT "
                    "integer kernel; use weights of 8 bits or fewer")
        if isinstance(weight, QuantSpec) and not (weight.symmetric and weight.signed):
            return (f"{config.name}{where}: LiteRT's integer kernels need signed symmetric "
                    "weights (zero point 0); use a symmetric, signed weight spec (as in "
                    "INT8)")
    return None


def _int8_grid(zero_point: int, qmin: int, qmax: int) -> tuple[int, int, int]:
    """``(zero_point, qmin, qmax)`` of an 8-bit activation format on int8 codes."""
    if (qmin, qmax) == (0, 255) or (qmin >= -128 and qmax <= 127 and qmax - qmin >= 254):
        return int8_code(zero_point, qmin), int8_code(qmin, qmin), int8_code(qmax, qmin)
    raise ExportError(
        f"activation range [{qmin}, {qmax}] has no LiteRT form: its integer kernels "
        "saturate at the int8 limits, so only 8-bit activations keep their meaning; "
        "quantize activations to 8 bits (INT8, W4A8) for LiteRT, or export to ONNX")


class _Flatbuffer:
    """Edits of a ``.tflite`` file's main graph (the other subgraphs are composites'
    decompositions)."""

    def __init__(self, content: bytes) -> None:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        self.schema, self.utils = schema, flatbuffer_utils
        self.model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
        self.graph = self.model.subgraphs[0]

    def content(self) -> bytes:
        return bytes(self.utils.convert_object_to_bytearray(self.model))

    def builtin(self, index: int) -> int:
        code = self.model.operatorCodes[index]
        return max(code.builtinCode, code.deprecatedBuiltinCode)

    def opcode(self, builtin: int) -> int:
        for i in range(len(self.model.operatorCodes)):
            if self.builtin(i) == builtin:
                return i
        code = self.schema.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = builtin
        code.version = 2  # int8 <-> float32
        self.model.operatorCodes.append(code)
        return len(self.model.operatorCodes) - 1

    def float_twin(self, index: int, suffix: str) -> int:
        old = self.graph.tensors[index]
        twin = self.schema.TensorT()
        twin.shape = old.shape
        twin.shapeSignature = old.shapeSignature
        twin.type = self.schema.TensorType.FLOAT32
        twin.name = (old.name.decode() if isinstance(old.name, bytes) else old.name) + suffix
        twin.buffer = 0
        self.graph.tensors.append(twin)
        return len(self.graph.tensors) - 1

    def op(self, builtin: int, inputs: list[int], outputs: list[int]) -> Any:
        new = self.schema.OperatorT()
        new.opcodeIndex = self.opcode(builtin)
        new.inputs = inputs
        new.outputs = outputs
        return new


def _float_interface(content: bytes) -> bytes:
    """Give an int8-interface model float32 inputs and outputs (``QUANTIZE`` after
    each int8 input, ``DEQUANTIZE`` before each int8 output)."""
    fb = _Flatbuffer(content)
    graph, ops, int8 = fb.graph, fb.schema.BuiltinOperator, fb.schema.TensorType.INT8
    remap: dict[int, int] = {}
    before, after = [], []
    for pos, index in enumerate(graph.inputs):
        if graph.tensors[index].type == int8:
            twin = fb.float_twin(index, "_float")
            before.append(fb.op(ops.QUANTIZE, [twin], [index]))
            graph.inputs[pos] = remap[index] = twin
    for pos, index in enumerate(graph.outputs):
        if graph.tensors[index].type == int8:
            twin = fb.float_twin(index, "_float")
            after.append(fb.op(ops.DEQUANTIZE, [index], [twin]))
            graph.outputs[pos] = remap[index] = twin
    graph.operators = before + list(graph.operators) + after
    for signature in fb.model.signatureDefs or []:
        for tensor_map in [*(signature.inputs or []), *(signature.outputs or [])]:
            tensor_map.tensorIndex = remap.get(tensor_map.tensorIndex, tensor_map.tensorIndex)
    return fb.content()


def _chose_outputs(model: nn.Module) -> bool:
    """Whether the model's config decides which layers keep int8 outputs before float
    ops (``integer_output`` rules, as ``quantize_for_backend(backend="litert")``
    writes)."""
    config = getattr(model, "quantaware_config", None)
    return any(getattr(rule, "integer_output", None) is not None
               for rule in getattr(config, "overrides", ()))


def _int8_float_weights(content: bytes, warn_float_linears: bool = False) -> bytes:
    """Store the float32 weights of float ``FULLY_CONNECTED`` ops (a linear layer whose
    output feeds a float op: GELU, LayerNorm) as the int8 codes they were dequantized
    from, with a ``DEQUANTIZE`` that XNNPACK unpacks once at load time, and the tables
    of ``EMBEDDING_LOOKUP`` (a quantized ``nn.Embedding``) as int8 codes with a scale
    per row, which LiteRT's lookup dequantizes row by row as it copies them. The
    converter folds such weights to float32, 4x the bytes. Only weights whose per-row
    codes rebuild them bit for bit are rewritten, so the file computes the same values
    (``code * scale`` is exact in float32 either way). With ``warn_float_linears``,
    linear layers that run in float32 on int8 inputs are reported (the file is
    parsed once for both)."""
    fb = _Flatbuffer(content)
    graph, schema = fb.graph, fb.schema
    users: dict[int, int] = {}
    for op in graph.operators:
        for index in op.inputs:
            users[index] = users.get(index, 0) + 1
    buffer_users: dict[int, int] = {}  # over every subgraph: composites share buffers
    for subgraph in fb.model.subgraphs:
        for tensor in subgraph.tensors:
            buffer_users[tensor.buffer] = buffer_users.get(tensor.buffer, 0) + 1
    rewritten = []
    changed = False
    for op in graph.operators:
        kind = fb.builtin(op.opcodeIndex)
        if (kind in (schema.BuiltinOperator.FULLY_CONNECTED,
                     schema.BuiltinOperator.TRANSPOSE_CONV,
                     schema.BuiltinOperator.EMBEDDING_LOOKUP)
                and len(op.inputs) > 1 and users.get(op.inputs[1]) == 1):
            codes = _exact_int8_rows(fb, graph.tensors[op.inputs[1]], buffer_users)
            if codes is not None and kind != schema.BuiltinOperator.EMBEDDING_LOOKUP:
                rewritten.append(_dequantized_weight(fb, op, *codes))
                changed = True
            elif codes is not None:
                _int8_table(fb, graph.tensors[op.inputs[1]], *codes)
                changed = True
        rewritten.append(op)
    if warn_float_linears:
        _warn_float_linears(fb)
    if not changed:
        return content
    graph.operators = rewritten
    return fb.content()


def _warn_float_linears(fb: _Flatbuffer) -> None:
    """Warn about linear layers with int8 inputs that run in float32 (their outputs
    are not quantized because only float ops read them)."""
    schema, graph = fb.schema, fb.graph
    dequantized = {op.outputs[0] for op in graph.operators
                   if fb.builtin(op.opcodeIndex) == schema.BuiltinOperator.DEQUANTIZE}
    linears = [op for op in graph.operators
               if fb.builtin(op.opcodeIndex) == schema.BuiltinOperator.FULLY_CONNECTED]
    floats = sum(op.inputs[0] in dequantized
                 and graph.tensors[op.inputs[0]].type == schema.TensorType.FLOAT32
                 for op in linears)
    if floats:
        log.warning(
            "LiteRT runs %d of the %d linear layers in float32 on dequantized int8 inputs: "
            "only float ops read their outputs, and LiteRT has no int8 kernel with a float "
            "output. quantaware.deploy.quantize_for_backend(..., backend='litert') keeps "
            "such outputs int8 where that costs little (or set LayerOverride(name, "
            "integer_output=True))", floats, len(linears))


def _exact_int8_rows(fb: _Flatbuffer, tensor: Any,
                     buffer_users: dict[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(codes, row_scales)`` of a constant float32 weight (rows along its first axis)
    that is exactly ``codes * row_scales`` with symmetric int8 codes reaching +-127
    in each row."""
    schema = fb.schema
    if (tensor.type != schema.TensorType.FLOAT32 or not tensor.buffer
            or buffer_users.get(tensor.buffer) != 1 or tensor.shape is None
            or len(tensor.shape) < 2):
        return None
    raw = fb.model.buffers[tensor.buffer].data
    if raw is None or len(raw) != 4 * int(np.prod(tensor.shape)):
        return None
    weight = np.frombuffer(bytes(bytearray(raw)), np.float32).reshape(tensor.shape[0], -1)
    scales = (np.abs(weight).max(axis=1) / np.float32(127)).astype(np.float32)
    scales[scales == 0] = 1.0
    codes = np.round(weight / scales[:, None])
    if not np.array_equal((codes * scales[:, None]).astype(np.float32), weight):
        return None
    return codes.astype(np.int8), scales


def _dequantized_weight(fb: _Flatbuffer, op: Any, codes: np.ndarray,
                        scales: np.ndarray) -> Any:
    """Point ``op``'s weight input at a ``DEQUANTIZE`` of int8 ``codes``; return that op."""
    schema, graph = fb.schema, fb.graph
    old = graph.tensors[op.inputs[1]]
    int8 = schema.TensorT()
    int8.shape, int8.type = old.shape, schema.TensorType.INT8
    int8.name = (old.name.decode() if isinstance(old.name, bytes) else old.name) + "_int8"
    int8.buffer, int8.quantization = _row_codes(fb, old, codes, scales)
    graph.tensors.append(int8)
    old.buffer = 0  # now computed by the DEQUANTIZE
    dequantize = fb.op(schema.BuiltinOperator.DEQUANTIZE, [len(graph.tensors) - 1],
                       [op.inputs[1]])
    return dequantize


def _int8_table(fb: _Flatbuffer, table: Any, codes: np.ndarray, scales: np.ndarray) -> None:
    """Make the constant ``table`` of an ``EMBEDDING_LOOKUP`` int8 ``codes`` with a
    scale per row (LiteRT's hybrid lookup: int8 table, float32 output)."""
    table.buffer, table.quantization = _row_codes(fb, table, codes, scales)
    table.type = fb.schema.TensorType.INT8


def _row_codes(fb: _Flatbuffer, weight: Any, codes: np.ndarray,
               scales: np.ndarray) -> tuple[int, Any]:
    """A new buffer holding ``codes`` in place of ``weight``'s float32 data (which is
    dropped), and the per-row quantization: ``(buffer index, parameters)``."""
    schema = fb.schema
    buffer = schema.BufferT()
    buffer.data = codes.tobytes()
    fb.model.buffers.append(buffer)
    fb.model.buffers[weight.buffer].data = None  # the float32 copy is no longer read
    quantization = schema.QuantizationParametersT()
    quantization.scale = scales.tolist()
    quantization.zeroPoint = [0] * len(scales)
    quantization.quantizedDimension = 0
    return len(fb.model.buffers) - 1, quantization


def _float_hardswish(content: bytes) -> bytes:
    """Run each int8 ``HARD_SWISH`` as ``DEQUANTIZE`` -> float32 ``HARD_SWISH`` ->
    ``QUANTIZE`` (same grids). XNNPACK has no int8 hardswish: the int8 op ran in the
    interpreter's own kernel, slowly, and split the graph between XNNPACK and it (a
    conv -> Hardswish -> conv block took 3x the float file's time)."""
    fb = _Flatbuffer(content)
    graph, ops, int8 = fb.graph, fb.schema.BuiltinOperator, fb.schema.TensorType.INT8
    rewritten = []
    for op in graph.operators:
        if (fb.builtin(op.opcodeIndex) != ops.HARD_SWISH
                or any(graph.tensors[i].type != int8 for i in (*op.inputs, *op.outputs))):
            rewritten.append(op)
            continue
        (x,), (y,) = op.inputs, op.outputs
        x_float, y_float = fb.float_twin(x, "_dequantized"), fb.float_twin(y, "_float")
        rewritten += [fb.op(ops.DEQUANTIZE, [x], [x_float]),
                      fb.op(ops.HARD_SWISH, [x_float], [y_float]),
                      fb.op(ops.QUANTIZE, [y_float], [y])]
    if len(rewritten) == len(graph.operators):
        return content
    graph.operators = rewritten
    return fb.content()


def _composites(content: bytes) -> list[str]:
    """Names of the composite ops (``STABLEHLO_COMPOSITE``, run through their float
    decomposition) in the main graph of a ``.tflite`` file."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    names = []
    for op in model.subgraphs[0].operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == \
                schema.BuiltinOperator.STABLEHLO_COMPOSITE:
            name = getattr(op.builtinOptions2, "name", None) or b"a composite op"
            names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names


def _has_quantizers(model: nn.Module) -> bool:
    from quantaware.fake_quant import FakeQuantizer

    return any(isinstance(m, FakeQuantizer) for m in model.modules())


def _broadcast_problem(name: str, x: Any, out: Any) -> str | None:
    """What LiteRT may get wrong in a 4-d ``expand``/``broadcast_to``/``repeat``/
    ``tile`` that changes a size, or ``None``."""
    if (not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor)
            or x.dim() != 4 or out.dim() != 4 or x.shape == out.shape):
        return None
    fix = ("rely on broadcasting instead (y + g, not y + g.expand_as(y))"
           if name in ("expand", "expand_as", "broadcast_to")
           else "concatenate instead (torch.cat([x, x], 1), not x.repeat(1, 2, 1, 1))")
    return (f"a 4-d {name} from {tuple(x.shape)} to {tuple(out.shape)}: LiteRT's converter "
            f"can move it to its channels-last layout wrongly, also in float; {fix}, or "
            "export to ONNX")


# Converted right in some graphs (an attention mask, a pooled context before a
# reduction) and wrongly in others (before a conv): checked on the file, not refused.
_EXPANDS = ("expand", "expand_as", "broadcast_to", "repeat", "tile")


def _call_problem(func: Any, args: tuple, kwargs: dict, out: Any,
                  quantized: bool) -> str | None:
    """What LiteRT computes differently from torch in one torch call, or ``None``."""
    name = getattr(func, "__name__", "")
    x = args[0] if args else kwargs.get("input")
    if name in ("expand", "expand_as", "broadcast_to", "repeat", "tile"):
        return _broadcast_problem(name, x, out)
    if name.startswith("adaptive_max_pool"):
        return (f"{name}: LiteRT has no adaptive max pooling, also in float; use "
                "nn.MaxPool2d with a fixed kernel (or x.amax((2, 3), keepdim=True) for a "
                "global one), or export to ONNX")
    if func is not F.interpolate or not isinstance(x, torch.Tensor):
        return None
    mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
    if kwargs.get("antialias", args[6] if len(args) > 6 else False):
        return (f"a {mode} resize with antialias=True: LiteRT has no antialiased resize, "
                "also in float; set antialias=False (or average-pool before the resize), "
                "or export to ONNX")
    if mode == "bicubic" and quantized:
        return ("a bicubic resize: LiteRT's converter lays out its int8 form wrongly (wrong "
                "outputs or a failed conversion; the float file is right); use "
                "mode='bilinear', or export to ONNX")
    if (mode == "nearest" and isinstance(out, torch.Tensor)
            and any(o % i for i, o in zip(x.shape[2:], out.shape[2:], strict=True))):
        return (f"a nearest resize from {tuple(x.shape[2:])} to {tuple(out.shape[2:])} is not "
                "an integer upscale: LiteRT's nearest resize picks other pixels than "
                "torch's mode='nearest' (half-pixel centres), also in float; use "
                "mode='nearest-exact' (the same pixels in torch and LiteRT) or an integer "
                "scale factor, or export to ONNX")
    return None


def _litert_layer_problem(model: nn.Module, example_inputs: tuple,
                          quantized: bool = False) -> tuple[str | None, str | None]:
    """``(problem, suspect)``: what in ``model`` LiteRT computes differently from
    torch or cannot convert (found by running the example once), and a 4-d
    ``expand``/``broadcast_to``/``repeat``/``tile`` that changes a size, which the
    converter gets right in some graphs and wrong in others (the file is checked
    then). Problems:

    - a 1-d transposed conv with ``output_padding`` (its last position is wrong; the
      2-d form fails to convert);
    - a ``nearest`` resize that is not an integer upscale (LiteRT's nearest resize
      picks pixels at half-pixel centres, torch's ``nearest`` at their corners);
    - adaptive max pooling and antialiased resizes (no LiteRT form), and bicubic
      resizes in an int8 file.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.ConvTranspose1d) and any(module.output_padding):
            return (f"{name} (ConvTranspose1d, output_padding={module.output_padding}): "
                    "LiteRT computes its last output position wrongly, also in float; "
                    "change the layer (pad its output instead), or export to ONNX"), None
    found: list[str] = []
    suspects: list[str] = []

    class Calls(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if not found:
                problem = _call_problem(func, args, kwargs, out, quantized)
                if problem is not None:
                    (suspects if getattr(func, "__name__", "") in _EXPANDS
                     else found).append(problem)
            return out

    try:
        with torch.no_grad(), frozen(model), Calls():
            out = model(*example_inputs)
    except Exception:  # the conversion reports a model that does not run
        return None, None
    problem = found[0] if found else _output_problem(out)
    return problem, suspects[0] if suspects else None


def _litert_mismatch(content: bytes, model: nn.Module, example_inputs: tuple) -> str | None:
    """How the LiteRT file fails to compute what ``model`` does on ``example_inputs``,
    or ``None``: it must run, an int8 file within a few output steps of its
    reference, a float file near the float model (a layout slip is off by tens of
    steps)."""
    import tempfile

    from quantaware.export.verify import verify

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "check.tflite"
        path.write_bytes(content)
        try:  # one batch holding the example's inputs, ((x1, x2),): no labels
            report = verify(path, model, [(tuple(example_inputs),)], check_layers=False,
                            threads=1, backend="litert")
        except Exception as exc:  # the backend's own errors, whatever their type
            return f"LiteRT cannot run it ({str(exc)[:300]})"
    if report.max_error_lsb is not None:
        if report.max_error_lsb <= 8 + 1e-3 and math.isfinite(report.cosine):
            return None
        return f"{report.max_error_lsb:.0f} output steps off"
    if report.cosine >= 0.999 and (report.relative_error or 0.0) <= 0.01:
        return None
    return f"{100 * (report.relative_error or 0.0):.1f}% off, cosine {report.cosine:.4f}"


def _output_problem(out: Any, where: str = "output") -> str | None:
    """Why LiteRT cannot return ``out`` (a ``None`` or non-tensor entry, a named
    tuple), or ``None``: a file's outputs are tensors."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return (f"the model's {where} is a named tuple ({type(out).__name__}), which "
                "LiteRT's converter cannot return; return a plain tuple or a dict of "
                "tensors, or export to ONNX")
    if isinstance(out, dict):
        items = [(f"{where}[{k!r}]", v) for k, v in out.items()]
    elif isinstance(out, tuple | list):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(out)]
    else:
        return (f"the model's {where} is {type(out).__name__}, not a tensor; a LiteRT file "
                "returns tensors: leave it out of forward()'s outputs")
    for name, value in items:
        problem = _output_problem(value, name)
        if problem is not None:
            return problem
    return None


def export_tflite(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | tuple,
    *,
    int8_io: bool = False,
) -> Path:
    """Write ``model`` as a LiteRT (TFLite) flatbuffer to ``path`` (atomically).

    A prepared model (calibrated or trained) becomes a full-integer file whose
    scales and zero points are the model's own; a float model becomes a float
    file (the baseline to compare against). Shapes are those of
    ``example_inputs`` (LiteRT files have static shapes).

    Args:
        model: a model from :func:`quantaware.prepare` / QAT, or a float model.
        path: the ``.tflite`` file to write; its folder is created if needed.
        example_inputs: a tensor or tuple of positional inputs.
        int8_io: keep int8 inputs and outputs (the caller quantizes inputs with
            the input tensor's scale and zero point, as LiteRT reports them)
            instead of float32 ones.

    Raises:
        ImportError: litert-torch or ai-edge-litert is not installed.
        ExportError: the model uses something LiteRT has no integer form of
            (dynamic or narrower-than-8-bit activations, asymmetric or 16-bit
            weights) or fails to convert; the message says what to change.

    Example:
        >>> import torch, tempfile, os
        >>> from quantaware import presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(16, 4)
        >>> q = quantize(net, presets.INT8, [x], x[:1])
        >>> export_tflite(q, os.path.join(tempfile.mkdtemp(), "m.tflite"), x[:1]).suffix
        '.tflite'
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    path = Path(path)
    litert_torch, quant_config, _ = _import_litert()
    quantized = _has_quantizers(model)
    config = getattr(model, "quantaware_config", None)  # FP16 models have no FakeQuantizer
    problem = litert_problem(config) if config is not None else None
    suspect = None
    if problem is None:  # on a copy: the forward pass must not calibrate the caller's
        problem, suspect = _litert_layer_problem(copy.deepcopy(model), example_inputs,
                                                 quantized)
    if problem is not None:
        raise ExportError(problem)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), quiet_loggers("root"):
            warnings.simplefilter("ignore")
            if quantized:
                program = torch.export.export(_export_copy(model), example_inputs)
                rewritten = program.module()
                rewriter = _Rewriter(rewritten)
                rewriter.run()
                # A fresh module keeps only the constants the graph uses (the
                # quantizers' flags and integer tables would become constants).
                module = fx.GraphModule(rewritten, rewritten.graph)
            else:
                module = model
            with frozen(model):  # eval mode for the conversion, the caller's mode after
                edge = litert_torch.convert(module, example_inputs,
                                            quant_config=quant_config if quantized else None)
            content = bytes(edge.model_content())
    except ExportError:
        raise
    except Exception as exc:
        hint = ""
        if "mhlo.convolution" in str(exc) and "lhs_dilation" in str(exc):
            hint = (" (a transposed conv LiteRT's converter cannot lower, also in float: "
                    "output_padding, or a padding/dilation that leaves the output "
                    "asymmetric; change the layer, or export to ONNX)")
        if not hint and suspect is not None:
            hint = f" ({suspect})"
        if not hint:
            hint = dtype_hint(example_inputs, {}, model)
        raise ExportError(
            f"LiteRT conversion failed for {type(model).__name__}{hint}: "
            f"{_export_failure(exc)}") from exc
    if quantized:
        for layer, why in rewriter.float_layers:
            log.warning("LiteRT runs %s in float32: it is %s", layer, why)
        for layer, short, channels in rewriter.rescaled:
            log.warning("LiteRT's converter quantizes the weights of transposed convolutions "
                        "itself, with scale max|w| / 127 per output channel: %d of %d output "
                        "channels of %s have codes below 127 (per-tensor or fewer-than-8-bit "
                        "weights, or a clipped or learned range), so their scales and codes in "
                        "the file differ from the model's by rounding (quantaware.verify "
                        "compares against the file's)", short, channels,
                        layer)
        for name in _composites(content):
            log.warning("LiteRT runs %s in float32: its converter wrote it as a composite op "
                        "with no int8 kernel (for average pooling: count_include_pad=True or "
                        "no padding gives an int8 AVERAGE_POOL_2D)", name)
    if quantized:
        content = _int8_float_weights(_float_hardswish(content),
                                      warn_float_linears=not _chose_outputs(model))
    if quantized and not int8_io:
        content = _float_interface(content)
    # The file run once on the example: a converter slip is caught here rather than
    # on a device (one Linear read by several grids, q/k/v split from a fused qkv,
    # was put on one of them and the others clipped).
    mismatch = None if int8_io else _litert_mismatch(content, model, example_inputs)
    if mismatch is not None and suspect is not None:
        raise ExportError(f"the LiteRT file does not compute what the model does on the "
                          f"example ({mismatch}): {suspect}")
    if mismatch is not None:
        log.warning("the LiteRT file does not compute what %s does on the example (%s); "
                    "quantaware.verify(..., backend='litert') names the first layer that "
                    "differs, and export to ONNX keeps the model's values",
                    type(model).__name__, mismatch)
    write_bytes(path, content)
    log.info("wrote %s (%d bytes)", path, len(content))
    return path


def tflite_ops(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """``(op name, input dtypes)`` for every op of a ``.tflite`` file, in order.

    Example:
        >>> import torch, tempfile, os
        >>> from quantaware import presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> x = torch.randn(16, 4)
        >>> p = export_tflite(quantize(net, presets.INT8, [x], x[:1]),
        ...                   os.path.join(tempfile.mkdtemp(), "m.tflite"), x[:1])
        >>> [name for name, _ in tflite_ops(p)]
        ['QUANTIZE', 'FULLY_CONNECTED', 'DEQUANTIZE']
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    rows = []
    for graph in model.subgraphs:
        for op in graph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            dtypes = [types[graph.tensors[i].type] for i in op.inputs if i >= 0]
            rows.append((name, dtypes))
    return rows


def output_scales(path: str | os.PathLike) -> list[float | None]:
    """The quantization step of each output of a ``.tflite`` file (read at its
    ``DEQUANTIZE`` for a float interface), ``None`` for a float output.

    Example:
        >>> import torch, tempfile, os
        >>> from quantaware import presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> x = torch.randn(16, 4)
        >>> q = quantize(net, presets.INT8, [x], x[:1])
        >>> p = export_tflite(q, os.path.join(tempfile.mkdtemp(), "m.tflite"), x[:1])
        >>> output_scales(p)[0] > 0
        True
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    graph = model.subgraphs[0]
    dequantized = {}  # a DEQUANTIZE's output -> its int8 input
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode,
               code.deprecatedBuiltinCode) == schema.BuiltinOperator.DEQUANTIZE:
            dequantized[op.outputs[0]] = op.inputs[0]
    scales: list[float | None] = []
    for index in graph.outputs:
        quant = graph.tensors[dequantized.get(index, index)].quantization
        has_scale = quant is not None and quant.scale is not None and len(quant.scale) > 0
        scales.append(float(np.max(quant.scale)) if has_scale else None)
    return scales


def output_scale(path: str | os.PathLike) -> float | None:
    """The quantization step of the first output of a ``.tflite`` file, or ``None``
    for a float output (:func:`output_scales` for every output)."""
    return output_scales(path)[0]


def _torch_layouts(value: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """A LiteRT tensor read in the torch layout ``shape``: NHWC images (LiteRT's
    layout) transposed back first, then the tensor as it is. Both when a square
    image has as many channels as rows (32x32x32 reads either way); a matrix also
    transposed (a constant matmul operand stored as a ``FULLY_CONNECTED`` weight,
    which keeps the shape of a square one)."""
    layouts = []
    if value.ndim == 4 and len(shape) == 4 and value.transpose(0, 3, 1, 2).shape == shape:
        layouts.append(value.transpose(0, 3, 1, 2))
    if value.shape == shape:
        layouts.append(value)
    if value.ndim == 2 and value.T.shape == shape:
        layouts.append(value.T)
    return layouts


def litert_layer_codes(path: str | os.PathLike, inputs: list[np.ndarray],
                       wanted: dict[str, tuple[float, int, np.ndarray]],
                       threads: int = 2) -> dict[str, tuple[str, np.ndarray]]:
    """The int8 codes LiteRT computes for quantized activations, found by their qparams.

    LiteRT keeps every intermediate tensor when asked (``experimental_preserve_all_
    tensors``); a quantizer's tensor is the int8 tensor with the quantizer's scale
    (bit for bit), its int8 zero point and its shape (NHWC images are transposed
    back). Where several tensors share all three (a residual add's output and a
    layer written straight onto the same grid), the one closest to ``wanted``'s
    reference codes is taken.

    Args:
        path: the ``.tflite`` file.
        inputs: one array per model input, at the file's static shapes.
        wanted: per quantizer name ``(scale, int8 zero point, reference int8 codes)``.

    Returns:
        per quantizer found ``("index:tensor name", int8 codes in torch layout)``.
    """
    from quantaware.backends import _import_litert, _LiteRTTensor

    with warnings.catch_warnings(), native_stderr_filtered():
        warnings.simplefilter("ignore", UserWarning)  # "intended for debugging": it is here
        interp = _import_litert().Interpreter(
            model_path=str(path), num_threads=threads, experimental_preserve_all_tensors=True)
        interp.allocate_tensors()
    for detail, array in zip(interp.get_input_details(), inputs, strict=True):
        interp.set_tensor(detail["index"], _LiteRTTensor.of(detail).to_input(np.asarray(array)))
    interp.invoke()
    by_key: dict[tuple[float, int], list[tuple[int, str, np.ndarray]]] = {}
    for detail in interp.get_tensor_details():
        scale, zero_point = detail["quantization"]
        if np.dtype(detail["dtype"]) != np.int8 or not scale:
            continue
        try:
            value = interp.get_tensor(detail["index"])
        except ValueError:  # constants folded away, scratch tensors
            continue
        by_key.setdefault((float(np.float32(scale)), int(zero_point)), []).append(
            (detail["index"], detail["name"], value))
    found: dict[str, tuple[int, str, np.ndarray]] = {}
    for name, (scale, zero_point, codes) in wanted.items():
        best: tuple[int, int, str, np.ndarray] | None = None
        for index, tensor, value in by_key.get((float(np.float32(scale)), zero_point), []):
            for candidate in _torch_layouts(value, codes.shape):
                diff = int(np.abs(candidate.astype(np.int64) - codes).max()) if codes.size else 0
                if best is None or diff < best[0]:
                    best = (diff, index, tensor, candidate)
        if best is not None:
            found[name] = best[1:]
    ordered = sorted(found.items(), key=lambda item: item[1][0])  # execution order
    return {name: (f"{index}:{tensor}", codes) for name, (index, tensor, codes) in ordered}
