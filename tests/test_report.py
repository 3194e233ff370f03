from __future__ import annotations

import base64
import dataclasses
import json
import re
from html.parser import HTMLParser

import pytest
import torch

from quantaware import presets, quantize
from quantaware.cli import main
from quantaware.report import histograms_from_model, write_report


class _Checker(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()


def _payload() -> dict:
    act = dataclasses.replace(presets.INT8.activation, observer="entropy")
    cfg = dataclasses.replace(presets.INT8, activation=act)
    data = [torch.rand(32, 6)]
    q = quantize(torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU()), cfg, data,
                 data[0][:1])
    return {
        "title": "test <report>",
        "rows": [{"group": "a", "variant": "FP32", "agreement": 100.0, "size_bytes": 4000},
                 {"group": "b", "variant": "INT8", "agreement": 97.5,
                  "agreement_confident": 99.0, "size_bytes": 1000}],
        "sensitivity": [{"name": "0", "params": 24, "only_quantized_drop": 1.0,
                         "only_quantized_sqnr": 30.0, "only_float_drop": 0.5,
                         "only_float_sqnr": 25.0}],
        "histograms": histograms_from_model(q),
    }


def test_report_is_valid_html_with_decodable_pngs(tmp_path):
    path = write_report(tmp_path / "r.html", _payload())
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    assert checker.stack == []
    assert len(checker.images) == 3  # accuracy vs size, sensitivity, histograms
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 1000
    assert "test &lt;report&gt;" in text
    summary = path.with_suffix(".md").read_text()
    assert re.search(r"\| b \| INT8 \| 97.5% \| 99.0% \|", summary)


def test_report_cli(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(_payload()))
    assert main(["report", str(src), "--out", str(tmp_path / "out.html")]) == 0
    assert (tmp_path / "out.html").is_file() and (tmp_path / "out.md").is_file()
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "binary.json").write_bytes(bytes(range(256)))
    assert main(["report", str(tmp_path / "binary.json")]) == 2


@pytest.mark.parametrize(("rows", "message"), [
    ([{"name": "a"}], "row 0 of the report has no 'variant'"),
    ([{"variant": "int8"}, "int8"], "row 1 of the report has no 'variant'"),
    ([{"variant": "int8", "agreement": "high"}], "row 0 of the report: agreement must be a "
                                                 "number, got 'high'"),
])
def test_malformed_rows_are_named_and_nothing_is_written(tmp_path, rows, message):
    """A row without 'variant' ended in a raw KeyError traceback."""
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path / "r.html", {"rows": rows})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("payload", "message"), [
    ({"rows": []}, "'rows' list is empty"),
    ({"rows": [{"variant": "a"}], "sensitivity": "x"}, "'sensitivity' must be a list"),
    ({"rows": [{"variant": "a"}], "histograms": [{"name": "h"}]}, "'histograms' must be a list"),
])
def test_malformed_sections_are_named_and_nothing_is_written(tmp_path, payload, message):
    """An empty list wrote an empty report; a string as sensitivity raised
    "string indices must be integers"."""
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path / "r.html", payload)
    assert not list(tmp_path.iterdir())


def test_a_quantize_results_file_reports_accuracy_agreement_and_cosine(tmp_path):
    """The table's columns are the measures the rows hold: quantize on labelled data
    put accuracy under an "agreement" header and left the agreement out; `report`
    refused the results.json of quantize and evaluate."""
    results = {"model": "tiny", "evaluation": {"models": [
        {"model": "FP32", "size_bytes": 4 * 2**20, "accuracy": 92.4},
        {"model": "INT8", "size_bytes": 2**20, "accuracy": 88.9, "top1_agreement": 93.5,
         "cosine": 0.98765}]}}
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    assert main(["report", str(src), "--out", str(tmp_path / "r.html")]) == 0
    summary = (tmp_path / "r.md").read_text().splitlines()
    assert summary[0] == "# quantaware: tiny"
    assert summary[2] == "| variant | accuracy | top-1 agreement | cosine | size MiB |"
    assert summary[4:6] == ["| FP32 | 92.4% | - | - | 4.00 |",
                            "| INT8 | 88.9% | 93.5% | 0.9877 | 1.00 |"]
    text = (tmp_path / "r.html").read_text()
    assert "<th>top-1 agreement</th>" in text and "<td class=n>93.5%</td>" in text


def test_a_pipeline_results_file_reports_each_quantized_model_once_per_target(tmp_path):
    """A run's evaluation holds one comparison per model and target; `report` refused it."""
    from quantaware.report import rows_from_results

    fp32 = {"model": "FP32", "size_bytes": 4 * 2**20, "accuracy": 92.0}
    run = {"name": "digits", "evaluation": {
        "ptq": {"models": [fp32, {"model": "PTQ INT8", "size_bytes": 2**20, "accuracy": 91.0,
                                  "top1_agreement": 97.0}]},
        "qat": {"models": [fp32, {"model": "QAT INT8", "size_bytes": 2**20, "accuracy": 92.0,
                                  "top1_agreement": 99.0}]},
        "ptq_tflite": {"models": [fp32, {"model": "PTQ INT8", "size_bytes": 2**20,
                                         "accuracy": 91.0, "top1_agreement": 97.5}]}}}
    rows = rows_from_results(run)["rows"]
    assert [r["variant"] for r in rows] == ["FP32", "PTQ INT8", "QAT INT8", "FP32 (tflite)",
                                            "PTQ INT8 (tflite)"]
    write_report(tmp_path / "r.html", {"rows": [
        {"variant": "a", "size_bytes": 1, "agreement": None, "accuracy": 90.0},
        {"variant": "b", "size_bytes": 2, "agreement": 95.0}]})  # a null agreement plotted


def test_bench_json_is_reported_by_model_batch_and_backend_in_percent(tmp_path):
    """Bench rows came out with fidelity missing, confident agreement 1.0 shown as
    "1.0%", and twelve rows all named "fp32" / "quantaware-int8"."""
    base = {"model": "tiny.py:build", "latency_ms": 1.0, "ratio_vs_fp32": 1.0,
            "size_bytes": 2**20}
    rows = [{**base, "batch": b, "backend": k, "variant": v, "fidelity": f,
             "agreement_confident": c}
            for b in (1, 8) for k in ("onnxruntime", "litert")
            for v, f, c in (("fp32", 1.0, 1.0), ("quantaware-int8", 0.9375, float("nan")))]
    rows.append({**base, "model": "minilm", "batch": 1, "backend": "onnxruntime",
                 "variant": "quantaware-int8", "fidelity": 0.997, "neighbour_agreement": 0.9})
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(rows))
    assert main(["report", str(src), "--out", str(tmp_path / "r.html")]) == 0
    summary = (tmp_path / "r.md").read_text()
    assert "| tiny.py:build @8 quantaware-int8 (litert) | 93.8% | - | - | 1.00 |" in summary
    assert "| tiny.py:build @1 fp32 (onnxruntime) | 100.0% | 100.0% | - | 1.00 |" in summary
    assert "| minilm @1 quantaware-int8 (onnxruntime) | - | - | 0.9970 | 1.00 |" in summary
