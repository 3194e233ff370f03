"""How far two exact-up-to-rounding INT8 implementations drift apart on real networks.

The fake-quantized torch model accumulates in float32; ONNX Runtime accumulates
in int32. Both round the same real numbers, but an activation that sits on a
rounding tie can come out one step apart, and deep INT8 networks can amplify
such a step. This script measures the effect without ONNX Runtime in the loop:
the same quantized torch model evaluated in NCHW and in channels-last layout
(a different float summation order, nothing else), and then the same against
ONNX Runtime (:func:`quantaware.verify`). Prints top-1 agreement and the
largest output difference for each model.

Usage:
    PYTHONPATH=src python benchmarks/rounding_sensitivity.py [--models mobilenet_v2 resnet18]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from pathlib import Path

import torch

from quantaware import export_onnx, verify
from quantaware.deploy import load_model_source, quantize_for_backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--num-eval", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"{'model':14s} {'torch NCHW vs channels-last':>28s} {'max diff':>9s} "
          f"{'ORT vs torch':>13s} {'INT8 vs FP32':>13s}")
    for name in args.models:
        src = load_model_source(name, num_eval=args.num_eval)
        q = quantize_for_backend(src.model, src.calib, src.example)
        data = torch.cat(src.evaluate)
        with torch.no_grad():
            nchw = q(data)
            cl = copy.deepcopy(q).to(memory_format=torch.channels_last)(
                data.contiguous(memory_format=torch.channels_last))
            fp = src.model(data)
        same = float((nchw.argmax(1) == cl.argmax(1)).float().mean())
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(q, Path(tmp) / "m.onnx", src.example)
            report = verify(path, q, src.evaluate, check_layers=False)
        vs_fp = float((nchw.argmax(1) == fp.argmax(1)).float().mean())
        print(f"{name:14s} {100 * same:27.1f}% {float((nchw - cl).abs().max()):9.3f} "
              f"{100 * report.top1_agreement:12.1f}% {100 * vs_fp:12.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
