"""PTQ of a user's model to INT8 ONNX, float vs INT8 comparison, quantized checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from quantaware.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from quantaware.deploy import default_config
from quantaware.sources import DataSource, LoadedModel, SourceError, load_data, load_model
from quantaware.workflow import (
    QUANTIZED_FORMAT,
    choose_config,
    compare_files,
    compare_onnx,
    comparison_table,
    load_quantized,
    quantize_model,
    run_quantize,
    save_quantized,
)
from quantaware.zoo.minilm import MiniLMConfig, minilm

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL = f"{__name__}:small_cnn"
DATA = f"{__name__}:labelled_batches"


def small_cnn(num_classes: int = 5) -> nn.Module:
    """Conv+BN+ReLU, a strided conv, pooling and a linear head: 3 x 12 x 12 -> classes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


class RenamedCNN(nn.Module):
    """The same input and output as :func:`small_cnn`, other layer names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def labelled_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches labelled with the float model's own predictions."""
    gen = torch.Generator().manual_seed(1)
    model = small_cnn()
    out = []
    for _ in range(3):
        x = torch.randn(16, 3, 12, 12, generator=gen)
        with torch.no_grad():
            out.append((x, model(x).argmax(1)))
    return out


@pytest.fixture(scope="module")
def quantized_run(single_thread, tmp_path_factory):
    """``run_quantize`` once, with verification: (results, out folder, progress lines)."""
    out = tmp_path_factory.mktemp("run")
    messages: list[str] = []
    model = load_model(MODEL)
    calib = load_data(DATA, model)
    results = run_quantize(model, calib, out, threads=1, latency_runs=3,
                           progress=messages.append)
    return results, out, messages


def test_run_quantize_writes_every_file_and_the_results(quantized_run):
    results, out, messages = quantized_run
    names = {"model-fp32.onnx", "model-int8.onnx", "model-int8.pt", "results.json"}
    assert names <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.tmp")) and not (out / "report.html").exists()
    assert results["files"] == {"float_onnx": str(out / "model-fp32.onnx"),
                                "int8_onnx": str(out / "model-int8.onnx"),
                                "quantized_checkpoint": str(out / "model-int8.pt"),
                                "results": str(out / "results.json")}
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results) == {"model", "calibration", "config", "target", "evaluation", "files",
                            "verify"}
    assert results["model"] == MODEL
    assert results["target"] == "onnxruntime-x86"
    assert results["evaluation"]["backend"] == "onnxruntime"
    assert results["calibration"] == {"data": DATA, "samples": 48}
    assert results["config"] == default_config(small_cnn()).to_dict()
    assert messages[0] == f"calibrating on 48 samples from {DATA}"
    assert "verifying the INT8 file against the torch model" in messages


