"""A self-contained HTML report (plots embedded as base64 PNG) and a Markdown summary.

The report takes a results payload, a dict with:

- ``rows``: variants, each with ``variant``, ``agreement`` and/or ``accuracy`` and
  ``size_bytes`` (optional ``group``, ``agreement_confident``, ``cosine``); the
  table shows the columns the rows fill (:func:`rows_from_results` makes the rows of
  a ``quantize`` or ``evaluate`` results file);
- ``sensitivity`` (optional): per-layer rows as from
  :func:`quantaware.analysis.sensitivity` (``LayerSensitivity.to_dict()``);
- ``histograms`` (optional): from :func:`histograms_from_model`.

Plots: accuracy vs size of every variant, per-layer sensitivity, activation
histograms with the chosen ranges. matplotlib is imported only here (install
the ``report`` extra).

Example:
    >>> import tempfile, os
    >>> rows = [{"variant": "FP32", "agreement": 100.0, "size_bytes": 4e6},
    ...         {"variant": "INT8", "agreement": 97.0, "size_bytes": 1e6}]
    >>> path = write_report(os.path.join(tempfile.mkdtemp(), "r.html"), {"rows": rows})
    >>> path.read_text().startswith("<!DOCTYPE html>")
    True
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantaware._files import write_text

__all__ = ["histograms_from_model", "markdown_summary", "write_report"]


def histograms_from_model(model: nn.Module, limit: int | None = None) -> list[dict[str, Any]]:
    """Histograms of a calibrated model's histogram observers, with the chosen ranges.

    Example:
        >>> import torch
        >>> from quantaware import presets, quantize
        >>> import dataclasses
        >>> act = dataclasses.replace(presets.INT8.activation, observer="mse")
        >>> cfg = dataclasses.replace(presets.INT8, activation=act)
        >>> data = [torch.randn(16, 4)]
        >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), cfg, data, data[0][:1])
        >>> histograms_from_model(q)[0]["name"]
        '0.input_quantizer'
    """
    from quantaware.observers import HistogramObserver
    from quantaware.prepare import quantizers

    out = []
    for name, q in quantizers(model):
        obs = q.observer
        if not isinstance(obs, HistogramObserver) or not obs.observed or not bool(q.calibrated):
            continue
        scale_t, zp_t = q.deployed_qparams()
        scale, zp = float(scale_t), int(zp_t)
        out.append({
            "name": name,
            "edges": obs.bin_edges().tolist(),
            "counts": obs.histogram.tolist(),
            "range": [(q.qmin - zp) * scale, (q.qmax - zp) * scale],
            "observer": q.spec.observer,
        })
        if limit is not None and len(out) >= limit:
            break
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# (key, header, format) of the table's columns; a column shows when a row has its key
_COLUMNS = (
    ("group", "group", str),
    ("variant", "variant", str),
    ("accuracy", "accuracy", lambda v: f"{v:.1f}%"),
    ("agreement", "top-1 agreement", lambda v: f"{v:.1f}%"),
    ("agreement_confident", "confident", lambda v: f"{v:.1f}%"),
    ("cosine", "cosine", lambda v: f"{v:.4f}"),
    ("size_bytes", "size MiB", lambda v: f"{v / 2**20:.2f}"),
)


def _table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The headers and cells of the variants table: the columns some row fills."""
    columns = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[("-" if r.get(key) is None else fmt(r[key])) for key, _, fmt in columns]
             for r in rows]
    return [header for _, header, _ in columns], cells


def _is_bench(rows: list[Any]) -> bool:
    """Rows of ``quantaware bench --json``: fidelity as a fraction, one row per model,
    batch, backend and variant."""
    return bool(rows) and all(isinstance(r, dict) and {"fidelity", "latency_ms", "batch",
                                                       "variant"} <= r.keys() for r in rows)


