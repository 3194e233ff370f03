"""Verify that an exported ONNX model computes what the torch model computes.

Both run on the same inputs; the report gives top-1 agreement, mean cosine
similarity and the largest difference in units of the output's quantization
step (LSB) where the ONNX output comes out of a ``DequantizeLinear``. For a
prepared model it also compares every quantized activation on the first batch
(:mod:`quantaware.export.layers`) and names the first layer where ONNX Runtime
and torch differ by more than one LSB. One LSB is
the expected worst case: ONNX Runtime accumulates in int32 where torch
accumulates in float, so a value that sits on a rounding tie may round the
other way (Brevitas' ``brevitas_ort`` checks the same bound).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from quantaware._batch import model_device, split_batch, to_device
from quantaware.bench import create_session
from quantaware.export.layers import compare_layers, first_divergence

__all__ = ["VerifyReport", "verify"]


@dataclass(frozen=True)
class VerifyReport:
    """Agreement between an ONNX model (as ONNX Runtime runs it) and a torch model.

    Attributes:
        num_samples: samples compared.
        top1_agreement: fraction (0..1) of samples with the same arg-max class.
        cosine: mean cosine similarity of per-sample outputs.
        min_cosine: the worst sample's cosine similarity.
        max_abs_error: largest absolute difference.
        max_error_lsb: ``max_abs_error`` in output quantization steps, or ``None``
            when the output is not quantized.
        output_scale: the output's quantization step, if quantized.
        layers_checked: quantized activations compared layer by layer (first batch).
        first_divergent_layer: the first quantizer (graph order) whose integer codes
            differ by more than one LSB, or ``None`` if every layer agrees.
        first_divergent_lsb: that layer's largest code difference.
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

    def passed(self, min_agreement: float = 0.99, max_lsb: float = 1.0) -> bool:
        """True if agreement and (where quantized) the LSB error are within bounds."""
        # Outputs are float32 values (q - zp) * scale: one step can read as 1.00002 LSB.
        lsb_ok = self.max_error_lsb is None or self.max_error_lsb <= max_lsb + 1e-3
        return self.top1_agreement >= min_agreement and lsb_ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lsb = ("n/a (float output)" if self.max_error_lsb is None
               else f"{self.max_error_lsb:.2f} LSB (step {self.output_scale:.4g})")
        verdict = "PASS" if self.passed() else "CHECK"
        if not self.layers_checked:
            layers = "not checked (no static activation quantizers)"
        elif self.first_divergent_layer is None:
            layers = f"all {self.layers_checked} quantized activations within 1 LSB"
        else:
            layers = (f"first divergence at {self.first_divergent_layer} "
                      f"({self.first_divergent_lsb} LSB; {self.layers_checked} checked)")
        return (
            f"verify: {verdict} on {self.num_samples} samples\n"
            f"  top-1 agreement  {100 * self.top1_agreement:.2f}%\n"
            f"  cosine           {self.cosine:.6f} (min {self.min_cosine:.6f})\n"
            f"  max error        {self.max_abs_error:.4g} = {lsb}\n"
            f"  layers           {layers}"
        )


def _output_scale(model_proto: onnx.ModelProto) -> float | None:
    """Scale of the DequantizeLinear that produces the first graph output, if any."""
    graph = model_proto.graph
    out_name = graph.output[0].name
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    node = producers.get(out_name)
    while node is not None and node.op_type in ("Identity", "Reshape", "Flatten"):
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


def _first_output(out: Any) -> torch.Tensor:
    while isinstance(out, tuple | list):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()[0]
    return out


def verify(
    onnx_path: str | Path,
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    threads: int = 2,
    check_layers: bool = True,
) -> VerifyReport:
    """Run ``onnx_path`` in ONNX Runtime and ``model`` in torch on ``data``; compare.

    Args:
        onnx_path: the exported model.
        model: the torch model it was exported from (prepared/calibrated/trained).
        data: batches (tensors, ``(inputs, ...)`` tuples, or dicts of inputs).
        num_batches: compare at most this many batches.
        threads: ONNX Runtime intra-op threads.
        check_layers: also compare every quantized activation on the first batch
            and report the first layer that differs by more than one LSB.

    Example:
        >>> import torch, tempfile, os, quantaware
        >>> from quantaware import presets
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(64, 4)
        >>> q = quantaware.quantize(net, presets.INT8, [x], x[:1])
        >>> path = quantaware.export_onnx(q, os.path.join(tempfile.mkdtemp(), "m.onnx"), x[:1])
        >>> verify(path, q, [x]).passed()
        True
    """

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    try:
        proto = onnx.load(str(onnx_path))
    except Exception as exc:
        raise ValueError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    if not proto.graph.node or not proto.graph.output:
        raise ValueError(
            f"{onnx_path} holds no ONNX graph (empty or truncated file); export it again"
        )
    session = create_session(proto.SerializeToString(), threads)
    input_names = [i.name for i in session.get_inputs()]
    scale = _output_scale(proto)

    model.eval()
    device = model_device(model)
    agree = total = 0
    first_batch = None
    cosines: list[np.ndarray] = []
    max_err = 0.0
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        first_batch = batch if first_batch is None else first_batch
        args, kwargs = split_batch(batch)
        if args:
            feed = {name: a.detach().cpu().numpy() for name, a in zip(input_names, args,
                                                                     strict=False)}
        else:
            feed = {k: v.detach().cpu().numpy() for k, v in kwargs.items() if k in input_names}
        ort_out = session.run(None, feed)[0]
        targs, tkwargs = to_device(args, kwargs, device)
        with torch.no_grad():
            ref = _first_output(model(*targs, **tkwargs)).detach().float().cpu().numpy()
        if ref.shape != ort_out.shape:
            raise ValueError(
                f"output shapes differ: torch {ref.shape} vs ONNX Runtime {ort_out.shape}; "
                "is this the model the file was exported from?"
            )
        n = ref.shape[0] if ref.ndim > 0 else 1
        a, b = ref.reshape(n, -1).astype(np.float64), ort_out.reshape(n, -1).astype(np.float64)
        max_err = max(max_err, float(np.max(np.abs(a - b))) if a.size else 0.0)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30),
                       np.where(np.abs(a - b).max(1) == 0, 1.0, 0.0))
        cosines.append(cos)
        if ref.ndim >= 2:  # a sample agrees when every position's arg-max agrees
            same = (ref.argmax(-1) == ort_out.argmax(-1)).reshape(n, -1)
            agree += int(same.all(axis=1).sum())
        else:
            agree += n
        total += n
    if total == 0:
        raise ValueError("verify got no data: pass an iterable with at least one batch")
    all_cos = np.concatenate(cosines)
    rows = compare_layers(onnx_path, model, first_batch, threads) if check_layers else []
    first = first_divergence(rows)
    return VerifyReport(
        num_samples=total,
        top1_agreement=agree / total,
        cosine=float(all_cos.mean()),
        min_cosine=float(all_cos.min()),
        max_abs_error=max_err,
        max_error_lsb=None if scale is None else max_err / scale,
        output_scale=scale,
        layers_checked=len(rows),
        first_divergent_layer=None if first is None else first.name,
        first_divergent_lsb=None if first is None else first.max_lsb,
    )

