"""Verify that an exported ONNX model computes what the torch model computes.

Both run on the same inputs; the report gives top-1 agreement, mean cosine
similarity and the largest difference in units of the output's quantization
step (LSB) where the ONNX output comes out of a ``DequantizeLinear``. For a
prepared model it also compares every quantized activation on the first batch
(:mod:`quantaware.export.layers`) and names the first layer where the inference
backend and torch differ.

The ONNX file runs in ONNX Runtime (default) or OpenVINO
(:mod:`quantaware.backends`). OpenVINO compiles a graph as a whole: a
quantized tensor exposed as an extra graph output can change how it fuses the
neighbouring quantize steps, and with it what the model computes. So on
OpenVINO a layer's codes are only compared when exposing them leaves the
model's own outputs bit for bit unchanged (all layers exposed at once, or else
one at a time); the others are counted as unavailable, not compared.

The torch side is the model run with ONNX Runtime's integer arithmetic
(:func:`quantaware.export.integer.integer_arithmetic`): its quantized layers
accumulate in int32 and rescale in float32 as the deployed kernels do, so a
correct export agrees bit for bit and any difference is a real divergence. The
report also gives the agreement with the fake-quant forward (what training and
PTQ evaluation run): it accumulates in float, so a value within rounding error
of a tie can round the other way, and a deep network amplifies such flips.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from quantaware._batch import (
    backend_feed,
    check_finite,
    forward_parameters,
    model_device,
    positional,
    split_batch,
    to_device,
)
from quantaware.backends import (
    BackendSession,
    check_backend,
    create_backend_session,
    element_type_name,
)
from quantaware.export.integer import fake_quant_arithmetic, int8_code, integer_arithmetic
from quantaware.export.layers import (
    LayerDiff,
    _disambiguate,
    _quantize_nodes,
    _torch_codes,
    activation_quantizers,
    compare_layers,
    diff_rows,
    first_divergence,
)
from quantaware.fake_quant import frozen

__all__ = ["VerifyReport", "verify"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    """Agreement between an ONNX model (as an inference backend runs it) and a torch model.

    Attributes:
        num_samples: samples compared.
        top1_agreement: fraction (0..1) of samples with the same arg-max class
            (over the last axis; a sequence of scores agrees when every position
            does). For dense maps ``(N, C, H, W, ...)``, as segmentation models
            output, the fraction of positions whose arg-max over the class axis
            ``C`` agrees.
        cosine: mean cosine similarity of per-sample outputs.
        min_cosine: the worst sample's cosine similarity.
        max_abs_error: largest absolute difference.
        max_error_lsb: ``max_abs_error`` in output quantization steps, or ``None``
            when the output is not quantized.
        output_scale: the output's quantization step, if quantized.
        layers_checked: quantized activations compared layer by layer (first batch).
        layers_unavailable: quantized activations the backend could not expose
            without changing what it computes (OpenVINO), so not compared.
        first_divergent_layer: the first quantizer (graph order) whose integer codes
            differ (by more than one LSB when some layers are compared with the
            fake-quant forward), or ``None`` if every layer agrees.
        first_divergent_lsb: that layer's largest code difference.
        reference: ``"integer"`` when the torch model ran ONNX Runtime's integer
            arithmetic (``integer_layers`` of its quantized layers exactly, the
            rest in fake-quant), ``"fake-quant"`` otherwise.
        integer_layers: quantized layers run integer-exact.
        fake_quant_layers: quantized layers without an integer-exact form.
        fake_quant_top1_agreement: top-1 agreement of the backend with the
            fake-quant forward (``None`` when that is the reference itself).
        fake_quant_cosine: mean cosine similarity with the fake-quant forward.
        fake_quant_max_error_lsb: the backend's largest error against the fake-quant
            forward in output steps (``None`` when that is the reference, or the
            output is float). More than a step or two means the backend computes
            something other than what the model trained with (a converter's own
            grids), even when the file matches the integer reference.
        backend: the inference backend that ran the ONNX file
            (:data:`quantaware.backends.BACKENDS`).
        relative_error: ``|backend - reference| / |reference|`` (Euclidean norms over
            all samples; the worst output's): catches a float output that is off
            by a factor, which the cosine does not see.
        num_outputs: outputs compared. With several (a tuple, list or dict of
            tensors), a sample agrees when it agrees on every output, its cosine is
            its worst output's, and the error is the worst output's (in its own
            quantization steps).
    """

    num_samples: int
    top1_agreement: float
    cosine: float
    min_cosine: float
    max_abs_error: float
    max_error_lsb: float | None
    output_scale: float | None
    layers_checked: int = 0
    first_divergent_layer: str | None = None
    first_divergent_lsb: int | None = None
    reference: str = "fake-quant"
    integer_layers: int = 0
    fake_quant_layers: int = 0
    fake_quant_top1_agreement: float | None = None
    fake_quant_cosine: float | None = None
    layers_unavailable: int = 0
    backend: str = "onnxruntime"
    num_outputs: int = 1
    fake_quant_max_error_lsb: float | None = None
    relative_error: float | None = None

    def passed(self, min_agreement: float = 0.99, max_lsb: float = 1.0,
               min_cosine: float = 0.999, max_relative_error: float = 0.05) -> bool:
        """True if agreement and the error are within bounds (the LSB error where the
        output is quantized, else the mean cosine and the relative error), and the
        file's outputs are finite."""
        # Outputs are float32 values (q - zp) * scale: one step can read as 1.00002 LSB.
        lsb_ok = (self.cosine >= min_cosine
                  and (self.relative_error or 0.0) <= max_relative_error
                  if self.max_error_lsb is None
                  else self.max_error_lsb <= max_lsb + 1e-3)
        # NaN/Inf in the file's outputs (where the model's are finite) fail.
        finite = math.isfinite(self.max_abs_error) and math.isfinite(self.cosine)
        return self.top1_agreement >= min_agreement and lsb_ok and finite

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lsb = (f"{100 * (self.relative_error or 0.0):.2f}% of the output (float output)"
               if self.max_error_lsb is None
               else f"{self.max_error_lsb:.2f} LSB (step {self.output_scale:.4g})")
        verdict = "PASS" if self.passed() else "CHECK"
        where = "" if self.backend == "onnxruntime" else f" in {self.backend}"
        if not self.layers_checked and self.layers_unavailable and self.backend == "litert":
            layers = (f"not compared in litert (none of the {self.layers_unavailable} "
                      "quantized activations has a tensor with its qparams in the file)")
        elif not self.layers_checked and self.layers_unavailable:
            layers = (f"not available in {self.backend} (none of the "
                      f"{self.layers_unavailable} quantized activations could be exposed "
                      "without changing its result)")
        elif not self.layers_checked:
            layers = "not checked (no static activation quantizers)"
        elif self.first_divergent_layer is None:
            exact = self.reference == "integer" and not self.fake_quant_layers
            layers = (f"all {self.layers_checked} quantized activations "
                      + ("identical" if exact else "within 1 LSB"))
        else:
            layers = (f"first divergence at {self.first_divergent_layer} "
                      f"({self.first_divergent_lsb} LSB; {self.layers_checked} checked)")
        if self.layers_checked and self.layers_unavailable:
            layers += f"; {self.layers_unavailable} not observable in {self.backend}"
        if self.reference == "integer":
            total = self.integer_layers + self.fake_quant_layers
            kernels = "LiteRT's" if self.backend == "litert" else "ONNX Runtime's"
            reference = (f"torch with {kernels} integer arithmetic "
                         f"({self.integer_layers} of {total} quantized layers exact)")
        else:
            reference = "torch fake-quant forward"
        lines = [
            f"verify: {verdict} on {self.num_samples} samples{where}"
            + (f", {self.num_outputs} outputs" if self.num_outputs > 1 else ""),
            f"  reference        {reference}",
            f"  top-1 agreement  {100 * self.top1_agreement:.2f}%",
            f"  cosine           {self.cosine:.6f} (min {self.min_cosine:.6f})",
            f"  max error        {self.max_abs_error:.4g} = {lsb}",
            f"  layers           {layers}",
        ]
        if self.fake_quant_top1_agreement is not None:
            gap = self.fake_quant_max_error_lsb
            line = (f"  fake-quant torch top-1 {100 * self.fake_quant_top1_agreement:.2f}%, "
                    f"cosine {self.fake_quant_cosine:.6f}")
            if gap is not None:
                line += f", max error {gap:.2f} LSB"
            if gap is not None and gap > _TIES_LSB and self.passed():
                line += (f"\n  NOTE: {self.backend} computes this file otherwise than the "
                         f"trained (fake-quant) model, by up to {gap:.0f} LSB: more than "
                         "rounding ties (the backend's own choices, which the integer "
                         "reference follows)")
            elif gap is not None and gap > _TIES_LSB:
                line += f" (more than rounding ties: {self.backend} differs from both)"
            else:
                line += " (float accumulation rounds ties differently)"
            lines.append(line)
        return "\n".join(lines)


# ops between an output's DequantizeLinear and the graph output that keep its values
_VALUE_PRESERVING = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


def _output_scales(model_proto: onnx.ModelProto) -> list[float | None]:
    """The scale of the DequantizeLinear that produces each graph output (``None``
    for a float output or a scale computed at run time), in output order."""
    graph = model_proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def scale_of(out_name: str) -> float | None:
        node = producers.get(out_name)
        while node is not None and node.op_type in _VALUE_PRESERVING:
            node = producers.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear":
            return None
        scale_name = node.input[1]
        if scale_name in inits:
            scale = numpy_helper.to_array(inits[scale_name])
        elif scale_name in consts:
            scale = numpy_helper.to_array(consts[scale_name].attribute[0].t)
        else:
            return None  # computed at run time (dynamic quantization)
        return float(np.max(scale)) if scale.size else None

    return [scale_of(output.name) for output in graph.output]


def _all_outputs(out: Any) -> list[torch.Tensor]:
    """The model's output tensors in the order the exported file lists them
    (tuples and lists in order, dicts by insertion, ``ModelOutput`` as its tuple)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for item in out for t in _all_outputs(item)]
    return []


@dataclass(frozen=True)
class _Agreement:
    num_samples: int
    top1: float
    cosine: float
    min_cosine: float
    max_abs_error: float
    per_sample: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    per_sample_cosine: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    scale: float | None = None  # quantization step of the output the error is from
    outputs: int = 1
    relative: float = 0.0  # |out - ref| / |ref| over all samples


def _agreement(refs: list[Any], outs: list[Any], backend: str = "onnxruntime",
               scales: list[float | None] | None = None) -> _Agreement:
    """Agreement over batches; a batch is one array or a list of the model's outputs.

    With several outputs a sample agrees when it agrees on every output and its
    cosine is its worst output's. ``scales`` are the outputs' quantization steps
    (``None`` for a float output); the error reported is the worst output's: the
    largest error in LSBs among quantized outputs, else the largest absolute error.
    """
    refs = [r if isinstance(r, list) else [r] for r in refs]
    outs = [o if isinstance(o, list) else [o] for o in outs]
    if refs and outs and len(refs[0]) != len(outs[0]):
        raise ValueError(
            f"the torch model gives {len(refs[0])} outputs and the {backend} file "
            f"{len(outs[0])}; is this the model the file was exported from?")
    count = len(refs[0]) if refs else 0
    scales = list(scales or [])[:count]
    scales += [None] * (count - len(scales))
    parts = [_one_agreement([r[j] for r in refs], [o[j] for o in outs], backend,
                            scales[j]) for j in range(count)]
    if len(parts) == 1:
        return parts[0]
    quantized = [p for p in parts if p.scale is not None]
    worst = (max(quantized, key=lambda p: p.max_abs_error / p.scale) if quantized
             else max(parts, key=lambda p: p.max_abs_error))
    samples = np.stack([p.per_sample for p in parts]).min(axis=0)
    cosines = np.stack([p.per_sample_cosine for p in parts]).min(axis=0)
    return _Agreement(parts[0].num_samples, float(samples.mean()), float(cosines.mean()),
                      float(cosines.min()), worst.max_abs_error, samples, cosines,
                      worst.scale, len(parts), max(p.relative for p in parts))


def _one_agreement(refs: list[np.ndarray], outs: list[np.ndarray],
                   backend: str = "onnxruntime", scale: float | None = None) -> _Agreement:
    agree: list[np.ndarray] = []
    total = 0
    cosines: list[np.ndarray] = []
    max_err = 0.0
    noise = signal = 0.0
    for ref, out in zip(refs, outs, strict=True):
        if ref.shape != out.shape:
            raise ValueError(
                f"output shapes differ: torch {ref.shape} vs {backend} {out.shape}; "
                "is this the model the file was exported from?"
            )
        n = ref.shape[0] if ref.ndim > 0 else 1
        a, b = ref.reshape(n, -1).astype(np.float64), out.reshape(n, -1).astype(np.float64)
        max_err = max(max_err, float(np.max(np.abs(a - b))) if a.size else 0.0)
        noise += float(np.square(a - b).sum())
        signal += float(np.square(a).sum())
        if a.shape[1] == 1 and n > 1:
            # one value per sample (a regression output): a sample's cosine is only
            # its sign; the batch's values as one vector are compared instead
            a, b = a.T, b.T
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30),
                       np.where(np.abs(a - b).max(1) == 0, 1.0, 0.0))
        cosines.append(np.broadcast_to(cos, (n,)) if len(cos) != n else cos)
        if ref.ndim >= 4:  # dense maps (N, C, H, W, ...): positions, class axis 1
            same = _same_top1(ref, out, 1).reshape(n, -1)
            agree.append(same.mean(axis=1))
        elif ref.ndim >= 2:  # a sample agrees when every position's arg-max agrees
            same = _same_top1(ref, out, -1).reshape(n, -1)
            agree.append(same.all(axis=1).astype(np.float64))
        else:
            agree.append(np.ones(n))
        total += n
    all_cos = np.concatenate(cosines)
    per_sample = np.concatenate(agree)
    relative = (math.sqrt(noise / signal) if signal > 0
                else (0.0 if noise == 0 else math.inf))
    return _Agreement(total, float(per_sample.sum()) / total, float(all_cos.mean()),
                      float(all_cos.min()), max_err, per_sample, all_cos, scale,
                      relative=relative)


def _same_top1(ref: np.ndarray, out: np.ndarray, axis: int) -> np.ndarray:
    """Whether ``out``'s arg-max along ``axis`` is one of ``ref``'s largest values.

    Outputs on an integer grid often tie exactly; float rounding a few ulps apart
    (3e-8) then picks another of the tied classes, which is no disagreement.
    """
    chosen = np.take_along_axis(ref, np.expand_dims(out.argmax(axis), axis), axis)
    top = ref.max(axis, keepdims=True)
    tolerance = 8 * np.finfo(np.float32).eps * np.abs(ref).max(axis, keepdims=True)
    return np.squeeze(chosen >= top - tolerance, axis)


def _torch_outputs(model: nn.Module, batches: list[Any]) -> list[list[np.ndarray]]:
    device = model_device(model)
    outs = []
    for batch in batches:
        args, kwargs = to_device(*split_batch(batch), device)
        with torch.no_grad():
            outs.append([t.detach().float().cpu().numpy()
                         for t in _all_outputs(model(*args, **kwargs))])
    return outs


def _exposed_codes(proto: onnx.ModelProto, tensors: list[str], feed: dict[str, np.ndarray],
                   expected: list[np.ndarray], threads: int) -> dict[str, np.ndarray] | None:
    """``tensors`` read from OpenVINO with them added as graph outputs, or ``None``
    when OpenVINO cannot expose them or adding them changes the model's own
    outputs (it then compiled a different computation, so the codes would not
    describe the deployed model)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    own = [o.name for o in proto.graph.output]
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in own)
    try:
        session = create_backend_session(probe.SerializeToString(), "openvino", threads)
        values = dict(zip(own + tensors, session.run(own + tensors, feed), strict=True))
    except (RuntimeError, ValueError) as exc:  # OpenVINO's errors are RuntimeErrors
        log.info("OpenVINO cannot expose %d layer output(s): %s", len(tensors), exc)
        return None
    if not all(np.array_equal(values[n], e) for n, e in zip(own, expected, strict=True)):
        return None
    return {t: values[t] for t in tensors}


