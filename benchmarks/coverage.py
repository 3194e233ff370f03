"""Model kinds beyond the examples: quantize, export and verify on every backend.

Each network below is built with fixed random weights (what is measured is the
deployment, not the accuracy), quantized with a preset on 48 random samples of its
input, exported, and checked with :func:`quantaware.verify` in ONNX Runtime,
OpenVINO and LiteRT (each backend that is installed). The table gives the verdict,
the largest output error (in output steps where the output is quantized), the
cosine and the first layer whose codes differ; an export or backend failure is
listed with its first line.

    PYTHONPATH=src python benchmarks/coverage.py
    PYTHONPATH=src python benchmarks/coverage.py --preset W4A4 --backends onnxruntime openvino
    PYTHONPATH=src python benchmarks/coverage.py --models encoder two-heads --qat

``--qat`` fine-tunes each prepared model for a few steps (fake-quant forward,
straight-through gradients) before export instead of calibrating only.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import quantaware
from quantaware import presets
from quantaware.qat import prepare_qat

log = logging.getLogger("benchmarks.coverage")


class Encoder(nn.Module):
    """Token ids, a learned position table, two transformer encoder layers, mean pool."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.position = nn.Parameter(torch.randn(1, 16, 32) * 0.1)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.position).mean(1))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` with a residual add and LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attention(h, h, h)
        return self.head(self.norm(h + a)[:, 0])


class ScaledDotProduct(nn.Module):
    """``scaled_dot_product_attention`` on 3-d query, key and value."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(F.gelu(F.scaled_dot_product_attention(q, k, v))).mean(1)


class PatchTransformer(nn.Module):
    """ViT-style: patch conv, class token, position table, LayerNorm + GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 32))
        self.position = nn.Parameter(torch.randn(1, 17, 32) * 0.02)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.position
        tokens = tokens + self.mlp(self.norm(tokens))
        return self.head(tokens[:, 0])


class Recurrent(nn.Module):
    """Conv1d features into an LSTM (``gru=True``: a two-layer GRU)."""

    def __init__(self, gru: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 16, 5, padding=2)
        self.rnn = nn.GRU(16, 32, 2, batch_first=True) if gru else nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(F.relu(self.conv(x)).transpose(1, 2))
        return self.head(out[:, -1])


class TwoHeads(nn.Module):
    """Two positional inputs (an image and a vector), two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.vector = nn.Linear(5, 8)
        self.classes = nn.Linear(8, 4)
        self.boxes = nn.Linear(8, 4)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = F.relu(self.conv(image)).mean((2, 3)) + F.relu(self.vector(vector))
        return self.classes(h), self.boxes(h)


class MobileBlock(nn.Module):
    """Hardswish stem, depthwise SiLU conv, squeeze-and-excitation gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.depthwise(self.stem(x)))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return self.head(F.adaptive_avg_pool2d(self.project(h * gate), 1).flatten(1))


class ChannelShuffle(nn.Module):
    """ShuffleNet-style split, depthwise branch, concat and channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.mix = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.stem(x)).chunk(2, 1)
        h = torch.cat([a, F.relu(self.branch(b))], 1)
        n, c, height, width = h.shape
        h = h.view(n, 2, c // 2, height, width).transpose(1, 2).reshape(n, c, height, width)
        return self.head(F.relu(self.mix(h)).mean((2, 3)))


class Segmenter(nn.Module):
    """Strided encoder, 1x1 classifier, bilinear upsampling to the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.down1, self.down2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
        self.classifier = nn.Conv2d(32, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(F.relu(self.down2(F.relu(self.down1(x)))))
        return F.interpolate(logits, scale_factor=4, mode="bilinear")


class Decoder(nn.Module):
    """U-Net-style decoder: strided encoder, transposed convs with BatchNorm back up, a
    skip connection concatenated, per-pixel logits."""

    def __init__(self) -> None:
        super().__init__()
        self.down1, self.down2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16),
                                 nn.ReLU())
        self.up1 = nn.ConvTranspose2d(32, 8, 2, 2)
        self.classifier = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.down1(x))
        h = torch.cat([self.up2(F.relu(self.down2(skip))), skip], 1)
        return self.classifier(F.relu(self.up1(h)))


