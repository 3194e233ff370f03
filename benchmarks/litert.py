"""LiteRT: full-integer .tflite files with quantaware's own scales, PTQ and QAT, side by side.

For the demo CNN (digits, trained here) and MobileNetV2 (real ImageNet weights,
photos from scikit-image), the float model, the PTQ model and the QAT model are
exported with :func:`quantaware.export_tflite` and run in LiteRT. Each INT8 row
reports :func:`quantaware.verify` of the file against the torch model it came
from: top-1 agreement and cosine with torch running LiteRT's integer arithmetic,
the largest output error in output steps, the first layer whose codes differ,
the agreement with the fake-quant forward, whether every op between the float
interface's QUANTIZE/DEQUANTIZE is int8, and the file size;
latency is the median of interleaved batch-1 runs (float and INT8 in the same
rounds, 2 threads), with the INT8/float speed-up.

QAT is the demo's QAT from the PTQ model for the CNN; for MobileNetV2 it is
label-free QAT (distillation towards the float model on unlabelled crops,
:func:`quantaware.distill.distill`).

    PYTHONPATH=src python benchmarks/litert.py --json litert.json
    PYTHONPATH=src python benchmarks/litert.py --quick
Needs ``pip install 'quantaware[litert]'``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import quantaware
from quantaware.backends import create_backend_session
from quantaware.deploy_bench import time_interleaved
from quantaware.export.tflite import tflite_ops

log = logging.getLogger("benchmarks.litert")


def _digits(quick: bool) -> tuple[dict[str, torch.nn.Module], list, Any]:
    from quantaware import presets
    from quantaware.calibrate import calibrate
    from quantaware.data import load_digits_split, make_loaders
    from quantaware.demo import DemoSettings
    from quantaware.models import DigitsCNN
    from quantaware.prepare import prepare
    from quantaware.train import fit

    cfg = DemoSettings.fast() if quick else DemoSettings()
    torch.manual_seed(cfg.seed)
    train_set, test_set = load_digits_split(seed=cfg.seed)
    train_loader, test_loader = make_loaders(train_set, test_set, cfg.batch_size, cfg.seed)
    example = test_set.tensors[0][:1]
    calib = list(islice(iter(train_loader), cfg.calib_batches))
    model = DigitsCNN()
    fit(model, train_loader, epochs=cfg.float_epochs, lr=cfg.lr, seed=cfg.seed)
    model.eval()
    ptq = calibrate(prepare(model, presets.INT8, example), calib).eval()
    qat = copy.deepcopy(ptq)
    fit(qat, train_loader, epochs=cfg.qat_epochs, lr=cfg.qat_lr, seed=cfg.seed + 1)
    data = [x for x, _ in test_loader]
    return {"fp32": model, "ptq-int8": ptq, "qat-int8": qat.eval()}, data, example


def _mobilenet(quick: bool) -> tuple[dict[str, torch.nn.Module], list, Any]:
    from quantaware.deploy import load_model_source, quantize_for_backend
    from quantaware.distill import distill

    source = load_model_source("mobilenet_v2", 16 if quick else None, 16 if quick else None,
                               size=64 if quick else None)
    example = source.example
    ptq = quantize_for_backend(source.model, source.calib, (example,)).eval()
    steps = 4 if quick else 60
    qat = distill(copy.deepcopy(ptq), source.model, source.unlabeled(), steps=steps, lr=1e-5)
    return ({"fp32": source.model, "ptq-int8": ptq, "qat-int8": qat.eval()},
            list(source.evaluate), example)


def rows_for(name: str, models: dict[str, torch.nn.Module], data: list, example: Any,
             folder: Path, runs: int, threads: int) -> list[dict[str, Any]]:
    paths = {v: quantaware.export_tflite(m, folder / f"{name}-{v}.tflite", example)
             for v, m in models.items()}
    sessions = {v: create_backend_session(p, "litert", threads) for v, p in paths.items()}
    feed_x = example.numpy() if isinstance(example, torch.Tensor) else example
    feeds = {v: {s.get_inputs()[0].name: feed_x} for v, s in sessions.items()}
    latency = time_interleaved(sessions, feeds, runs, max(runs // 5, 2))
    rows = []
    for variant, path in paths.items():
        row: dict[str, Any] = {"model": name, "variant": variant,
                               "latency_ms": latency[variant],
                               "speedup_vs_fp32": latency["fp32"] / latency[variant],
                               "size_bytes": path.stat().st_size}
        if variant != "fp32":
            report = quantaware.verify(path, models[variant], data, backend="litert",
                                       threads=threads)
            ops = tflite_ops(path)
            row.update(top1_vs_torch=report.top1_agreement, cosine=report.cosine,
                       max_error_lsb=report.max_error_lsb, samples=report.num_samples,
                       reference=report.reference,
                       top1_vs_fake_quant=report.fake_quant_top1_agreement,
                       layers_checked=report.layers_checked,
                       first_divergent_layer=report.first_divergent_layer,
                       first_divergent_lsb=report.first_divergent_lsb,
                       all_int8=all("float32" not in d for n, d in ops
                                    if n not in ("QUANTIZE", "DEQUANTIZE")))
        rows.append(row)
        log.info("%s", row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and few runs")
    parser.add_argument("--models", nargs="+", default=["digits-cnn", "mobilenet_v2"],
                        choices=["digits-cnn", "mobilenet_v2"])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    builders = {"digits-cnn": _digits, "mobilenet_v2": _mobilenet}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            models, data, example = builders[name](args.quick)
            rows += rows_for(name, models, data, example, Path(tmp),
                             5 if args.quick else args.runs, args.threads)
    table = Table(title="LiteRT: quantaware INT8 (own scales) vs float, batch 1")
    for col in ("model", "variant", "latency ms", "x faster", "size KiB", "top-1 vs torch",
                "cosine", "max err LSB", "first diverging layer", "vs fake-quant", "all int8"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for r in rows:
        q = "top1_vs_torch" in r
        table.add_row(r["model"], r["variant"], f"{r['latency_ms']:.3f}",
                      f"{r['speedup_vs_fp32']:.2f}x", f"{r['size_bytes'] / 1024:.0f}",
                      f"{100 * r['top1_vs_torch']:.2f}% ({r['samples']})" if q else "",
                      f"{r['cosine']:.6f}" if q else "",
                      f"{r['max_error_lsb']:.2f}" if q and r["max_error_lsb"] is not None
                      else "",
                      (f"{r['first_divergent_layer']} ({r['first_divergent_lsb']} LSB)"
                       if r["first_divergent_layer"] else f"none of {r['layers_checked']}")
                      if q else "",
                      f"{100 * r['top1_vs_fake_quant']:.2f}%"
                      if q and r["top1_vs_fake_quant"] is not None else "",
                      str(r["all_int8"]) if q else "")
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
