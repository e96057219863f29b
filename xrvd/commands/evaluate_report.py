"""`xrvd evaluate`'s pictures: per finding, the ROC curves of every compared model on one plot,
a reliability (calibration) plot and score histograms by label value, as PNG files in OUT/ and
in one self-contained OUT/report.html (images as data: URIs, no external CSS, scripts or fonts:
it opens offline, from a mail or a USB stick) with the tables.

matplotlib is the `plots` extra (in the full install, not in the lean service install): it is
imported here only, when the report is written, and without it the report has the tables
alone. Figures are built as matplotlib.figure.Figure objects on an Agg canvas of their own,
never through pyplot or matplotlib.use(), which change state for the whole process (a
backend, a figure registry) that other code in it may rely on.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import FINDING_NAMES
from ..fsutil import write_atomically
from ..stats import calibration, roc_curve

PLOTS_MISSING = ("plots: matplotlib is not installed, so report.html has the tables alone; "
                 "`uv sync --extra plots` (or the full install) adds them")
# matplotlib's tab10: distinguishable, also in grey print.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
POSITIVE, NEGATIVE = "#d62728", "#1f77b4"
KINDS = ("roc", "calibration", "histogram")


@dataclass(frozen=True)
class Report:
    html: Path
    images: list[Path] = field(default_factory=list)
    missing: str = ""  # why there are no plots (what to install), or ""


@dataclass(frozen=True)
class Entry:
    """One model's scores of one finding's labelled images, and its metrics row."""

    model: str
    color: str
    scores: np.ndarray
    labels: np.ndarray
    row: dict

    @property
    def both_classes(self) -> bool:
        return 0 < int(self.labels.sum()) < len(self.labels)


def _matplotlib() -> tuple[type, type] | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def slug(finding: str) -> str:
    """A file name part for a finding (`Lung Opacity` -> `lung-opacity`)."""
    return re.sub(r"[^a-z0-9]+", "-", finding.lower()).strip("-") or "finding"


def write_report(out: Path, summary: dict, rows: list[dict],
                 curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
                 columns: tuple[str, ...]) -> Report:
    """OUT/report.html (the tables with `columns`, as metrics.csv has them) and, where
    matplotlib is installed, OUT/<kind>-<finding>.png for every finding that some model has
    both positive and negative images of."""
    models = [identity["model"] for identity in summary["models"]]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(models)}
    by_finding: dict[str, list[Entry]] = {}
    for row in rows:
        scores, labels = curves[row["model"], row["label"]]
        by_finding.setdefault(row["label"], []).append(
            Entry(row["model"], colors[row["model"]], scores, labels, row))
    plotting = _matplotlib()
    figures: dict[str, list[tuple[str, str, bytes]]] = {}  # finding -> (kind, file, png)
    images: list[Path] = []
    _remove_earlier_plots(out)
    if plotting is not None:
        for finding, entries in by_finding.items():
            if not any(entry.both_classes for entry in entries):
                continue
            for kind, draw in zip(KINDS, (_roc, _calibration, _histograms), strict=True):
                png = _render(plotting, draw, finding, entries)
                path = out / f"{kind}-{slug(finding)}.png"
                write_atomically(path, png)
                images.append(path)
                figures.setdefault(finding, []).append((kind, path.name, png))
    missing = "" if plotting is not None else PLOTS_MISSING
    page = out / "report.html"
    write_atomically(page, _html(summary, rows, columns, list(by_finding), figures,
                                 missing).encode("utf-8"))
    return Report(page, images, missing)


def _remove_earlier_plots(out: Path) -> None:
    """An earlier run's plots in the same folder would pass for this run's: only the names
    this module gives them (a kind and a finding some model reports) are removed."""
    for kind in KINDS:
        for finding in FINDING_NAMES:
            (out / f"{kind}-{slug(finding)}.png").unlink(missing_ok=True)


# --- figures ----------------------------------------------------------------------------------


def _render(plotting, draw: Callable, finding: str, entries: list[Entry]) -> bytes:
    figure_class, canvas_class = plotting
    width = 4.4 * len(entries) if draw is _histograms else 5.6
    figure = figure_class(figsize=(max(width, 5.6), 4.6), dpi=100, layout="constrained")
    canvas_class(figure)  # attaches itself: this figure renders with Agg, whatever else runs
    draw(figure, finding, entries)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _roc(figure, finding: str, entries: list[Entry]) -> None:
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1)
    for entry in (e for e in entries if e.both_classes):
        curve = roc_curve(entry.scores, entry.labels)
        row = entry.row
        axes.plot(curve.false_positive_rate, curve.true_positive_rate, color=entry.color,
                  linewidth=1.8, label=f"{entry.model}\nAUROC {row['auroc']:.3f} "
                  f"({row['auroc_low']:.3f}-{row['auroc_high']:.3f}), n={row['images']}")
        # Where the configured threshold puts this model on its curve.
        axes.plot([1 - row["specificity"]], [row["sensitivity"]], marker="o",
                  color=entry.color, markersize=6)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel("1 - specificity (false positive rate)")
    axes.set_ylabel("sensitivity (true positive rate)")
    axes.set_title(f"{finding}: ROC (dot: at the threshold)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=7)


def _calibration(figure, finding: str, entries: list[Entry]) -> None:
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1,
              label="scores as probabilities")
    for entry in entries:
        if not len(entry.scores):
            continue
        points = calibration(entry.scores, entry.labels, bins=10)
        axes.plot(points.mean_score, points.fraction_positive, marker="o", markersize=4,
                  color=entry.color, linewidth=1.5, label=f"{entry.model} (n={len(entry.scores)})")
    axes.set_xlim(0, 1)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("mean score in the bin (10 bins)")
    axes.set_ylabel("share of positive images in the bin")
    axes.set_title(f"{finding}: calibration")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=7)


def _histograms(figure, finding: str, entries: list[Entry]) -> None:
    panels = figure.subplots(1, len(entries), sharey=True, squeeze=False)[0]
    edges = np.linspace(0.0, 1.0, 21)
    for axes, entry in zip(panels, entries, strict=True):
        for value, color, name in ((0, NEGATIVE, "negative"), (1, POSITIVE, "positive")):
            chosen = entry.scores[entry.labels == value]
            if len(chosen):  # each group sums to 1: a rare finding stays visible
                axes.hist(np.clip(chosen, 0.0, 1.0), bins=edges, color=color, alpha=0.55,
                          weights=np.full(len(chosen), 1.0 / len(chosen)),
                          label=f"{name} (n={len(chosen)})")
        threshold = entry.row["threshold"]
        axes.axvline(threshold, color="#333333", linestyle=":", linewidth=1.2,
                     label=f"threshold {threshold:g}")
        axes.set_xlim(0, 1)
        axes.set_xlabel("score")
        axes.set_title(entry.model, fontsize=9)
        axes.legend(loc="best", fontsize=7)
    panels[0].set_ylabel("share of the group's images")
    figure.suptitle(f"{finding}: scores by label")


# --- the page ---------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem;
       color: #1a1a1a; }
h1 { font-size: 1.5rem; margin-bottom: .25rem; } h2 { margin-top: 2rem; }
.meta { color: #555; margin-top: 0; }
.warning { background: #fde8e8; border: 2px solid #c62828; color: #8e0000; padding: .6rem 1rem;
           font-weight: bold; margin: 1rem 0; }
.note { background: #fff8e1; border: 1px solid #f0c36d; padding: .5rem 1rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .8rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: .2rem .3rem; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; white-space: normal; vertical-align: bottom; }
td.text, th.text { text-align: left; } td.sentence { white-space: normal; min-width: 9rem; }
code { font-size: .8rem; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .8rem; color: #555; max-width: 560px; }
"""
CAPTIONS = {
    "roc": "All compared models on the same images; the dot is each model at its threshold.",
    "calibration": "TorchXRayVision's scores are scaled so that 0.5 is each finding's "
                   "published operating point, not to be probabilities: the distance from "
                   "the diagonal shows how far they are from this site's rates.",
    "histogram": "Scores of the positive and the negative images, each group summing to 1; "
                 "the dotted line is the threshold.",
}
TEXT_COLUMNS = {"model", "label", "target_metric", "note"}


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _header(column: str) -> str:
    """metrics.csv's name, allowed to break after its underscores (a narrower table)."""
    return "_<wbr>".join(_e(part) for part in column.split("_"))


