"""Your own model, end to end: PTQ to an INT8 file, float vs INT8 evaluation.

What ``quantaware quantize``, ``evaluate`` and ``export`` run (and the pipeline
file's steps): :func:`quantize_model` calibrates with the measured defaults of
:mod:`quantaware.deploy` (or a preset and a calibration method);
:func:`export_model` writes ONNX or LiteRT files; :func:`compare_files` runs a
float and a quantized file side by side in ONNX Runtime, OpenVINO or LiteRT on
the same batches (accuracy on labelled data, top-1 agreement and output cosine,
file size, latency at batch 1 and at the data's batch size; :func:`compare_onnx`
for ONNX Runtime); :func:`run_quantize` does all of it and writes
``results.json`` (and a report) atomically.

Example:
    >>> import tempfile
    >>> from quantaware.sources import load_data, load_model
    >>> model = load_model("quantaware.models:DigitsCNN")
    >>> calib = load_data("digits", model, split="train", limit=64)
    >>> results = run_quantize(model, calib, tempfile.mkdtemp(), latency_runs=2)
    >>> sorted(results["files"])
    ['float_onnx', 'int8_onnx', 'quantized_checkpoint', 'results']
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantaware._batch import (
    check_class_labels,
    input_args,
    input_shapes,
    positional,
    slice_inputs,
)
from quantaware.config import LayerOverride, QuantConfig, QuantSpec
from quantaware.sources import DataSource, LoadedModel, SourceError

__all__ = ["CALIBRATION_METHODS", "QUANTIZED_FORMAT", "check_skip_patterns", "compare_files",
           "compare_onnx", "export_model", "load_quantized", "quantize_model", "run_quantize",
           "skip_rules"]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "moving_average", "percentile", "mse", "entropy")
QUANTIZED_FORMAT = "quantaware-quantized-v1"

Progress = Callable[[str], None]


def skip_rules(patterns: tuple[str, ...] | list[str]) -> tuple[LayerOverride, ...]:
    """Rules that keep the layers named by ``patterns`` in float: each an ``fnmatch``
    pattern of module (or functional op) names, which also covers the layers inside
    a matching module (``"features.3"`` skips ``features.3.conv.0`` too).

    Example:
        >>> [r.pattern for r in skip_rules(["classifier"])]
        ['classifier', 'classifier.*']
    """
    rules: list[LayerOverride] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise SourceError(f"a layer to keep in float must be a non-empty name or "
                              f"pattern, got {pattern!r}")
        rules += [LayerOverride(pattern, skip=True), LayerOverride(pattern + ".*", skip=True)]
    return tuple(rules)


def check_skip_patterns(module: nn.Module, patterns: tuple[str, ...] | list[str],
                        option: str = "--skip") -> None:
    """Refuse patterns that name no layer of ``module`` (a typo would otherwise
    quantize the layer the user meant to keep in float).

    Example:
        >>> check_skip_patterns(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["0"])
    """
    if not patterns:
        return
    names = [n for n, _ in module.named_modules() if n]

    def unmatched(candidates: list[str]) -> list[str]:
        return [p for p in patterns
                if not any(r.matches(n) for r in skip_rules([p]) for n in candidates)]

    missing = unmatched(names)
    if missing:  # functional ops (add, cat, matmul) have names in the traced graph only
        from quantaware.prepare import _Tracer

        try:
            graph = _Tracer().trace(module)
            names += [n.name for n in graph.nodes if n.op in ("call_function", "call_method")]
        except Exception:  # untraceable forward: module names are all there is
            pass
        missing = unmatched(names)
    if missing:
        leaves = [n for n, m in module.named_modules() if n and not any(m.children())]
        shown = ", ".join(leaves[:8]) + (", ..." if len(leaves) > 8 else "")
        raise SourceError(
            f"{option} {missing[0]!r} matches no layer of {type(module).__name__}; its layers "
            f"are named like {shown or '(none)'} (fnmatch patterns such as 'features.1*' "
            "work; a module's name also covers the layers inside it)")


def _static_activations(config: QuantConfig) -> bool:
    """Whether ``config`` calibrates activation ranges (static activation quantizers)."""
    return isinstance(config.activation, QuantSpec) and not config.activation.dynamic


def with_method(config: QuantConfig, method: str | None) -> QuantConfig:
    """``config`` with activation ranges from ``method`` (unchanged for ``None`` or a
    config without static activation quantizers).

    Example:
        >>> from quantaware import presets
        >>> with_method(presets.INT8, "mse").activation.observer
        'mse'
    """
    if method is None or not _static_activations(config):
        return config
    return dataclasses.replace(config, activation=dataclasses.replace(
        config.activation, observer=method))


def choose_config(module: nn.Module, preset: str | None = None,
                  method: str | None = None,
                  skip: tuple[str, ...] | list[str] = ()) -> QuantConfig:
    """The preset named ``preset`` (default: the measured default for ``module``),
    with activation ranges from ``method`` if given and the layers named by ``skip``
    (:func:`skip_rules`) kept in float.

    Example:
        >>> choose_config(torch.nn.Conv2d(3, 4, 3), "INT8", "mse").activation.observer
        'mse'
    """
    from quantaware import presets
    from quantaware.deploy import default_config

    try:
        config = presets.get(preset) if preset else default_config(module)
    except KeyError as exc:
        raise SourceError(str(exc.args[0] if exc.args else exc)) from exc
    if method is not None:
        if method not in CALIBRATION_METHODS:
            raise SourceError(f"unknown calibration method {method!r}; choose one of "
                              f"{', '.join(CALIBRATION_METHODS)}")
        if not _static_activations(config):
            kind = ("quantizes activations at run time, from each batch's own range"
                    if getattr(config.activation, "dynamic", False)
                    else "quantizes no activations")
            raise SourceError(f"preset {config.name} {kind}; a calibration method does not "
                              "apply")
        config = with_method(config, method)
    if skip:
        check_skip_patterns(module, skip)
        config = dataclasses.replace(config, overrides=config.overrides + skip_rules(skip))
    return config


def _check_runs(module: nn.Module, data: DataSource, size_option: str = "--size") -> None:
    """Run the float model on one sample first, so a shape mismatch is reported as such."""
    example = data.example
    try:
        with torch.no_grad():
            module(*input_args(example, module))
    except Exception as exc:
        shapes = input_shapes(example)
        raise SourceError(
            f"the model fails on the data from {data.name} (one sample of shape {shapes}): "
            f"{type(exc).__name__}: {exc}. Check the model's expected input or the "
            f"preprocessing ({size_option})") from exc


def quantize_model(model: LoadedModel, calib: DataSource, preset: str | None = None,
                   method: str | None = None,
                   backend: str = "onnxruntime-x86",
                   skip: tuple[str, ...] | list[str] = ()) -> tuple[nn.Module, QuantConfig]:
    """PTQ of a model source on calibration data: ``(quantized model, config used)``.

    ``backend`` is the runtime the model is quantized for
    (:data:`quantaware.deploy.BACKENDS`; ``"litert"``: layers before float ops keep
    int8 outputs where that costs little). ``skip``: layer names or patterns kept in
    float (:func:`skip_rules`).

    Example:
        >>> from quantaware.sources import load_data, load_model
        >>> m = load_model("quantaware.models:DigitsCNN")
        >>> q, config = quantize_model(m, load_data("digits", m, limit=32))
        >>> config.name
        'INT8_CNN'
    """
    from quantaware.deploy import quantize_for_backend

    module = model.require_torch("quantization")
    _check_runs(module, calib)
    config = choose_config(module, preset, method, skip)
    with torch.no_grad():
        quantized = quantize_for_backend(module, calib.unlabeled, calib.example, config=config,
                                         backend=backend)
    return quantized, getattr(quantized, "quantaware_config", config)


def export_model(module: nn.Module, path: str | Path, example: Any,
                 file_format: str = "onnx") -> Path:
    """Export a float or quantized model to ONNX or LiteRT (``"tflite"``), atomically."""
    if file_format == "tflite":
        from quantaware.export.tflite import export_tflite

        return export_tflite(module, path, input_args(example, module))
    if file_format != "onnx":
        raise ValueError(f"unknown export format {file_format!r}; choose onnx or tflite")
    from quantaware.export.onnx import export_onnx

    return export_onnx(module, path, input_args(example, module))


def save_quantized(path: str | Path, quantized: nn.Module, config: QuantConfig,
                   model_spec: str) -> Path:
    """Write the quantized model's state (quantizer state included) and config."""
    from quantaware.checkpoint import save_checkpoint

    return save_checkpoint(path, {"format": QUANTIZED_FORMAT, "model": model_spec,
                                  "config": config.to_dict(),
                                  "state_dict": quantized.state_dict()})


