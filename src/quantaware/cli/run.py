"""``quantaware run PIPELINE.yaml``: the six-step workflow from one validated file."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run", help="run a pipeline file: model, data, baseline, PTQ, QAT, evaluate, deploy",
        description="Run the steps of PIPELINE (YAML): load the model, load the data, train "
        "or load the float baseline, quantize (PTQ), optionally QAT, then export float and "
        "INT8 ONNX, evaluate them side by side in ONNX Runtime and verify each deployed "
        "file. Finished steps are recorded in OUT/pipeline-state.json and skipped when run "
        "again with the same settings (a killed QAT run resumes from its last epoch). See "
        "examples/*.yaml.",
    )
    parser.add_argument("pipeline", metavar="PIPELINE.yaml")
    parser.add_argument("--fast", action="store_true",
                        help="apply the file's `fast:` overrides (few samples, one epoch)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: the file's `out`, relative to it)")
    parser.add_argument("--check", action="store_true",
                        help="only validate the file and print the settings it resolves to")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    parser.set_defaults(func=run, output_files=("json",), output_dirs=("out",))


def run(args: argparse.Namespace) -> int:
    import json

    from quantaware.backends import RUNTIME_NAMES
    from quantaware.cli import UsageError
    from quantaware.cli import _sources as common
    from quantaware.image_folder import ImageFolderError
    from quantaware.pipeline import PipelineError, load_pipeline, run_pipeline
    from quantaware.sources import SourceError
    from quantaware.workflow import comparison_table

    con = common.console()
    try:
        settings = load_pipeline(args.pipeline, fast=args.fast)
    except PipelineError as exc:
        raise UsageError(str(exc)) from exc
    if args.check:
        con.print_json(json.dumps(settings))
        return 0
    try:
        with common.status(con, f"running {args.pipeline}") as say:
            results = run_pipeline(args.pipeline, fast=args.fast, out=args.out, say=say)
    except (PipelineError, SourceError, ImageFolderError) as exc:
        raise UsageError(str(exc)) from exc
    steps = results["steps"]
    float_acc = steps["baseline"].get("float_accuracy")
    line = [f"float {float_acc:.2f}%" if float_acc is not None else "float (no labels)"]
    if steps["quantization"].get("ptq_accuracy") is not None:
        line.append(f"PTQ {steps['quantization']['ptq_accuracy']:.2f}%")
    if steps.get("qat", {}) and steps["qat"].get("qat_accuracy") is not None:
        line.append(f"QAT {steps['qat']['qat_accuracy']:.2f}%")
    con.print(f"{results['name']} ({steps['quantization']['config']}): " + ", ".join(line)
              + " (torch, evaluation data)")
    failed = []
    for name, result in results["evaluation"].items():
        runtime = RUNTIME_NAMES[result.get("backend", "onnxruntime")]
        common.print_table(con, f"{result['models'][1]['model']} vs float in {runtime} on "
                           f"{result['samples']} samples of {result['data']}",
                           comparison_table(result))
        verify = result.get("verify")
        if verify is not None:
            common.print_verify(con, f"verify {name}", verify)
            if not verify["passed"]:
                failed.append(name)
    common.print_files(con, results["files"])
    if args.json:
        con.print(f"results written to {common.write_json(results, args.json)}")
    return 1 if failed else 0