class Volumetric(nn.Module):
    """Conv3d + BatchNorm3d, 3-d max pooling, global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.max_pool3d(self.conv1(x), 2)))
        return self.head(F.adaptive_avg_pool3d(h, 1).flatten(1))


def _signal_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 3, padding=1, groups=16), nn.BatchNorm1d(32), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(32, 10))


def _randn(*shape: int) -> Callable[[torch.Generator], Any]:
    return lambda gen: torch.randn(*shape, generator=gen)


#: name -> (model factory, one batch of inputs from a generator)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Any]]] = {
    "encoder": (Encoder, lambda gen: torch.randint(0, 100, (8, 16), generator=gen)),
    "attention": (Attention, _randn(8, 10, 8)),
    "sdpa-3d": (ScaledDotProduct, _randn(8, 10, 16)),
    "patch-transformer": (PatchTransformer, _randn(8, 3, 16, 16)),
    "lstm": (Recurrent, _randn(8, 1, 40)),
    "gru": (lambda: Recurrent(gru=True), _randn(8, 1, 40)),
    "conv1d": (_signal_net, _randn(8, 1, 40)),
    "mlp-batchnorm": (_mlp, _randn(8, 1, 8, 8)),
    "two-heads": (TwoHeads, lambda gen: (torch.randn(8, 3, 8, 8, generator=gen),
                                         torch.randn(8, 5, generator=gen))),
    "mobile-block": (MobileBlock, _randn(8, 3, 16, 16)),
    "channel-shuffle": (ChannelShuffle, _randn(8, 3, 16, 16)),
    "segmenter": (Segmenter, _randn(8, 3, 32, 32)),
    "decoder": (Decoder, _randn(8, 3, 32, 32)),
    "conv3d": (Volumetric, _randn(8, 1, 8, 8, 8)),
}

BACKENDS = ("onnxruntime", "openvino", "litert")
_MODULES = {"openvino": "openvino", "litert": "ai_edge_litert"}


def _batches(make: Callable[[torch.Generator], Any], count: int = 6) -> list[Any]:
    gen = torch.Generator().manual_seed(1)
    batches = [make(gen) for _ in range(count)]
    # several positional inputs travel as ((x1, x2),), a tensor as itself
    return [(b,) if isinstance(b, tuple) else b for b in batches]


def _example(batch: Any) -> Any:
    if isinstance(batch, tuple):
        return tuple(x[:1] for x in batch[0])
    return batch[:1]


def _model(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = factory().eval()
    for module in model.modules():  # non-trivial folded batch norms
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model


def _fine_tune(model: nn.Module, config: Any, batches: list[Any], example: Any) -> nn.Module:
    prepared = prepare_qat(model, config, example)
    quantaware.calibrate(prepared, batches)
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=1e-4)
    prepared.train()
    for batch in batches:
        args = batch[0] if isinstance(batch, tuple) else (batch,)
        out = prepared(*args)
        loss = sum(o.float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return prepared.eval()


def _row(name: str, backend: str, report: Any = None, error: str | None = None) -> dict:
    if error is not None:
        return {"model": name, "backend": backend, "verdict": "ERROR", "detail": error}
    lsb = ("float out" if report.max_error_lsb is None else f"{report.max_error_lsb:.2f}")
    total = report.integer_layers + report.fake_quant_layers
    return {"model": name, "backend": backend,
            "verdict": "PASS" if report.passed() else "CHECK",
            "top-1": f"{100 * report.top1_agreement:.2f}%", "max err LSB": lsb,
            "cosine": f"{report.cosine:.6f}",
            "first diverging layer": report.first_divergent_layer or "-",
            "integer layers": (f"{report.integer_layers}/{total}"
                               if report.reference == "integer" else "fake-quant ref")}


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:150] if text else type(exc).__name__


def run(models: list[str], backends: list[str], preset: str, qat: bool,
        out: Path) -> list[dict]:
    config = presets.get(preset)
    rows = []
    for name in models:
        factory, make = MODELS[name]
        batches = _batches(make)
        example = _example(batches[0])
        log.info("%s: %s", name, "fine-tuning" if qat else "calibrating")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = _model(factory)
                quantized = (_fine_tune(model, config, batches, example) if qat
                             else quantaware.quantize(model, config, batches, example))
        except Exception as exc:  # report and go on with the next model
            rows += [_row(name, b, error=f"quantize: {_first_line(exc)}") for b in backends]
            continue
        onnx_path = None
        for backend in backends:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if backend == "litert":
                        path = quantaware.export_tflite(quantized, out / f"{name}.tflite",
                                                        example)
                    else:
                        onnx_path = onnx_path or quantaware.export_onnx(
                            quantized, out / f"{name}.onnx", example)
                        path = onnx_path
                    rows.append(_row(name, backend,
                                     quantaware.verify(path, quantized, batches,
                                                       backend=backend)))
            except Exception as exc:  # a backend that cannot run the model is a result
                rows.append(_row(name, backend, error=_first_line(exc)))
    return rows


def print_table(rows: list[dict]) -> None:
    columns = ["model", "backend", "verdict", "top-1", "max err LSB", "cosine",
               "integer layers", "first diverging layer"]
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(width[c]) for c in columns))
    for row in rows:
        if row["verdict"] == "ERROR":
            print("  ".join([row["model"].ljust(width["model"]),
                             row["backend"].ljust(width["backend"]), "ERROR   ", row["detail"]]))
        else:
            print("  ".join(str(row.get(c, "")).ljust(width[c]) for c in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--preset", default="INT8", help="a preset name (quantaware presets)")
    parser.add_argument("--qat", action="store_true", help="fine-tune instead of calibrating")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backends = [b for b in args.backends
                if b not in _MODULES or importlib.util.find_spec(_MODULES[b]) is not None]
    skipped = sorted(set(args.backends) - set(backends))
    if skipped:
        log.info("not installed, skipped: %s", ", ".join(skipped))
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.models, backends, args.preset, args.qat, Path(tmp))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
