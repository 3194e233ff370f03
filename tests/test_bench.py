"""Tests for the ONNX Runtime benchmarking helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantaware.bench import (
    OnnxModelError,
    file_size,
    onnx_accuracy,
    onnx_latency_ms,
    onnx_predict,
    onnx_session,
)
from quantaware.train import predict_logits

# torch.export emits this from its own internals while exporting; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """The tiny model exported twice: with a dynamic and with a fixed batch dimension."""
    model = _tiny_model()
    out = tmp_path_factory.mktemp("onnx")
    x = torch.randn(4, 1, 8, 8)
    dynamic, fixed = out / "dynamic.onnx", out / "fixed.onnx"
    torch.onnx.export(
        model,
        (x,),
        dynamic,
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    torch.onnx.export(model, (x,), fixed, dynamo=True, verbose=False)
    return model, dynamic, fixed


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 8, 8, generator=generator)
    y = torch.randint(0, 3, (10,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)  # last batch has 2 rows


def test_session_settings(exported) -> None:
    _, dynamic, _ = exported
    session = onnx_session(dynamic, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert len(session.get_inputs()) == 1


def test_latency_is_positive(exported) -> None:
    _, dynamic, _ = exported
    latency = onnx_latency_ms(dynamic, np.zeros((1, 1, 8, 8), np.float32), warmup=1, runs=3)
    assert latency > 0
    with pytest.raises(ValueError, match="runs"):
        onnx_latency_ms(dynamic, np.zeros((1, 1, 8, 8), np.float32), runs=0)


@pytest.mark.parametrize("which", ["dynamic", "fixed"])
def test_predict_and_accuracy_match_torch(exported, loader: DataLoader, which: str) -> None:
    model, dynamic, fixed = exported
    path = dynamic if which == "dynamic" else fixed
    logits, labels = onnx_predict(path, loader)
    expected_logits, expected_labels = predict_logits(model, loader)
    assert logits.shape == (10, 3)
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labels, expected_labels.numpy())
    expected_acc = 100.0 * float(np.mean(expected_logits.argmax(1).numpy() == labels))
    assert onnx_accuracy(path, loader) == pytest.approx(expected_acc)


def test_predict_accepts_dicts_and_unlabelled_batches(exported) -> None:
    model, dynamic, _ = exported
    x = torch.randn(3, 1, 8, 8)
    logits, labels = onnx_predict(dynamic, [x.numpy()])
    assert labels is None
    np.testing.assert_allclose(logits, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    _, labels = onnx_predict(dynamic, [{"input": x, "label": torch.tensor([0, 1, 2])}])
    assert labels.tolist() == [0, 1, 2]
    with pytest.raises(OnnxModelError, match="one input"):
        onnx_predict(dynamic, [{"a": x, "b": x}])
    with pytest.raises(ValueError, match="labelled batches"):
        onnx_accuracy(dynamic, [x])


def test_file_size_counts_external_data(exported) -> None:
    _, dynamic, _ = exported
    sidecars = [p for p in dynamic.parent.iterdir() if p.name.startswith("dynamic.onnx.")]
    expected = os.path.getsize(dynamic) + sum(os.path.getsize(p) for p in sidecars)
    assert file_size(dynamic) == expected
    assert file_size(dynamic, include_external_data=False) == os.path.getsize(dynamic)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        onnx_session(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="no such file"):
        file_size(tmp_path / "nope.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"definitely not a protobuf")
    with pytest.raises(OnnxModelError, match=r"cannot load .*corrupt\.onnx"):
        onnx_session(corrupt)
    with pytest.raises(OnnxModelError, match="cannot load"):
        onnx_latency_ms(corrupt, np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(OnnxModelError, match="cannot parse"):
        file_size(corrupt)
    assert file_size(corrupt, include_external_data=False) == len(b"definitely not a protobuf")
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(b"TFL3")
    with pytest.raises(OnnxModelError, match=r"model\.tflite' is not an ONNX model"):
        onnx_session(tflite)


def test_missing_external_data_is_reported(exported, tmp_path: Path) -> None:
    _, dynamic, _ = exported
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(dynamic.read_bytes())  # copied without its .data file
    with pytest.raises(OnnxModelError, match="missing"):
        file_size(lonely)
    with pytest.raises(OnnxModelError, match="external"):
        onnx_session(lonely)


def test_float_input_linear_stays_float_in_onnx_runtime(tmp_path: Path) -> None:
    """int8 weights on float inputs: ONNX Runtime's MatMulNBits would quantize the
    input to int8 by default; quantaware's sessions compute it in float32."""
    import onnxruntime as ort

    import quantaware
    from quantaware import LayerOverride, presets
    from quantaware.bench import create_session

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(32, 16, 64) * torch.linspace(0.1, 8, 64)  # uneven channels
    config = presets.INT8.with_overrides(LayerOverride("*", activation=None))
    q = quantaware.quantize(model, config, [x], x[:1])
    path = quantaware.export_onnx(q, tmp_path / "w8.onnx", x[:1])
    with torch.no_grad():
        ref = q(x).numpy()
    ours = create_session(path.read_bytes(), 1).run(None, {"input": x.numpy()})[0]
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    default = plain.run(None, {"input": x.numpy()})[0]
    err_ours, err_default = np.abs(ours - ref).max(), np.abs(default - ref).max()
    assert err_ours < 1e-4 * np.abs(ref).max(), err_ours
    assert err_default > 10 * err_ours  # the default quantizes the float input
