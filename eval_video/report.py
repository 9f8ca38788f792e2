"""Reports of an evaluation: JSON (the record), markdown or HTML (for reading) and their figures.

The JSON holds, per method (one folder of videos each), every metric's value, N, backbone,
whether it is a proxy, its notes, per-video values and, for skipped metrics, the reason. The
readable report adds a table across methods, bar charts per metric, per-video distributions and
FP | quantized | difference strips.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eval_video._files import atomic_path, write_text_atomic
from eval_video.results import MetricResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_VERSION = 1


@dataclass
class EvalReport:
    """Everything an evaluation produced: inputs, settings and results per method."""

    inputs: dict[str, object]
    settings: dict[str, object]
    methods: dict[str, list[MetricResult]]
    strips: dict[str, list[Path]] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON report (schema version :data:`REPORT_VERSION`)."""
        return {
            "report_version": REPORT_VERSION,
            "tool": "tfmq-video eval",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": self.inputs,
            "settings": self.settings,
            "methods": {label: [r.to_json() for r in results] for label, results in self.methods.items()},
            "strips": {label: [str(p) for p in paths] for label, paths in self.strips.items()},
        }

    def metric_names(self) -> list[str]:
        """Every metric that appears for any method, in first-seen order."""
        names: list[str] = []
        for results in self.methods.values():
            names += [r.metric for r in results if r.metric not in names]
        return names

    def lookup(self, method: str, metric: str) -> MetricResult | None:
        """The result of ``metric`` for ``method``, if any."""
        return next((r for r in self.methods[method] if r.metric == metric), None)


def write_json(path: str | Path, report: EvalReport) -> Path:
    """Write the JSON report atomically."""
    return write_text_atomic(path, json.dumps(report.to_json(), indent=2) + "\n")


def format_value(result: MetricResult | None) -> str:
    """A table cell: the value with 4 significant digits, ``skipped`` or ``-``."""
    if result is None:
        return "-"
    if result.value is None:
        return "skipped"
    if not math.isfinite(result.value):
        return str(result.value)
    return f"{result.value:.4g}" + (" (proxy)" if result.proxy else "")


# ---------------------------------------------------------------- figures


def _grid(count: int) -> tuple[Figure, np.ndarray]:
    """A figure with ``count`` panels, three per row (no pyplot: no global backend state)."""
    from matplotlib.figure import Figure

    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, axes


def _finite(result: MetricResult | None) -> bool:
    return result is not None and result.value is not None and math.isfinite(result.value)