def load_quantized(path: str | Path, model: LoadedModel, example: Any) -> nn.Module:
    """Rebuild the quantized model that :func:`save_quantized` wrote, for ``model``.

    The checkpoint is read safely (no code runs); its keys must fit ``model``.
    """
    from quantaware.checkpoint import load_checkpoint
    from quantaware.prepare import prepare

    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != QUANTIZED_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise SourceError(f"{path} is not a quantized model written by `quantaware quantize` "
                          f"(format {found!r})")
    if not isinstance(payload.get("config"), dict) or not isinstance(
            payload.get("state_dict"), dict):
        raise SourceError(f"{path} lacks its quantization config or state (a damaged "
                          "checkpoint); write it again with `quantaware quantize`")
    try:
        config = QuantConfig.from_dict(payload["config"])
    except (ValueError, TypeError, KeyError) as exc:
        raise SourceError(f"{path} holds an unreadable quantization config ({exc}); write it "
                          "again with `quantaware quantize`") from exc
    module = model.require_torch("loading a quantized checkpoint")
    prepared = prepare(module, config, input_args(example, module))
    state = payload["state_dict"]
    modules = dict(prepared.named_modules())
    for key, value in state.items():  # SmoothQuant factors are buffers added after prepare
        owner, _, name = key.rpartition(".")
        if name == "smoothing" and owner in modules and hasattr(modules[owner], "set_smoothing"):
            modules[owner].set_smoothing(value)
    own = prepared.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or wrong:
        raise SourceError(f"{path} does not fit model {model.name}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, shape mismatch {wrong[:3]}. Pass the "
                          "model it was quantized from; if it is that model, the file comes "
                          "from a quantaware version that quantized other layers of it: "
                          "quantize it again")
    prepared.load_state_dict(state)
    _check_loaded(path, prepared)
    return prepared.eval()


