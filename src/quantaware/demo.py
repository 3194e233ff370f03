"""The built-in demo: the whole workflow on scikit-learn's bundled digits.

Float baseline -> PTQ static int8, dynamic int8, float16 -> QAT int8 from the PTQ
model -> ONNX export of every variant -> accuracy in torch and in ONNX Runtime,
file size and latency, side by side. Runs offline in about a minute on 2 cores.

Example:
    >>> from quantaware.demo import run_demo
    >>> rows = run_demo("quantaware-demo", fast=True)  # doctest: +SKIP
    >>> [r["variant"] for r in rows]  # doctest: +SKIP
    ['fp32', 'ptq-int8', 'dynamic-int8', 'fp16', 'qat-int8']
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantaware import presets
from quantaware._files import write_json
from quantaware.calibrate import calibrate
from quantaware.config import QuantConfig
from quantaware.prepare import prepare

__all__ = ["DemoSettings", "run_demo", "write_json_atomic"]

VARIANTS = ("fp32", "ptq-int8", "dynamic-int8", "fp16", "qat-int8")


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo; ``fast()`` is the quick mode the tests use."""

    float_epochs: int = 12
    qat_epochs: int = 3
    qat_lr: float = 2e-4
    lr: float = 3e-3
    batch_size: int = 64
    calib_batches: int = 16
    latency_batch: int = 64
    latency_runs: int = 100
    seed: int = 0

    @classmethod
    def fast(cls) -> DemoSettings:
        return cls(float_epochs=3, qat_epochs=1, calib_batches=4, latency_runs=5)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder."""
    write_json(path, payload)


def _quantized(model: nn.Module, config: QuantConfig, calib, example: torch.Tensor,
               batches: int) -> nn.Module:
    prepared = prepare(model, config, example)
    return calibrate(prepared, calib, num_batches=batches)


def run_demo(
    out_dir: str | os.PathLike = "quantaware-demo",
    *,
    fast: bool = False,
    settings: DemoSettings | None = None,
    on_step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the demo, write ``out_dir/results.json`` and the ONNX files; return the rows.

    Each row: ``variant``, ``accuracy`` and ``accuracy_onnxruntime`` (percent on the
    held-out test split), ``size_bytes`` (ONNX file), ``latency_ms`` (median ONNX
    Runtime latency of a batch of ``settings.latency_batch`` on 2 threads), and the
    ``verify`` agreement between the torch model and the ONNX file.

    Args:
        out_dir: folder for ``results.json`` and ``<variant>.onnx``.
        fast: a quick, less accurate run (for tests and smoke checks).
        settings: explicit knobs (overrides ``fast``).
        on_step: called with a description as each step starts (progress display).
    """
    from quantaware.bench import file_size, onnx_accuracy, onnx_latency_ms
    from quantaware.data import load_digits_split, make_loaders
    from quantaware.export import export_onnx, verify
    from quantaware.models import DigitsCNN
    from quantaware.train import evaluate_accuracy, fit

    cfg = settings or (DemoSettings.fast() if fast else DemoSettings())
    step = on_step or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    train_set, test_set = load_digits_split(seed=cfg.seed)
    train_loader, test_loader = make_loaders(train_set, test_set, cfg.batch_size, cfg.seed)
    example = test_set.tensors[0][:1]
    calib = list(islice(iter(train_loader), cfg.calib_batches))

    step(f"training the float baseline ({cfg.float_epochs} epochs)")
    t0 = time.perf_counter()
    float_model = DigitsCNN()
    fit(float_model, train_loader, epochs=cfg.float_epochs, lr=cfg.lr, seed=cfg.seed)
    float_model.eval()
    train_seconds = time.perf_counter() - t0

    models: dict[str, nn.Module] = {"fp32": float_model}
    step("post-training quantization: static int8")
    models["ptq-int8"] = _quantized(float_model, presets.INT8, calib, example,
                                    cfg.calib_batches)
    step("post-training quantization: dynamic int8")
    models["dynamic-int8"] = prepare(float_model, presets.INT8_DYNAMIC, example)
    step("post-training quantization: float16")
    models["fp16"] = prepare(float_model, presets.FP16, example)
    step(f"quantization-aware training from the PTQ model ({cfg.qat_epochs} epochs)")
    qat = copy.deepcopy(models["ptq-int8"])
    fit(qat, train_loader, epochs=cfg.qat_epochs, lr=cfg.qat_lr, seed=cfg.seed + 1)
    models["qat-int8"] = qat.eval()

    rows: list[dict[str, Any]] = []
    latency_input = test_set.tensors[0][: cfg.latency_batch].numpy()
    for name in VARIANTS:
        model = models[name].eval()
        step(f"{name}: export to ONNX and evaluate in torch and ONNX Runtime")
        path = export_onnx(model, out / f"{name}.onnx", example)
        report = verify(path, model, test_loader)
        rows.append({
            "variant": name,
            "accuracy": round(evaluate_accuracy(model, test_loader), 3),
            "accuracy_onnxruntime": round(onnx_accuracy(path, test_loader), 3),
            "size_bytes": file_size(path),
            "latency_ms": round(onnx_latency_ms(path, latency_input,
                                                runs=cfg.latency_runs), 4),
            "verify_top1_agreement": round(report.top1_agreement, 5),
            "verify_max_error_lsb": (None if report.max_error_lsb is None
                                     else round(report.max_error_lsb, 3)),
        })
    write_json_atomic(out / "results.json", rows)
    write_json_atomic(out / "run.json", {
        "settings": cfg.__dict__, "float_train_seconds": round(train_seconds, 2),
        "test_samples": len(test_set), "latency_batch": len(latency_input),
    })
    return rows
