"""Fidelity measures and the ONNX Runtime session settings the deploy benchmark uses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantaware.bench import session_options
from quantaware.deploy_bench import fidelity, fidelity_details


def test_image_fidelity_counts_confident_samples_separately():
    ref = np.array([[9.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 0.2]])
    out = np.array([[9.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 8.1], [0.0, 0.0, 0.2]])
    assert fidelity("image", ref, out) == 0.5
    # confident (max softmax >= 0.5): rows 0 and 2, one of which agrees
    assert fidelity_details("image", ref, out) == {"agreement_confident": 0.5}
    flat = np.zeros((2, 3))
    assert math.isnan(fidelity_details("image", flat, flat)["agreement_confident"])


def test_text_fidelity_neighbours():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 8))
    assert fidelity("text", emb, emb) == pytest.approx(1.0)
    assert fidelity_details("text", emb, emb * 3.0) == {"neighbour_agreement": 1.0}
    # Reversing the embeddings changes every sentence's nearest neighbour identity.
    shuffled = emb[::-1]
    assert fidelity_details("text", emb, shuffled)["neighbour_agreement"] < 0.5


def test_sessions_leave_the_callers_float_mode_alone(tmp_path):
    """ONNX Runtime switches the thread that creates a session to flushing denormals;
    quantaware's sessions undo that, and flush only while they run."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    from quantaware.bench import create_session

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = tmp_path / "softmax.onnx"
    onnx.save(model, str(path))
    tiny = torch.tensor([1e-40])
    assert float(tiny * 1.0) > 0.0  # IEEE denormals before
    session = create_session(str(path), threads=1)
    out = session.run(None, {"x": np.array([[0.0, -1e4, 1.0, 2.0]] * 2, np.float32)})[0]
    assert out.shape == (2, 4) and np.allclose(out.sum(1), 1.0)
    assert float(tiny * 1.0) > 0.0  # and after creating and running a session
    assert float(np.float32(1e-40) * np.float32(1.0)) > 0.0


def test_sessions_flush_denormals_and_do_not_spin():
    options = session_options(3)
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            session_options(bad)


def test_openvino_times_the_quantaware_files_only():
    from quantaware.deploy_bench import DISTILLED, VARIANTS, backend_variants

    assert backend_variants(VARIANTS, "onnxruntime") == list(VARIANTS)
    assert backend_variants([*VARIANTS, DISTILLED], "openvino") == ["fp32", "quantaware-int8",
                                                                    DISTILLED]


@pytest.mark.parametrize("backends", [(), ("onnxruntime", "onnxruntime"), ("tensorrt",)])
def test_benchmark_rejects_bad_backends(backends):
    from quantaware.deploy_bench import benchmark

    with pytest.raises(ValueError, match="backend"):
        benchmark(["resnet18"], backends=backends)


def test_results_table_has_a_backend_column_for_several_backends():
    from rich.console import Console

    from quantaware.cli.bench import results_table

    row = {"model": "m", "batch": 1, "variant": "fp32", "latency_ms": 2.0, "ratio_vs_fp32": 1.0,
           "size_bytes": 1000, "fidelity": 1.0, "agreement_confident": 1.0}

    def render(rows):
        console = Console(width=200, record=True)
        console.print(results_table(rows))
        return " ".join(console.export_text().split())  # the caption wraps

    single = render([row])  # rows written before backends existed have no "backend"
    assert "ONNX Runtime deployment" in single and "backend" not in single
    both = render([{**row, "backend": "onnxruntime"}, {**row, "backend": "openvino"}])
    assert "backend" in both and "openvino" in both and "as onnxruntime runs it" in both
    # size x is against the same backend's float file: ONNX and .tflite sizes differ
    mixed = render([{**row, "backend": "onnxruntime"}, {**row, "backend": "litert",
                                                         "size_bytes": 1250}])
    assert "0.80" not in mixed and mixed.count(" 1.00 ") >= 2


def test_fidelity_scores_every_output_and_takes_the_worst():
    rng = np.random.default_rng(0)
    logits, boxes = rng.normal(size=(8, 5)), rng.normal(size=(8, 4))
    assert fidelity("image", [logits, boxes], [logits, boxes]) == pytest.approx(1.0)
    # A negated second head: the first output alone would read 1.0.
    assert fidelity("image", [logits, boxes], [logits, -boxes]) < 0.5
    assert fidelity("text", [boxes], [boxes * 2.0]) == pytest.approx(1.0)
    flipped = fidelity_details("text", [boxes, boxes], [boxes, boxes[::-1]])
    assert flipped == fidelity_details("text", boxes, boxes[::-1])
    assert flipped["neighbour_agreement"] < 1.0
    # A class-less head (one score per sample) is scored by cosine, not top-1.
    score = rng.normal(size=8)
    assert fidelity("image", score, score) == pytest.approx(1.0)
    assert fidelity("image", score, -score) == pytest.approx(-1.0)
    assert math.isnan(fidelity_details("image", score, score)["agreement_confident"])
    with pytest.raises(ValueError, match="as many outputs"):
        fidelity("image", [logits, boxes], [logits])
    with pytest.raises(ValueError, match="output 1: shape"):
        fidelity("image", [logits, boxes], [logits, boxes[:, :2]])


