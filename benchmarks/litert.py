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

``--pt2e`` adds, for timing only, the float model quantized by litert-torch's own
PT2E quantizer (recalibrated on the same calibration samples, int8 interface):
how fast LiteRT runs an INT8 file of the same network that does not come from
quantaware. ``--layer-kinds`` times single MobileNetV2-shaped layers (int8
interface, so only the layer runs) in float32 and INT8, to show where a network's
INT8/float ratio comes from.

    PYTHONPATH=src python benchmarks/litert.py --json litert.json
    PYTHONPATH=src python benchmarks/litert.py --quick
    PYTHONPATH=src python benchmarks/litert.py --pt2e --layer-kinds --threads 1
Needs ``pip install 'quantaware[litert]'``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import quantaware
from quantaware.backends import create_backend_session
from quantaware.deploy_bench import time_interleaved
from quantaware.export.tflite import tflite_ops

log = logging.getLogger("benchmarks.litert")


Built = tuple[dict[str, torch.nn.Module], list, Any, list]  # models, data, example, calib


def _digits(quick: bool) -> Built:
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
    return ({"fp32": model, "ptq-int8": ptq, "qat-int8": qat.eval()}, data, example,
            [x for x, _ in calib])


def _mobilenet(quick: bool) -> Built:
    from quantaware.deploy import load_model_source, quantize_for_backend
    from quantaware.distill import distill

    source = load_model_source("mobilenet_v2", 16 if quick else None, 16 if quick else None,
                               size=64 if quick else None)
    example = source.example
    ptq = quantize_for_backend(source.model, source.calib, (example,)).eval()
    steps = 4 if quick else 60
    qat = distill(copy.deepcopy(ptq), source.model, source.unlabeled(), steps=steps, lr=1e-5)
    return ({"fp32": source.model, "ptq-int8": ptq, "qat-int8": qat.eval()},
            list(source.evaluate), example, list(source.calib))


def export_pt2e(model: torch.nn.Module, calib: list[torch.Tensor], example: torch.Tensor,
                path: Path, samples: int = 64) -> Path:
    """``model`` quantized and converted by litert-torch's own PT2E route (per-channel
    symmetric weights, its observers on up to ``samples`` calibration samples)."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    graph = torch.export.export(model.eval(), (example,), strict=True).module()
    prepared = prepare_pt2e(graph, quantizer)
    rows = torch.cat(calib)[:samples]
    with torch.no_grad():
        for i in range(len(rows)):  # the exported program has the example's static batch
            prepared(rows[i:i + 1])
    converted = convert_pt2e(prepared, fold_quantize=False)
    litert_torch.convert(converted, (example,),
                         quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    return path


def rows_for(name: str, built: Built, folder: Path, runs: int, threads: int,
             pt2e: bool = False) -> list[dict[str, Any]]:
    models, data, example, calib = built
    paths = {v: quantaware.export_tflite(m, folder / f"{name}-{v}.tflite", example)
             for v, m in models.items()}
    if pt2e:
        paths["pt2e-int8 (litert-torch)"] = export_pt2e(models["fp32"], calib, example,
                                                        folder / f"{name}-pt2e.tflite")
    sessions = {v: create_backend_session(p, "litert", threads) for v, p in paths.items()}
    feed_x = example.numpy() if isinstance(example, torch.Tensor) else example
    # int8-interface files get their input quantized once, outside the timed runs.
    feeds = {v: s.stored_feed({s.get_inputs()[0].name: feed_x}) for v, s in sessions.items()}
    latency = time_interleaved(sessions, feeds, runs, max(runs // 5, 2))
    rows = []
    for variant, path in paths.items():
        row: dict[str, Any] = {"model": name, "variant": variant,
                               "latency_ms": latency[variant],
                               "speedup_vs_fp32": latency["fp32"] / latency[variant],
                               "size_bytes": path.stat().st_size}
        if variant in models and variant != "fp32":
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


class _ChannelsLast(torch.nn.Module):
    """A layer between NHWC input and output: LiteRT's converter cancels these permutes
    against the ones it adds around NCHW ops, so the file holds the layer alone (an NCHW
    layer's file also runs two TRANSPOSEs, which cost float32 more than int8)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _layer_kinds() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    from torch import nn

    return {
        "stem conv 3x3/2, 3->32, 224x224": (nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU6()),
                                            (3, 224, 224)),
        "expand 1x1, 24->144, 56x56": (nn.Sequential(nn.Conv2d(24, 144, 1), nn.ReLU6()),
                                       (24, 56, 56)),
        "depthwise 3x3, 144, 56x56": (nn.Sequential(nn.Conv2d(144, 144, 3, 1, 1, groups=144),
                                                    nn.ReLU6()), (144, 56, 56)),
        "depthwise 3x3/2, 144, 56x56": (nn.Sequential(nn.Conv2d(144, 144, 3, 2, 1, groups=144),
                                                      nn.ReLU6()), (144, 56, 56)),
        "project 1x1, 144->24, 56x56": (nn.Sequential(nn.Conv2d(144, 24, 1)), (144, 56, 56)),
        "1x1, 320->1280, 7x7": (nn.Sequential(nn.Conv2d(320, 1280, 1), nn.ReLU6()),
                                (320, 7, 7)),
        "dense conv 3x3, 64->64, 28x28": (nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU()),
                                          (64, 28, 28)),
    }