def test_a_run_stopped_part_way_leaves_the_earlier_run_as_it_was(quantized_run, tmp_path,
                                                                  monkeypatch):
    """A run stopped part way deleted the earlier run's files (its results.json first,
    then every output name). Files are now written aside and moved into place at the
    end: the earlier run stays whole, and no file of the stopped run is left."""
    import shutil

    from quantaware import workflow

    out = tmp_path / "run"
    shutil.copytree(quantized_run[1], out)
    (out / "report.html").write_text("an earlier run's report")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "compare_files", stopped)
    model = load_model(MODEL)
    with pytest.raises(KeyboardInterrupt):
        run_quantize(model, load_data(DATA, model), out, threads=1, latency_runs=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_keeps_the_permissions_and_links_of_the_files_it_replaces(quantized_run,
                                                                         tmp_path):
    import shutil
    import stat

    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(quantized_run[1], out)
    elsewhere.mkdir()
    shutil.move(out / "model-int8.pt", elsewhere / "model-int8.pt")
    (out / "model-int8.pt").symlink_to(elsewhere / "model-int8.pt")
    (out / "results.json").chmod(0o600)
    model = load_model(MODEL)
    run_quantize(model, load_data(DATA, model), out, threads=1, latency_runs=2, verify=False)
    assert (out / "model-int8.pt").is_symlink()
    assert (elsewhere / "model-int8.pt").stat().st_mtime_ns > (out / "model-fp32.onnx").stat(
        ).st_mtime_ns - 10**10
    assert stat.S_IMODE((out / "results.json").stat().st_mode) == 0o600
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_run_quantize_rejects_an_unknown_target_before_any_work(tmp_path):
    model = load_model(MODEL)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; choose one of"):
        run_quantize(model, load_data(DATA, model), tmp_path / "out", backend="tensorrt")
    assert not (tmp_path / "out").exists()


def test_a_preset_litert_cannot_run_is_refused_before_calibrating(tmp_path):
    pytest.importorskip("litert_torch")
    model = load_model(MODEL)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")  # an earlier run's results stay
    with pytest.raises(SourceError, match="--target litert: W4A4: 4-bit activations"):
        run_quantize(model, load_data(DATA, model), out, preset="W4A4", backend="litert")
    assert [p.name for p in out.iterdir()] == ["results.json"]


def test_run_quantize_evaluates_on_the_calibration_data_by_default(quantized_run):
    results, out, _ = quantized_run
    evaluation = results["evaluation"]
    assert evaluation["data"] == DATA and evaluation["samples"] == 48
    assert evaluation["labeled"] and evaluation["threads"] == 1
    fp32, int8 = evaluation["models"]
    assert (fp32["model"], int8["model"]) == ("FP32", "INT8")
    # The labels are the float model's predictions: FP32 is right on every sample and
    # the INT8 accuracy is its agreement with FP32.
    assert fp32["accuracy"] == 100.0
    assert int8["accuracy"] == int8["top1_agreement"]
    assert 80.0 <= int8["top1_agreement"] <= 100.0
    assert 0.99 < int8["cosine"] <= 1.0 + 1e-6
    assert fp32["size_bytes"] == os.path.getsize(out / "model-fp32.onnx")
    assert int8["size_bytes"] == os.path.getsize(out / "model-int8.onnx")
    assert int8["size_ratio"] == pytest.approx(int8["size_bytes"] / fp32["size_bytes"])
    assert int8["size_ratio"] < 1.0
    for row in (fp32, int8):
        assert row["batch"] == 16
        assert row["latency_ms_batch1"] > 0 and row["latency_ms_batch"] > 0
    assert int8["speedup_batch1"] == pytest.approx(
        fp32["latency_ms_batch1"] / int8["latency_ms_batch1"])
    assert "top1_agreement" not in fp32 and "speedup_batch" not in fp32


def test_run_quantize_verifies_the_int8_file(quantized_run):
    verify = quantized_run[0]["verify"]
    assert verify["passed"] is True and verify["reference"] == "integer"
    assert verify["num_samples"] == 48 and verify["top1_agreement"] == 1.0
    assert verify["max_error_lsb"] <= 1.0 + 1e-3


def test_float_onnx_computes_the_float_model(quantized_run):
    out = quantized_run[1]
    x = labelled_batches()[0][0]
    session = ort.InferenceSession(str(out / "model-fp32.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), small_cnn()(x), rtol=1e-4, atol=1e-5)


def test_quantized_checkpoint_rebuilds_the_quantized_model(quantized_run, tmp_path):
    out = quantized_run[1]
    model = load_model(MODEL)
    calib = load_data(DATA, model)
    quantized, config = quantize_model(model, calib)
    payload = load_checkpoint(out / "model-int8.pt")
    assert payload["format"] == QUANTIZED_FORMAT and payload["model"] == MODEL
    assert payload["config"] == config.to_dict()
    x = calib.inputs[1]
    with torch.no_grad():
        want = quantized(x)
        rebuilt = load_quantized(out / "model-int8.pt", load_model(MODEL), calib.example)
        assert torch.equal(rebuilt(x), want)
        save_quantized(tmp_path / "q.pt", quantized, config, MODEL)
        again = load_quantized(tmp_path / "q.pt", load_model(MODEL), calib.example)
        assert torch.equal(again(x), want)
        assert not torch.allclose(want, small_cnn()(x))  # it is the quantized model


def test_quantized_checkpoint_problems(quantized_run, tmp_path):
    ckpt = quantized_run[1] / "model-int8.pt"
    example = labelled_batches()[0][0][:1]
    other = LoadedModel("renamed", module=RenamedCNN().eval())
    with pytest.raises(SourceError, match="does not fit model renamed"):
        load_quantized(ckpt, other, example)
    with pytest.raises(SourceError, match="needs the PyTorch model"):
        load_quantized(ckpt, LoadedModel("m.onnx", onnx_path=tmp_path / "m.onnx"), example)
    save_checkpoint(tmp_path / "plain.pt", {"state_dict": small_cnn().state_dict()})
    with pytest.raises(SourceError, match="is not a quantized model"):
        load_quantized(tmp_path / "plain.pt", load_model(MODEL), example)
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    torch.save({"format": QUANTIZED_FORMAT, "config": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_quantized(tmp_path / "evil.pt", load_model(MODEL), example)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["zero scale", "nan scale", "zero point", "nan weight",
                                    "no config"])
def test_a_damaged_quantized_checkpoint_is_refused(quantized_run, tmp_path, damage):
    """Zero or NaN scales exported silently to a file computing zeros or NaN; a
    checkpoint without its config raised a bare KeyError."""
    payload = load_checkpoint(quantized_run[1] / "model-int8.pt")
    state = payload["state_dict"]
    scale = next(k for k in state if k.endswith("input_quantizer.scale"))
    if damage == "zero scale":
        state[scale] = torch.zeros_like(state[scale])
    elif damage == "nan scale":
        state[scale] = torch.full_like(state[scale], float("nan"))
    elif damage == "zero point":
        key = scale.replace(".scale", ".zero_point")
        state[key] = torch.full_like(state[key], 1000)
    elif damage == "nan weight":
        key = next(k for k in state if k.endswith("weight"))
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    else:
        del payload["config"]
    save_checkpoint(tmp_path / "damaged.pt", payload)
    message = "lacks its quantization config" if damage == "no config" else "damaged"
    with pytest.raises(SourceError, match=message):
        load_quantized(tmp_path / "damaged.pt", load_model(MODEL), labelled_batches()[0][0][:1])


def test_quantized_checkpoint_for_a_model_with_other_layer_sizes(quantized_run):
    example = labelled_batches()[0][0][:1]
    three_classes = LoadedModel("three", module=small_cnn(num_classes=3))
    with pytest.raises(SourceError, match="does not fit model three"):
        load_quantized(quantized_run[1] / "model-int8.pt", three_classes, example)


def test_transformer_checkpoint_round_trip_keeps_smoothing(tmp_path):
    cfg = MiniLMConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=4,
                       intermediate_size=64, max_positions=12)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (12, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0
    data = DataSource("ids", [{"input_ids": ids[:6], "attention_mask": mask[:6]},
                              {"input_ids": ids[6:], "attention_mask": mask[6:]}],
                      labeled=False)
    quantized, config = quantize_model(LoadedModel("tiny", module=minilm(cfg)), data)
    assert config.name == "INT8_TRANSFORMER"
    assert any(name.endswith("smoothing") for name in quantized.state_dict())
    save_quantized(tmp_path / "q.pt", quantized, config, "tiny")
    rebuilt = load_quantized(tmp_path / "q.pt", LoadedModel("tiny", module=minilm(cfg)),
                             data.example)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids, mask), quantized(ids, mask))


def test_quantize_model_problems(tmp_path):
    onnx_model = LoadedModel("m.onnx", onnx_path=tmp_path / "m.onnx")
    data = load_data("digits", limit=4)
    with pytest.raises(SourceError, match="quantization needs the PyTorch model"):
        quantize_model(onnx_model, data)
    with pytest.raises(SourceError, match=r"fails on the data from digits \(one sample of shape "
                       r"\(1, 1, 8, 8\)\).*--size"):
        quantize_model(load_model(MODEL), data)


def test_choose_config():
    conv = small_cnn()
    assert choose_config(conv).name == "INT8_CNN"
    assert choose_config(conv).activation.observer == "percentile"
    config = choose_config(conv, "INT8", "mse")
    assert config.name == "INT8" and config.activation.observer == "mse"
    assert choose_config(conv, "W4A8").activation.observer != "entropy"
    assert choose_config(conv, "W4A8", "entropy").activation.observer == "entropy"
    with pytest.raises(SourceError, match="unknown preset 'INT3'"):
        choose_config(conv, "INT3")
    with pytest.raises(SourceError, match="unknown calibration method 'median'"):
        choose_config(conv, None, "median")
    with pytest.raises(SourceError, match="FP16 quantizes no activations"):
        choose_config(conv, "FP16", "minmax")
    # dynamic activations are never calibrated: the method was recorded and ignored
    with pytest.raises(SourceError, match="INT8_DYNAMIC quantizes activations at run time"):
        choose_config(conv, "INT8_DYNAMIC", "entropy")


# -- compare_onnx on hand-built ONNX models --------------------------------------------


def write_onnx(path, nodes, inputs, outputs, initializers=()) -> str:
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def scores_model(path, scale=None, width=4) -> str:
    """``x -> x`` (or ``x * scale``, or the row sum when ``width == 1``) over N x 4."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    if width == 1:
        axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
        return write_onnx(path, [helper.make_node("ReduceSum", ["x", "axes"], ["y"])], [x], [y],
                          [axes])
    if scale is None:
        return write_onnx(path, [helper.make_node("Identity", ["x"], ["y"])], [x], [y])
    w = numpy_helper.from_array(np.asarray(scale, np.float32), "w")
    return write_onnx(path, [helper.make_node("Mul", ["x", "w"], ["y"])], [x], [y], [w])


@pytest.fixture(scope="module")
def vectors():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, generator=gen)
    labels = torch.randint(0, 4, (40,), generator=gen)
    return x, labels


def two_heads_model(path, second_scale: float) -> str:
    """``x -> (x, x * second_scale)`` over N x 4."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b")]
    w = numpy_helper.from_array(np.asarray(second_scale, np.float32), "w")
    return write_onnx(path, [helper.make_node("Identity", ["x"], ["a"]),
                             helper.make_node("Mul", ["x", "w"], ["b"])], [x], ys, [w])


