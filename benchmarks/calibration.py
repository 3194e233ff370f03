"""Calibration cost per range estimator, as a multiple of the float forward passes.

MobileNetV2 (no weights needed: the cost does not depend on them) at 96x96, 8
batches of 8 random inputs, 1 thread: for each observer the float model's passes
over the batches and ``quantaware.calibrate`` over the same batches are timed in
the same run (best of ``--repeats``), and their ratio printed.

    PYTHONPATH=src python benchmarks/calibration.py
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import quantaware
from quantaware import presets
from quantaware.zoo.mobilenet import mobilenet_v2

METHODS = ("minmax", "moving_average", "percentile", "mse", "entropy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = mobilenet_v2().eval()
    data = [torch.randn(8, 3, 96, 96) for _ in range(8)]
    print(f"{'observer':<15} {'float s':>8} {'calibrate s':>12} {'ratio':>7}")
    for method in METHODS:
        activation = dataclasses.replace(presets.INT8.activation, observer=method)
        config = dataclasses.replace(presets.INT8, activation=activation)
        forward, calibrate = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                for x in data:
                    net(x)
            forward.append(time.perf_counter() - start)
            prepared = quantaware.prepare(net, config, data[0][:1])
            start = time.perf_counter()
            quantaware.calibrate(prepared, data)
            calibrate.append(time.perf_counter() - start)
        f, c = min(forward), min(calibrate)
        print(f"{method:<15} {f:>8.2f} {c:>12.2f} {c / f:>6.1f}x")


if __name__ == "__main__":
    main()
