"""Run deployed ONNX classifiers on photos, video files or a camera, and time them.

Each frame is decoded (Pillow for image files, OpenCV for video and cameras),
preprocessed exactly like :class:`quantaware.image_folder.ImageFolder` (shorter
side resized, centre crop, normalised; :func:`quantaware.image_folder.preprocess`)
and run at batch size 1, as on an edge device, by every model given: one model,
or two to compare (typically the float export and its INT8 counterpart). Per
model the timings are:

- model-only latency: the wall-clock time of ONNX Runtime's ``run`` alone, per
  frame, after a warm-up; its mean gives the model-only frames per second;
- end-to-end time: decode + preprocess + that model's ``run``, per frame (drawing
  and saving the annotated frames is not counted).

With two models they run in alternating order (A B, B A, ...) so caches and
machine noise favour neither, and their top-1 agreement over the frames is
reported. Sessions come from :func:`quantaware.bench.onnx_session` (fixed thread
budget, no spinning, no result-changing rewrites).

Annotated frames (top predictions with softmax probabilities drawn on the
original frame) go to a video file, a folder of numbered JPEG frames, or a
window; every file is written to a temporary name and renamed, so a failure
never leaves a half-written file.

Example:
    >>> import os, tempfile, numpy as np, torch
    >>> from PIL import Image
    >>> import quantaware
    >>> photos, models = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(os.path.join(photos, "a.png"))
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten()).eval()
    >>> model = quantaware.export_onnx(net, os.path.join(models, "m.onnx"),
    ...                                torch.zeros(1, 3, 16, 16))
    >>> result = predict(model, photos, warmup=1)
    >>> result.frames, result.input_size, result.models[0].precision
    (1, 16, 'FP32')
    >>> len(result.predictions[0].top[0])  # top-3 of the one model
    3
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from quantaware.bench import ORT_FLOAT_TYPES
from quantaware.frames import (
    VIDEO_EXTENSIONS,
    VIDEO_WRITERS,
    Frame,
    FrameSource,
    FrameSourceError,
    FrameWriter,
    Window,
    annotate,
)
from quantaware.image_folder import preprocess
from quantaware.images import IMAGENET_MEAN, IMAGENET_STD
from quantaware.sources import LabelsError, read_labels

__all__ = [
    "VIDEO_EXTENSIONS",
    "VIDEO_WRITERS",
    "ClassScore",
    "DeployedModel",
    "Frame",
    "FramePrediction",
    "FrameSource",
    "FrameSourceError",
    "FrameWriter",
    "ModelStats",
    "PredictResult",
    "annotate",
    "model_precision",
    "predict",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

DEFAULT_SIZE = 224


# Operators only quantized graphs contain.
_QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm",
    "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
})


# --------------------------------------------------------------------------- models


def model_precision(path: PathLike) -> str:
    """``"INT8"`` for a quantized ONNX graph (quantize/dequantize or integer
    operators, or int8/uint8 weights), ``"FP16"`` for float16 weights, else ``"FP32"``.

    Example:
        >>> import onnx, os, tempfile
        >>> from onnx import TensorProto, helper
        >>> graph = helper.make_graph(
        ...     [helper.make_node("Relu", ["x"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        >>> path = os.path.join(tempfile.mkdtemp(), "relu.onnx")
        >>> onnx.save(helper.make_model(graph), path)
        >>> model_precision(path)
        'FP32'
    """
    import onnx

    from quantaware.bench import OnnxModelError

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise OnnxModelError(f"cannot parse {str(path)!r} as ONNX: {exc}; re-export it") from exc
    integer_types = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                     onnx.TensorProto.UINT4}
    dtypes = {t.data_type for t in graph.initializer}
    if any(n.op_type in _QUANTIZED_OPS for n in graph.node) or dtypes & integer_types:
        return "INT8"
    return "FP16" if onnx.TensorProto.FLOAT16 in dtypes else "FP32"


class DeployedModel:
    """An ONNX image classifier with one float input ``(1, 3, H, W)``, in an
    ONNX Runtime session (:func:`quantaware.bench.onnx_session`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OnnxModelError: not a loadable ONNX model, or not one image input.

    Example:
        >>> import os, tempfile, torch, numpy as np, quantaware
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
        >>> path = quantaware.export_onnx(net, os.path.join(tempfile.mkdtemp(), "m.onnx"),
        ...                               torch.zeros(1, 3, 8, 8))
        >>> model = DeployedModel(path)
        >>> model.input_side, model.warm_up(8, runs=2)
        (8, 5)
        >>> logits, seconds = model.run(np.zeros((1, 3, 8, 8), np.float32))
        >>> logits.shape, seconds > 0
        ((1, 5), True)
    """

    def __init__(self, path: PathLike, threads: int = 2) -> None:
        from quantaware.bench import OnnxModelError, onnx_session

        self.path = Path(path)
        self.session = onnx_session(self.path, threads=threads)
        self.precision = model_precision(self.path)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OnnxModelError(
                f"model {str(self.path)!r} has {len(inputs)} inputs "
                f"{[i.name for i in inputs]}; predict feeds one image tensor (1, 3, H, W)")
        (arg,) = inputs
        shape = list(arg.shape or [])
        # Dimensions are ints when static, names or None when dynamic.
        static = [d if isinstance(d, int) else None for d in shape]
        if arg.type not in ORT_FLOAT_TYPES or len(shape) != 4 or static[0] not in (1, None) \
                or static[1] not in (3, None):
            raise OnnxModelError(
                f"model {str(self.path)!r} takes {arg.type} of shape {shape}; predict feeds "
                "one RGB image as a float tensor of shape (1, 3, H, W) (batch 1 or dynamic): "
                "export an image classifier with such an input")
        height, width = shape[2:]
        if isinstance(height, int) and isinstance(width, int) and height != width:
            raise OnnxModelError(
                f"model {str(self.path)!r} takes {height}x{width} images; predict feeds square "
                "centre crops: export the model with a square (or dynamic) input size")
        self.input_name = arg.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_dtype = ORT_FLOAT_TYPES[arg.type]
        self.input_side: int | None = height if isinstance(height, int) else None

    def run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """The first output for input ``x`` and the seconds ONNX Runtime's ``run`` took."""
        from quantaware.bench import denormals_flushed

        feed = {self.input_name: x}
        session = self.session.session  # the raw session: time nothing but its run
        with denormals_flushed():
            start = time.perf_counter_ns()
            (out,) = session.run([self.output_name], feed)
            elapsed = time.perf_counter_ns() - start
        return out, elapsed / 1e9

    def warm_up(self, side: int, runs: int = 10) -> int:
        """Run a ``side x side`` zero image ``runs`` times (at least once); return the
        number of classes the model outputs."""
        from quantaware.bench import OnnxModelError

        x = np.zeros((1, 3, side, side), self.input_dtype)
        try:
            for _ in range(max(1, runs)):
                out, _ = self.run(x)
        except Exception as exc:  # onnxruntime raises its own Exception subclasses
            raise OnnxModelError(
                f"ONNX Runtime cannot run {str(self.path)!r} on a (1, 3, {side}, {side}) "
                f"input: {exc}. Pass the image size the model was exported for (--size).") from exc
        if out.ndim != 2 or out.shape[0] != 1:
            raise OnnxModelError(
                f"model {str(self.path)!r} outputs shape {tuple(out.shape)} for one image; "
                "predict expects class scores of shape (1, num_classes) as the first output")
        return int(out.shape[1])


# --------------------------------------------------------------------------- results


class ClassScore(NamedTuple):
    """One predicted class: index, name (the index as text without labels), probability."""

    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class FramePrediction:
    """The top classes of one frame, per model (in the order the models were given)."""

    name: str
    top: tuple[tuple[ClassScore, ...], ...]


@dataclass(frozen=True)
class ModelStats:
    """Timings of one model over the frames, in milliseconds per frame.

    ``latency_ms``: ONNX Runtime's ``run`` only; ``end_to_end_ms``: decode +
    preprocess + ``run``.

    Example:
        >>> stats = ModelStats("m.onnx", "m", "INT8", (10.0, 20.0), (15.0, 25.0))
        >>> stats.fps, stats.end_to_end_fps, stats.latency_summary()["p50"]
        (66.66666666666667, 50.0, 15.0)
    """

    path: str
    name: str
    precision: str
    latency_ms: tuple[float, ...]
    end_to_end_ms: tuple[float, ...]

    @property
    def fps(self) -> float:
        """Model-only frames per second: 1000 / mean ``run`` latency."""
        return 1000.0 / float(np.mean(self.latency_ms))

    @property
    def end_to_end_fps(self) -> float:
        """Frames per second of decode + preprocess + ``run``."""
        return 1000.0 / float(np.mean(self.end_to_end_ms))

    def latency_summary(self) -> dict[str, float]:
        """Mean, median and 90th percentile of the ``run`` latency, in ms."""
        p50, p90 = np.percentile(self.latency_ms, [50, 90])
        return {"mean": float(np.mean(self.latency_ms)), "p50": float(p50), "p90": float(p90)}


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict` measured and predicted."""

    source: str
    source_kind: str
    input_size: int
    threads: int
    models: tuple[ModelStats, ...]
    predictions: tuple[FramePrediction, ...]
    decode_ms: tuple[float, ...]
    preprocess_ms: tuple[float, ...]
    saved: str | None = None

    @property
    def frames(self) -> int:
        """The number of frames run."""
        return len(self.predictions)

    def fps_ratio(self, end_to_end: bool = False) -> float | None:
        """The second model's FPS over the first's (None with one model)."""
        if len(self.models) < 2:
            return None
        first, second = self.models[:2]
        if end_to_end:
            return second.end_to_end_fps / first.end_to_end_fps
        return second.fps / first.fps

    @property
    def agreeing_frames(self) -> int | None:
        """Frames on which both models' top-1 class is the same (None with one model)."""
        if len(self.models) < 2:
            return None
        return sum(p.top[0][0].index == p.top[1][0].index for p in self.predictions)

    @property
    def top1_agreement(self) -> float | None:
        """The fraction of frames on which both models agree on the top-1 class."""
        agreeing = self.agreeing_frames
        return None if agreeing is None else agreeing / self.frames

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-serialisable data (per-frame top classes included)."""
        models = []
        for i, stats in enumerate(self.models):
            models.append({
                "path": stats.path, "name": stats.name, "precision": stats.precision,
                "model_fps": stats.fps, "latency_ms": stats.latency_summary(),
                "end_to_end_fps": stats.end_to_end_fps,
                "model_fps_ratio_vs_first": stats.fps / self.models[0].fps if i else 1.0,
                "end_to_end_fps_ratio_vs_first":
                    stats.end_to_end_fps / self.models[0].end_to_end_fps if i else 1.0,
            })
        names = [m.name for m in self.models]
        return {
            "source": self.source, "source_kind": self.source_kind, "frames": self.frames,
            "input_size": self.input_size, "threads": self.threads, "batch_size": 1,
            "decode_ms_mean": float(np.mean(self.decode_ms)),
            "preprocess_ms_mean": float(np.mean(self.preprocess_ms)),
            "models": models,
            "model_fps_ratio": self.fps_ratio(),
            "end_to_end_fps_ratio": self.fps_ratio(end_to_end=True),
            "top1_agreement": self.top1_agreement,
            "saved": self.saved,
            "predictions": [
                {"frame": p.name, "top": {name: [s._asdict() for s in scores]
                                          for name, scores in zip(names, p.top, strict=True)}}
                for p in self.predictions],
        }


# --------------------------------------------------------------------------- predict


def _input_size(models: Sequence[DeployedModel], size: int | None) -> int:
    from quantaware.bench import OnnxModelError

    static = {m.input_side for m in models if m.input_side is not None}
    if len(static) > 1:
        raise OnnxModelError(f"the models take different image sizes {sorted(static)}; compare "
                             "models exported for the same input size")
    if size is None:
        return static.pop() if static else DEFAULT_SIZE
    if static and size not in static:
        raise OnnxModelError(f"image size {size} (--size) does not match the model input "
                             f"{static.pop()}; leave --size out to use the model's size")
    return size


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name = path.stem
        while name in names:
            name += "'"
        names.append(name)
    return names


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


def _check_models(models: Sequence[DeployedModel], labels: PathLike | Sequence[str] | None,
                  size: int | None, resize: int | None, warmup: int
                  ) -> tuple[int, int, Sequence[str] | None]:
    """Warm the models up; return the input side, the resize side and the class names."""
    from quantaware.bench import OnnxModelError

    side = _input_size(models, size)
    resize = round(side * 8 / 7) if resize is None else resize
    if resize < side:
        raise ValueError(f"resize ({resize}) must be >= size ({side})")
    names = read_labels(labels) if isinstance(labels, str | os.PathLike) else labels
    classes = [m.warm_up(side, warmup) for m in models]
    if len(set(classes)) > 1:
        raise OnnxModelError(
            f"{str(models[0].path)!r} outputs {classes[0]} classes but {str(models[1].path)!r} "
            f"outputs {classes[1]}; compare two exports of the same classifier")
    if names is not None and len(names) != classes[0]:
        what = (f"labels file {str(labels)!r} has" if isinstance(labels, str | os.PathLike)
                else "the labels list has")
        raise LabelsError(f"{what} {len(names)} lines but model {str(models[0].path)!r} "
                          f"outputs {classes[0]} classes; give one class name per line, in the "
                          "model's class order")
    return side, resize, names


def _run_frame(models: Sequence[DeployedModel], frame: Frame, side: int, resize: int,
               mean: Sequence[float], std: Sequence[float]
               ) -> tuple[float, list[np.ndarray], list[float]]:
    """Preprocess ``frame`` and run every model on it: preprocess ms, outputs, run ms."""
    start = time.perf_counter()
    x = preprocess(frame.rgb, side, resize, mean, std).numpy()[None]
    feeds = {dtype: np.ascontiguousarray(x, dtype=dtype)
             for dtype in {m.input_dtype for m in models}}
    prep_ms = (time.perf_counter() - start) * 1e3
    outputs: list[np.ndarray] = [np.empty(0)] * len(models)
    times = [0.0] * len(models)
    # Alternate the order (A B, B A, ...) so neither model always runs on warm caches.
    order = range(len(models)) if frame.index % 2 == 0 else reversed(range(len(models)))
    for i in order:
        outputs[i], seconds = models[i].run(feeds[models[i].input_dtype])
        times[i] = seconds * 1e3
    return prep_ms, outputs, times


def _top_classes(logits: np.ndarray, names: Sequence[str] | None,
                 top_k: int) -> tuple[ClassScore, ...]:
    probs = _softmax(logits[0])
    best = np.argsort(-probs, kind="stable")[:top_k]
    return tuple(ClassScore(int(c), names[c] if names else str(c), float(probs[c]))
                 for c in best)


def predict(
    models: PathLike | Sequence[PathLike],
    source: PathLike | int,
    *,
    labels: PathLike | Sequence[str] | None = None,
    size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    threads: int = 2,
    warmup: int = 10,
    max_frames: int | None = None,
    top_k: int = 3,
    save: PathLike | None = None,
    show: bool = False,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> PredictResult:
    """Run one or two ONNX classifiers on every frame of ``source`` and time them.

    Args:
        models: an ONNX file, or two to compare (the second against the first).
        source: a folder of images, an image or video file, or a camera index
            (see :class:`FrameSource`).
        labels: class names (a file with one per line, or a list) in class order;
            their number must equal the models' number of classes.
        size: side of the square model input (default: the model's static input
            size, else 224); ``resize``, ``mean``, ``std``: as
            :func:`quantaware.image_folder.preprocess`.
        threads: ONNX Runtime intra-op threads per session.
        warmup: untimed runs per model before the first frame.
        max_frames: stop after this many frames (a camera runs until Ctrl-C without it).
        top_k: classes kept (and drawn) per frame and model.
        save: write annotated frames to this video file or folder (:class:`FrameWriter`).
        show: also show them in a window (q or Esc stops).
        on_progress: called as ``on_progress(frames_done, frames_expected_or_None)``.

    Raises:
        FileNotFoundError: a model, source or labels file is missing.
        OnnxModelError: a model cannot be loaded or is not an image classifier.
        FrameSourceError: the source cannot be read.
        LabelsError: the labels do not match the models.

    Example:
        >>> predict([], "photos")
        Traceback (most recent call last):
        ...
        ValueError: give one ONNX model, or two to compare, got 0
    """
    from quantaware.bench import session_options

    paths = [Path(models)] if isinstance(models, str | os.PathLike) else [Path(m) for m in models]
    if len(paths) not in (1, 2):
        raise ValueError(f"give one ONNX model, or two to compare, got {len(paths)}")
    session_options(threads)  # validates threads before anything is loaded
    if warmup < 0 or top_k < 1:
        raise ValueError(f"need warmup >= 0 and top_k >= 1, got warmup={warmup}, top_k={top_k}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
    predictions: list[FramePrediction] = []
    latency: list[list[float]] = [[] for _ in paths]
    decode_ms: list[float] = []
    preprocess_ms: list[float] = []
    with contextlib.ExitStack() as stack:
        frames = stack.enter_context(FrameSource(source, max_frames))
        writer = stack.enter_context(FrameWriter(save, frames.fps)) if save is not None else None
        window = Window() if show else None
        if window is not None:
            stack.callback(window.close)
        deployed = [DeployedModel(p, threads) for p in paths]
        side, resize, names = _check_models(deployed, labels, size, resize, warmup)
        model_names = _unique_names(paths)
        precisions = [m.precision for m in deployed]
        tags = precisions if len(set(precisions)) == len(precisions) else model_names
        if on_progress is not None:
            on_progress(0, frames.total)
        iterator = iter(frames)
        while True:
            try:
                frame = next(iterator, None)
                if frame is None:
                    break
                prep_ms, outputs, times = _run_frame(deployed, frame, side, resize, mean, std)
            except KeyboardInterrupt:
                if frames.kind != "camera":
                    raise
                break  # Ctrl-C ends a camera stream; what was measured is reported
            decode_ms.append(frame.decode_seconds * 1e3)
            preprocess_ms.append(prep_ms)
            for i, ms in enumerate(times):
                latency[i].append(ms)
            top = tuple(_top_classes(out, names, top_k) for out in outputs)
            predictions.append(FramePrediction(frame.name, top))
            if writer is not None or window is not None:
                lines = [f"{tag + ' ' if len(tags) > 1 else ''}{c.probability:.2f} {c.label}"
                         for tag, scores in zip(tags, top, strict=True) for c in scores]
                bgr = annotate(frame.rgb, lines)
                if writer is not None:
                    writer.write(bgr)
                if window is not None and not window.show(bgr):
                    break
            if on_progress is not None:
                on_progress(len(predictions), frames.total)
    if not predictions:
        raise FrameSourceError(f"no frames were read from {frames.description!r}")
    decode = np.asarray(decode_ms)
    prep = np.asarray(preprocess_ms)
    stats = tuple(
        ModelStats(str(path), name, precision, tuple(times),
                   tuple((decode + prep + np.asarray(times)).tolist()))
        for path, name, precision, times in zip(paths, model_names, precisions, latency,
                                                strict=True))
    logger.info("%d frames from %s", len(predictions), frames.description)
    return PredictResult(
        source=frames.description, source_kind=frames.kind, input_size=side, threads=threads,
        models=stats, predictions=tuple(predictions), decode_ms=tuple(decode_ms),
        preprocess_ms=tuple(preprocess_ms),
        saved=str(writer.path) if writer is not None and writer.count else None)
