"""Exports shared by the export tests (each real export takes seconds, so each is done once)."""

from __future__ import annotations

import contextlib

import pytest
import torch

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