def plot_metric_bars(path: Path, report: EvalReport) -> Path | None:
    """One bar chart per metric with a value, methods side by side; None when nothing to plot."""
    metrics = [m for m in report.metric_names() if any(_finite(report.lookup(k, m)) for k in report.methods)]
    if not metrics:
        return None
    fig, axes = _grid(len(metrics))
    labels = list(report.methods)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        results = [report.lookup(label, metric) for label in labels]
        values = [r.value if _finite(r) else np.nan for r in results]  # type: ignore[union-attr]
        ax.bar(range(len(labels)), values, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        proxy = any(r is not None and r.proxy for r in results)
        higher = next((r.higher_is_better for r in results if r is not None), True)
        ax.set_title(f"{metric}{' (proxy)' if proxy else ''} {'↑' if higher else '↓'}", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_distributions(path: Path, report: EvalReport) -> Path | None:
    """Box plots of per-video values per metric and method; None when no metric has them."""
    metrics = [m for m in report.metric_names()
               if any((r := report.lookup(k, m)) is not None and r.per_video for k in report.methods)]
    if not metrics:
        return None
    fig, axes = _grid(len(metrics))
    for ax, metric in zip(axes.flat, metrics, strict=False):
        data, labels = [], []
        for label in report.methods:
            result = report.lookup(label, metric)
            if result is not None and result.per_video:
                values = np.array(list(result.per_video.values()), dtype=np.float64)
                data.append(values[np.isfinite(values)])
                labels.append(label)
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=8)
        ax.set_title(f"{metric} per video", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


# ---------------------------------------------------------------- readable reports


def _rows(report: EvalReport) -> list[list[str]]:
    """Metric x method table: header row then one row per metric."""
    labels = list(report.methods)
    rows = [["metric", "better", *labels, "N", "backbone"]]
    for metric in report.metric_names():
        results = [report.lookup(label, metric) for label in labels]
        first = next(r for r in results if r is not None)
        n = ", ".join(sorted({str(r.n) for r in results if r is not None and r.value is not None})) or "-"
        better = "↑" if first.higher_is_better else "↓"
        rows.append([metric, better, *[format_value(r) for r in results], n, first.backbone])
    return rows


def _notes(report: EvalReport) -> list[str]:
    """Skip reasons and notes, once each; methods are named when a note does not hold for all."""
    where: dict[tuple[str, str], list[str]] = {}
    for label, results in report.methods.items():
        for r in results:
            for text in ([f"skipped: {r.skipped}"] if r.skipped else []) + r.notes:
                labels = where.setdefault((r.metric, text), [])
                labels += [] if label in labels else [label]
    every = len(report.methods)
    return [f"{metric}{'' if len(labels) == every else ' [' + ', '.join(labels) + ']'}: {text}"
            for (metric, text), labels in where.items()]


def render_markdown(report: EvalReport, figures: Sequence[Path], base: Path) -> str:
    """The markdown report; figure and strip paths relative to ``base`` (the report's folder)."""
    rows = _rows(report)
    lines = ["# Video evaluation", "", f"Inputs: `{json.dumps(report.inputs)}`", "",
             f"Settings: `{json.dumps(report.settings)}`", "", "## Results", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows[1:]]
    lines += ["", "↑ higher is better, ↓ lower is better; (proxy): not the network the published metric prescribes.",
              "", "## Notes", ""] + [f"- {note}" for note in _notes(report)]
    if figures:
        lines += ["", "## Plots", ""] + [f"![{f.stem}]({_rel(f, base)})" for f in figures]
    for label, strips in report.strips.items():
        lines += ["", f"## Strips: {label} (FP | quantized | difference)", ""]
        lines += [f"![{s.stem}]({_rel(s, base)})" for s in strips]
    return "\n".join(lines) + "\n"


def render_html(report: EvalReport, figures: Sequence[Path], base: Path) -> str:
    """The same report as a standalone HTML page (images referenced by relative path)."""
    esc = html.escape
    rows = _rows(report)
    table = "<table border='1' cellspacing='0' cellpadding='4'>"
    table += "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:]) + "</table>"
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Video evaluation</title></head><body>",
             "<h1>Video evaluation</h1>", f"<p>Inputs: <code>{esc(json.dumps(report.inputs))}</code></p>",
             f"<p>Settings: <code>{esc(json.dumps(report.settings))}</code></p>", "<h2>Results</h2>", table,
             "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in _notes(report)) + "</ul>"]
    parts += ["<h2>Plots</h2>"] + [f"<img src='{esc(_rel(f, base))}'>" for f in figures] if figures else []
    for label, strips in report.strips.items():
        parts.append(f"<h2>Strips: {esc(label)} (FP | quantized | difference)</h2>")
        parts += [f"<p><img src='{esc(_rel(s, base))}'></p>" for s in strips]
    return "\n".join(parts + ["</body></html>"]) + "\n"


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def write_readable(path: str | Path, report: EvalReport, assets_dir: str | Path | None = None) -> Path:
    """Write the markdown (``.md``) or HTML (``.html``) report and its figures; return its path."""
    path = Path(path)
    if path.suffix not in (".md", ".html"):
        raise ValueError(f"{path}: the readable report must end in .md or .html")
    assets = Path(assets_dir) if assets_dir is not None else path.with_name(path.stem + "_files")
    figures = [f for f in (plot_metric_bars(assets / "metrics.png", report),
                           plot_distributions(assets / "per_video.png", report)) if f is not None]
    render = render_markdown if path.suffix == ".md" else render_html
    return write_text_atomic(path, render(report, figures, path.parent))