def _check_loaded(path: str | Path, model: nn.Module) -> None:
    """Refuse a checkpoint whose numbers cannot be deployed: non-finite weights, or a
    calibrated quantizer with a scale that is not a positive finite number or a zero
    point outside its integer range (an export would write a file computing zeros
    or NaN)."""
    from quantaware.prepare import quantizers

    bad = [name for name, t in model.named_parameters() if not bool(torch.isfinite(t).all())]
    for name, q in quantizers(model):
        if not bool(q.calibrated):
            continue
        scale, zero_point = q.deployed_qparams()
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            bad.append(f"{name}.scale")
        elif not bool(((zero_point >= q.qmin) & (zero_point <= q.qmax)).all()):
            bad.append(f"{name}.zero_point")
    if bad:
        raise SourceError(
            f"{path} holds values no deployed model can use in {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} (non-finite weights, "
            "scales that are not positive finite numbers, or zero points outside the "
            "integer range); the checkpoint is damaged: write it again with quantize")


# -- evaluation in the target runtime ---------------------------------------------


def _feed(session: Any, inputs: Any,
          parameters: list[str] | None = None) -> dict[str, np.ndarray]:
    """The feed of ``session`` for a batch's inputs, cast to the file's input types.

    Keyword inputs go by name; where the file names its inputs otherwise (LiteRT
    numbers them), in the order of ``parameters`` (the model's ``forward``
    parameters, the order the file was exported in) or else in the batch's order.
    """
    names = [i.name for i in session.get_inputs()]
    types = {i.name: i.type for i in session.get_inputs()}
    if isinstance(inputs, dict):
        if set(inputs) != set(names):
            if len(inputs) != len(names):
                raise SourceError(f"the model file takes inputs {names}; the data gives "
                                  f"{sorted(inputs)}")
            ordered = positional(inputs, parameters) if parameters else ()
            if len(ordered) != len(inputs):
                ordered = tuple(inputs.values())
            inputs = dict(zip(names, ordered, strict=True))
        values = inputs
    else:
        args = input_args(inputs)
        if len(names) != len(args):
            raise SourceError(f"the model file takes {len(names)} inputs {names}; the data "
                              f"gives {len(args)} per batch")
        values = dict(zip(names, args, strict=True))
    feed = {}
    for name in names:
        array = np.ascontiguousarray(values[name].detach().cpu().numpy()
                                     if isinstance(values[name], torch.Tensor) else values[name])
        dtype = next((d for d in (np.int64, np.int32) if np.dtype(d).name in types[name]),
                     np.float32)
        feed[name] = array.astype(dtype, copy=False)
    return feed


