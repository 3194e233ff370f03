"""``quantaware verify``: quantize a model, export it, and prove ONNX Runtime computes the same.

``--backend openvino`` runs the exported file in OpenVINO instead (float layers in
float32) and reports the same figures for it; ``--backend litert`` quantizes for
LiteRT (layers before float ops keep int8 outputs where that costs little, since
LiteRT has no integer kernel with a float output), exports a LiteRT file with the
model's own scales and runs that.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantaware._batch import input_args
from quantaware.backends import BACKENDS
from quantaware.cli import UsageError
from quantaware.deploy import BUILTIN_MODELS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "verify", help="quantize + export a model and check ONNX Runtime against torch",
        description="Quantize MODEL (PTQ with the backend's measured default config, or "
        "--preset), export it to ONNX, run both on held-out data and report top-1 "
        "agreement, cosine, the max output error in LSBs and the first layer where "
        "ONNX Runtime and torch differ. The torch side runs ONNX Runtime's integer "
        "arithmetic, so a correct export matches bit for bit; the agreement with the "
        "fake-quant forward is reported beside it. --backend openvino runs the file in "
        "OpenVINO instead; --backend litert quantizes for LiteRT (layers before float "
        "ops keep int8 outputs where that costs little) and exports a LiteRT file with "
        "the model's own scales. Exit code 1 if the "
        "agreement bound is not met.",
    )
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help=f"one of {', '.join(BUILTIN_MODELS)} or MODULE:FUNCTION returning "
                        "a torch.nn.Module")
    parser.add_argument("--input-shape", metavar="C,H,W",
                        help="per-sample input shape for MODULE:FUNCTION models")
    parser.add_argument("--size", type=int,
                        help="image side (CNNs, default 224) or sequence length (minilm, 64)")
    parser.add_argument("--preset", help="a preset name instead of the measured default")
    parser.add_argument("--num-calib", type=int, default=88, help="calibration samples")
    parser.add_argument("--num-eval", type=int, default=264, help="evaluation samples")
    parser.add_argument("--out", default="quantaware-verify", metavar="DIR",
                        help="folder for the exported file (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--min-agreement", type=float, default=0.995,
                        help="top-1 agreement (images) or cosine (text) required "
                        "(default: %(default)s)")
    parser.add_argument("--reference", choices=("auto", "integer", "fake-quant"),
                        default="auto",
                        help="torch side: ONNX Runtime's integer arithmetic (auto: where "
                        "the model has integer layers) or the fake-quant forward "
                        "(default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="inference backend that runs the exported file (litert: a .tflite "
                        "export) (default: %(default)s)")
    parser.set_defaults(func=run, output_files=("json",), output_dirs=("out",))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    import quantaware
    from quantaware import presets
    from quantaware.backends import check_backend
    from quantaware.cli._sources import parse_input_shape
    from quantaware.deploy import default_config, load_model_source, quantize_for_backend

    if not 0.0 <= args.min_agreement <= 1.0:  # NaN fails this too
        raise UsageError(f"--min-agreement must be between 0 and 1, got {args.min_agreement}")
    try:
        preset = presets.get(args.preset) if args.preset else None
    except KeyError as exc:
        raise UsageError(exc.args[0]) from exc
    try:
        check_backend(args.backend)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    console = Console(width=None if sys.stdout.isatty() else 100, emoji=False)
    with console.status(f"loading {escape(args.model)}") as status:
        try:
            source = load_model_source(args.model, args.num_calib, args.num_eval,
                                       size=args.size,
                                       input_shape=parse_input_shape(args.input_shape))
        except (ValueError, KeyError) as exc:
            raise UsageError(str(exc)) from exc
        config = preset or default_config(source.model)
        example = input_args(source.example)
        status.update(f"quantizing with {config.name}")
        qmodel = quantize_for_backend(
            source.model, source.calib, example, config=config,
            backend="litert" if args.backend == "litert" else "onnxruntime-x86")
        status.update("exporting")
        if args.backend == "litert":
            path = quantaware.export_tflite(
                qmodel, Path(args.out) / f"{source.file_stem}-int8.tflite", example)
        else:
            path = quantaware.export_onnx(qmodel, Path(args.out) / f"{source.file_stem}-int8.onnx",
                                          example)
        status.update(f"running {args.backend} and torch")
        report = quantaware.verify(path, qmodel, source.evaluate, reference=args.reference,
                                   backend=args.backend)
    console.print(f"[bold]{escape(source.name)}[/bold] ({config.name}) -> {escape(str(path))}")
    console.print(escape(str(report)))
    if args.json:
        from quantaware.deploy_bench import write_json

        console.print(f"report written to {write_json(report.to_dict(), args.json)}")
    score = report.cosine if source.kind == "text" else report.top1_agreement
    return 0 if score >= args.min_agreement else 1