def test_compare_files_reports_the_worst_output(tmp_path, vectors):
    """Accuracy comes from the first output; agreement and cosine from the worst one
    (here the second head, negated: no argmax agrees, cosine -1)."""
    x, labels = vectors
    ref = two_heads_model(tmp_path / "ref.onnx", 1.0)
    flipped = two_heads_model(tmp_path / "flipped.onnx", -1.0)
    data = DataSource("vectors", [(x[:20], labels[:20]), (x[20:], labels[20:])], labeled=True)
    fp32, int8 = compare_files(ref, flipped, data, "onnxruntime", threads=1,
                               latency_runs=2)["models"]
    assert fp32["accuracy"] == int8["accuracy"]  # the first heads are identical
    assert int8["outputs"] == 2 and int8["top1_agreement"] == 0.0
    assert int8["cosine"] == pytest.approx(-1.0)
    same = compare_files(ref, ref, data, "onnxruntime", threads=1, latency_runs=2)
    assert same["models"][1]["top1_agreement"] == 100.0


def test_compare_onnx_measures_what_numpy_says(tmp_path, vectors):
    x, labels = vectors
    scale = np.array([1.0, 0.5, 1.0, -1.0], np.float32)
    ref = scores_model(tmp_path / "float.onnx")
    quant = scores_model(tmp_path / "quant.onnx", scale)
    data = DataSource("vectors", [(x[:16], labels[:16]), (x[16:], labels[16:])], labeled=True)
    lines: list[str] = []
    result = compare_onnx(ref, quant, data, threads=1, latency_runs=2, progress=lines.append)
    a = x.numpy()
    b = a * scale
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    fp32, int8 = result["models"]
    assert result["samples"] == 40 and result["labeled"] and result["data"] == "vectors"
    assert fp32["accuracy"] == pytest.approx(100 * np.mean(a.argmax(1) == labels.numpy()))
    assert int8["accuracy"] == pytest.approx(100 * np.mean(b.argmax(1) == labels.numpy()))
    assert int8["top1_agreement"] == pytest.approx(100 * np.mean(a.argmax(1) == b.argmax(1)))
    assert int8["top1_agreement"] < 100.0
    assert int8["cosine"] == pytest.approx(float(cos.mean()), rel=1e-5)
    assert fp32["path"] == ref and int8["path"] == quant
    assert int8["size_bytes"] == os.path.getsize(quant) and fp32["batch"] == 16
    assert "running FP32 (float.onnx) in ONNX Runtime on 40 samples" in lines
    assert "timing INT8" in lines

    unlabelled = DataSource("vectors", [x[:16], x[16:]], labeled=False)
    result = compare_onnx(ref, ref, unlabelled, threads=1, latency_runs=2)
    assert all("accuracy" not in row for row in result["models"])
    assert result["models"][1]["top1_agreement"] == 100.0
    assert result["models"][1]["cosine"] == pytest.approx(1.0)