def _outputs(session: Any, batches: list[Any], runtime: str,
             parameters: list[str] | None = None) -> list[np.ndarray]:
    """Every output of the file over ``batches``, each as ``(samples, values)``."""
    runs = []
    for inputs in batches:
        try:
            runs.append(session.run(None, _feed(session, inputs, parameters)))
        except SourceError:
            raise
        except Exception as exc:  # each runtime raises its own types
            raise SourceError(f"{runtime} cannot run the model on this data: {exc}") from exc
    for run in runs:
        for k, out in enumerate(run):
            if np.ndim(out) == 0:
                raise SourceError(f"output {k} of the model is a scalar; comparing models "
                                  "needs outputs with a batch dimension (N, ...)")
            if np.issubdtype(np.asarray(out).dtype, np.floating) and not np.isfinite(out).all():
                raise SourceError(f"{runtime} gives NaN/Inf in output {k} of the model on "
                                  "this data; check the model (and its weights) for values "
                                  "that overflow")
    # float64: cosines of large outputs overflow float32; shapes kept (dense maps
    # agree per position)
    return [np.concatenate([np.asarray(run[k]) for run in runs]).astype(np.float64)
            for k in range(len(runs[0]))]


def _has_classes(out: np.ndarray) -> bool:
    """Class scores: (N, classes) or dense maps (N, classes, H, W, ...) with more than
    one class; not (N, L, D) sequences of features, not single logits."""
    return (out.ndim == 2 or out.ndim >= 4) and out.shape[1] > 1


