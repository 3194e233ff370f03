"""Deployed INT8 side by side with ONNX Runtime's own quantizer: latency, size, fidelity.

For each model four ONNX files are written and run in ONNX Runtime (CPU, fixed
thread budget, thread spinning disabled so sessions do not steal each other's
cores), and optionally in OpenVINO (:mod:`quantaware.backends`):

- ``fp32``: the float model;
- ``quantaware-int8``: :func:`quantaware.deploy.quantize_for_backend` (the
  backend's measured default config, SmoothQuant for transformers), exported with Q/DQ;
- ``ort-static-int8``: ``onnxruntime.quantization.quantize_static`` of the fp32
  file (QDQ, per-channel, u8s8, MinMax) on the same calibration data;
- ``ort-dynamic-int8``: ``onnxruntime.quantization.quantize_dynamic``;
- with ``distill_steps > 0``, for models with unlabelled data (the image
  models): ``quantaware-int8-distilled``, the quantaware model fine-tuned for
  that many steps towards the FP32 model on unlabelled crops
  (:func:`quantaware.distill.distill`, no labels), exported the same way.

With ``backends=("onnxruntime", "openvino")`` the fp32 and quantaware files
(not ONNX Runtime's quantizer outputs) are also timed in OpenVINO, float layers
in float32; each row names its ``backend``. With ``"litert"`` the fp32 model and
the quantaware models are also exported as LiteRT files
(:func:`quantaware.export_tflite`, the models' own scales) and timed in LiteRT's
interpreter; ``quantaware-int8`` is quantized for LiteRT there
(``quantize_for_backend(..., backend="litert")``). The files have the static
batch of the example input (1), so a batch of B is B invocations.

Latency is the median of many ``session.run`` calls after warm-up, taken
interleaved (one run of each variant per round, A B C D A B C D ...) so that
machine noise hits every variant alike; with several backends, every
backend's variants take part in the same rounds. Fidelity compares each
variant's outputs with the fp32 file's outputs in the first backend listed: top-1
agreement for image models, mean cosine similarity of the embeddings for text
models; a model with several outputs is scored by its worst one.

Example:
    >>> rows = benchmark(["resnet18"], quick=True)  # doctest: +SKIP
    >>> sorted(rows[0])  # doctest: +SKIP
    ['backend', 'batch', 'fidelity', 'latency_ms', 'model', 'ratio_vs_fp32', 'size_bytes', ...]
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantaware._batch import backend_feed, forward_parameters, input_args, map_inputs
from quantaware._files import atomic_path
from quantaware._files import write_json as _write_json
from quantaware._native import quiet_loggers
from quantaware.deploy import ModelSource, load_model_source, quantize_for_backend

__all__ = ["DISTILLED", "ORT_QUANTIZER_VARIANTS", "VARIANTS", "backend_variants", "benchmark",
           "build_variants", "fidelity", "fidelity_details", "time_interleaved", "write_json"]

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "quantaware-int8", "ort-static-int8", "ort-dynamic-int8")
# Made by ONNX Runtime's quantizer for ONNX Runtime: timed in that backend only.
ORT_QUANTIZER_VARIANTS = ("ort-static-int8", "ort-dynamic-int8")
DISTILLED = "quantaware-int8-distilled"
DISTILL_LR = 1e-5


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over our calibration batches."""

    def __init__(self, batches: list[Any], names: Sequence[str]) -> None:
        self._feeds = iter([backend_feed(b, names) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # pragma: no cover - part of ORT's reader protocol
        pass


def build_variants(source: ModelSource, out_dir: str | os.PathLike,
                   on_step: Callable[[str], None] = lambda msg: None,
                   distill_steps: int = 0) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the ONNX files of :data:`VARIANTS` (and :data:`DISTILLED`) for ``source``.

    Returns the paths by variant and quantaware's torch models by variant (the
    ones exported as ``quantaware-int8`` and, if built, ``quantaware-int8-distilled``,
    for :func:`quantaware.verify`).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from quantaware import export_onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {v: out / f"{source.file_stem}-{v}.onnx" for v in VARIANTS}
    args = input_args(source.example)
    on_step(f"{source.name}: export fp32")
    export_onnx(source.model, paths["fp32"], args)
    on_step(f"{source.name}: quantaware PTQ + export")
    qmodel = quantize_for_backend(source.model, source.calib, args)
    export_onnx(qmodel, paths["quantaware-int8"], args)
    torch_models = {"quantaware-int8": qmodel}
    if distill_steps > 0 and source.unlabeled is not None:
        import copy

        from quantaware.distill import distill

        on_step(f"{source.name}: label-free distillation, {distill_steps} steps")
        student = distill(copy.deepcopy(qmodel), source.model, source.unlabeled(),
                          steps=distill_steps, lr=DISTILL_LR)
        paths[DISTILLED] = out / f"{source.file_stem}-{DISTILLED}.onnx"
        export_onnx(student, paths[DISTILLED], args)
        torch_models[DISTILLED] = student
    names = [i.name for i in ort.InferenceSession(
        str(paths["fp32"]), providers=["CPUExecutionProvider"]).get_inputs()]
    on_step(f"{source.name}: ORT quantize_static")
    for variant, run in (
        ("ort-static-int8", lambda tmp: quantize_static(
            str(paths["fp32"]), tmp, _Reader(source.calib, names), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax)),
        ("ort-dynamic-int8", lambda tmp: quantize_dynamic(
            str(paths["fp32"]), tmp, weight_type=QuantType.QInt8)),
    ):
        # ONNX Runtime's quantizer is a baseline: where it fails on a model (a
        # LayerNorm bias it cannot scale, an op it does not know), its row is left
        # out, not the whole comparison. Its own progress warnings are not shown.
        try:
            with atomic_path(paths[variant], suffix=".onnx") as tmp, quiet_loggers("root"):
                run(str(tmp))
        except Exception as exc:  # any failure of the third-party tool
            log.warning("%s: ONNX Runtime's %s failed on this model (%s: %s); its row is "
                        "left out", source.name, variant, type(exc).__name__, exc)
            del paths[variant]
    return paths, torch_models


def build_litert_variants(source: ModelSource, out_dir: str | os.PathLike,
                          torch_models: dict[str, Any]) -> tuple[dict[str, Path], dict[str, Any]]:
    """LiteRT files of the fp32 model and of quantaware's quantized models (static
    shapes of ``source.example``), and the torch models they come from.

    ``quantaware-int8`` is quantized again for LiteRT
    (:func:`~quantaware.deploy.quantize_for_backend` with ``backend="litert"``: layers
    before float ops keep int8 outputs where that costs little); the other models
    (distilled) are the ONNX files' own."""
    from quantaware.export.tflite import export_tflite

    args = input_args(source.example)
    out = Path(out_dir)
    models = {**torch_models, "quantaware-int8": quantize_for_backend(
        source.model, source.calib, args, backend="litert").eval()}
    paths = {v: export_tflite(m, out / f"{source.file_stem}-{v}.tflite", args)
             for v, m in {"fp32": source.model, **models}.items()}
    return paths, models


def backend_variants(variants: Sequence[str], backend: str) -> list[str]:
    """The ``variants`` timed in ``backend``: all in ONNX Runtime, elsewhere all but
    :data:`ORT_QUANTIZER_VARIANTS`.

    Example:
        >>> backend_variants(VARIANTS, "openvino")
        ['fp32', 'quantaware-int8']
    """
    if backend == "onnxruntime":
        return list(variants)
    return [v for v in variants if v not in ORT_QUANTIZER_VARIANTS]


def _sessions(paths: dict[str, dict[str, Path]], threads: int,
              backends: Sequence[str]) -> dict[tuple[str, str], Any]:
    """A session per ``(backend, variant)`` on ``paths[backend][variant]``."""
    from quantaware.backends import create_backend_session

    return {(b, v): create_backend_session(paths[b][v], b, threads)
            for b in backends for v in backend_variants(list(paths[b]), b)}


def _outputs(session: Any, batches: list[Any], parameters: list[str]) -> list[np.ndarray]:
    """Every output of ``session`` over ``batches``, each concatenated over the batches
    (``parameters``: the model's forward parameters, for files with numbered inputs)."""
    names = [i.name for i in session.get_inputs()]
    runs = [session.run(None, backend_feed(b, names, parameters)) for b in batches]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(runs[0]))]


