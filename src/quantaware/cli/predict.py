"""``quantaware predict``: run deployed ONNX classifiers on photos, video or a camera, timed."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantaware._files import check_writable_dir, check_writable_file
from quantaware.cli import UsageError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from quantaware.predict import PredictResult


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predict", help="run ONNX classifiers on images, video or a camera; FPS and latency",
        description="Run an exported ONNX image classifier (or two, e.g. FP32 and INT8, to "
        "compare) at batch size 1 on every image of a folder, every frame of a video file "
        "(any container OpenCV reads) or a camera, preprocessed like ImageFolder. Prints "
        "model-only FPS and mean/p50/p90 latency of ONNX Runtime's run, end-to-end FPS "
        "(decode + preprocess + run) and, with two models, the second's FPS relative to the "
        "first and their top-1 agreement. --save writes the frames annotated with the top-3 "
        "classes. Exit codes: 0 ok, 1 failure (unreadable or mismatched files), 2 usage error.",
    )
    parser.add_argument("--model", required=True, action="append", metavar="MODEL.onnx",
                        help="an ONNX classifier; give it twice to compare two models (the "
                        "second against the first)")
    parser.add_argument("--source", required=True, metavar="DIR|VIDEO|CAMERA",
                        help="a folder of images, an image or video file, or a camera index")
    parser.add_argument("--labels", metavar="FILE",
                        help="class names, one per line in class order (default: indices)")
    parser.add_argument("--save", metavar="OUT",
                        help="write annotated frames: a video if OUT ends in .mp4, .avi, .mkv "
                        "or .mov, else a folder of frame_000000.jpg, ...")
    parser.add_argument("--show", action="store_true",
                        help="show annotated frames in a window (needs a display and a GUI "
                        "OpenCV build; q or Esc stops)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--max-frames", type=_positive_int, metavar="N",
                        help="stop after N frames (a camera runs until Ctrl-C without it)")
    parser.add_argument("--threads", type=_positive_int, default=2,
                        help="ONNX Runtime threads per model (default: %(default)s)")
    parser.add_argument("--warmup", type=_non_negative_int, default=10, metavar="N",
                        help="untimed runs per model before the first frame (default: "
                        "%(default)s)")
    parser.add_argument("--size", type=_positive_int,
                        help="model input side (default: the model's, else 224)")
    parser.add_argument("--resize", type=_positive_int,
                        help="shorter image side before the centre crop (default: size * 8/7)")
    parser.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                        help="normalisation mean of 0..1 pixels (default: ImageNet's)")
    parser.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                        help="normalisation std (default: ImageNet's)")
    parser.set_defaults(func=run, output_files=("json",))


class _LazyProgress:
    """A rich progress bar that appears only once a run has lasted more than ``delay`` s.

    It is refreshed from the caller's thread between frames (no refresh thread
    competing with ONNX Runtime for cores while a frame is timed).
    """

    def __init__(self, console: Console, delay: float = 1.0, interval: float = 0.1) -> None:
        self.console, self.delay, self.interval = console, delay, interval
        self.start = time.monotonic()
        self._last = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if self._progress is None:
            if now - self.start < self.delay:
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(TextColumn("frames"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console,
                                      auto_refresh=False, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("frames", total=total)
        if now - self._last >= self.interval or done == total:
            self._progress.update(self._task, completed=done, total=total, refresh=True)
            self._last = now

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _example_result() -> PredictResult:
    from quantaware.predict import ClassScore, FramePrediction, ModelStats, PredictResult

    top = (ClassScore(1, "cat", 0.9),)
    return PredictResult(
        "clip.mp4", "video", 224, 2,
        (ModelStats("fp32.onnx", "fp32", "FP32", (10.0, 10.0), (20.0, 20.0)),
         ModelStats("int8.onnx", "int8", "INT8", (5.0, 5.0), (15.0, 15.0))),
        (FramePrediction("frame 0", (top, top)), FramePrediction("frame 1", (top, top))),
        (4.0, 4.0), (6.0, 6.0))


def results_table(result: PredictResult) -> Table:
    """A rich table of a :class:`~quantaware.predict.PredictResult`'s per-model timings.

    Example:
        >>> table = results_table(_example_result())
        >>> [column.header for column in table.columns][:3], table.row_count
        (['model', 'precision', 'model FPS'], 2)
    """
    from rich.markup import escape
    from rich.table import Table

    two = len(result.models) > 1
    table = Table(title=f"{result.frames} frames from {escape(str(result.source))} "
                  f"({result.source_kind}), "
                  f"{result.input_size}x{result.input_size} input, batch 1, "
                  f"{result.threads} ONNX Runtime threads",
                  caption="model FPS and latency: ONNX Runtime run only; end-to-end: decode + "
                  "preprocess + run" + ("; x first model: FPS relative to the first model"
                                        if two else ""))
    headers = ["model", "precision", "model FPS", "mean ms", "p50 ms", "p90 ms",
               "end-to-end FPS"]
    if two:
        headers += ["model FPS x first model", "end-to-end x first model"]
    for header in headers:
        table.add_column(header, justify="left" if header in ("model", "precision") else "right")
    first = result.models[0]
    for stats in result.models:
        latency = stats.latency_summary()
        row = [stats.name, stats.precision, f"{stats.fps:.1f}", f"{latency['mean']:.2f}",
               f"{latency['p50']:.2f}", f"{latency['p90']:.2f}", f"{stats.end_to_end_fps:.1f}"]
        if two:
            row += [f"{stats.fps / first.fps:.2f}x",
                    f"{stats.end_to_end_fps / first.end_to_end_fps:.2f}x"]
        table.add_row(*row)
    return table


def summary_lines(result: PredictResult) -> list[str]:
    """Plain-text lines with the numbers that matter (readable in logs and pipes).

    Example:
        >>> lines = summary_lines(_example_result())
        >>> lines[1]  # doctest: +ELLIPSIS
        'int8 (INT8): model-only 200.0 FPS, latency mean 5.00 ms / p50 5.00 ms / ...'
        >>> lines[2].split(": ")[1]
        'model-only FPS 2.00x first model, end-to-end FPS 1.33x first model'
        >>> lines[3]
        'top-1 agreement: 1.0000 (2/2 frames)'
    """
    lines = []
    for stats in result.models:
        latency = stats.latency_summary()
        lines.append(f"{stats.name} ({stats.precision}): model-only {stats.fps:.1f} FPS, "
                     f"latency mean {latency['mean']:.2f} ms / p50 {latency['p50']:.2f} ms / "
                     f"p90 {latency['p90']:.2f} ms; end-to-end {stats.end_to_end_fps:.1f} FPS")
    if len(result.models) > 1:
        first, second = result.models
        lines.append(f"{second.name} ({second.precision}) vs {first.name} ({first.precision}): "
                     f"model-only FPS {result.fps_ratio():.2f}x first model, end-to-end FPS "
                     f"{result.fps_ratio(end_to_end=True):.2f}x first model")
        lines.append(f"top-1 agreement: {result.top1_agreement:.4f} ({result.agreeing_frames}/"
                     f"{result.frames} frames)")
    return lines


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from quantaware.cli._sources import check_threads
    from quantaware.image_folder import IMAGE_EXTENSIONS
    from quantaware.images import IMAGENET_MEAN, IMAGENET_STD
    from quantaware.predict import VIDEO_EXTENSIONS, VIDEO_WRITERS, predict

    if len(args.model) > 2:
        raise UsageError(f"--model takes one model, or two to compare; got {len(args.model)}")
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None and not all(math.isfinite(v) for v in values):
            raise UsageError(f"{flag} values must be finite numbers, got {values}")
    if args.std is not None and min(args.std) <= 0:
        raise UsageError(f"--std values must be > 0, got {args.std}")
    check_threads(args.threads)
    if args.size is not None and args.resize is not None and args.resize < args.size:
        raise UsageError(f"--resize ({args.resize}) must be >= --size ({args.size})")
    suffix = Path(args.save).suffix.lower() if args.save else ""
    if suffix in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS and suffix not in VIDEO_WRITERS:
        raise UsageError(f"--save takes a folder (for JPEG frames) or a video file ending in "
                         f"{', '.join(VIDEO_WRITERS)}; got {args.save!r}")
    if args.save:
        check = check_writable_file if suffix in VIDEO_WRITERS else check_writable_dir
        try:
            check(args.save, "--save")
        except OSError as exc:
            raise UsageError(str(exc)) from exc
        source, save = Path(str(args.source)).resolve(), Path(args.save).resolve()
        if source.is_dir() and (save == source or source in save.parents):
            raise UsageError(f"--save {args.save} lies inside the --source folder, whose "
                             "images the next run would read back as frames; give a folder "
                             "outside it")
    console = Console(width=None if sys.stdout.isatty() else 160, emoji=False)
    progress = _LazyProgress(Console(stderr=True, emoji=False))
    try:
        result = predict(args.model, args.source, labels=args.labels, size=args.size,
                         resize=args.resize, mean=args.mean or IMAGENET_MEAN,
                         std=args.std or IMAGENET_STD, threads=args.threads,
                         warmup=args.warmup, max_frames=args.max_frames, save=args.save,
                         show=args.show, on_progress=progress)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    console.print(results_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False)
    if result.saved:
        console.print(f"annotated frames written to {result.saved}", highlight=False)
    if args.json:
        from quantaware.deploy_bench import write_json

        path = write_json(result.to_dict(), args.json)
        console.print(f"results written to {path}", highlight=False)
    return 0
