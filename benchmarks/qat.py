"""QAT benchmark: accuracy (float / PTQ / QAT at W8A8, W4A4, W2A2) and step-time ratios.

Prints one table. Accuracy rows: MNIST-1D CNN and digits CNN; every QAT model is
also exported to ONNX and run in ONNX Runtime (``ort agree`` is the top-1
agreement with the torch fake-quant model). Speed rows: median training step time
of QAT / float at batch 64 (one thread, steps interleaved so that machine load
hits both alike), for the MNIST-1D CNN and a ResNet-18 on 16x16 inputs, beside
torchao's pt2e QAT (``prepare_qat_pt2e``) when torchao is installed.

Usage:
    PYTHONPATH=src python benchmarks/qat.py [--quick] [--json FILE] [--report FILE.html]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from quantaware import calibrate, prepare, presets
from quantaware.data import load_digits_split, load_mnist1d_split
from quantaware.models import MNIST1DCNN, DigitsCNN
from quantaware.qat import distillation_loss, prepare_qat
from quantaware.train import evaluate_accuracy, fit

log = logging.getLogger("benchmarks.qat")
CONFIGS = {"W8A8": presets.INT8, "W4A4": presets.W4A4, "W2A2": presets.W2A2}


def _qat(float_model: nn.Module, config, train_loader, calib, example, epochs: int,
         lr: float) -> nn.Module:
    model = prepare_qat(float_model, config, example)
    calibrate(model, calib)
    quant = {id(p) for m in model.modules() if hasattr(m, "observer") for p in
             m.parameters(recurse=False)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in quant],
               "weight_decay": 1e-4},
              {"params": [p for p in model.parameters() if id(p) in quant],
               "weight_decay": 0.0, "lr": lr * 0.1}]
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(train_loader))
    float_model.eval()
    model.train()
    for _ in range(epochs):
        for x, y in train_loader:
            with torch.no_grad():
                teacher = float_model(x)
            loss = distillation_loss(model(x), teacher, y, temperature=4.0, weight=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _ort_agreement(model: nn.Module, example, test_loader) -> float:
    from quantaware.export import export_onnx, verify

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "m.onnx", example)
        return verify(path, model, test_loader).top1_agreement


def accuracy_rows(quick: bool) -> list[dict[str, Any]]:
    rows = []
    nets = {
        "MNIST-1D CNN": (MNIST1DCNN, load_mnist1d_split, 40),
        "digits CNN": (DigitsCNN, load_digits_split, 20),
    }
    for net_name, (make, load, float_epochs) in nets.items():
        train, test = load()
        gen = torch.Generator().manual_seed(0)
        train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=gen)
        test_loader = DataLoader(test, batch_size=256)
        calib = [x for x, _ in DataLoader(train, batch_size=64)][:8]
        example = train[0][0].unsqueeze(0)
        torch.manual_seed(0)
        float_model = make()
        fit(float_model, train_loader, epochs=3 if quick else float_epochs, lr=3e-3, seed=0)
        float_model.eval()
        float_acc = evaluate_accuracy(float_model, test_loader)
        for cfg_name, config in CONFIGS.items():
            ptq = calibrate(prepare(float_model, config, example), calib)
            ptq_acc = evaluate_accuracy(ptq, test_loader)
            qat_epochs = 1 if quick else (15 if cfg_name == "W8A8" else 30)
            qat = _qat(float_model, config, train_loader, calib, example, qat_epochs,
                       lr=1e-3)
            row = {"net": net_name, "bits": cfg_name, "float": float_acc, "ptq": ptq_acc,
                   "qat": evaluate_accuracy(qat, test_loader), "qat_epochs": qat_epochs,
                   "ort_agreement": _ort_agreement(qat, example, test_loader)}
            log.info("%s", row)
            rows.append(row)
    return rows


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _torchao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module | str:
    """torchao's pt2e QAT model (X86 inductor quantizer, W8A8), or why there is none."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except Exception as exc:  # torchao missing or incompatible with this torch
        log.warning("torchao pt2e QAT unavailable: %s", exc)
        return f"unavailable: {type(exc).__name__}: {exc}"
    try:
        exported = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
        quantizer = X86InductorQuantizer().set_global(
            get_default_x86_inductor_quantization_config(is_qat=True))
        return prepare_qat_pt2e(exported, quantizer)
    except Exception as exc:  # its pattern matcher rejects some graphs
        log.warning("torchao pt2e QAT failed on %s: %s: %s", type(model).__name__,
                    type(exc).__name__, exc)
        return f"failed: {type(exc).__name__}: {exc}"


