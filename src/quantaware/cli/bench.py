"""``quantaware bench``: quantaware INT8 vs FP32 and ONNX Runtime's quantizers, one table.

``--backend onnxruntime openvino`` also times the FP32 and quantaware INT8 files
in OpenVINO, in the same table (one row per backend and variant).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from quantaware.backends import BACKENDS
from quantaware.cli import UsageError
from quantaware.deploy import BUILTIN_MODELS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="latency, size and fidelity of FP32 / quantaware INT8 / ORT INT8",
        description="For each model, export FP32 and quantaware INT8, quantize the FP32 file "
        "with ONNX Runtime's quantize_static (QDQ, per-channel, u8s8, same calibration "
        "data) and quantize_dynamic, then time all four interleaved in ONNX Runtime "
        "(median after warm-up, spinning disabled) and compare their outputs with FP32. "
        "With --backend onnxruntime openvino the FP32 and quantaware INT8 files are also "
        "timed in OpenVINO (float layers in float32), in the same rounds; with litert "
        "FP32 and quantaware INT8 (quantized for LiteRT: layers before float ops keep "
        "int8 outputs where that costs little) are exported as LiteRT files (the "
        "models' own scales, batch 1) and timed in LiteRT's interpreter.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run, output_files=("json",), output_dirs=("out",))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``quantaware bench`` and ``benchmarks/deploy.py``."""
    parser.add_argument("--models", nargs="+", default=list(BUILTIN_MODELS), metavar="MODEL",
                        help=f"built-in names {BUILTIN_MODELS} or MODULE:FUNCTION "
                        "(default: all built-ins)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16], metavar="N",
                        help="batch sizes (default: 1 16)")
    parser.add_argument("--input-shape", metavar="C,H,W",
                        help="per-sample input shape for MODULE:FUNCTION models")
    parser.add_argument("--threads", type=int, default=2,
                        help="inference threads per session (default: 2)")
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=["onnxruntime"],
                        metavar="BACKEND", dest="backends",
                        help=f"inference backends, any of {', '.join(BACKENDS)}; ONNX "
                        "Runtime's quantizer outputs run in onnxruntime only (default: "
                        "onnxruntime)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs (default: 50)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up runs (default: 10)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny inputs and 3 runs: checks the pipeline, not the speed")
    parser.add_argument("--distill", type=int, default=0, metavar="STEPS",
                        help="also fine-tune the quantaware INT8 image models for STEPS steps "
                        "towards FP32 on unlabelled crops (label-free distillation) and bench "
                        "the result as quantaware-int8-distilled (default: 0, off)")
    parser.add_argument("--out", metavar="DIR", help="keep the ONNX files in DIR")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def _second(row: dict[str, Any]) -> str:
    if "agreement_confident" in row:
        return f"{row['agreement_confident']:.4f} conf."
    if "neighbour_agreement" in row:
        return f"{row['neighbour_agreement']:.4f} nn"
    return ""


def _verify(row: dict[str, Any]) -> str:
    if row.get("verify_top1") is None:
        return ""
    if "neighbour_agreement" in row:
        return f"cos {row['verify_cosine']:.5f}"
    text = f"top-1 {row['verify_top1']:.4f}"
    if row.get("verify_fake_quant_top1") is not None:
        text += f" (fake-quant {row['verify_fake_quant_top1']:.4f})"
    return text