def _openvino_layers(proto: onnx.ModelProto, model: nn.Module, batch: Any, threads: int,
                     session: BackendSession) -> tuple[list[LayerDiff], int]:
    """:func:`~quantaware.export.layers.compare_layers` for OpenVINO: rows and the
    number of quantized activations that could not be observed faithfully.

    All quantizer outputs are exposed at once; if that changes the model's own
    outputs on ``batch``, each is exposed on its own (one compile per layer) and
    the ones that still change them are left out.
    """
    model.eval()
    quantizers = activation_quantizers(model)
    found = _quantize_nodes(proto, set(quantizers))
    if not found:
        return [], 0
    feed = backend_feed(batch, [i.name for i in session.get_inputs()])
    expected = session.run([o.name for o in proto.graph.output], feed)
    tensors = [tensor for _, tensor, _ in found]
    values = _exposed_codes(proto, tensors, feed, expected, threads)
    if values is None:
        values = {}
        for tensor in tensors:
            values.update(_exposed_codes(proto, [tensor], feed, expected, threads) or {})
    ref = _torch_codes(model, quantizers, batch)
    pairs = _disambiguate(found, quantizers, list(ref))
    return diff_rows(pairs, ref, values), len(set(tensors) - set(values))


def _litert_layers(path: Path, model: nn.Module, batch: Any, threads: int,
                   session: BackendSession) -> tuple[list[LayerDiff], int]:
    """:func:`~quantaware.export.layers.compare_layers` for a LiteRT file: the
    quantizers' codes against the file's int8 tensors with the same qparams, on
    the first sample(s) of ``batch`` (one invocation at the file's batch size)."""
    from quantaware.export.tflite import litert_layer_codes

    quantizers = activation_quantizers(model)
    args, kwargs = split_batch(batch)
    if kwargs and not args:  # the file's inputs are numbered in forward's order
        parameters = forward_parameters(model)
        if set(kwargs) <= set(parameters):
            args = positional(kwargs, parameters)
    if not args:
        return [], len(quantizers)
    sizes = [i.shape[0] for i in session.get_inputs()]
    sample = tuple(a[:max(n, 1)] for a, n in zip(args, sizes, strict=False))
    ref = _torch_codes(model, quantizers, (sample,))
    shift = {name: -int8_code(0, q.qmin) for name, q in quantizers.items()}
    deployed = {name: q.deployed_qparams() for name, q in quantizers.items()}
    wanted = {name: (float(deployed[name][0]), int(deployed[name][1]) - shift[name],
                     ref[name] - shift[name])
              for name in quantizers if name in ref}
    found = litert_layer_codes(path, [a.detach().cpu().numpy() for a in sample], wanted,
                               threads)
    values = {tensor: codes.astype(np.int64) + shift[name]
              for name, (tensor, codes) in found.items()}
    rows = diff_rows([(name, tensor) for name, (tensor, _) in found.items()], ref, values)
    return rows, len(quantizers) - len(rows)


