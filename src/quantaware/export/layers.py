"""Layer-by-layer comparison of an exported model with its torch model.

Every static activation quantizer of a prepared model becomes one ONNX
``QuantizeLinear`` whose scale initializer is named after it
(``<module path>.output_quantizer.scale``). Exposing those integer tensors as
extra graph outputs and recording the same quantizers' outputs in torch (as
integer codes, ``round(y / scale) + zero_point``) compares the two runs tensor by
tensor in graph order. The first quantizer whose codes differ by more than one
LSB is where the deployed model stops computing what the torch model computes;
everything before it agrees within integer-vs-float rounding.

Example:
    >>> import torch, tempfile, os, quantaware
    >>> from quantaware import presets
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = torch.randn(64, 4)
    >>> q = quantaware.quantize(net, presets.INT8, [x], x[:1])
    >>> path = quantaware.export_onnx(q, os.path.join(tempfile.mkdtemp(), "m.onnx"), x[:1])
    >>> rows = compare_layers(path, q, x)
    >>> rows[0].name, first_divergence(rows) is None
    ('0.input_quantizer', True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from quantaware._batch import model_device, split_batch, to_device
from quantaware.bench import create_session
from quantaware.fake_quant import FakeQuantizer

__all__ = ["LayerDiff", "activation_quantizers", "compare_layers", "diff_rows", "first_divergence"]

_SCALE_SUFFIX = ".scale"


@dataclass(frozen=True)
class LayerDiff:
    """How one quantized tensor differs between ONNX Runtime and torch.

    Attributes:
        name: the torch quantizer (e.g. ``features.3.conv.0.output_quantizer``).
        onnx_tensor: the ``QuantizeLinear`` output it corresponds to.
        max_lsb: largest difference of the integer codes.
        mismatch: fraction of elements whose codes differ at all.
    """

    name: str
    onnx_tensor: str
    max_lsb: int
    mismatch: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_divergence(rows: list[LayerDiff], max_lsb: int = 1) -> LayerDiff | None:
    """The first row (in graph order) whose codes differ by more than ``max_lsb``."""
    return next((row for row in rows if row.max_lsb > max_lsb), None)


_Key = tuple[float, int]
# ONNX ops that only copy or rearrange values (and a Resize in nearest mode).
_COPYING_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze",
                          "Unsqueeze", "Identity"})


def _copies(node: onnx.NodeProto) -> bool:
    if node.op_type == "Resize":
        return any(a.name == "mode" and a.s == b"nearest" for a in node.attribute)
    return node.op_type in _COPYING_OPS


def _quantize_nodes(proto: onnx.ModelProto, names: set[str]) -> list[tuple[str, str, _Key]]:
    """``(quantizer name, Q output, (scale, zero point))`` for Q nodes whose scale is
    named after a quantizer; the qparams are read from the file."""
    from onnx import numpy_helper

    consts = {i.name: i for i in proto.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in proto.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})

    def value(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(consts[name]) if name in consts else None

    producers = {out: n for n in proto.graph.node for out in n.output}

    def regrids(node: onnx.NodeProto) -> bool:
        """Whether ``node`` quantizes codes copied by value-preserving ops (a nearest
        resize, max pooling, reshapes) back onto the grid they were dequantized from:
        a quantizer's codes again, not a tensor of its own."""
        producer = producers.get(node.input[0])
        while producer is not None and _copies(producer):
            producer = producers.get(producer.input[0])
        return (producer is not None and producer.op_type == "DequantizeLinear"
                and producer.input[1] == node.input[1])

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def codes_of(node: onnx.NodeProto) -> str:
        """The quantizer's codes: a format narrower than its storage (4-bit, narrow
        range) saturates in a ``Clip`` after the ``QuantizeLinear`` (16-bit storage:
        ``Cast`` to int32, ``Clip``, ``Cast`` back)."""
        def only_user(name: str, op_type: str) -> onnx.NodeProto | None:
            users = consumers.get(name, [])
            return users[0] if len(users) == 1 and users[0].op_type == op_type else None

        clip = only_user(node.output[0], "Clip")
        if clip is not None:
            return clip.output[0]
        widen = only_user(node.output[0], "Cast")
        clip = only_user(widen.output[0], "Clip") if widen is not None else None
        back = only_user(clip.output[0], "Cast") if clip is not None else None
        return back.output[0] if back is not None else node.output[0]

    found = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 2 or regrids(node):
            continue
        scale = node.input[1]
        name = scale[: -len(_SCALE_SUFFIX)] if scale.endswith(_SCALE_SUFFIX) else None
        if name not in names:
            continue
        s = value(scale)
        zp = value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
        if s is None or zp is None or s.size != 1 or zp.size != 1:
            continue
        found.append((name, codes_of(node), (float(np.float32(s.item())), int(zp.item()))))
    return found


