"""A self-contained HTML report (plots embedded as base64 PNG) and a Markdown summary.

The report takes a results payload, a dict with:

- ``rows``: variants, each with ``variant``, ``agreement`` (or ``accuracy``) and
  ``size_bytes`` (optional ``group``, ``agreement_confident``);
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


def _score(row: dict[str, Any]) -> float:
    return float(row.get("agreement", row.get("accuracy", 0.0)))


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
    rows = [r for r in payload.get("rows", []) if "size_bytes" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 5))
        groups = sorted({r.get("group", "") for r in rows})
        for group in groups:
            pts = [r for r in rows if r.get("group", "") == group]
            ax.scatter([r["size_bytes"] / 2**20 for r in pts], [_score(r) for r in pts],
                       label=group or "variants", s=40)
            for r in pts:
                ax.annotate(r["variant"], (r["size_bytes"] / 2**20, _score(r)), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("weights (MiB)")
        ax.set_ylabel("top-1 agreement / accuracy (%)")
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
    lines = [f"# {payload.get('title', 'quantaware report')}", "",
             "| group | variant | agreement | confident | weights MiB |",
             "|---|---|---:|---:|---:|"]
    for r in payload.get("rows", []):
        conf = r.get("agreement_confident")
        lines.append(f"| {r.get('group', '')} | {r['variant']} | {_score(r):.1f}% | "
                     f"{'-' if conf is None else f'{conf:.1f}%'} | "
                     f"{r.get('size_bytes', 0) / 2**20:.2f} |")
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
    for index, row in enumerate(payload["rows"]):
        if not isinstance(row, dict) or "variant" not in row:
            raise ValueError(f"row {index} of the report has no 'variant' (each row names "
                             "its variant, as benchmarks/ptq.py --json writes them)")
        for key in ("agreement", "accuracy", "agreement_confident", "size_bytes"):
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
             f"<h1>{title}</h1>", "<table><tr><th>group</th><th>variant</th><th>agreement</th>"
             "<th>confident</th><th>weights MiB</th></tr>"]
    for r in payload["rows"]:
        conf = r.get("agreement_confident")
        parts.append(
            f"<tr><td>{html.escape(str(r.get('group', '')))}</td>"
            f"<td>{html.escape(str(r['variant']))}</td><td class=n>{_score(r):.1f}%</td>"
            f"<td class=n>{'-' if conf is None else f'{conf:.1f}%'}</td>"
            f"<td class=n>{r.get('size_bytes', 0) / 2**20:.2f}</td></tr>")
    parts.append("</table>")
    for caption, data in _plots(payload):
        parts.append(f"<h2>{html.escape(caption)}</h2>"
                     f"<img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">")
    parts.append("</body></html>")
    write_text(path, "\n".join(parts) + "\n")
    write_text(path.with_suffix(".md"), summary)
    return path