def _latency_ms(session: Any, feed: dict[str, np.ndarray], runs: int) -> float:
    for _ in range(max(2, runs // 5)):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        session.run(None, feed)
        times.append(time.perf_counter_ns() - start)
    return float(np.median(times)) / 1e6


def compare_onnx(float_path: str | Path, quantized_path: str | Path, data: DataSource,
                 threads: int = 2, latency_runs: int = 30,
                 progress: Progress | None = None,
                 names: tuple[str, str] = ("FP32", "INT8")) -> dict[str, Any]:
    """Float vs quantized ONNX files on the same batches in ONNX Runtime, measured in
    one run: :func:`compare_files` with ``backend="onnxruntime"``.

    Example:
        >>> import tempfile, os
        >>> from quantaware.sources import load_data, load_model
        >>> m = load_model("quantaware.models:DigitsCNN")
        >>> d = load_data("digits", m, limit=16)
        >>> f = export_model(m.module, os.path.join(tempfile.mkdtemp(), "f.onnx"), d.example)
        >>> compare_onnx(f, f, d, latency_runs=2)["models"][1]["top1_agreement"]
        100.0
    """
    return compare_files(float_path, quantized_path, data, "onnxruntime", threads=threads,
                         latency_runs=latency_runs, progress=progress, names=names)


def compare_files(float_path: str | Path, quantized_path: str | Path, data: DataSource,
                  backend: str = "onnxruntime", threads: int = 2, latency_runs: int = 30,
                  progress: Progress | None = None,
                  names: tuple[str, str] = ("FP32", "INT8"),
                  parameters: list[str] | None = None) -> dict[str, Any]:
    """Float vs quantized exported files on the same batches in ``backend``, measured
    in one run.

    ``backend`` is one of :data:`quantaware.backends.BACKENDS`: ONNX files in
    ``"onnxruntime"`` or ``"openvino"``, ``.tflite`` files
    (:func:`quantaware.export_tflite`) in ``"litert"``. ``names`` label the two
    rows; ``parameters`` (the model's ``forward`` parameter names) place keyword
    inputs on a file's numbered inputs. Returns a dict with a row per model
    (``accuracy`` on labelled data, from the first output, ``size_bytes``,
    ``latency_ms_batch1``, ``latency_ms_batch``) and the quantized model's
    ``top1_agreement`` (per position for dense maps ``(N, classes, H, W)``; left out
    where no output holds class scores: ``(N, L, D)`` features, single logits) and
    mean output ``cosine`` against the float model (for a model with several
    outputs, those of its worst output, and their count in ``outputs``). LiteRT files
    have the static batch they were exported with; a larger batch runs as that many
    invocations.

    Example:
        >>> import tempfile, os
        >>> from quantaware.sources import load_data, load_model
        >>> m = load_model("quantaware.models:DigitsCNN")
        >>> d = load_data("digits", m, limit=32)
        >>> q, _ = quantize_model(m, d)
        >>> out = tempfile.mkdtemp()
        >>> f = export_model(m.module, os.path.join(out, "f.onnx"), d.example)
        >>> i = export_model(q, os.path.join(out, "q.onnx"), d.example)
        >>> result = compare_files(f, i, d, "onnxruntime", latency_runs=2)
        >>> result["backend"], result["models"][1]["size_ratio"] < 0.5
        ('onnxruntime', True)
    """
    from quantaware.backends import RUNTIME_NAMES, check_backend, create_backend_session
    from quantaware.bench import file_size

    check_backend(backend)
    runtime = RUNTIME_NAMES[backend]
    kind = "LiteRT" if backend == "litert" else "ONNX"
    batches = data.inputs
    labels = data.labels.numpy() if data.labeled else None
    rows, outputs = [], []
    for label, path in zip(names, (Path(float_path), Path(quantized_path)), strict=True):
        if not path.is_file():
            raise FileNotFoundError(f"{kind} model {str(path)!r} does not exist")
        if progress:
            progress(f"running {label} ({path.name}) in {runtime} on {data.num_samples} "
                     "samples")
        try:
            session = create_backend_session(str(path), backend, threads=threads)
        except ImportError:
            raise
        except Exception as exc:  # each runtime raises its own types
            raise SourceError(f"{str(path)!r} is not a loadable {kind} model: {exc}") from exc
        every = _outputs(session, batches, runtime, parameters)
        outputs.append(every)
        out = every[0]  # the first output holds the class scores
        row: dict[str, Any] = {"model": label, "path": str(path), "size_bytes": file_size(path)}
        names_ = data.label_names
        if names_ is not None and (out.ndim < 2 or len(names_) != out.shape[1]):
            has = (f"has {out.shape[1]} outputs" if out.ndim >= 2
                   else f"gives outputs of shape {out.shape[1:]}")
            raise SourceError(f"the labels file has {len(names_)} class names but "
                              f"{path.name} {has}; use the labels file of this model")
        if labels is not None:
            if out.ndim != 2 or out.shape[1] < 2:
                raise SourceError(f"{path.name} gives outputs of shape {out.shape[1:]} per "
                                  "sample; accuracy needs class scores (N, classes): "
                                  "compare without labels")
            try:
                check_class_labels(labels, out.shape[1])
            except ValueError as exc:
                raise SourceError(f"{exc} (for image folders: the class folders do not "
                                  "match the model's outputs)") from exc
            row["accuracy"] = 100.0 * float(np.mean(out.argmax(1) == labels))
        if progress:
            progress(f"timing {label}")
        one = _feed(session, slice_inputs(batches[0], 0, 1), parameters)
        row["latency_ms_batch1"] = _latency_ms(session, one, latency_runs)
        full = _feed(session, batches[0], parameters)
        row["batch"] = int(next(iter(full.values())).shape[0])
        row["latency_ms_batch"] = _latency_ms(session, full,
                                              max(3, latency_runs // 3))
        rows.append(row)
    if [o.shape for o in outputs[0]] != [o.shape for o in outputs[1]]:
        raise SourceError(f"the two models give outputs of different shapes "
                          f"{[o.shape for o in outputs[0]]} and {[o.shape for o in outputs[1]]}; "
                          "compare a model with its own quantized version")
    agreements, cosines = [], []
    for ref, out in zip(*outputs, strict=True):
        if _has_classes(ref):  # per sample, or per position of a dense map
            agreements.append(100.0 * float(np.mean(ref.argmax(1) == out.argmax(1))))
        ref, out = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
        cos = (ref * out).sum(1) / np.maximum(np.linalg.norm(ref, axis=1)
                                              * np.linalg.norm(out, axis=1), 1e-12)
        cosines.append(float(np.mean(cos)))
    quant = rows[1]
    quant["cosine"] = min(cosines)
    if agreements:  # feature outputs and single logits have no top-1 to agree on
        quant["top1_agreement"] = min(agreements)
    if len(outputs[0]) > 1:
        quant["outputs"] = len(outputs[0])
    quant["size_ratio"] = quant["size_bytes"] / rows[0]["size_bytes"]
    quant["speedup_batch1"] = rows[0]["latency_ms_batch1"] / quant["latency_ms_batch1"]
    quant["speedup_batch"] = rows[0]["latency_ms_batch"] / quant["latency_ms_batch"]
    return {"data": data.name, "samples": data.num_samples, "labeled": data.labeled,
            "backend": backend, "threads": threads, "models": rows}


def comparison_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows of strings for printing :func:`compare_onnx`'s result as a table."""
    header = ["model", "accuracy %", "agreement %", "cosine", "size MiB",
              "ms @1", f"ms @{result['models'][0]['batch']}", "speed-up @1"]
    rows = [header]
    for r in result["models"]:
        rows.append([
            r["model"], f"{r['accuracy']:.2f}" if "accuracy" in r else "-",
            f"{r['top1_agreement']:.2f}" if "top1_agreement" in r else "-",
            f"{r['cosine']:.5f}" if "cosine" in r else "-",
            f"{r['size_bytes'] / 2**20:.2f}", f"{r['latency_ms_batch1']:.2f}",
            f"{r['latency_ms_batch']:.2f}",
            f"{r['speedup_batch1']:.2f}x" if "speedup_batch1" in r else "1.00x"])
    return rows


# -- the quantize command ------------------------------------------------------------


def run_quantize(model: LoadedModel, calib: DataSource, out: str | Path,
                 evaluate: DataSource | None = None, preset: str | None = None,
                 method: str | None = None, report: bool = False, verify: bool = True,
                 threads: int = 2, latency_runs: int = 30,
                 progress: Progress | None = None,
                 backend: str = "onnxruntime-x86",
                 skip: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """PTQ, export, evaluation in the target runtime and ``results.json`` in ``out``.

    ``backend``: the runtime the INT8 model is quantized for and runs in
    (:data:`quantaware.deploy.BACKENDS`). For ``"onnxruntime-x86"`` the float and
    INT8 models are exported to ONNX (``model-fp32.onnx``, ``model-int8.onnx``) and
    run in ONNX Runtime; for ``"litert"`` to LiteRT (``model-fp32.tflite``,
    ``model-int8.tflite``, full-integer, at the example's batch size) and run in
    LiteRT. ``model-int8.pt`` holds the quantized model for ``quantaware export
    --quantized``. ``skip``: layer names or patterns kept in float
    (:func:`skip_rules`).

    ``evaluate`` defaults to the calibration data (then the accuracy is not held
    out: pass separate data for an honest figure). With ``verify`` the INT8 file
    is checked against the torch model (:func:`quantaware.verify`) in the same
    runtime. With ``report`` an HTML report (and Markdown summary) is written beside
    it. The files are written to a hidden folder in ``out`` and moved into place at
    the end, ``results.json`` last: a run that fails or is stopped leaves an earlier
    run's files in ``out`` as they were.
    """
    from quantaware.deploy import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    runtime, suffix = ("litert", "tflite") if backend == "litert" else ("onnxruntime", "onnx")
    # the preset and method are checked before anything in OUT is touched
    chosen = choose_config(model.require_torch("quantization"), preset, method, skip)
    if runtime == "litert":  # before calibrating: the export and the runtime are extras
        from quantaware.backends import _import_litert
        from quantaware.export.tflite import _import_litert as _import_converter
        from quantaware.export.tflite import litert_problem

        _import_converter()
        _import_litert()
        problem = litert_problem(chosen)
        if problem is not None:
            raise SourceError(f"--target litert: {problem}")
    from quantaware._files import check_writable_dir, replace_file
    from quantaware.deploy_bench import write_json

    out = Path(out)
    check_writable_dir(out)
    say = progress or (lambda _msg: None)
    if _static_activations(chosen):
        say(f"calibrating on {calib.num_samples} samples from {calib.name}")
    else:  # FP16, weight-only and dynamic presets have no activation ranges to calibrate
        say(f"quantizing the weights ({chosen.name})")
    quantized, config = quantize_model(model, calib, preset, method, backend, skip)
    say(f"exporting the float and the INT8 model ({suffix})")
    # Everything is written to a hidden folder in OUT and moved into place at the end,
    # results.json last: a run that fails or is stopped part way leaves an earlier
    # run's files as they were, never a mixture.
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".quantaware-run-", dir=out))
    try:
        results = _export_and_compare(model, calib, evaluate, stage, quantized, config,
                                      suffix, runtime, backend, verify, report, threads,
                                      latency_runs, say)
        results = _moved_paths(results, stage, out)
        write_json(results, stage / "results.json")  # type: ignore[arg-type]
        other = "onnx" if suffix == "tflite" else "tflite"  # a run for the other target
        stale = ["report.html", "report.md", f"model-fp32.{other}", f"model-int8.{other}"]
        staged = sorted(stage.iterdir(), key=lambda p: p.name == "results.json")
        for path in staged[:-1]:
            replace_file(path, out / path.name)
        moved = {path.name for path in staged[:-1]}
        for name in stale:  # files of an earlier run that this run does not replace
            if name not in moved:
                (out / name).unlink(missing_ok=True)
        replace_file(staged[-1], out / "results.json")  # last: the run is complete
        return results
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _moved_paths(value: Any, stage: Path, out: Path) -> Any:
    """``value`` (results: dicts, lists, strings) with paths in ``stage`` moved to ``out``."""
    if isinstance(value, dict):
        return {k: _moved_paths(v, stage, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved_paths(v, stage, out) for v in value]
    if isinstance(value, str) and value.startswith(str(stage)):
        return str(out) + value[len(str(stage)):]
    return value


def _export_and_compare(model: LoadedModel, calib: DataSource, evaluate: DataSource | None,
                        out: Path, quantized: nn.Module, config: QuantConfig, suffix: str,
                        runtime: str, backend: str, verify: bool, report: bool, threads: int,
                        latency_runs: int, say: Callable[[str], None]) -> dict[str, Any]:
    from quantaware._batch import forward_parameters

    module = model.require_torch("quantization")
    float_path = export_model(module, out / f"model-fp32.{suffix}", calib.example, suffix)
    int8_path = export_model(quantized, out / f"model-int8.{suffix}", calib.example, suffix)
    ckpt = save_quantized(out / "model-int8.pt", quantized, config, model.name)
    data = evaluate or calib
    parameters = forward_parameters(module)
    comparison = compare_files(float_path, int8_path, data, runtime, threads=threads,
                               latency_runs=latency_runs, progress=say, parameters=parameters)
    results: dict[str, Any] = {
        "model": model.name, "calibration": {"data": calib.name, "samples": calib.num_samples},
        "config": config.to_dict(), "target": backend, "evaluation": comparison,
        "files": {f"float_{suffix}": str(float_path), f"int8_{suffix}": str(int8_path),
                  "quantized_checkpoint": str(ckpt), "results": str(out / "results.json")},
    }
    if verify:
        import quantaware

        say("verifying the INT8 file against the torch model")
        report_ = quantaware.verify(int8_path, quantized, data.unlabeled, num_batches=8,
                                    threads=threads, backend=runtime)
        # Embeddings have no classes: their check is the cosine, not the arg-max.
        passed = (report_.cosine >= 0.99 if model.tokenizer is not None
                  else report_.passed())
        results["verify"] = report_.to_dict() | {"passed": bool(passed)}
    if report:
        from quantaware.report import histograms_from_model, rows_from_results, write_report

        say("writing the report")
        from quantaware.backends import RUNTIME_NAMES

        runtime_name = RUNTIME_NAMES[runtime]
        path = write_report(out / "report.html", {
            **rows_from_results(comparison),
            "title": f"quantaware: {model.name} ({config.name}, {runtime_name})",
            "histograms": histograms_from_model(quantized, limit=12)})
        results["files"]["report"] = str(path)
        results["files"]["report_summary"] = str(path.with_suffix(".md"))
    return results