Outputs = np.ndarray | Sequence[np.ndarray]


def _pairs(reference: Outputs, output: Outputs) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(reference, output)`` array pairs, one per model output."""
    refs = [reference] if isinstance(reference, np.ndarray) else list(reference)
    outs = [output] if isinstance(output, np.ndarray) else list(output)
    if not refs or len(refs) != len(outs):
        raise ValueError(f"fidelity needs as many outputs as the reference has: got "
                         f"{len(outs)} against {len(refs)}")
    for k, (r, o) in enumerate(zip(refs, outs, strict=True)):
        if r.shape != o.shape:
            raise ValueError(f"output {k}: shape {o.shape} differs from the reference's "
                             f"{r.shape}")
    return list(zip(refs, outs, strict=True))


def _has_classes(a: np.ndarray) -> bool:
    """True if ``a`` has a class axis (axis 1, more than one entry) to take a top-1 over."""
    return a.ndim >= 2 and a.shape[1] > 1


def _cosine(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean over samples of the cosine between their flattened outputs."""
    n = len(reference)
    ref = reference.reshape(n, -1).astype(np.float64)
    out = output.reshape(n, -1).astype(np.float64)
    cos = (ref * out).sum(1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    return float(cos.mean())


def fidelity(kind: str, reference: Outputs, output: Outputs) -> float:
    """Top-1 agreement (``kind="image"``) or mean cosine similarity (``"text"``).

    ``reference`` and ``output`` are one array or one array per model output; a
    model with several outputs scores its worst one. Top-1 is taken over axis 1
    (per pixel for dense maps ``(N, C, H, W)``); an image model's output without
    a class axis (one score per sample) is scored by cosine.

    Example:
        >>> a = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> fidelity("image", a, a[::-1]), fidelity("text", a, a)
        (0.0, 1.0)
        >>> fidelity("image", [a, a], [a, a[::-1]])  # the second head disagrees
        0.0
    """
    scores = [float(np.mean(r.argmax(1) == o.argmax(1)))
              if kind == "image" and _has_classes(r) else _cosine(r, o)
              for r, o in _pairs(reference, output)]
    return min(scores)


def fidelity_details(kind: str, reference: Outputs, output: Outputs) -> dict[str, float]:
    """The second fidelity figure: confident-crop agreement or neighbour agreement.

    For ``kind="image"``: top-1 agreement over the samples (pixels, for dense
    maps) where the reference is confident (max softmax >= 0.5), key
    ``agreement_confident`` (NaN if none is, or no output has a class axis).
    For ``kind="text"``: the fraction of samples whose most similar *other*
    sample (cosine of the embeddings) is unchanged, key ``neighbour_agreement``.
    With several outputs, the worst one.

    Example:
        >>> e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> fidelity_details("text", e, e)
        {'neighbour_agreement': 1.0}
    """
    pairs = _pairs(reference, output)
    if kind == "image":
        scores = []
        for ref, out in pairs:
            if not _has_classes(ref):
                continue
            z = ref.astype(np.float64)
            z = np.exp(z - z.max(1, keepdims=True))
            confident = (z / z.sum(1, keepdims=True)).max(1) >= 0.5
            same = ref.argmax(1) == out.argmax(1)
            if confident.any():
                scores.append(float(same[confident].mean()))
        return {"agreement_confident": min(scores) if scores else float("nan")}

    def neighbours(e: np.ndarray) -> np.ndarray:
        e = e.reshape(len(e), -1).astype(np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return {"neighbour_agreement": min(float(np.mean(neighbours(r) == neighbours(o)))
                                       for r, o in pairs)}


def time_interleaved(sessions: dict[Any, Any], feeds: dict[Any, dict[str, np.ndarray]],
                     runs: int, warmup: int) -> dict[Any, float]:
    """Median ms of ``runs`` interleaved ``session.run`` calls per session after ``warmup``.

    ``sessions`` and ``feeds`` share their keys (e.g. variant names).
    """
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    timings = {name: np.empty(runs) for name in sessions}
    for i in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter_ns()
            session.run(None, feeds[name])
            timings[name][i] = time.perf_counter_ns() - start
    return {name: float(np.median(t)) / 1e6 for name, t in timings.items()}


def _batch_of(source: ModelSource, batch: int) -> Any:
    return map_inputs(source.evaluate[0],
                      lambda v: v[:1].repeat(batch, *([1] * (v.dim() - 1))))


def benchmark(models: Sequence[str], batches: Sequence[int] = (1, 16), threads: int = 2,
              runs: int = 50, warmup: int = 10, quick: bool = False,
              out_dir: str | os.PathLike | None = None,
              on_step: Callable[[str], None] = lambda msg: None,
              on_model: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
              distill_steps: int = 0,
              backends: Sequence[str] = ("onnxruntime",),
              input_shape: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Build, run and time every variant of every model; one row per
    model/batch/backend/variant.

    ``ratio_vs_fp32`` is latency divided by the fp32 latency in the same backend
    (0.33 = 3x faster). Besides ``fidelity`` each row carries
    :func:`fidelity_details`, and the quantaware rows the :func:`quantaware.verify`
    result of the ONNX file, run in the row's backend, against the torch model it
    was exported from: ``verify_top1`` and ``verify_cosine`` against
    ``verify_reference`` (``"integer"``: torch running ONNX Runtime's integer
    arithmetic), and ``verify_fake_quant_top1`` against the fake-quant forward
    (``None`` on the other variants).

    Args:
        models: built-in names or ``MODULE:FUNCTION`` (see :func:`load_model_source`).
        batches: batch sizes to time.
        threads: inference threads per session.
        runs, warmup: timed and untimed runs per variant (interleaved).
        quick: small inputs (32x32 images, 16 tokens), 16 samples, 3 runs: a smoke test.
        out_dir: where the ONNX files go (default: a temporary folder).
        on_model: called with all rows so far after each model (e.g. to save them).
        distill_steps: also build :data:`DISTILLED` for models with unlabelled data.
        backends: inference backends (:data:`quantaware.backends.BACKENDS`); the
            first one's fp32 output is the fidelity reference.
        input_shape: per-sample input shape for ``MODULE:FUNCTION`` models.
    """
    from quantaware.backends import check_backend
    from quantaware.bench import file_size
    from quantaware.export.verify import verify

    if isinstance(distill_steps, bool) or not isinstance(distill_steps, int) or distill_steps < 0:
        raise ValueError(f"distill_steps must be a non-negative integer, got {distill_steps!r}")
    def counts(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not batches or not all(counts(b, 1) for b in batches):
        raise ValueError(f"batches must be positive integers, got {batches!r}")
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if not counts(value, low):
            kind = "a positive" if low else "a non-negative"
            raise ValueError(f"{name} must be {kind} integer, got {value!r}")
    if isinstance(backends, str) or not backends or len(set(backends)) != len(backends):
        raise ValueError(f"backends must be a non-empty sequence of distinct names, "
                         f"got {backends!r}")
    for backend in backends:
        check_backend(backend)
    if quick:
        runs, warmup = min(runs, 3), min(warmup, 1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        stems: set[str] = set()
        for spec in models:
            if quick:
                size = 16 if spec == "minilm" else 32
                source = load_model_source(spec, 16, 16, size=size, input_shape=input_shape)
            else:
                source = load_model_source(spec, input_shape=input_shape)
            if source.file_stem in stems:  # vision/models.py:build, audio/models.py:build
                source.stem = f"{source.file_stem}-{len(stems) + 1}"
            stems.add(source.file_stem)
            onnx_paths, torch_models = build_variants(source, folder, on_step, distill_steps)
            paths = {b: onnx_paths for b in backends}
            backend_models = {b: torch_models for b in backends}
            if "litert" in backends:
                on_step(f"{source.name}: LiteRT PTQ + export")
                paths["litert"], backend_models["litert"] = build_litert_variants(
                    source, folder, torch_models)
            checked = {}
            for backend in backends:
                for variant, qmodel in backend_models[backend].items():
                    on_step(f"{source.name}: verify {variant} in {backend}")
                    report = verify(paths[backend][variant], qmodel, source.evaluate,
                                    threads=threads, check_layers=False, backend=backend)
                    checked[backend, variant] = {
                        "verify_top1": report.top1_agreement,
                        "verify_cosine": report.cosine,
                        "verify_reference": report.reference,
                        "verify_fake_quant_top1": report.fake_quant_top1_agreement}
            sessions = _sessions(paths, threads, backends)
            on_step(f"{source.name}: fidelity")
            parameters = forward_parameters(source.model)
            results = {key: _outputs(s, source.evaluate, parameters)
                       for key, s in sessions.items()}
            reference = results[backends[0], "fp32"]
            fid = {key: fidelity(source.kind, reference, out) for key, out in results.items()}
            details = {key: fidelity_details(source.kind, reference, out)
                       for key, out in results.items()}
            for batch in batches:
                on_step(f"{source.name}: timing batch {batch}")
                sample = _batch_of(source, batch)
                feeds = {key: backend_feed(sample, [i.name for i in s.get_inputs()], parameters)
                         for key, s in sessions.items()}
                latency = time_interleaved(sessions, feeds, runs, warmup)
                for backend, variant in sessions:
                    rows.append({
                        "model": source.name, "batch": batch, "backend": backend,
                        "variant": variant,
                        "latency_ms": latency[backend, variant],
                        "ratio_vs_fp32": latency[backend, variant] / latency[backend, "fp32"],
                        "size_bytes": file_size(paths[backend][variant]),
                        "fidelity": fid[backend, variant],
                        **details[backend, variant],
                        **checked.get((backend, variant),
                                      {"verify_top1": None, "verify_cosine": None,
                                       "verify_reference": None,
                                       "verify_fake_quant_top1": None}),
                    })
            del sessions
            on_model(rows)
    return rows


def write_json(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` as JSON, atomically."""
    return _write_json(path, rows)
