"""Command-line interface: a thin layer over the Python API.

Exit codes: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

DESCRIPTION = """\
quantaware: quantize PyTorch models (PTQ, QAT) and deploy INT8 ONNX that
provably computes what you trained.

Start with `quantaware demo`: it trains a CNN on scikit-learn's bundled digits,
quantizes it five ways, exports each to ONNX and compares accuracy, size and
ONNX Runtime latency in one table."""


def _demo_table(rows: list[dict[str, Any]], latency_batch: int):
    from rich.table import Table

    table = Table(
        title="quantaware demo: digits CNN, float vs quantized",
        caption=f"accuracy on the held-out split; latency: ONNX Runtime, batch "
        f"{latency_batch}, 2 threads, median; agree: top-1 agreement torch vs ONNX Runtime",
    )
    for header in ("variant", "acc torch", "acc ORT", "size KiB", "size x", "latency ms",
                   "speed-up", "agree"):
        table.add_column(header, justify="left" if header == "variant" else "right")
    base = rows[0]
    for row in rows:
        agreement = row.get("verify_top1_agreement")
        table.add_row(
            row["variant"],
            f"{row['accuracy']:.2f}%",
            f"{row['accuracy_onnxruntime']:.2f}%",
            f"{row['size_bytes'] / 1024:.1f}",
            f"{row['size_bytes'] / base['size_bytes']:.2f}x",
            f"{row['latency_ms']:.3f}",
            f"{base['latency_ms'] / row['latency_ms']:.2f}x",
            "-" if agreement is None else f"{100 * agreement:.2f}%",
        )
    return table


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from quantaware.demo import run_demo

    console = Console(width=None if sys.stdout.isatty() else 100)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=not console.is_terminal) as progress:
        task = progress.add_task("starting", total=None)
        rows = run_demo(args.out, fast=args.fast,
                        on_step=lambda msg: progress.update(task, description=msg))
    out = Path(args.out)
    latency_batch = json.loads((out / "run.json").read_text())["latency_batch"]
    console.print(_demo_table(rows, latency_batch))
    console.print(f"results written to {out / 'results.json'}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from quantaware import presets

    names = [args.name] if args.name else sorted(presets.PRESETS)
    try:
        payload = {name.upper(): presets.get(name).to_dict() for name in names}
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(json.dumps(payload, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantaware", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run the whole workflow on the bundled digits data",
        description="Train a CNN on scikit-learn's bundled digits (offline), then PTQ "
        "static int8, dynamic int8, float16 and QAT int8 from the PTQ model; export each "
        "to ONNX; evaluate in torch and ONNX Runtime; print accuracy, file size and "
        "latency side by side and write DIR/results.json.",
    )
    demo.add_argument("--out", default="quantaware-demo", metavar="DIR",
                      help="output folder for results.json and the ONNX files "
                      "(default: %(default)s)")
    demo.add_argument("--fast", action="store_true",
                      help="a quick, less accurate run (a few epochs) for smoke tests")
    demo.set_defaults(func=_cmd_demo)

    pre = sub.add_parser("presets", help="show the built-in quantization presets as JSON",
                         description="Print the named presets (or one of them) as the "
                         "JSON that QuantConfig.from_dict reads.")
    pre.add_argument("name", nargs="?", help="a preset name, e.g. INT8")
    pre.set_defaults(func=_cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quantaware`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
