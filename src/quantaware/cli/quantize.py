"""``quantaware quantize``: your model + calibration data -> INT8 ONNX or LiteRT file,
results JSON, report."""

from __future__ import annotations

import argparse

from quantaware.cli import _sources as common

# --target -> quantaware.deploy.BACKENDS
TARGETS = {"onnxruntime": "onnxruntime-x86", "litert": "litert"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quantize", help="PTQ of your model on your data: INT8 ONNX or LiteRT file + results "
        "JSON (+ report)",
        description="Calibrate MODEL on --data (post-training quantization with the measured "
        "default config for CNNs or transformers, or --preset / --method), export the float "
        "and the INT8 model for --target (ONNX for ONNX Runtime, .tflite for LiteRT), "
        "compare them in that runtime on --eval-data (accuracy on labelled data, top-1 "
        "agreement, cosine, size, latency), verify the INT8 file against the torch model "
        "there, and write OUT/results.json (and OUT/report.html with --report). Files: "
        "OUT/model-fp32.onnx and OUT/model-int8.onnx (or .tflite with --target litert), "
        "OUT/model-int8.pt.",
    )
    common.add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="DATA",
                        help="calibration data: " + common.DATA_HELP)
    parser.add_argument("--eval-data", metavar="DATA",
                        help="evaluation data (default: --data, test split for built-ins)")
    parser.add_argument("--num-calib", type=int, default=256,
                        help="calibration samples (default: %(default)s)")
    parser.add_argument("--num-eval", type=int, default=None,
                        help="evaluation samples (default: all)")
    parser.add_argument("--preset", help="a preset name (quantaware presets) instead of the "
                        "measured default")
    parser.add_argument("--method", help="activation range method: minmax, moving_average, "
                        "percentile, mse or entropy")
    parser.add_argument("--skip", action="append", default=[], metavar="LAYER",
                        help="keep LAYER in float (a module name or fnmatch pattern, e.g. "
                        "classifier or 'features.1*'; a module's name also covers the layers "
                        "inside it); repeat for more layers")
    parser.add_argument("--target", choices=TARGETS, default="onnxruntime",
                        help="the runtime the INT8 model is quantized for, exported to and "
                        "evaluated in (default: %(default)s). litert writes full-integer "
                        ".tflite files (pip install 'quantaware[litert]') and keeps int8 "
                        "outputs of layers that only float ops read where that costs little "
                        "(LiteRT has no int8 kernel with a float output)")
    common.add_image_arguments(parser)
    parser.add_argument("--out", default="quantaware-out", metavar="DIR",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="also write OUT/report.html")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the torch vs runtime check of the INT8 file")
    parser.add_argument("--threads", type=int, default=2, help="runtime threads")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    parser.set_defaults(func=run, output_files=("json",), output_dirs=("out",),
                        written_names={"out": (
                            "model-fp32.onnx", "model-int8.onnx", "model-fp32.tflite",
                            "model-int8.tflite", "model-int8.pt", "results.json",
                            "report.html", "report.md")})


def run(args: argparse.Namespace) -> int:
    from quantaware.backends import RUNTIME_NAMES
    from quantaware.cli import UsageError
    from quantaware.sources import SourceError
    from quantaware.workflow import CALIBRATION_METHODS, comparison_table, run_quantize

    for name in ("num_calib", "num_eval", "threads"):
        common.positive("--" + name.replace("_", "-"), getattr(args, name))
    common.check_threads(args.threads)
    if args.method is not None and args.method not in CALIBRATION_METHODS:
        raise UsageError(f"unknown --method {args.method!r}; choose one of "
                         f"{', '.join(CALIBRATION_METHODS)}")
    con = common.console()
    with common.status(con, f"loading {args.model}") as say:
        model = common.load_model(args)
        calib = common.load_data(args, args.data, model, "train", args.num_calib)
        evaluate = common.load_data(args, args.eval_data or args.data, model, "test",
                                    args.num_eval)
        try:
            results = run_quantize(model, calib, args.out, evaluate=evaluate,
                                   preset=args.preset, method=args.method,
                                   report=args.report, verify=not args.no_verify,
                                   threads=args.threads, progress=say,
                                   backend=TARGETS[args.target], skip=args.skip)
        except SourceError as exc:
            raise UsageError(str(exc)) from exc
    comparison = results["evaluation"]
    runtime = RUNTIME_NAMES[comparison["backend"]]
    common.print_table(con, f"{model.name}: {results['config']['name']} in {runtime} on "
                       f"{comparison['samples']} samples of {comparison['data']}",
                       comparison_table(comparison))
    verify = results.get("verify")
    if verify is not None:
        common.print_verify(con, "verify", verify)
    common.print_files(con, results["files"])
    if args.json:
        con.print(f"results written to {common.write_json(results, args.json)}")
    return 0 if verify is None or verify["passed"] else 1