def _layer_rows(backend: str, onnx_path: Path, proto: onnx.ModelProto, model: nn.Module,
                batch: Any, threads: int,
                session: BackendSession) -> tuple[list[LayerDiff], int]:
    if backend == "onnxruntime":
        return compare_layers(onnx_path, model, batch, threads), 0
    return _openvino_layers(proto, model, batch, threads, session)


REFERENCES = ("auto", "integer", "fake-quant")
# Integer kernels and the fake-quant forward may round ties apart: a step or two.
_TIES_LSB = 2.0


def _fits(given: tuple[int, ...], takes: Any) -> bool:
    """Whether an input of shape ``given`` fits a backend input of shape ``takes``
    (``None`` or a name for a dynamic dimension)."""
    dims = list(takes or [])
    return len(dims) == len(given) and all(
        d is None or isinstance(d, str) or int(d) == g for d, g in zip(dims, given,
                                                                       strict=True))


def _type_text(value: Any) -> str:
    """A value's element type as backends name it (``float``, ``int64``)."""
    return element_type_name(np.asarray(value).dtype)


def _type_name(info: Any) -> str:
    """A backend input's element type (``tensor(float)`` -> ``float``; ``""`` unknown)."""
    text = str(getattr(info, "type", "") or "")
    return text[len("tensor("):-1] if text.startswith("tensor(") else ""


