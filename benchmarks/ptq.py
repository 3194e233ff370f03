"""PTQ accuracy benchmark on MobileNetV2 (real ImageNet weights, real photo crops).

Prints one table: top-1 agreement with FP32 over all evaluation crops and over
crops where FP32 is confident (max softmax >= 0.5), and weight bytes, for

- per-tensor INT8 weights, nearest + min-max, vs with cross-layer equalization
  and bias correction, vs per-channel INT8;
- W4 (per-channel) A8: nearest vs MSE weight ranges vs MSE ranges + AdaRound;
- mixed precision (int8 / W4 / float per layer) within 1 point of the
  all-int8-with-first/last-float model's agreement on a separate search set,
  vs that model;
- every activation calibration method at INT8.

Data: calibration crops seed 1 (88), evaluation crops seed 2 (264), mixed
precision search crops seed 3 (264). ``--quick`` uses fewer crops and iterations.
FP32 logits are computed once; every model is evaluated in batches under
``torch.inference_mode`` in channels-last layout. Bias correction, AdaRound,
the mixed-precision ranking and the sensitivity analysis work on subsets whose
sizes are options.

Usage:
    PYTHONPATH=src python benchmarks/ptq.py [--quick] [--json FILE] [--report FILE.html]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantaware import PerTensor, QuantSpec, calibrate, prepare, presets
from quantaware.algorithms import adaround, bias_correction, cle, weight_range
from quantaware.analysis import agreement, outputs, search, sensitivity
from quantaware.config import LayerOverride
from quantaware.fake_quant import FakeQuantizer
from quantaware.images import image_crops
from quantaware.nn.weighted import WeightQuantMixin
from quantaware.zoo import load_mobilenet_v2_imagenet

log = logging.getLogger("ptq")


def batches(x: torch.Tensor, size: int = 22) -> list[torch.Tensor]:
    x = x.contiguous(memory_format=torch.channels_last)
    return [x[i:i + size] for i in range(0, len(x), size)]


def evaluate(model: nn.Module, data: list[torch.Tensor]) -> torch.Tensor:
    """Logits over ``data``, in channels-last layout (faster convs on CPU)."""
    model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return outputs(model, data)


def weight_size(model: nn.Module) -> float:
    """Bytes of every weight as stored: quantizer bits, or 32 for float."""
    total = 0.0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or isinstance(module, nn.BatchNorm2d):
            continue
        bits = 32
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(module, WeightQuantMixin) and isinstance(wq, FakeQuantizer) and bool(
                wq.fake_quant_enabled):
            bits = wq.spec.bits
        total += weight.numel() * bits / 8
    return total


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        n_cal, n_eval, n_search = (32, 64, 32) if args.quick else (88, 264, 264)
        self.args = args
        self.model = load_mobilenet_v2_imagenet()
        calib = image_crops(n_cal, seed=1)
        self.calib = batches(calib)
        self.eval = batches(image_crops(n_eval, seed=2), args.eval_batch)
        self.search = batches(image_crops(n_search, seed=3), args.eval_batch)
        self.example = self.calib[0][:1].contiguous()
        # Bias correction corrects every layer in one pass when given one batch.
        self.bc_data = batches(calib[:args.bias_correction_crops], args.bias_correction_crops)
        t = time.time()
        self.fp = evaluate(self.model, self.eval)
        self.fp_seconds = time.time() - t
        log.info("FP32 logits over %d crops: %.1f s", len(self.fp), self.fp_seconds)
        self.confident = self.fp.softmax(-1).amax(-1) >= 0.5
        self.rows: list[dict[str, Any]] = []

    def row(self, group: str, variant: str, model: nn.Module, seconds: float,
            **extra: Any) -> nn.Module:
        out = evaluate(model, self.eval)
        same = out.argmax(-1) == self.fp.argmax(-1)
        row = {"group": group, "variant": variant,
               "agreement": 100.0 * float(same.float().mean()),
               "agreement_confident": 100.0 * float(same[self.confident].float().mean()),
               "size_bytes": weight_size(model), "seconds": round(seconds, 1), **extra}
        self.rows.append(row)
        log.info("%s / %s: %.1f%% / %.1f%%", group, variant, row["agreement"],
                 row["agreement_confident"])
        return model

    def ptq(self, model: nn.Module, config) -> nn.Module:
        return calibrate(prepare(model, config, self.example), self.calib)


def per_tensor_int8() -> Any:
    return dataclasses.replace(presets.INT8, name="INT8 per-tensor weights", weight=QuantSpec(
        bits=8, narrow_range=True, granularity=PerTensor()))


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    b = Bench(args)
    extras: dict[str, Any] = {"num_eval": len(b.fp), "num_confident": int(b.confident.sum())}
    b.rows.append({"group": "reference", "variant": "FP32", "agreement": 100.0,
                   "agreement_confident": 100.0, "size_bytes": weight_size(b.model),
                   "seconds": round(b.fp_seconds, 1)})
    t = time.time()
    int8 = b.row("per-tensor vs per-channel", "per-channel INT8 (min-max)",
                 b.ptq(b.model, presets.INT8), time.time() - t)
    groups = {
        "per-tensor": lambda: _per_tensor(b),
        "w4a8": lambda: _w4a8(b),
        "mixed": lambda: _mixed(b, int8, extras),
        "calibration": lambda: _calibration(b, extras),
        "sensitivity": lambda: _sensitivity(b, int8, extras),
    }
    wanted = args.groups.split(",")
    unknown = set(wanted) - set(groups)
    if unknown:
        raise SystemExit(f"unknown group(s) {sorted(unknown)}; choose from {list(groups)}")
    for name in wanted:
        groups[name]()
    return b.rows, extras


def _per_tensor(b: Bench) -> None:
    pt = per_tensor_int8()
    t = time.time()
    b.row("per-tensor vs per-channel", "per-tensor INT8, nearest + min-max",
          b.ptq(b.model, pt), time.time() - t)
    for mode in ("replace", "scale"):
        t = time.time()
        eq = cle.apply(b.model, b.example, relu6=mode)
        with torch.inference_mode():
            change = agreement(evaluate(eq, b.eval), b.fp)
        q = bias_correction.apply(b.ptq(eq, pt), b.bc_data)
        b.row("per-tensor vs per-channel", f"per-tensor INT8 + CLE (relu6={mode}) + bias corr.",
              q, time.time() - t, float_agreement_after_cle=change)


def _w4a8(b: Bench) -> None:
    args, quick = b.args, b.args.quick
    iterations = args.adaround_iterations or (100 if quick else 300)
    t = time.time()
    b.row("W4A8", "W4A8 nearest (min-max)", b.ptq(b.model, presets.W4A8), time.time() - t)
    t = time.time()
    q = weight_range.apply(prepare(b.model, presets.W4A8, b.example))
    q = b.row("W4A8", "W4A8 nearest (MSE ranges)", calibrate(q, b.calib), time.time() - t)
    t = time.time()
    adaround.apply(q, b.calib[:args.adaround_batches], iterations=iterations,
                   num_samples=args.adaround_samples, batch_size=256)
    b.row("W4A8", f"W4A8 AdaRound (MSE ranges, {iterations} it.)", q, time.time() - t)


def _mixed(b: Bench, int8: nn.Module, extras: dict[str, Any]) -> None:
    args = b.args
    # Mixed precision vs the common manual recipe (first and last layer float).
    names = [n for n, m in int8.named_modules() if isinstance(m, WeightQuantMixin)]
    first_last = (names[0], names[-1])
    fl_cfg = presets.INT8.with_overrides(*(LayerOverride(n, skip=True) for n in first_last))
    t = time.time()
    fl = b.ptq(b.model, fl_cfg)
    b.row("mixed precision", "INT8, first/last float", fl, time.time() - t)
    # A 1-point drop from FP32 is out of reach for any INT8 model here (per-channel
    # INT8 alone loses more), so the budget's reference is the first/last-float model:
    # at most 1 point below its agreement on the search crops, with a smaller model.
    fp_search = evaluate(b.model, b.search)
    ref_search = agreement(evaluate(fl, b.search), fp_search)
    t = time.time()
    result = search(b.model, presets.INT8, b.calib, b.search, max_drop=1.0,
                    low_spec=presets.W4A8.weight, reference_score=ref_search,
                    example_inputs=b.example,
                    rank_data=[b.search[0][:args.search_rank_crops]])
    mp = b.ptq(b.model, result.config)
    b.row("mixed precision", "mixed int8/W4/float, <= 1 point below INT8 first/last float",
          mp, time.time() - t,
          search_score=result.score, search_reference=ref_search,
          meets_budget_on_search=result.meets_budget,
          low_bit_layers=sum(c == "low" for c in result.choices.values()),
          float_layers=sum(c == "float" for c in result.choices.values()))
    extras["mixed_precision_config"] = result.config.to_dict()
    extras["mixed_precision_history"] = result.history


def _calibration(b: Bench, extras: dict[str, Any]) -> None:
    b.rows.append({**b.rows[1], "group": "calibration", "variant": "INT8, activations minmax"})
    for observer in ("moving_average", "percentile", "mse", "entropy"):
        act = dataclasses.replace(presets.INT8.activation, observer=observer)
        cfg = dataclasses.replace(presets.INT8, activation=act, name=f"INT8 {observer}")
        t = time.time()
        q = b.row("calibration", f"INT8, activations {observer}", b.ptq(b.model, cfg),
                  time.time() - t)
        if observer == "entropy":
            extras["histograms"] = activation_histograms(q)


def _sensitivity(b: Bench, int8: nn.Module, extras: dict[str, Any]) -> None:
    t = time.time()
    sens = sensitivity(int8, [b.eval[0][:b.args.sensitivity_crops]])
    extras["sensitivity"] = [s.to_dict() for s in sens]
    extras["sensitivity_seconds"] = round(time.time() - t, 1)



def activation_histograms(model: nn.Module, limit: int = 12) -> list[dict[str, Any]]:
    from quantaware.report import histograms_from_model

    return histograms_from_model(model, limit=limit)


def print_table(rows: list[dict[str, Any]], extras: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="MobileNetV2 (ImageNet weights) PTQ: top-1 agreement with FP32",
                  caption=f"{extras['num_eval']} evaluation crops, "
                  f"{extras['num_confident']} with FP32 max softmax >= 0.5")
    for header in ("group", "variant", "agree all", "agree conf.", "weights MiB", "s"):
        table.add_column(header, justify="left" if header in ("group", "variant") else "right")
    for r in rows:
        table.add_row(r["group"], r["variant"], f"{r['agreement']:.1f}%",
                      f"{r['agreement_confident']:.1f}%", f"{r['size_bytes'] / 2**20:.2f}",
                      f"{r['seconds']:.0f}")
    console = Console(width=140)
    console.print(table)
    mp = next((r for r in rows if "search_reference" in r), None)
    if mp is not None:
        console.print(
            f"Mixed precision budget: agreement on the search crops at most 1 point below "
            f"the INT8 first/last-float model's ({mp['search_reference']:.1f}% -> "
            f"{mp['search_score']:.1f}%, met: {mp['meets_budget_on_search']}), not below "
            f"FP32; {mp['low_bit_layers']} layers at W4, {mp['float_layers']} float.")
    calib = [r for r in rows if r["group"] == "calibration"]
    if calib:
        best = max(calib, key=lambda r: (r["agreement"], r["agreement_confident"]))
        console.print(f"Best activation calibration at INT8: {best['variant']} "
                      f"({best['agreement']:.1f}% / {best['agreement_confident']:.1f}%).")
    console.print(f"Total run time: {extras.get('total_seconds', 0):.0f} s")


def write_json(path: str, payload: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer crops and iterations")
    parser.add_argument("--json", metavar="FILE", help="write the rows (and analysis) as JSON")
    parser.add_argument("--report", metavar="FILE", help="write an HTML report (and .md)")
    parser.add_argument("--groups", default="per-tensor,w4a8,mixed,calibration,sensitivity",
                        help="comma-separated groups to run (per-channel INT8 always runs)")
    parser.add_argument("--eval-batch", type=int, default=44, help="evaluation batch size")
    parser.add_argument("--bias-correction-crops", type=int, default=44,
                        help="calibration crops used by bias correction (one batch)")
    parser.add_argument("--adaround-batches", type=int, default=2,
                        help="calibration batches (of 22 crops) AdaRound samples from")
    parser.add_argument("--adaround-samples", type=int, default=1024,
                        help="output positions sampled per layer by AdaRound")
    parser.add_argument("--adaround-iterations", type=int, default=0,
                        help="AdaRound steps per layer (default 300, 100 with --quick)")
    parser.add_argument("--search-rank-crops", type=int, default=8,
                        help="search crops for the mixed-precision per-layer ranking")
    parser.add_argument("--sensitivity-crops", type=int, default=8,
                        help="evaluation crops for the per-layer sensitivity analysis")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    torch.manual_seed(0)
    start = time.time()
    rows, extras = run(args)
    extras["total_seconds"] = round(time.time() - start, 1)
    print_table(rows, extras)
    payload = {"title": "MobileNetV2 PTQ benchmark" + (" (quick)" if args.quick else ""),
               "rows": rows, **extras}
    if args.json:
        write_json(args.json, payload)
    if args.report:
        from quantaware.report import write_report

        write_report(args.report, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