def results_table(rows: list[dict[str, Any]]):
    """A rich table of benchmark rows; a ``backend`` column when rows come from several."""
    from rich.table import Table

    backends = list(dict.fromkeys(r.get("backend", "onnxruntime") for r in rows))
    several = len(backends) > 1
    if backends == ["onnxruntime"]:
        title, verified = "ONNX Runtime deployment: FP32 vs INT8", "ONNX Runtime"
        ratio = reference = ""
    else:
        title = f"Deployment in {' and '.join(backends)}: FP32 vs INT8"
        ratio, reference = " (same backend)", f" as {backends[0]} runs it"
        verified = "the row's backend"
    table = Table(title=title,
                  caption=f"latency: median ms, interleaved runs; ratio: latency / FP32{ratio}; "
                  f"fidelity: top-1 agreement with FP32{reference} (images) "
                  "or mean embedding cosine (text), the worst output of a multi-output "
                  "model; fidelity 2: agreement where FP32 is confident (max softmax "
                  ">= 0.5) or nearest-neighbour agreement (text); "
                  f"verify: {verified} vs quantaware's torch model running ONNX Runtime's "
                  "integer arithmetic (in brackets: vs its fake-quant forward)")
    headers = ("model", "batch", *(("backend",) if several else ()), "variant", "latency ms",
               "ratio", "speed-up", "size MB", "size x", "fidelity", "fidelity 2", "verify")
    for header in headers:
        table.add_column(header, justify="left" if header in ("model", "backend", "variant")
                         else "right")
    # each backend's own float file (a .tflite and an .onnx differ in size)
    def backend_of(r: dict[str, Any]) -> str:
        return r.get("backend", "onnxruntime")

    fp32_size = {(r["model"], r["batch"], backend_of(r)): r["size_bytes"]
                 for r in rows if r["variant"] == "fp32"}
    for r in rows:
        backend = (r.get("backend", "onnxruntime"),) if several else ()
        table.add_row(
            r["model"], str(r["batch"]), *backend, r["variant"], f"{r['latency_ms']:.2f}",
            f"{r['ratio_vs_fp32']:.2f}", f"{1 / r['ratio_vs_fp32']:.2f}x",
            f"{r['size_bytes'] / 1e6:.1f}",
            f"{r['size_bytes'] / fp32_size[r['model'], r['batch'], backend_of(r)]:.2f}",
            f"{r['fidelity']:.4f}", _second(r), _verify(r),
        )
    return table


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from quantaware.backends import check_backend
    from quantaware.cli._sources import check_threads, parse_input_shape, positive
    from quantaware.deploy_bench import benchmark, write_json

    for batch in args.batches:
        positive("--batches", batch)
    positive("--runs", args.runs)
    check_threads(args.threads)
    if args.warmup < 0:
        raise UsageError(f"--warmup must be a non-negative integer, got {args.warmup}")
    _check_models(args)
    try:
        for backend in args.backends:
            check_backend(backend)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    console = Console(width=None if sys.stdout.isatty() else 160, emoji=False)
    def save(rows: list[dict[str, Any]]) -> None:
        if args.json:  # after every model, so a long run keeps what it measured
            write_json(rows, args.json)

    with console.status("starting") as status:
        rows = benchmark(args.models, batches=args.batches, threads=args.threads,
                         runs=args.runs, warmup=args.warmup, quick=args.quick,
                         out_dir=args.out, on_step=lambda msg: status.update(msg),
                         on_model=save, distill_steps=args.distill,
                         backends=tuple(dict.fromkeys(args.backends)),
                         input_shape=parse_input_shape(args.input_shape))
    console.print(results_table(rows))
    if args.json:
        console.print(f"rows written to {args.json}")
    return 0


def _check_models(args: argparse.Namespace) -> None:
    """Usage errors in --models (unknown names, specs that do not import, a missing
    --input-shape) before any model is benchmarked."""
    from quantaware._spec import load_spec
    from quantaware.cli import UsageError
    from quantaware.deploy import BUILTIN_MODELS

    for spec in args.models:
        if spec in BUILTIN_MODELS:
            continue
        if ":" not in spec:
            raise UsageError(f"--models: unknown model {spec!r}: use one of "
                             f"{', '.join(BUILTIN_MODELS)} or MODULE:FUNCTION")
        try:
            load_spec(spec)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"--models: {exc}") from exc
        if args.input_shape is None:
            raise UsageError(f"--models {spec}: pass the per-sample input shape, e.g. "
                             "--input-shape 3,224,224")