def _shape_text(shape: Any) -> str:
    """``(N, 1, 8, 8)``: a backend's input shape, dynamic dimensions as ``N``."""
    dims = ["N" if d is None or isinstance(d, str) else str(d) for d in (shape or [])]
    return f"({', '.join(dims)})"


# ONNX operators that hold integer arithmetic (QDQ and the operator formats)
_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                            "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})


_INTEGER_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                            onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                            onnx.TensorProto.INT4, onnx.TensorProto.UINT4})


def _check_quantized_file(path: Path, proto: onnx.ModelProto | None, model: nn.Module) -> None:
    """Refuse to compare a file without integer ops (or float16 constants) against an
    integer-quantized (float16) model: the float export of the same model agrees
    with it to the quantization error, and verify would pass a file that deploys
    none of the quantization."""
    from quantaware.export.onnx import _FOLD_INPUT_SIZE_LIMIT
    from quantaware.fake_quant import Float16Quantizer
    from quantaware.prepare import quantizers

    integer = any(bool(q.fake_quant_enabled) for _, q in quantizers(model))
    # float16 weights of a few values are folded into float32 constants on export
    half = any(isinstance(getattr(m, "weight_quantizer", None), Float16Quantizer)
               and isinstance(getattr(m, "weight", None), torch.Tensor)
               and m.weight.numel() > _FOLD_INPUT_SIZE_LIMIT for m in model.modules())
    if not integer and not half:
        return
    if proto is not None:
        ops = {n.op_type for n in proto.graph.node}
        for function in proto.functions:
            ops |= {n.op_type for n in function.node}
        types = {i.data_type for i in proto.graph.initializer}
        # int8 tables looked up with Gather hold no quantized operator
        has_integer = bool(ops & _QUANTIZED_OPS or types & _INTEGER_TYPES)
        has_half = onnx.TensorProto.FLOAT16 in types
    else:
        from quantaware.export.tflite import tflite_ops

        dtypes = {d for _, op_dtypes in tflite_ops(path) for d in op_dtypes}
        has_integer = bool(dtypes & {"int8", "uint8", "int16"})
        has_half = "float16" in dtypes
    if (integer and not has_integer) or (half and not integer and not has_half):
        kind = "quantized operators" if integer else "float16 constants"
        raise ValueError(
            f"{path.name} holds no {kind}, but the model is quantized: it looks like the "
            "float export; verify the file exported from the quantized model "
            "(quantaware.export_onnx / export_tflite of it)")


