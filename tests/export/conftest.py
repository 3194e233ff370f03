"""Exports shared by the export tests (each real export takes seconds, so each is done once)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets

INPUT_SHAPE = (3, 8, 8)


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def example_input() -> torch.Tensor:
    """Batch-1 example input: every model is exported at batch 1 (dynamic batch)."""
    return torch.zeros(1, *INPUT_SHAPE)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def float_model(cnn_factory):
    return cnn_factory(0)


@pytest.fixture(scope="session")
def calib_data(batches_factory):
    return batches_factory((16, *INPUT_SHAPE), 8, 0)


@pytest.fixture(scope="session")
def fresh_data(batches_factory):
    """Inputs never seen in calibration."""
    return batches_factory((20, *INPUT_SHAPE), 10, 123)


@pytest.fixture(scope="session")
def int8_model(float_model, calib_data, example_input):
    with _one_thread():
        return quantaware.quantize(float_model, presets.INT8, calib_data, example_input)


@pytest.fixture(scope="session")
def int8_snapshot(int8_model):
    """The quantized model's state and an output, taken before it is exported."""
    x = torch.randn(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), _one_thread():
        out = int8_model(x)
    return {k: v.clone() for k, v in int8_model.state_dict().items()}, x, out


@pytest.fixture(scope="session")
def int8_path(int8_model, int8_snapshot, export_dir, example_input):
    with _one_thread():
        return quantaware.export_onnx(int8_model, export_dir / "int8.onnx", example_input)


@pytest.fixture(scope="session")
def float_path(float_model, export_dir, example_input):
    with _one_thread():
        return quantaware.export_onnx(float_model, export_dir / "float.onnx", example_input)


@pytest.fixture(scope="session")
def preset_exports(float_model, calib_data, export_dir, example_input):
    """INT8_DYNAMIC, FP16 and W4A8: ``{name: (model, path)}``."""
    out = {}
    with _one_thread():
        for name in ("INT8_DYNAMIC", "FP16", "W4A8"):
            model = quantaware.quantize(float_model, presets.PRESETS[name], calib_data,
                                        example_input)
            path = quantaware.export_onnx(model, export_dir / f"{name}.onnx", example_input)
            out[name] = (model, path)
    return out


class UpsamplingNet(torch.nn.Module):
    """A small encoder-decoder: a strided conv, bilinear upsampling back to the skip
    connection's size (read from its shape at run time), a concatenation, max
    pooling and an ``nn.Upsample`` in nearest mode."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(16, 8, 1)
        self.fuse = nn.Conv2d(16, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        skip = F.relu(self.enc(x))
        y = self.mid(F.relu(self.down(skip)))
        y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.fuse(torch.cat([y, skip], 1)))
        return self.head(self.up(F.max_pool2d(y, 2)))


@pytest.fixture(scope="session")
def upsampling_int8():
    """``(quantized UpsamplingNet, fresh data)``: inputs of odd size (12x14 -> 6x7)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 12, 14, generator=gen) for _ in range(2)]
    data = [torch.randn(32, 3, 12, 14, generator=gen)]
    with _one_thread():
        q = quantaware.quantize(UpsamplingNet().eval(), presets.INT8, calib, calib[0][:1])
    return q, data


class _TwoHeads(nn.Module):
    """Class scores and a box regression from one trunk, as a dict or a tuple."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 16)
        self.classes = nn.Linear(16, 4)
        self.boxes = nn.Linear(16, 4)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> object:
        h = torch.relu(self.trunk(x))
        out = (self.classes(h), self.boxes(h))
        return {"classes": out[0], "boxes": out[1]} if self.as_dict else out


def _two_heads(tmp_path, as_dict: bool = False):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 6, generator=gen) for _ in range(3)]
    q = quantaware.quantize(_TwoHeads(as_dict).eval(), presets.INT8, data, data[0][:1])
    return q, quantaware.export_onnx(q, tmp_path / "heads.onnx", data[0][:1]), data