def _cell(column: str, value) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "<td>-</td>" if column not in TEXT_COLUMNS else "<td class=\"text\"></td>"
    if column == "note":  # a sentence: wraps rather than widen the table
        return f"<td class=\"text sentence\">{_e(value)}</td>"
    if column in TEXT_COLUMNS:
        return f"<td class=\"text\">{_e(value)}</td>"
    if isinstance(value, float) and column not in ("threshold", "threshold_for_target",
                                                   "target"):
        return f"<td>{value:.3f}</td>"
    return f"<td>{_e(f'{value:g}' if isinstance(value, float) else value)}</td>"


def _html(summary: dict, rows: list[dict], columns: tuple[str, ...], findings: list[str],
          figures: dict[str, list[tuple[str, str, bytes]]], missing: str) -> str:
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    target = ", ".join(f"{metric} {value:g}" for metric, value in summary["target"].items())
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>xrvd evaluate: {_e(Path(summary['labels_file']).name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Local validation: {_e(summary['labels_file'])}</h1>",
        f"<p class=\"meta\">xrvd {_e(__version__)}, {_e(when)}; {summary['images']} images "
        f"labelled; {len(summary['not_classified'])} not classified; proposed thresholds for "
        f"{_e(target)}</p>",
    ]
    if any(identity["untrained"] for identity in summary["models"]):
        parts.append("<div class=\"warning\">UNTRAINED weights: these scores are random and "
                     "every number and picture below is meaningless. Install the published "
                     "weights (xrvd models fetch or import) before judging a model.</div>")
    parts.append("<h2>Models</h2><div class=\"scroll\"><table><tr>" + "".join(
        f"<th class=\"text\">{name}</th>" for name in (
            "model", "weights sha256", "thresholds", "scores from the journal",
            "scores computed", "not scored")) + "</tr>")
    for identity in summary["models"]:
        untrained = " <strong>(UNTRAINED)</strong>" if identity["untrained"] else ""
        parts.append(
            f"<tr><td class=\"text\">{_e(identity['model'])}{untrained}</td>"
            f"<td class=\"text\"><code>{_e(identity['weights_sha256'])}</code></td>"
            f"<td class=\"text\">{_e(identity['thresholds'])}</td>"
            f"<td>{identity['scores_from_journal']}</td><td>{identity['scores_computed']}</td>"
            f"<td>{identity['not_scored']}</td></tr>")
    parts.append("</table></div>")
    if summary["not_classified"]:
        parts.append(f"<details><summary>{len(summary['not_classified'])} image(s) not "
                     "classified</summary><table><tr><th class=\"text\">image</th>"
                     "<th class=\"text\">reason</th><th class=\"text\">models</th></tr>")
        for entry in summary["not_classified"]:
            image = entry["path"] or f"SOP Instance UID {entry['sop_instance_uid']}"
            parts.append(f"<tr><td class=\"text\">{_e(image)}</td>"
                         f"<td class=\"text\">{_e(entry['reason'])}</td>"
                         f"<td class=\"text\">{_e(', '.join(entry['models']))}</td></tr>")
        parts.append("</table></details>")
    parts.append("<h2>Metrics</h2>")
    for identity in summary["models"]:
        shown = [c for c in columns if c != "model"]
        parts.append(f"<h3>{_e(identity['model'])}</h3><div class=\"scroll\"><table><tr>" +
                     "".join(f"<th class=\"text\">{_header(c)}</th>" if c in TEXT_COLUMNS
                             else f"<th>{_header(c)}</th>" for c in shown) + "</tr>")
        for row in (r for r in rows if r["model"] == identity["model"]):
            parts.append("<tr>" + "".join(_cell(c, row.get(c)) for c in shown) + "</tr>")
        parts.append("</table></div>")
    parts.append("<h2>Plots</h2>")
    if missing:
        parts.append(f"<p class=\"note\">{_e(missing)}</p>")
    for finding in findings:
        parts.append(f"<h3 id=\"{_e(slug(finding))}\">{_e(finding)}</h3>")
        if finding not in figures:
            if not missing:
                parts.append("<p class=\"note\">No plots: every model has only positive or "
                             "only negative images of it here.</p>")
            continue
        parts.append("<div class=\"plots\">")
        for kind, name, png in figures[finding]:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" "
                         f"alt=\"{_e(finding)}: {kind}\" data-kind=\"{kind}\" "
                         f"title=\"{_e(name)}\"><figcaption>{_e(CAPTIONS[kind])}"
                         "</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
