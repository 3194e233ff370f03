"""``quantaware export``: a float model, or a quantized checkpoint, to ONNX or LiteRT."""

from __future__ import annotations

import argparse

FORMATS = ("onnx", "tflite")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="export a float model or a quantized checkpoint to ONNX or LiteRT",
        description="Write MODEL as ONNX: float, or with --quantized CKPT the quantized "
        "model saved by `quantaware quantize` (OUT/model-int8.pt), with QuantizeLinear/"
        "DequantizeLinear and integer weights. --format tflite writes a LiteRT file "
        "instead: full-integer with the checkpoint's own scales (needs "
        "pip install 'quantaware[litert]'; static shapes, batch 1). The input shape comes "
        "from one sample of --data or from --input-shape.",
    )
    from quantaware.cli import _sources as common

    common.add_model_arguments(parser)
    parser.add_argument("--quantized", metavar="CKPT",
                        help="a quantized checkpoint from quantaware quantize (default: "
                        "export the float model)")
    parser.add_argument("--data", metavar="DATA", help="data to take one example input from: "
                        + common.DATA_HELP)
    parser.add_argument("--input-shape", metavar="C,H,W",
                        help="per-sample input shape instead of --data")
    common.add_image_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, default="onnx",
                        help="output format (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--json", metavar="FILE", help="also write a summary to FILE")
    parser.set_defaults(func=run, output_files=("out", "json"))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from quantaware._batch import input_args
    from quantaware.bench import file_size
    from quantaware.checkpoint import CheckpointError
    from quantaware.cli import UsageError
    from quantaware.cli import _sources as common
    from quantaware.prepare import _check_runs
    from quantaware.sources import SourceError
    from quantaware.workflow import export_model, load_quantized

    if (args.data is None) == (args.input_shape is None):
        raise UsageError("give exactly one of --data (one sample is the example input) and "
                         "--input-shape")
    suffix = Path(args.out).suffix.lower()
    if suffix in (".onnx", ".tflite") and suffix != f".{args.format}":
        raise UsageError(f"--out {args.out}: a {args.format} file is written; name it "
                         f"{Path(args.out).with_suffix('.' + args.format).name} (or give "
                         f"--format {suffix[1:]})")
    con = common.console()
    model = common.load_model(args)
    try:
        module = model.require_torch("export")
    except SourceError as exc:
        raise UsageError(str(exc)) from exc
    if args.data is not None:
        example = common.load_data(args, args.data, model, "test", 1).example
    else:
        example = torch.zeros(1, *common.parse_input_shape(args.input_shape))
    if args.quantized and not Path(args.quantized).is_file():
        raise FileNotFoundError(f"quantized checkpoint {args.quantized!r} does not exist")
    try:  # a wrong example shape is named as such, not as an export failure
        _check_runs(module, input_args(example))
    except ValueError as exc:
        given = "--input-shape" if args.input_shape is not None else "--data"
        raise UsageError(f"{exc} (the example comes from {given})") from exc
    try:
        if args.quantized:
            module = load_quantized(args.quantized, model, example)
        path = export_model(module, args.out, example, args.format)
    except (SourceError, CheckpointError, ImportError) as exc:
        raise UsageError(str(exc)) from exc
    summary = {"model": model.name, "quantized": args.quantized, "format": args.format,
               "path": str(path), "size_bytes": file_size(path)}
    con.print(f"wrote {path} ({summary['size_bytes'] / 2**20:.2f} MiB, "
              f"{'quantized' if args.quantized else 'float'})")
    if args.json:
        con.print(f"summary written to {common.write_json(summary, args.json)}")
    return 0