def test_compare_onnx_problems(tmp_path, vectors):
    x, labels = vectors
    ref = scores_model(tmp_path / "float.onnx")
    summed = scores_model(tmp_path / "sum.onnx", width=1)
    labelled = DataSource("d", [(x, labels)], labeled=True)
    unlabelled = DataSource("d", [x], labeled=False)
    kwargs = {"threads": 1, "latency_runs": 2}
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        compare_onnx(ref, tmp_path / "missing.onnx", labelled, **kwargs)
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(SourceError, match="is not a loadable ONNX model"):
        compare_onnx(tmp_path / "text.onnx", ref, labelled, **kwargs)
    too_big = DataSource("d", [(x, labels + 4)], labeled=True)
    with pytest.raises(SourceError, match="has label 7, but the model gives 4 class scores"):
        compare_onnx(ref, ref, too_big, **kwargs)
    with pytest.raises(SourceError, match="accuracy needs class scores"):
        compare_onnx(summed, summed, labelled, **kwargs)
    with pytest.raises(SourceError, match="outputs of different shapes"):
        compare_onnx(ref, summed, unlabelled, **kwargs)
    wrong_width = DataSource("d", [torch.zeros(2, 3)], labeled=False)
    with pytest.raises(SourceError, match="ONNX Runtime cannot run the model on this data"):
        compare_onnx(ref, ref, wrong_width, **kwargs)


