"""Options shared by the commands that take a model and data (quantize, evaluate, export)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from quantaware.cli import UsageError

MODEL_HELP = ("MODULE:FUNCTION or path/to/file.py:FUNCTION returning an nn.Module, a Hugging "
              "Face model folder (config.json, model.safetensors, tokenizer.json), or an "
              ".onnx file")
DATA_HELP = ("digits, mnist1d, an image folder (class subfolders = labelled; images only = "
             "unlabelled), a .txt file with one sentence per line, or MODULE:FUNCTION "
             "returning an iterable of batches")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--weights", metavar="FILE",
                        help="state dict for a MODULE:FUNCTION model (.pt/.pth read with "
                        "torch.load(weights_only=True), or .safetensors)")


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=224,
                        help="image folders: side of the square model input (default 224)")
    parser.add_argument("--resize", type=int, default=None,
                        help="image folders: shorter side before the centre crop "
                        "(default size*8/7, 256 for 224)")
    parser.add_argument("--labels", metavar="FILE",
                        help="labelled image folders: the model's class names, one per line "
                        "in output order; class folders are matched by name (default: "
                        "folders named by integers are those class indices, others are "
                        "numbered in sorted order)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per batch (default 16; MODULE:FUNCTION data keeps "
                        "its own batches unless this is given)")


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape C,H,W`` as a tuple of positive ints (``None`` when not given)."""
    from quantaware.cli import UsageError

    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--input-shape must be comma-separated ints, got {text!r}") from exc
    if not shape or min(shape) < 1:
        raise UsageError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def check_threads(value: int | None) -> None:
    """``--threads``: a positive integer of at most :data:`quantaware.backends.MAX_THREADS`
    (a huge count made the runtimes create thread pools until the machine stalled)."""
    from quantaware.backends import MAX_THREADS

    positive("--threads", value)
    if value is not None and value > MAX_THREADS:
        raise UsageError(f"--threads must be at most {MAX_THREADS}, got {value}")


def positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise UsageError(f"{name} must be a positive integer, got {value}")


def load_model(args: argparse.Namespace) -> Any:
    from quantaware.sources import SourceError, load_model

    try:
        return load_model(args.model, args.weights)
    except SourceError as exc:
        raise UsageError(str(exc)) from exc


def load_data(args: argparse.Namespace, spec: str, model: Any, split: str,
              limit: int | None) -> Any:
    from quantaware.image_folder import ImageFolderError
    from quantaware.sources import SourceError, is_function_spec, load_data, read_labels

    positive("--batch-size", args.batch_size)
    positive("--size", args.size)
    positive("--resize", args.resize)
    try:
        names = read_labels(args.labels) if getattr(args, "labels", None) else None
        batch_size = args.batch_size
        if batch_size is None and not is_function_spec(spec):
            batch_size = 16
        return load_data(spec, model, split=split, batch_size=batch_size, limit=limit,
                         size=args.size, resize=args.resize, class_names=names)
    except (SourceError, ImageFolderError) as exc:
        raise UsageError(str(exc)) from exc


def console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 110, emoji=False)


@contextmanager
def status(con: Any, first: str) -> Iterator[Callable[[str], None]]:
    """The current step with a spinner and the time spent in it (finished steps stay
    listed with their time); plain lines on stderr when not on a terminal."""
    if not con.is_terminal:
        print(first, file=sys.stderr)
        yield lambda msg: print(msg, file=sys.stderr)
        return
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=con) as progress:
        current = [progress.add_task(escape(first), total=1)]

        def update(message: str) -> None:
            progress.update(current[0], completed=1)
            current[0] = progress.add_task(escape(message), total=1)

        yield update
        progress.update(current[0], completed=1)


def print_table(con: Any, title: str, rows: list[list[str]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for i, head in enumerate(rows[0]):
        table.add_column(head, justify="left" if i == 0 else "right")
    for row in rows[1:]:
        table.add_row(*row)
    con.print(table)


def write_json(payload: Any, path: str) -> str:
    from quantaware.deploy_bench import write_json as write

    return str(write(payload, path))


def print_verify(con: Any, label: str, verify: dict[str, Any]) -> None:
    """One line for a verify result dict (``VerifyReport.to_dict()`` plus ``passed``)."""
    from quantaware.backends import RUNTIME_NAMES

    runtime = RUNTIME_NAMES.get(verify.get("backend", ""), "ONNX Runtime")
    error = (f"max error {verify['max_error_lsb']} LSB" if verify["max_error_lsb"] is not None
             else f"max abs error {verify['max_abs_error']:.3g} (float output)")
    con.print(f"{label}: {runtime} vs torch top-1 {100 * verify['top1_agreement']:.2f}%, "
              f"cosine {verify['cosine']:.5f}, {error} -> "
              f"{'PASS' if verify['passed'] else 'CHECK'}")


def print_files(con: Any, files: dict[str, str]) -> None:
    for kind, path in files.items():
        con.print(f"{kind}: {path}")