def _bench_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bench rows as report rows: named by model, batch (and backend where there are
    several), image fidelity as top-1 agreement in percent, text fidelity as cosine."""
    several = len({r.get("backend") for r in rows}) > 1
    out = []
    for r in rows:
        where = f" ({r.get('backend')})" if several else ""
        row: dict[str, Any] = {"variant": f"{r.get('model')} @{r['batch']} {r['variant']}{where}",
                               "size_bytes": r.get("size_bytes")}
        fidelity = r["fidelity"]
        if "neighbour_agreement" in r:  # text: fidelity is the mean embedding cosine
            row["cosine"] = fidelity
        elif isinstance(fidelity, int | float):
            row["agreement"] = 100.0 * fidelity
            confident = r.get("agreement_confident")
            if isinstance(confident, int | float) and math.isfinite(confident):
                row["agreement_confident"] = 100.0 * confident
        out.append(row)
    return out


def rows_from_results(payload: Any) -> dict[str, Any]:
    """A report payload from any results JSON quantaware writes: a payload with
    ``rows`` (``benchmarks/ptq.py --json``), a bare list of rows, the ``results.json``
    of ``quantize``/``run`` or the JSON of ``evaluate`` (float vs quantized models).

    Example:
        >>> rows_from_results({"models": [{"model": "FP32", "size_bytes": 4e6,
        ...                                "accuracy": 91.0}]})["rows"]
        [{'variant': 'FP32', 'size_bytes': 4000000.0, 'accuracy': 91.0}]
    """
    if isinstance(payload, list):
        return {"rows": _bench_rows(payload) if _is_bench(payload) else payload}
    if not isinstance(payload, dict) or "rows" in payload:
        return payload
    comparison = payload.get("evaluation", payload)
    if not isinstance(comparison, dict):
        return payload  # refused by write_report, naming what it needs
    if isinstance(comparison.get("models"), list):
        models = comparison["models"]
    else:  # a pipeline's: one float-vs-quantized comparison per model and target
        models, seen = [], set()
        for key, one in comparison.items():
            for m in (one.get("models") if isinstance(one, dict) else None) or []:
                if not isinstance(m, dict):
                    return payload
                label = m.get("model")
                if label == "FP32" and "_" in key:  # another target's float file
                    label = f"FP32 ({key.split('_', 1)[1]})"
                elif label != "FP32" and "_" in key:
                    label = f"{label} ({key.split('_', 1)[1]})"
                if label not in seen:
                    seen.add(label)
                    models.append({**m, "model": label})
        if not models:
            return payload
    rows = []
    for m in models:
        if not isinstance(m, dict):
            return payload
        row = {"variant": m.get("model"), "size_bytes": m.get("size_bytes")}
        for key, source in (("accuracy", "accuracy"), ("agreement", "top1_agreement"),
                            ("cosine", "cosine")):
            if m.get(source) is not None:
                row[key] = m[source]
        rows.append(row)
    out = {"rows": rows}
    if "title" in payload:
        out["title"] = payload["title"]
    elif "model" in payload:
        out["title"] = f"quantaware: {payload['model']}"
    return out


def _plots(payload: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "the report's plots need matplotlib: pip install 'quantaware[report]'"
        ) from exc
    plots = []
    rows = [r for r in payload.get("rows", []) if r.get("size_bytes") is not None]
    # one measure on the y axis: accuracy when every variant has it (labelled data)
    key = "accuracy" if rows and all(r.get("accuracy") is not None for r in rows) else None
    rows = [r for r in rows if key or r.get("agreement") is not None
            or r.get("accuracy") is not None]
    if rows:

        def _score(row: dict[str, Any]) -> float:
            if key:
                return float(row[key])
            agreement = row.get("agreement")
            return float(agreement if agreement is not None else row["accuracy"])

        fig, ax = plt.subplots(figsize=(8, 5))
        groups = sorted({r.get("group", "") for r in rows})
        for group in groups:
            pts = [r for r in rows if r.get("group", "") == group]
            ax.scatter([r["size_bytes"] / 2**20 for r in pts], [_score(r) for r in pts],
                       label=group or "variants", s=40)
            for r in pts:
                ax.annotate(r["variant"], (r["size_bytes"] / 2**20, _score(r)), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel("accuracy (%)" if key else "top-1 agreement / accuracy (%)")
        ax.set_title("Accuracy vs size of every variant")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        plots.append(("Accuracy vs size", _png(fig)))
    sens = payload.get("sensitivity") or []
    if sens:
        fig, ax = plt.subplots(figsize=(max(8, len(sens) * 0.18), 4.5))
        x = range(len(sens))
        ax.bar([i - 0.2 for i in x], [s["only_quantized_sqnr"] for s in sens], width=0.4,
               label="SQNR, only this layer quantized")
        ax.bar([i + 0.2 for i in x], [s["only_float_sqnr"] for s in sens], width=0.4,
               label="SQNR, only this layer float")
        ax.set_xticks(list(x), [s["name"] for s in sens], rotation=90, fontsize=5)
        ax.set_ylabel("output SQNR (dB)")
        ax.set_title("Per-layer sensitivity")
        ax.legend(fontsize=7)
        plots.append(("Per-layer sensitivity", _png(fig)))
    hists = payload.get("histograms") or []
    if hists:
        cols = 3
        rows_n = (len(hists) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(12, 2.6 * rows_n), squeeze=False)
        for ax, h in zip(axes.flat, hists, strict=False):
            edges = torch.tensor(h["edges"])
            counts = torch.tensor(h["counts"]).clamp(min=0)
            ax.stairs(counts.numpy(), edges.numpy(), fill=True, alpha=0.6)
            ax.set_yscale("log")
            for v in h["range"]:
                ax.axvline(v, color="red", lw=1)
            ax.set_title(f"{h['name']} ({h.get('observer', '')})", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(hists):]:
            ax.axis("off")
        fig.suptitle("Activation histograms (log counts) with the chosen ranges (red)")
        fig.tight_layout()
        plots.append(("Activation histograms", _png(fig)))
    return plots


def markdown_summary(payload: dict[str, Any]) -> str:
    """A Markdown table of the variants (and the most sensitive layers)."""
    headers, cells = _table(payload.get("rows", []))
    lines = [f"# {payload.get('title', 'quantaware report')}", "",
             "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if h in ("group", "variant") else "---:" for h in headers)
             + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    sens = sorted(payload.get("sensitivity") or [], key=lambda s: s["only_quantized_sqnr"])
    if sens:
        lines += ["", "## Most sensitive layers (lowest SQNR when only they are quantized)", "",
                  "| layer | params | SQNR alone dB | drop alone | drop when only it is float |",
                  "|---|---:|---:|---:|---:|"]
        for s in sens[:10]:
            lines.append(f"| {s['name']} | {s['params']} | {s['only_quantized_sqnr']:.1f} | "
                         f"{s['only_quantized_drop']:.1f} | {s['only_float_drop']:.1f} |")
    return "\n".join(lines) + "\n"


def write_report(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``path`` (HTML, images embedded) and ``path`` with ``.md`` (summary).

    Returns the HTML path.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise ValueError("the report needs a dict with a 'rows' list of variants "
                         "(as written by benchmarks/ptq.py --json)")
    if not payload["rows"]:
        raise ValueError("the report's 'rows' list is empty: give at least one variant")
    for key, needed in (("sensitivity", ("name", "params", "only_quantized_drop",
                                         "only_quantized_sqnr", "only_float_drop")),
                        ("histograms", ("name", "edges", "counts", "range"))):
        entries = payload.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(k in e for k in needed) for e in entries):
            raise ValueError(f"the report's {key!r} must be a list of entries with "
                             f"{', '.join(needed)} (as quantaware writes them)")
    for index, row in enumerate(payload["rows"]):
        if not isinstance(row, dict) or "variant" not in row:
            raise ValueError(f"row {index} of the report has no 'variant' (each row names "
                             "its variant, as benchmarks/ptq.py --json writes them)")
        for key in ("agreement", "accuracy", "agreement_confident", "cosine", "size_bytes"):
            value = row.get(key)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)):
                raise ValueError(f"row {index} of the report: {key} must be a number, "
                                 f"got {value!r}")
    path = Path(path)
    title = html.escape(payload.get("title", "quantaware report"))
    summary = markdown_summary(payload)
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{title}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
             "td.n{text-align:right}img{max-width:100%}</style></head><body>",
             f"<h1>{title}</h1>"]
    headers, cells = _table(payload["rows"])
    parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                 + "</tr>")
    for row in cells:
        parts.append("<tr>" + "".join(
            f"<td{'' if h in ('group', 'variant') else ' class=n'}>{html.escape(c)}</td>"
            for h, c in zip(headers, row, strict=True)) + "</tr>")
    parts.append("</table>")
    for caption, data in _plots(payload):
        parts.append(f"<h2>{html.escape(caption)}</h2>"
                     f"<img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">")
    parts.append("</body></html>")
    write_text(path, "\n".join(parts) + "\n")
    write_text(path.with_suffix(".md"), summary)
    return path