def test_dense_map_fidelity_is_per_pixel_over_the_classes():
    rng = np.random.default_rng(1)
    seg = rng.normal(size=(2, 3, 4, 5)) * 5.0
    assert fidelity("image", seg, seg) == 1.0
    swapped = seg[:, ::-1]
    agree = np.mean(seg.argmax(1) == swapped.argmax(1))
    assert fidelity("image", seg, swapped) == pytest.approx(agree)
    assert fidelity_details("image", seg, seg) == {"agreement_confident": 1.0}


def test_outputs_collects_every_output_over_the_batches():
    from quantaware.deploy_bench import _outputs

    class Session:
        def get_inputs(self):
            return [type("I", (), {"name": "x"})()]

        def run(self, names, feed):
            x = feed["x"]
            return [x * 2.0, x.sum(1)]

    import torch

    batches = [torch.ones(2, 3), torch.zeros(1, 3)]
    first, second = _outputs(Session(), batches, ["x"])
    assert first.shape == (3, 3) and second.tolist() == [3.0, 3.0, 0.0]


def test_outputs_feed_keyword_inputs_to_numbered_inputs_in_forward_order():
    """A LiteRT file numbers its inputs; a dict batch (a transformer's input_ids and
    attention_mask) goes to them in the order of the model's forward parameters,
    whatever the dict's order."""
    import torch

    from quantaware._batch import forward_parameters
    from quantaware.deploy_bench import _outputs

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids * attention_mask

    class Session:
        def get_inputs(self):
            return [type("I", (), {"name": f"serving_default_args_{k}"})() for k in (0, 1)]

        def run(self, names, feed):
            assert sorted(feed) == ["serving_default_args_0", "serving_default_args_1"], feed
            return [feed["serving_default_args_0"] * 10 + feed["serving_default_args_1"]]

    batch = {"attention_mask": torch.tensor([[1, 0]]), "input_ids": torch.tensor([[7, 8]])}
    (out,) = _outputs(Session(), [batch], forward_parameters(Model()))
    assert out.tolist() == [[71, 80]]


def test_a_failing_onnx_runtime_baseline_leaves_its_row_out(tmp_path, monkeypatch, caplog):
    """ONNX Runtime's quantize_static fails on some models (a LayerNorm bias it
    cannot scale); the comparison goes on without that baseline."""
    import onnxruntime.quantization as ortq
    import torch

    from quantaware.deploy import ModelSource
    from quantaware.deploy_bench import build_variants

    def fail(*_args, **_kwargs):
        raise ValueError("Unable to get valid quantization scale")

    monkeypatch.setattr(ortq, "quantize_static", fail)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    source = ModelSource("pkg.models:tiny", net, "image", x[:1], [x], [x])
    paths, _ = build_variants(source, tmp_path)
    assert sorted(paths) == ["fp32", "ort-dynamic-int8", "quantaware-int8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "models-tiny-fp32.onnx", "models-tiny-ort-dynamic-int8.onnx",
        "models-tiny-quantaware-int8.onnx"]
    assert "ort-static-int8 failed on this model" in caplog.text


def test_models_whose_specs_share_a_file_name_keep_their_own_files(tmp_path):
    """vision/models.py:build and audio/models.py:build both wrote models-build-*.onnx:
    the second model's files replaced the first's."""
    from quantaware.deploy_bench import benchmark

    for i, folder in enumerate(("vision", "audio")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "models.py").write_text(
            f"import torch\n\ndef build():\n    torch.manual_seed({i})\n"
            "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),\n"
            "        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),"
            " torch.nn.Linear(4, 3))\n")
    out = tmp_path / "out"
    benchmark([str(tmp_path / "vision" / "models.py:build"),
               str(tmp_path / "audio" / "models.py:build")], batches=[1], threads=1, runs=1,
              warmup=0, quick=True, out_dir=out, input_shape=(3, 16, 16))
    names = sorted(p.name for p in out.glob("*quantaware-int8.onnx"))
    assert names == ["models-build-2-quantaware-int8.onnx", "models-build-quantaware-int8.onnx"]