def test_compare_onnx_feeds_dict_inputs_by_name_or_by_position(tmp_path):
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 3]),
              helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["N", 3])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["ids_f", "weights"], ["y"])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    path = write_onnx(tmp_path / "two.onnx", nodes, inputs, [y])
    ids = torch.tensor([[1, 2, 3], [3, 2, 1]])
    weights = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0]])
    for batch in ({"input_ids": ids, "weights": weights},  # names match
                  {"ids": ids.double(), "w": weights.double()}):  # matched by position
        result = compare_onnx(path, path, DataSource("d", [batch], labeled=False), threads=1,
                              latency_runs=2)
        assert result["models"][1]["top1_agreement"] == 100.0
    with pytest.raises(SourceError, match=r"takes inputs \['input_ids', 'weights'\]"):
        compare_onnx(path, path, DataSource("d", [{"ids": ids}], labeled=False), threads=1,
                     latency_runs=2)
    with pytest.raises(SourceError, match="takes 2 inputs"):
        compare_onnx(path, path, DataSource("d", [weights], labeled=False), threads=1,
                     latency_runs=2)


def test_comparison_table(quantized_run):
    evaluation = quantized_run[0]["evaluation"]
    header, fp32, int8 = comparison_table(evaluation)
    assert header == ["model", "accuracy %", "agreement %", "cosine", "size MiB", "ms @1",
                      "ms @16", "speed-up @1"]
    assert fp32[0] == "FP32" and fp32[1] == "100.00" and fp32[2:4] == ["-", "-"]
    assert fp32[-1] == "1.00x"
    row = evaluation["models"][1]
    assert int8[2] == f"{row['top1_agreement']:.2f}" and int8[3] == f"{row['cosine']:.5f}"
    assert int8[-1] == f"{row['speedup_batch1']:.2f}x"
    unlabelled = {"models": [{k: v for k, v in r.items() if k != "accuracy"}
                             for r in evaluation["models"]]}
    assert [r[1] for r in comparison_table(unlabelled)[1:]] == ["-", "-"]