def speed_rows(quick: bool) -> list[dict[str, Any]]:
    from quantaware.zoo import resnet18

    rows = []
    nets = {
        "MNIST-1D CNN": (lambda: MNIST1DCNN(), (1, 40)),
        "ResNet-18 16x16": (lambda: resnet18(num_classes=10), (3, 16, 16)),
    }
    steps = 10 if quick else 60
    for net_name, (make, shape) in nets.items():
        torch.manual_seed(0)
        x, y = torch.randn(64, *shape), torch.randint(0, 10, (64,))
        float_model = make().train()
        variants: dict[str, nn.Module] = {"float": float_model}
        for name in ("W8A8", "W4A4"):
            q = prepare_qat(float_model, CONFIGS[name], x[:1])
            calibrate(q, [x])
            variants[f"quantaware {name}"] = q.train()
        ao = _torchao_qat(float_model, x)
        if isinstance(ao, str):
            rows.append({"net": net_name, "variant": "torchao pt2e W8A8", "step_ms": None,
                         "ratio_vs_float": None, "steps": 0, "error": ao})
        else:
            variants["torchao pt2e W8A8"] = ao
        fns = {k: _step_fn(m, x, y) for k, m in variants.items()}
        for fn in fns.values():  # warm-up (first-use initialisation, allocator)
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(steps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["float"])
        for k, ts in times.items():
            rows.append({"net": net_name, "variant": k, "step_ms": 1000 * statistics.median(ts),
                         "ratio_vs_float": statistics.median(ts) / base, "steps": steps})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs and steps (smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    parser.add_argument("--skip-accuracy", action="store_true", help="speed rows only")
    parser.add_argument("--report", type=Path, default=None,
                        help="write an HTML report (and a .md summary) of the accuracy rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    acc = [] if args.skip_accuracy else accuracy_rows(args.quick)
    speed = speed_rows(args.quick)
    table = Table(title="quantaware QAT benchmark" + (" (quick)" if args.quick else ""))
    for col in ("net", "bits / variant", "float %", "PTQ %", "QAT %", "ORT agree",
                "step ms", "x float"):
        table.add_column(col, justify="left" if col in ("net", "bits / variant") else "right")
    for r in acc:
        table.add_row(r["net"], r["bits"], f"{r['float']:.2f}", f"{r['ptq']:.2f}",
                      f"{r['qat']:.2f}", f"{100 * r['ort_agreement']:.2f}", "", "")
    for r in speed:
        if r["step_ms"] is None:
            table.add_row(r["net"], r["variant"], "", "", "", "", r["error"], "")
            continue
        table.add_row(r["net"], r["variant"], "", "", "", "", f"{r['step_ms']:.2f}",
                      f"{r['ratio_vs_float']:.2f}x")
    Console(width=120).print(table)
    if args.json is not None:
        from quantaware.demo import write_json_atomic

        write_json_atomic(args.json, {"accuracy": acc, "speed": speed, "quick": args.quick})
    if args.report is not None:
        from quantaware.report import write_report

        out = write_report(args.report, report_payload(acc, args.quick))
        Console().print(f"report written to {out}")


def report_payload(acc: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    """The accuracy rows in the report's format: one row per net and float/PTQ/QAT model."""
    rows = []
    for r in acc:
        if not any(x["group"] == r["net"] and x["variant"] == "float" for x in rows):
            rows.append({"group": r["net"], "variant": "float", "accuracy": r["float"]})
        rows += [{"group": r["net"], "variant": f"{r['bits']} PTQ", "accuracy": r["ptq"]},
                 {"group": r["net"], "variant": f"{r['bits']} QAT ({r['qat_epochs']} ep.)",
                  "accuracy": r["qat"]}]
    return {"title": "quantaware QAT benchmark" + (" (quick)" if quick else ""), "rows": rows}


if __name__ == "__main__":
    main()
