"""``quantaware demo``: the whole workflow on the bundled digits data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="run the whole workflow on the bundled digits data",
        description="Train a CNN on scikit-learn's bundled digits (offline), then PTQ "
        "static int8, dynamic int8, float16 and QAT int8 from the PTQ model; export each "
        "to ONNX; evaluate in torch and ONNX Runtime; print accuracy, file size and "
        "latency side by side and write DIR/results.json.",
    )
    parser.add_argument("--out", default="quantaware-demo", metavar="DIR",
                        help="output folder for results.json and the ONNX files "
                        "(default: %(default)s)")
    parser.add_argument("--fast", action="store_true",
                        help="a quick, less accurate run (a few epochs) for smoke tests")
    parser.set_defaults(func=run, output_dirs=("out",))


def results_table(rows: list[dict[str, Any]], latency_batch: int):
    """A rich table of demo rows (first row is the float baseline)."""
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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from quantaware import demo

    console = Console(width=None if sys.stdout.isatty() else 100, emoji=False)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=not console.is_terminal) as progress:
        task = progress.add_task("starting", total=None)
        rows = demo.run_demo(args.out, fast=args.fast,
                             on_step=lambda msg: progress.update(task, description=msg))
    out = Path(args.out)
    latency_batch = json.loads((out / "run.json").read_text())["latency_batch"]
    console.print(results_table(rows, latency_batch))
    console.print(f"results written to {out / 'results.json'}")
    return 0