def verify(
    onnx_path: str | Path,
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    threads: int = 2,
    check_layers: bool = True,
    reference: str = "auto",
    backend: str = "onnxruntime",
) -> VerifyReport:
    """Run ``onnx_path`` in ``backend`` and ``model`` in torch on ``data``; compare.

    Args:
        onnx_path: the exported model.
        model: the torch model it was exported from (prepared/calibrated/trained).
        data: batches (tensors, ``(inputs, ...)`` tuples, or dicts of inputs).
        num_batches: compare at most this many batches.
        threads: inference threads of the backend.
        check_layers: also compare every quantized activation on the first batch
            and report the first layer that differs.
        reference: ``"integer"`` runs the torch model with ONNX Runtime's integer
            arithmetic (and also reports agreement with the fake-quant forward);
            ``"fake-quant"`` compares with the fake-quant forward only; ``"auto"``
            (default) is ``"integer"`` when the model has a quantized layer with
            an integer-exact form.
        backend: ``"onnxruntime"`` (default), ``"openvino"`` or ``"litert"``
            (:mod:`quantaware.backends`; float layers run in float32). For
            ``"litert"`` the file is a ``.tflite`` from
            :func:`quantaware.export_tflite`, the integer reference reproduces
            LiteRT's int8 kernels (``integer_arithmetic(model, "litert")``) and
            the layer check reads LiteRT's intermediate tensors. The
            integer reference reproduces ONNX Runtime's kernels, so OpenVINO,
            which rounds some steps differently (ties of the input quantizer,
            requantized residual adds), can differ from it by an LSB here and
            there, and a deep network amplifies such flips. When exposing the
            layer outputs all at once changes OpenVINO's result, the layer check
            compiles the model once per layer (about a minute on MobileNetV2).

    Raises:
        ValueError: unknown ``backend`` or ``reference``, an unreadable file, no data.
        ImportError: ``backend="openvino"`` or ``"litert"`` without it installed.

    Example:
        >>> import torch, tempfile, os, quantaware
        >>> from quantaware import presets
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(64, 4)
        >>> q = quantaware.quantize(net, presets.INT8, [x], x[:1])
        >>> path = quantaware.export_onnx(q, os.path.join(tempfile.mkdtemp(), "m.onnx"), x[:1])
        >>> report = verify(path, q, [x])
        >>> report.passed(), report.reference, report.max_error_lsb
        (True, 'integer', 0.0)
        >>> verify(path, q, [x], backend="openvino").backend  # with OpenVINO installed
        'openvino'
    """
    with frozen(model):  # the checks' forward passes leave the model's ranges alone
        return _verify(onnx_path, model, data, num_batches, threads, check_layers, reference,
                       backend)