def _key(q: FakeQuantizer) -> _Key:
    scale, zero_point = q.deployed_qparams()
    return float(scale.float().reshape(-1)[0]), int(zero_point.reshape(-1)[0])


def _disambiguate(pairs: list[tuple[str, str, _Key]], quantizers: dict[str, FakeQuantizer],
                  order: list[str]) -> list[tuple[str, str]]:
    """Pair each Q node with its quantizer when several share one scale constant.

    The exporter stores equal constants once, so quantizers with identical
    scales (two ReLU6 outputs calibrated to ``[0, 6]``, or several dead channels'
    tiny ranges) leave several Q nodes reading the first one's scale. Among
    quantizers with the Q node's own scale and zero point, the k-th such Q node
    in graph order is the k-th quantizer in execution order.
    """
    groups: dict[_Key, list[str]] = {}
    for name in order:
        groups.setdefault(_key(quantizers[name]), []).append(name)
    used: dict[_Key, int] = {}
    out = []
    for name, tensor, key in pairs:
        members = groups.get(key, [name])
        i = used.get(key, 0)
        used[key] = i + 1
        out.append((members[i] if i < len(members) else name, tensor))
    return out


def _torch_codes(model: nn.Module, quantizers: dict[str, FakeQuantizer],
                 batch: Any) -> dict[str, np.ndarray]:
    codes: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}

    def hook(name: str, q: FakeQuantizer):
        def record(_module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            scale, zero_point = q.deployed_qparams()
            scale = scale.reshape(-1)[0] if scale.dim() else scale
            value = torch.round(output.detach().float() / scale) + zero_point.float()
            codes[name] = value.cpu().numpy().astype(np.int64)
        return record

    handles = [q.register_forward_hook(hook(n, q)) for n, q in quantizers.items()]
    try:
        args, kwargs = to_device(*split_batch(batch), model_device(model))
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    # A quantizer of a layer called at several sites has no one tensor to compare.
    return {name: value for name, value in codes.items() if calls[name] == 1}


def activation_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """The enabled static per-tensor activation quantizers of ``model``, by name:
    the ones whose codes the exported graph holds as ``QuantizeLinear`` outputs."""
    return {
        name: q for name, q in model.named_modules()
        if isinstance(q, FakeQuantizer) and not q.from_tensor and q.axis is None
        and bool(q.fake_quant_enabled)
    }


def diff_rows(pairs: list[tuple[str, str]], ref: dict[str, np.ndarray],
              values: dict[str, np.ndarray]) -> list[LayerDiff]:
    """One :class:`LayerDiff` per ``(quantizer, tensor)`` pair observed on both sides."""
    rows = []
    for name, tensor in pairs:
        if tensor not in values or name not in ref or ref[name].shape != values[tensor].shape:
            continue  # not observed, or a quantizer the torch forward did not run on it
        diff = np.abs(ref[name] - values[tensor].astype(np.int64))
        rows.append(LayerDiff(name, tensor, int(diff.max()) if diff.size else 0,
                              float((diff > 0).mean()) if diff.size else 0.0))
    return rows


def compare_layers(onnx_path: str | Path, model: nn.Module, batch: Any,
                   threads: int = 2) -> list[LayerDiff]:
    """Compare every static per-tensor activation quantizer's codes, in graph order.

    Args:
        onnx_path: a model written by :func:`quantaware.export_onnx`.
        model: the prepared torch model it came from.
        batch: one batch (tensor, ``(inputs, ...)`` tuple or dict of inputs).

    Returns:
        One :class:`LayerDiff` per quantizer found in both (empty for float models).
    """

    model.eval()
    quantizers = activation_quantizers(model)
    proto = onnx.load(str(onnx_path))
    pairs = _quantize_nodes(proto, set(quantizers))
    if not pairs:
        return []
    existing = {o.name for o in proto.graph.output}
    for _, tensor, _ in pairs:
        if tensor not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=tensor))
    session = create_session(proto.SerializeToString(), threads)
    args, kwargs = split_batch(batch)
    input_names = [i.name for i in session.get_inputs()]
    if args:
        feed = {n: a.detach().cpu().numpy() for n, a in zip(input_names, args, strict=False)}
    else:
        feed = {k: v.detach().cpu().numpy() for k, v in kwargs.items() if k in input_names}
    wanted = [tensor for _, tensor, _ in pairs]
    ort_values = dict(zip(wanted, session.run(wanted, feed), strict=True))
    ref = _torch_codes(model, quantizers, batch)
    return diff_rows(_disambiguate(pairs, quantizers, list(ref)), ref, ort_values)