def layer_kind_rows(folder: Path, runs: int, threads: int) -> list[dict[str, Any]]:
    """Float32 vs INT8 invoke time of single layers (NHWC and int8 interface: the files
    hold the layer's own ops only, no TRANSPOSE or QUANTIZE)."""
    from ai_edge_litert.interpreter import Interpreter

    from quantaware import presets

    torch.manual_seed(0)
    rows = []
    for kind, (layer, (channels, height, width)) in _layer_kinds().items():
        layer = _ChannelsLast(layer).eval()
        x = torch.randn(4, height, width, channels)
        q = quantaware.quantize(layer, presets.INT8, [x], x[:1]).eval()
        files = {"fp32": quantaware.export_tflite(layer, folder / "kind-f.tflite", x[:1]),
                 "int8": quantaware.export_tflite(q, folder / "kind-q.tflite", x[:1],
                                                  int8_io=True)}
        interpreters = {}
        for variant, path in files.items():
            interp = Interpreter(str(path), num_threads=threads)
            interp.allocate_tensors()
            extra = {d["op_name"] for d in interp._get_ops_details()} & {
                "TRANSPOSE", "QUANTIZE", "DEQUANTIZE"}
            if extra:
                raise RuntimeError(f"{kind}: the {variant} file runs {sorted(extra)} too")
            detail = interp.get_input_details()[0]
            interp.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
            interpreters[variant] = interp
        for interp in interpreters.values():
            for _ in range(max(runs // 5, 2)):
                interp.invoke()
        times: dict[str, list[int]] = {v: [] for v in interpreters}
        for _ in range(runs):
            for variant, interp in interpreters.items():
                start = time.perf_counter_ns()
                interp.invoke()
                times[variant].append(time.perf_counter_ns() - start)
        ms = {v: float(np.median(t)) / 1e6 for v, t in times.items()}
        rows.append({"layer": kind, "fp32_ms": ms["fp32"], "int8_ms": ms["int8"],
                     "speedup": ms["fp32"] / ms["int8"]})
        log.info("%s", rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and few runs")
    parser.add_argument("--models", nargs="+", default=["digits-cnn", "mobilenet_v2"],
                        choices=["digits-cnn", "mobilenet_v2"])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pt2e", action="store_true",
                        help="also time litert-torch's own PT2E INT8 file of each model")
    parser.add_argument("--layer-kinds", action="store_true",
                        help="also time single MobileNetV2-shaped layers, float vs INT8")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    builders = {"digits-cnn": _digits, "mobilenet_v2": _mobilenet}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += rows_for(name, builders[name](args.quick), Path(tmp),
                             5 if args.quick else args.runs, args.threads, args.pt2e)
        kinds = (layer_kind_rows(Path(tmp), 5 if args.quick else args.runs, args.threads)
                 if args.layer_kinds else [])
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
    if kinds:
        kind_table = Table(title=f"LiteRT: single layers, float32 vs INT8 ({args.threads} "
                                 "threads, invoke only)")
        for col in ("layer", "float32 ms", "INT8 ms", "x faster"):
            kind_table.add_column(col, justify="left" if col == "layer" else "right")
        for r in kinds:
            kind_table.add_row(r["layer"], f"{r['fp32_ms']:.3f}", f"{r['int8_ms']:.3f}",
                               f"{r['speedup']:.2f}x")
        Console(width=200).print(kind_table)
    if args.json:
        args.json.write_text(json.dumps({"models": rows, "layer_kinds": kinds}, indent=2,
                                        default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
