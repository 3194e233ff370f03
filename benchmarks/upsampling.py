"""Upsampling decoders: every conv integer, every backend exact.

A small segmentation network, MobileNetV2's real ImageNet backbone with an FPN-style
decoder (1x1 laterals, two 2x upsamplings added to the laterals, a 3x3 conv, a
21-class 1x1 classifier and an 8x upsampling back to the input size; the decoder's
weights are random but fixed), is quantized with the CNN default (``INT8``,
percentile ranges) on photo crops and exported. The table reports, for each
backend, :func:`quantaware.verify` of the INT8 file against the torch model (the
largest output error, in output steps where the output is quantized; cosine; the
first layer whose codes differ),
and for ONNX Runtime the kernels its optimized graph runs (integer ``QLinearConv``
vs float convs) and the batch-1 latency of FP32 and INT8, the median of interleaved
runs (2 threads).

    PYTHONPATH=src python benchmarks/upsampling.py
    PYTHONPATH=src python benchmarks/upsampling.py --mode nearest --backends onnxruntime

The decoder's upsampling mode is ``--mode`` (bilinear by default).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import quantaware
from quantaware.bench import onnx_session
from quantaware.deploy import load_model_source, quantize_for_backend
from quantaware.deploy_bench import time_interleaved

log = logging.getLogger("benchmarks.upsampling")


class Segmenter(nn.Module):
    """MobileNetV2 features at strides 8, 16 and 32 and an FPN-style decoder."""

    def __init__(self, mode: str, classes: int = 21, width: int = 64) -> None:
        super().__init__()
        from quantaware.zoo.mobilenet import load_mobilenet_v2_imagenet

        features = load_mobilenet_v2_imagenet().features
        self.stage8, self.stage16, self.stage32 = features[:7], features[7:14], features[14:18]
        self.lat8, self.lat16 = nn.Conv2d(32, width, 1), nn.Conv2d(96, width, 1)
        self.lat32 = nn.Conv2d(320, width, 1)
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        self.classify = nn.Conv2d(width, classes, 1)
        self.mode = mode
        gen = torch.Generator().manual_seed(0)
        for conv in (self.lat8, self.lat16, self.lat32, self.smooth, self.classify):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen)
                                  * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()

    def _up(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        align = False if self.mode == "bilinear" else None
        return F.interpolate(x, scale_factor=factor, mode=self.mode, align_corners=align)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c8 = self.stage8(x)
        c16 = self.stage16(c8)
        c32 = self.stage32(c16)
        p = self.lat32(c32)
        p = self._up(p, 2) + self.lat16(c16)
        p = self._up(p, 2) + self.lat8(c8)
        return self._up(self.classify(F.relu(self.smooth(p))), 8)


def _ort_kernels(path: Path, folder: Path) -> Counter:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="bilinear", choices=["bilinear", "nearest"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino", "litert"])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    source = load_model_source("mobilenet_v2", 64, 64, size=args.size)
    model = Segmenter(args.mode).eval()
    example = source.example
    qmodel = quantize_for_backend(model, source.calib, (example,)).eval()
    folder = Path(tempfile.mkdtemp(prefix="quantaware-upsampling-"))
    fp32 = quantaware.export_onnx(model, folder / "fp32.onnx", example)
    int8 = quantaware.export_onnx(qmodel, folder / "int8.onnx", example)

    kernels = _ort_kernels(int8, folder)
    float_convs = sum(kernels[k] for k in ("Conv", "FusedConv", "NchwcConv"))
    print(f"{args.mode} decoder, {args.size}x{args.size}: ONNX Runtime runs "
          f"{kernels['QLinearConv']} QLinearConv and {float_convs} float convs")
    for backend in args.backends:
        path = int8
        if backend == "litert":
            try:
                path = quantaware.export_tflite(qmodel, folder / "int8.tflite", example)
            except ImportError as exc:
                print(f"litert: skipped ({exc})")
                continue
        report = quantaware.verify(path, qmodel, source.evaluate, backend=backend)
        lsb = (f"max error {report.max_abs_error:.3g}" if report.max_error_lsb is None
               else f"{report.max_error_lsb:.2f} LSB")
        print(f"{backend:12s} {lsb}, cosine {report.cosine:.6f} "
              f"(min {report.min_cosine:.6f}), {report.integer_layers} of "
              f"{report.integer_layers + report.fake_quant_layers} layers integer-exact, "
              f"first diverging layer: {report.first_divergent_layer}")
    sessions = {"fp32": onnx_session(fp32, args.threads), "int8": onnx_session(int8, args.threads)}
    feed = example.numpy()
    feeds = {name: {s.get_inputs()[0].name: feed} for name, s in sessions.items()}
    ms = time_interleaved(sessions, feeds, args.runs, warmup=10)
    print(f"ONNX Runtime batch 1: FP32 {ms['fp32']:.2f} ms, INT8 {ms['int8']:.2f} ms, "
          f"{ms['fp32'] / ms['int8']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