def test_labels_file_with_another_class_count_is_refused(tmp_path):
    from PIL import Image
    from skimage import data as skdata

    from quantaware.sources import LoadedModel, SourceError, load_data
    from quantaware.workflow import compare_onnx, export_model, quantize_model

    for name in ("cat", "coffee"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.fromarray(getattr(skdata, name)()).resize((32, 32)).save(
            tmp_path / "photos" / name / "a.png")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3)).eval()
    model = LoadedModel("net", module=net)
    names = ["cat", "coffee", "dog", "extra"]  # 4 names, the model has 3 outputs
    data = load_data(str(tmp_path / "photos"), model, size=16, class_names=names)
    q, _ = quantize_model(model, data)
    f = export_model(net, tmp_path / "f.onnx", data.example)
    i = export_model(q, tmp_path / "q.onnx", data.example)
    with pytest.raises(SourceError, match=r"labels file has 4 class names but f\.onnx has 3"):
        compare_onnx(f, i, data, latency_runs=1)


class _Overflowing(nn.Module):
    """Finite in torch's first call, Inf for large inputs: outputs overflow float32."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 1e38


def overflowing() -> nn.Module:
    torch.manual_seed(0)
    return _Overflowing().eval()


def linear_batches() -> list[torch.Tensor]:
    return [torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 100]


def test_a_run_failing_after_export_leaves_no_files_and_a_bad_preset_keeps_the_last_run(
        quantized_run, tmp_path):
    """Non-finite outputs were compared (accuracy from NaN, a bare NaN in
    results.json); the failure left the exported files without their results. A
    preset typo deleted the previous run's results.json before being refused."""
    model = load_model(f"{__name__}:overflowing")
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="NaN/Inf in output 0"):
        run_quantize(model, load_data(f"{__name__}:linear_batches", model), out, threads=1,
                     latency_runs=2, verify=False)
    assert not out.exists() or not list(out.iterdir())
    _, previous, _ = quantized_run
    before = sorted(p.name for p in previous.iterdir())
    cnn = load_model(MODEL)
    with pytest.raises(ValueError, match="unknown preset 'INT9'"):
        run_quantize(cnn, load_data(DATA, cnn), previous, preset="INT9", threads=1)
    assert sorted(p.name for p in previous.iterdir()) == before