def _verify(
    onnx_path: str | Path,
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    threads: int = 2,
    check_layers: bool = True,
    reference: str = "auto",
    backend: str = "onnxruntime",
) -> VerifyReport:
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    check_backend(backend)
    onnx_path = Path(onnx_path)
    litert = backend == "litert"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{'LiteRT' if litert else 'ONNX'} model not found: {onnx_path}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be positive or None, got {num_batches}")
    if litert:
        from quantaware.export.tflite import output_scales

        proto = None
        session = create_backend_session(onnx_path, backend, threads)
        scales = output_scales(onnx_path)
    else:
        try:
            proto = onnx.load(str(onnx_path))
        except Exception as exc:
            raise ValueError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
        if not proto.graph.node or not proto.graph.output:
            raise ValueError(
                f"{onnx_path} holds no ONNX graph (empty or truncated file); export it again"
            )
        session = create_backend_session(proto.SerializeToString(), backend, threads)
        scales = _output_scales(proto)
    _check_quantized_file(onnx_path, proto, model)
    batches = list(itertools.islice(data, num_batches))
    if not batches:
        raise ValueError("verify got no data: pass an iterable with at least one batch")
    for index, batch in enumerate(batches):
        check_finite(*split_batch(batch), f"verify batch {index}")
    input_names = [i.name for i in session.get_inputs()]
    parameters = forward_parameters(model)

    def run(index: int, batch: Any) -> list[np.ndarray]:
        feed = backend_feed(batch, input_names, parameters)
        try:
            return list(session.run(None, feed))
        except Exception as exc:  # each backend raises its own types
            given = ", ".join(f"{k} {tuple(np.shape(v))} {_type_text(v)}"
                              for k, v in feed.items())
            takes = ", ".join(f"{i.name} {_shape_text(i.shape)} {_type_name(i)}"
                              for i in session.get_inputs())
            detail = " ".join(str(exc).split())
            if len(detail) > 600:  # backends put the cause last, after their call stack
                detail = detail[:200] + " ... " + detail[-400:]
            fits = all(name in feed and _fits(np.shape(feed[name]), i.shape)
                       and _type_name(i) in ("", _type_text(feed[name]))
                       for name, i in zip(input_names, session.get_inputs(), strict=True))
            if fits:
                raise ValueError(
                    f"{backend} failed on {Path(onnx_path).name} at verify batch {index}, "
                    f"though the inputs fit the file ({given}): {detail}. If the file runs "
                    f"in ONNX Runtime (backend='onnxruntime'), this is {backend}'s failure "
                    "on it") from exc
            raise ValueError(
                f"{backend} could not run {Path(onnx_path).name} on verify batch {index}: "
                f"given {given}, the file takes {takes} ({detail}); pass data shaped (and "
                "typed) like the example the model was exported with") from exc

    outs = [run(index, batch) for index, batch in enumerate(batches)]

    def layer_rows() -> tuple[list[LayerDiff], int]:
        if proto is None:
            return _litert_layers(onnx_path, model, batches[0], threads, session)
        return _layer_rows(backend, onnx_path, proto, model, batches[0], threads, session)

    model.eval()
    with fake_quant_arithmetic(model):
        expected = _torch_outputs(model, batches)
        for index, arrays in enumerate(expected):
            if not all(np.isfinite(a).all() for a in arrays):
                raise ValueError(
                    f"the torch model's output on verify batch {index} contains NaN/Inf: "
                    "there is nothing to compare the file with; check the model's weights "
                    "(and quantizers) for NaN/Inf and that it runs on this data")
        fake = _agreement(expected, outs, backend, scales)
    main, rows, unavailable, max_lsb = fake, [], 0, 1
    integer_layers = fallback_layers = 0
    used = "fake-quant"
    if reference != "fake-quant":
        with integer_arithmetic(model, "litert" if litert else "onnxruntime") as emulation:
            if emulation.emulated or reference == "integer":
                used = "integer"
                integer_layers, fallback_layers = len(emulation.emulated), len(emulation.fallback)
                main = _agreement(_torch_outputs(model, batches), outs, backend, scales)
                # Exact layers must match code for code; float ones within 1 LSB.
                max_lsb = 0 if emulation.complete else 1
                if check_layers:
                    rows, unavailable = layer_rows()
    if used == "fake-quant" and check_layers:
        with fake_quant_arithmetic(model):
            rows, unavailable = layer_rows()
    first = first_divergence(rows, max_lsb)
    return VerifyReport(
        num_samples=main.num_samples,
        top1_agreement=main.top1,
        cosine=main.cosine,
        min_cosine=main.min_cosine,
        max_abs_error=main.max_abs_error,
        max_error_lsb=None if main.scale is None else main.max_abs_error / main.scale,
        output_scale=main.scale,
        layers_checked=len(rows),
        first_divergent_layer=None if first is None else first.name,
        first_divergent_lsb=None if first is None else first.max_lsb,
        reference=used,
        integer_layers=integer_layers,
        fake_quant_layers=fallback_layers,
        fake_quant_top1_agreement=fake.top1 if used == "integer" else None,
        fake_quant_cosine=fake.cosine if used == "integer" else None,
        fake_quant_max_error_lsb=(fake.max_abs_error / fake.scale
                                  if used == "integer" and fake.scale else None),
        layers_unavailable=unavailable,
        backend=backend,
        num_outputs=main.outputs,
        relative_error=main.relative,
    )
