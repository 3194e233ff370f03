"""``quantaware report``: turn a results JSON into a self-contained HTML report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="write an HTML report (with plots) and a Markdown summary",
        description="Read a results JSON (the results.json of `quantize` or `run`, the "
        "--json of `evaluate`, or `python benchmarks/ptq.py --json FILE`: a 'rows' list of "
        "variants with agreement/accuracy and size_bytes, optional 'sensitivity' and "
        "'histograms') and write a self-contained HTML file with plots "
        "(accuracy vs size, per-layer sensitivity, activation histograms) plus a .md summary.",
    )
    parser.add_argument("results", help="the results JSON file")
    parser.add_argument("--out", default="quantaware-report.html", metavar="FILE",
                        help="HTML file to write; the summary goes next to it as .md "
                        "(default: %(default)s)")
    parser.set_defaults(func=run, output_files=("out",))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from quantaware.cli import UsageError
    from quantaware.report import rows_from_results, write_report

    if Path(args.out).suffix.lower() == ".md":
        raise UsageError(f"--out {args.out}: --out names the HTML file and the .md summary "
                         "is written beside it; give a name ending in .html")
    source = Path(args.results)
    if not source.is_file():
        raise UsageError(f"results file {source} not found; write one with "
                         "`python benchmarks/ptq.py --json FILE`")
    try:
        payload = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{source} is not valid JSON ({exc}); pass the file written by "
                         "--json") from exc
    payload = rows_from_results(payload)  # quantize/evaluate results files too
    try:
        out = write_report(args.out, payload)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    console = Console(emoji=False)
    console.print(f"report written to {out} (summary: {out.with_suffix('.md')})")
    return 0