def test_skip_keeps_the_named_layers_float_and_the_names_are_checked(tmp_path):
    from quantaware.nn import QuantConv2d, QuantLinear
    from quantaware.workflow import check_skip_patterns, skip_rules

    model = load_model(MODEL)
    calib = load_data(DATA, model)
    quantized, config = quantize_model(model, calib, skip=["7", "3"])
    layers = dict(quantized.named_modules())
    assert type(layers["7"]) is nn.Linear and type(layers["3"]) is nn.Conv2d
    assert isinstance(layers["0"], QuantConv2d)
    assert {r.pattern for r in config.overrides if r.skip} >= {"7", "7.*", "3", "3.*"}
    # a container's name covers what is inside it
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    cfg = choose_config(nested, "INT8", skip=["0"])
    assert cfg.resolve("0.0") is None and cfg.resolve("1") is not None
    from quantaware.prepare import prepare

    prepared = prepare(nested, cfg, (torch.randn(1, 4),))
    assert not isinstance(dict(prepared.named_modules())["0.0"], QuantLinear)
    # functional ops are named as in the traced graph
    check_skip_patterns(load_model("quantaware.models:DigitsCNN").module, ["add", "cat*"])
    with pytest.raises(SourceError, match=r"--skip 'clasifier' matches no layer of "
                       r"Sequential; its layers are named like 0, 1, 2"):
        choose_config(model.module, "INT8", skip=["7", "clasifier"])
    with pytest.raises(SourceError, match="non-empty name"):
        skip_rules([" "])
    # run_quantize refuses a bad name before it touches the output folder
    with pytest.raises(SourceError, match="'fc9' matches no layer"):
        run_quantize(model, calib, tmp_path / "out", skip=["fc9"])
    assert not (tmp_path / "out").exists()


def seg_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)).eval()


def unlabelled_images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(8, 3, 12, 12, generator=gen) for _ in range(2)]


def test_dense_maps_agree_per_position_and_single_logits_have_no_top1(tmp_path):
    """Outputs were flattened to (N, C*H*W) before the argmax: a segmentation map's
    agreement was taken over every pixel and class at once, and a single logit
    "agreed" 100% with its negation."""
    from quantaware.export import export_onnx

    model = load_model(f"{__name__}:seg_model")
    data = load_data(f"{__name__}:unlabelled_images", model)
    x = data.example
    other = seg_model()
    with torch.no_grad():
        other[0].weight.add_(0.05 * torch.randn_like(other[0].weight))
    a = export_onnx(model.module, tmp_path / "a.onnx", x)
    b = export_onnx(other, tmp_path / "b.onnx", x)
    result = compare_onnx(a, b, data, threads=1, latency_runs=2)
    with torch.no_grad():
        ref = torch.cat([model.module(t) for t in data.inputs]).argmax(1)
        out = torch.cat([other(t) for t in data.inputs]).argmax(1)
    expected = 100.0 * float((ref == out).float().mean())
    assert 50.0 < expected < 100.0
    assert result["models"][1]["top1_agreement"] == pytest.approx(expected, abs=0.5)
    one = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 1)).eval()
    neg = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 1)).eval()
    with torch.no_grad():
        neg[1].weight.copy_(-one[1].weight)
        neg[1].bias.copy_(-one[1].bias)
    c = export_onnx(one, tmp_path / "c.onnx", x)
    d = export_onnx(neg, tmp_path / "d.onnx", x)
    result = compare_onnx(c, d, data, threads=1, latency_runs=2)
    assert "top1_agreement" not in result["models"][1]
    assert result["models"][1]["cosine"] == pytest.approx(-1.0)


class FeatsAndIds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(4, 16)
        self.ln, self.out = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.emb(ids).mean(1) + self.fc(feats)))


def test_dict_batches_in_another_key_order_than_forward(tmp_path):
    """Dict inputs were passed in the dict's order: {"feats", "ids"} put the float
    features where forward() takes the token ids ("Expected tensor ... Long")."""
    from quantaware.deploy import quantize_for_backend
    from quantaware.workflow import export_model

    torch.manual_seed(0)
    batches = [{"feats": torch.randn(8, 4), "ids": torch.randint(0, 50, (8, 5))}
               for _ in range(2)]
    example = {k: v[:1] for k, v in batches[0].items()}
    model = FeatsAndIds().eval()
    quantized = quantize_for_backend(model, batches, example)
    path = export_model(quantized, tmp_path / "m.onnx", example)
    from quantaware import verify

    assert verify(path, quantized, batches, threads=1).passed()
