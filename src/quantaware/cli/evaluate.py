"""``quantaware evaluate``: float vs quantized on your data, side by side in one table."""

from __future__ import annotations

import argparse

from quantaware.backends import BACKENDS, RUNTIME_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate", help="float vs INT8 on labelled data: accuracy, agreement, size, latency",
        description="Run the float model (an .onnx file, or MODEL exported first) and the "
        "quantized file on the same data in ONNX Runtime (or --backend), and print "
        "accuracy (labelled data), top-1 agreement and output cosine against float, file "
        "size and latency at batch 1 and at --batch-size, measured in one run. A .tflite "
        "quantized file (quantaware quantize --target litert) runs in LiteRT beside MODEL "
        "exported to .tflite.",
    )
    from quantaware.cli import _sources as common

    common.add_model_arguments(parser)
    parser.add_argument("--quantized", required=True, metavar="FILE",
                        help="the quantized .onnx or .tflite file (e.g. OUT/model-int8.onnx "
                        "from quantaware quantize)")
    parser.add_argument("--data", required=True, metavar="DATA", help=common.DATA_HELP)
    parser.add_argument("--num-eval", type=int, default=None, help="samples (default: all)")
    common.add_image_arguments(parser)
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="runtime: onnxruntime or openvino for .onnx files, litert for "
                        ".tflite files (default: by the --quantized file's suffix)")
    parser.add_argument("--threads", type=int, default=2, help="runtime threads")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per latency figure")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    parser.set_defaults(func=run, output_files=("json",))


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from quantaware._batch import forward_parameters
    from quantaware.cli import UsageError
    from quantaware.cli import _sources as common
    from quantaware.sources import SourceError
    from quantaware.workflow import compare_files, comparison_table, export_model

    for name in ("num_eval", "threads", "runs"):
        common.positive("--" + name.replace("_", "-"), getattr(args, name))
    common.check_threads(args.threads)
    if not Path(args.quantized).is_file():
        raise FileNotFoundError(f"quantized model {args.quantized!r} does not exist")
    tflite = Path(args.quantized).suffix.lower() == ".tflite"
    backend = args.backend or ("litert" if tflite else "onnxruntime")
    if tflite != (backend == "litert"):
        raise UsageError(f"--backend {backend} runs "
                         f"{'.tflite' if backend == 'litert' else 'ONNX'} files; "
                         f"{args.quantized!r} is {'a .tflite' if tflite else 'not a .tflite'} "
                         f"file (use --backend {'litert' if tflite else 'onnxruntime'})")
    suffix = "tflite" if tflite else "onnx"
    try:  # the quantized file first: a bad one is reported before the float model runs
        from quantaware.backends import create_backend_session

        create_backend_session(args.quantized, backend, threads=args.threads)
    except (ImportError, FileNotFoundError):
        raise
    except Exception as exc:  # each runtime raises its own types
        kind = "LiteRT" if tflite else "ONNX"
        raise UsageError(f"{args.quantized!r} is not a loadable {kind} model: {exc}") from exc
    con = common.console()
    with common.status(con, f"loading {args.model}") as say, \
            tempfile.TemporaryDirectory() as tmp:
        model = common.load_model(args)
        data = common.load_data(args, args.data, model, "test", args.num_eval)
        try:
            if model.is_onnx and tflite:
                raise UsageError("the float model is an ONNX file and --quantized a LiteRT "
                                 "file; pass the torch model as --model (it is exported "
                                 "to .tflite for the comparison)")
            if model.is_onnx:
                float_path = model.onnx_path
            else:
                say(f"exporting the float model to {'LiteRT' if tflite else 'ONNX'}")
                float_path = export_model(model.module, Path(tmp) / f"model-fp32.{suffix}",
                                          data.example, suffix)
            parameters = None if model.is_onnx else forward_parameters(model.module)
            result = compare_files(float_path, args.quantized, data, backend,
                                   threads=args.threads, latency_runs=args.runs,
                                   progress=say, parameters=parameters)
        except SourceError as exc:
            raise UsageError(str(exc)) from exc
    result["float_model"] = model.name
    if not model.is_onnx:  # exported to a temporary file for the comparison
        result["models"][0]["path"] = None
    common.print_table(con, f"{model.name} vs {Path(args.quantized).name} in "
                       f"{RUNTIME_NAMES[backend]} on "
                       f"{result['samples']} samples of {result['data']}",
                       comparison_table(result))
    if args.json:
        con.print(f"results written to {common.write_json(result, args.json)}")
    return 0
