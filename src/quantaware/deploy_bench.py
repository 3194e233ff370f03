"""Deployed INT8 side by side with ONNX Runtime's own quantizer: latency, size, fidelity.

For each model four ONNX files are written and run in ONNX Runtime (CPU, fixed
thread budget, thread spinning disabled so sessions do not steal each other's
cores):

- ``fp32``: the float model;
- ``quantaware-int8``: :func:`quantaware.deploy.quantize_for_backend` (the
  backend's measured default config, SmoothQuant for transformers), exported with Q/DQ;
- ``ort-static-int8``: ``onnxruntime.quantization.quantize_static`` of the fp32
  file (QDQ, per-channel, u8s8, MinMax) on the same calibration data;
- ``ort-dynamic-int8``: ``onnxruntime.quantization.quantize_dynamic``.

Latency is the median of many ``session.run`` calls after warm-up, taken
interleaved (one run of each variant per round, A B C D A B C D ...) so that
machine noise hits every variant alike. Fidelity compares each variant's ONNX
Runtime output with the fp32 file's: top-1 agreement for image models, mean
cosine similarity of the embeddings for text models.

Example:
    >>> rows = benchmark(["resnet18"], quick=True)  # doctest: +SKIP
    >>> sorted(rows[0])  # doctest: +SKIP
    ['batch', 'fidelity', 'latency_ms', 'model', 'ratio_vs_fp32', 'size_bytes', 'variant']
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantaware.deploy import ModelSource, load_model_source, quantize_for_backend

__all__ = ["VARIANTS", "benchmark", "build_variants", "fidelity", "time_interleaved",
           "write_json"]

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "quantaware-int8", "ort-static-int8", "ort-dynamic-int8")


def _numpy_feed(batch: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    if isinstance(batch, dict):
        return {k: v.detach().cpu().numpy() for k, v in batch.items() if k in names}
    return {names[0]: batch.detach().cpu().numpy()}


def _example_args(example: Any) -> tuple:
    return tuple(example.values()) if isinstance(example, dict) else (example,)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over our calibration batches."""

    def __init__(self, batches: list[Any], names: Sequence[str]) -> None:
        self._feeds = iter([_numpy_feed(b, names) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # pragma: no cover - part of ORT's reader protocol
        pass


def build_variants(source: ModelSource, out_dir: str | os.PathLike,
                   on_step: Callable[[str], None] = lambda msg: None) -> dict[str, Path]:
    """Write the four ONNX files of :data:`VARIANTS` for ``source`` into ``out_dir``."""
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
    paths = {v: out / f"{source.name}-{v}.onnx" for v in VARIANTS}
    args = _example_args(source.example)
    on_step(f"{source.name}: export fp32")
    export_onnx(source.model, paths["fp32"], args)
    on_step(f"{source.name}: quantaware PTQ + export")
    qmodel = quantize_for_backend(source.model, source.calib, args)
    export_onnx(qmodel, paths["quantaware-int8"], args)
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
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out)
        os.close(fd)
        try:
            run(tmp)
            os.replace(tmp, paths[variant])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return paths


def _sessions(paths: dict[str, Path], threads: int) -> dict[str, Any]:
    from quantaware.bench import onnx_session

    return {v: onnx_session(p, threads=threads) for v, p in paths.items()}


def _outputs(session: Any, batches: list[Any]) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, _numpy_feed(b, names))[0] for b in batches])


def fidelity(kind: str, reference: np.ndarray, output: np.ndarray) -> float:
    """Top-1 agreement (``kind="image"``) or mean cosine similarity (``"text"``).

    Example:
        >>> a = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> fidelity("image", a, a[::-1]), fidelity("text", a, a)
        (0.0, 1.0)
    """
    if kind == "image":
        return float(np.mean(reference.argmax(1) == output.argmax(1)))
    ref, out = reference.astype(np.float64), output.astype(np.float64)
    cos = (ref * out).sum(1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    return float(cos.mean())


def time_interleaved(sessions: dict[str, Any], feeds: dict[str, dict[str, np.ndarray]],
                     runs: int, warmup: int) -> dict[str, float]:
    """Median ms of ``runs`` interleaved ``session.run`` calls per variant after ``warmup``."""
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
    first = source.evaluate[0]
    if isinstance(first, dict):
        return {k: v[:1].repeat(batch, 1) for k, v in first.items()}
    return first[:1].repeat(batch, *([1] * (first.dim() - 1)))


def benchmark(models: Sequence[str], batches: Sequence[int] = (1, 16), threads: int = 2,
              runs: int = 50, warmup: int = 10, quick: bool = False,
              out_dir: str | os.PathLike | None = None,
              on_step: Callable[[str], None] = lambda msg: None) -> list[dict[str, Any]]:
    """Build, run and time every variant of every model; one row per model/batch/variant.

    ``ratio_vs_fp32`` is latency divided by the fp32 latency (0.33 = 3x faster).

    Args:
        models: built-in names or ``MODULE:FUNCTION`` (see :func:`load_model_source`).
        batches: batch sizes to time.
        threads: ONNX Runtime intra-op threads.
        runs, warmup: timed and untimed runs per variant (interleaved).
        quick: small inputs (32x32 images, 16 tokens), 16 samples, 3 runs: a smoke test.
        out_dir: where the ONNX files go (default: a temporary folder).
    """
    from quantaware.bench import file_size

    if quick:
        runs, warmup = min(runs, 3), min(warmup, 1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        for spec in models:
            if quick:
                size = 16 if spec == "minilm" else 32
                source = load_model_source(spec, 16, 16, size=size)
            else:
                source = load_model_source(spec)
            paths = build_variants(source, folder, on_step)
            sessions = _sessions(paths, threads)
            on_step(f"{source.name}: fidelity")
            reference = _outputs(sessions["fp32"], source.evaluate)
            fid = {v: fidelity(source.kind, reference, _outputs(s, source.evaluate))
                   for v, s in sessions.items()}
            for batch in batches:
                on_step(f"{source.name}: timing batch {batch}")
                sample = _batch_of(source, batch)
                feeds = {v: _numpy_feed(sample, [i.name for i in s.get_inputs()])
                         for v, s in sessions.items()}
                latency = time_interleaved(sessions, feeds, runs, warmup)
                for variant in VARIANTS:
                    rows.append({
                        "model": source.name, "batch": batch, "variant": variant,
                        "latency_ms": latency[variant],
                        "ratio_vs_fp32": latency[variant] / latency["fp32"],
                        "size_bytes": file_size(paths[variant]),
                        "fidelity": fid[variant],
                    })
            del sessions
    return rows


def write_json(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` as JSON, atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json.tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(rows, handle, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
