"""`xrvd evaluate --labels LABELS.csv OUT/`: how well the configured model (or several, compared
on the same images) does on a site's own labelled images (issue 19). `--format nih|chexpert
--images DIR` reads the public datasets' own label files instead (evaluate_labels.py), so that
their published tables can be reproduced.

Each image is classified once per model, as `xrvd classify` does, or, with --from-journal, its
scores are taken from the journal of the config's state_dir when that model with those very
weights (sha256) has already classified it: matched by SOP Instance UID, or by the path a
back-fill read it from (unless the file changed since). An image the journal has not scored
is classified as usual when the table gives its file; one named by its UID alone is listed as
not scored. Per model and finding the command writes the number of images, positives and
prevalence, AUROC with DeLong's 95 % interval, sensitivity, specificity, PPV and NPV at the
finding's threshold (model.thresholds, else model.threshold), and the threshold that reaches
a target sensitivity or specificity on these images, to OUT/metrics.csv and OUT/metrics.json,
with plots and OUT/report.html (evaluate_report.py), and prints a table. --write-thresholds
also proposes those thresholds as the config snippet that sets them (OUT/thresholds.yaml).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from ..errors import EXIT_OK, EXIT_PARTIAL
from ..fsutil import write_atomically
from ..pipeline.convert import ConvertOptions
from ..pipeline.models import Classifier, ModelIdentity
from ..pipeline.registry import get_spec
from ..stats import (
    NotEnoughData,
    at_threshold,
    delong_interval,
    round_threshold,
    threshold_for,
)
from ..thresholds import Thresholds
from .classify import classify_files
from .evaluate_labels import (  # noqa: F401 - the labels readers, re-exported
    Labels,
    LabelsError,
    read_dataset_labels,
    read_labels,
)

COLUMNS = ("model", "label", "images", "positives", "prevalence", "auroc", "auroc_low",
           "auroc_high", "threshold", "sensitivity", "specificity", "ppv", "npv",
           "target_metric", "target", "threshold_for_target", "sensitivity_at_target",
           "specificity_at_target", "note")


@dataclass(frozen=True)
class Target:
    """The sensitivity or the specificity a proposed threshold must reach."""

    metric: str = "sensitivity"  # or specificity
    value: float = 0.9

    def describe(self) -> str:
        return f"{self.metric} {self.value:g}"


@dataclass
class ModelScores:
    """One model's scores of the labelled images, and where they came from."""

    identity: ModelIdentity
    labels: tuple[str, ...]  # the findings it reports
    thresholds: Thresholds
    scores: list[dict[str, float] | None]  # per image (None: not scored)
    from_journal: int = 0
    computed: int = 0
    not_scored: dict[int, str] = field(default_factory=dict)  # image index -> reason


def metrics_for(scores: list[float | None], labels: list[int | None], threshold: float,
                target: Target = Target()) -> dict:
    """One finding's row: the images that have both a score and a label."""
    pairs = [(s, y) for s, y in zip(scores, labels, strict=True)
             if s is not None and y is not None]
    row: dict = {"images": len(pairs), "positives": sum(y for _, y in pairs),
                 "threshold": threshold, "target_metric": target.metric,
                 "target": target.value}
    row["prevalence"] = row["positives"] / len(pairs) if pairs else math.nan
    values, truth = [s for s, _ in pairs], [y for _, y in pairs]
    try:
        interval = delong_interval(values, truth)
    except NotEnoughData as exc:
        return {**row, "note": str(exc)}
    called = at_threshold(values, truth, threshold)
    # The shortest decimal with the same calls: what a person would write in the config.
    chosen = round_threshold(values, threshold_for(values, truth,
                                                   **{target.metric: target.value}))
    reached = at_threshold(values, truth, chosen)
    return {**row, "auroc": interval.auroc, "auroc_low": interval.low,
            "auroc_high": interval.high, "sensitivity": called.sensitivity,
            "specificity": called.specificity, "ppv": called.ppv, "npv": called.npv,
            "threshold_for_target": chosen, "sensitivity_at_target": reached.sensitivity,
            "specificity_at_target": reached.specificity,
            "note": "" if chosen <= 1.0 else "no threshold within [0, 1] reaches the target"}


def score_images(config, name: str, labels: Labels, journal) -> ModelScores:
    """The model's scores of every labelled image: from the journal (an open connection, or
    None) where these weights scored it, else by classifying its file."""
    from ..store.results import scores_for_images

    classifier = Classifier.from_config(config, name=name)
    identity = classifier.identity
    count = len(labels.files)
    result = ModelScores(identity, tuple(classifier.labels),
                         Thresholds.of_config(config.model, classifier.labels), [None] * count)
    if journal is not None:
        paths = {i: str(file.resolve()) for i, file in enumerate(labels.files)
                 if file is not None}
        by_uid, by_path = scores_for_images(
            journal, identity.name, identity.weights_sha256,
            sop_uids=[uid for uid in labels.sop_uids or () if uid], paths=paths.values())
        for index in range(count):
            found = by_uid.get(labels.uid(index))
            if found is None and index in paths:
                found = _unchanged(by_path.get(paths[index]), paths[index])
            if found is not None and set(classifier.labels) <= set(found.scores):
                result.scores[index] = found.scores
                result.from_journal += 1
    todo = [i for i in range(count) if result.scores[i] is None and labels.files[i] is not None]
    classified = classify_files([labels.files[i] for i in todo], classifier,
                                threshold=result.thresholds,
                                batch_size=config.model.batch_size,
                                options=ConvertOptions(**config.convert.model_dump()))
    for index, outcome in zip(todo, classified, strict=True):
        if outcome.error is not None:
            result.not_scored[index] = outcome.error.reason
        else:
            result.scores[index] = {f.label: f.score for f in outcome.findings}
            result.computed += 1
    for index in range(count):
        if labels.files[index] is None and result.scores[index] is None:
            result.not_scored[index] = "not_in_journal"
    return result


def _unchanged(found, path: str):
    """The journal's scores of a back-filled file, unless the file has changed since."""
    if found is None or found.size is None:
        return found
    try:
        stat = os.stat(path)
    except OSError:
        return found  # gone since: the journal still holds what it was
    return found if (stat.st_size, stat.st_mtime_ns) == (found.size, found.mtime_ns) else None


def evaluate(config, labels_path: Path, out: Path, *, models: tuple[str, ...] = (),
             target: Target = Target(), kind: str = "csv", images: Path | None = None,
             from_journal: bool = False, write_thresholds: bool = False,
             stream: TextIO | None = None) -> int:
    """models: the models to compare (default: the configured one), one after the other on the
    same images. kind: csv (a generic labels table) or a public dataset's own label file (nih,
    chexpert) with `images`, the folder of its images. from_journal: take the scores the
    journal of config.state_dir holds for these models and weights."""
    from . import evaluate_report

    stream = stream or sys.stdout
    names = list(dict.fromkeys(models)) or [config.model.name]
    known = tuple(dict.fromkeys(label for name in names for label in get_spec(name).label_names))
    labels = read_labels(labels_path, known, from_journal=from_journal) if kind == "csv" else \
        read_dataset_labels(kind, labels_path, images or labels_path.parent, known)
    journal = None
    if from_journal:
        from ..store.results import open_journal

        journal = open_journal(config.state_dir)
    rows: list[dict] = []
    scored: list[ModelScores] = []
    curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    try:
        for name in names:
            model = score_images(config, name, labels, journal)  # one model in memory at once
            scored.append(model)
            for finding, values in labels.findings.items():
                if finding not in model.labels:
                    continue
                column = [None if s is None else s[finding] for s in model.scores]
                rows.append({"model": name, "label": finding, **metrics_for(
                    column, values, model.thresholds.of(finding), target)})
                pairs = [(s, y) for s, y in zip(column, values, strict=True)
                         if s is not None and y is not None]
                curves[name, finding] = (np.array([s for s, _ in pairs], dtype=np.float64),
                                         np.array([y for _, y in pairs], dtype=np.int64))
    finally:
        if journal is not None:
            journal.close()
    out.mkdir(parents=True, exist_ok=True)
    not_scored = _not_scored(labels, scored)
    # Each file appears whole or not at all (an interrupted run leaves no half table).
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(out / "metrics.csv", table.getvalue().encode("utf-8"))
    identities = [_identity(model) for model in scored]
    summary = {"models": identities, "labels_file": str(labels_path),
               "images": len(labels.files), "target": {target.metric: target.value},
               "from_journal": from_journal, "not_classified": not_scored}
    write_atomically(out / "metrics.json", json.dumps({
        **summary,
        "findings": [{key: _jsonable(value) for key, value in row.items()} for row in rows],
    }, indent=2, allow_nan=False).encode("utf-8"))
    _print(rows, identities, len(labels.files), not_scored, from_journal, stream)
    report = evaluate_report.write_report(out, summary, rows, curves, COLUMNS)
    if report.missing:
        stream.write(f"{report.missing}\n")
    written = [str(out / "metrics.csv"), str(out / "metrics.json"),
               f"{report.html} ({len(report.images)} plots)"]
    if write_thresholds:
        snippets = [thresholds_snippet(model, rows, config.model.threshold, target)
                    for model in scored]
        # One YAML document per model: each is a config file's `model:` section by itself.
        write_atomically(out / "thresholds.yaml", "---\n".join(snippets).encode("utf-8"))
        stream.write(f"\nProposed thresholds for {target.describe()} on these images, as they "
                     "go into the config file (model.name must be the model named above "
                     "them):\n\n" + "\n".join(snippets) + "\n")
        written.append(str(out / "thresholds.yaml"))
    stream.write(f"written: {', '.join(written)}\n")
    return EXIT_PARTIAL if not_scored else EXIT_OK


def thresholds_snippet(model: ModelScores, rows: list[dict], default: float,
                       target: Target) -> str:
    """The `model:` section that sets the thresholds proposed for one model, as YAML with
    comments. It replaces the config's section, so a threshold the config already gives a
    finding that gets no proposal here (not labelled, or one class only) is kept, saying so;
    a finding with neither is named in a comment that says why it has none."""
    identity = model.identity
    lines = [f"# {identity.name} (weights sha256 {identity.weights_sha256[:16]}): "
             f"{target.describe()} on the labelled images"]
    if identity.untrained:
        lines.append("# UNTRAINED weights: these thresholds mean nothing")
    configured = model.thresholds.overrides
    chosen, kept, left_out = [], [], []
    own = [r for r in rows if r["model"] == identity.name]
    for row in own:
        label = row["label"]
        if "auroc" in row and row["threshold_for_target"] <= 1.0:
            chosen.append(f"    {_yaml_key(label)}: {_yaml_number(row['threshold_for_target'])}")
            continue
        why = (row["note"] if "auroc" in row else
               f"{row['positives']} positive and {row['images'] - row['positives']} negative "
               "images here (a threshold needs both)")
        if label in configured:
            kept.append(f"    {_yaml_key(label)}: {_yaml_number(configured[label])}  # kept "
                        f"from the config: {why}")
        else:
            left_out.append(f"    # {label}: left out, {why}")
    labelled = {row["label"] for row in own}
    kept += [f"    {_yaml_key(label)}: {_yaml_number(value)}  # kept from the config (not "
             "labelled here)" for label, value in configured.items() if label not in labelled]
    lines += ["model:", f"  threshold: {_yaml_number(default)}",
              "  thresholds:" if chosen or kept else "  thresholds: {}",
              *chosen, *kept, *left_out]
    return "\n".join(lines) + "\n"


def _yaml_number(value: float) -> str:
    """Positional (YAML 1.1, as PyYAML reads it, takes 1e-05 for a string) and no longer than
    the value needs."""
    return np.format_float_positional(float(value), unique=True, trim="0")


def _yaml_key(name: str) -> str:
    return name if all(c.isalnum() or c in " _" for c in name) else json.dumps(name)


def _identity(model: ModelScores) -> dict:
    identity = model.identity
    return {"model": identity.name, "weights_sha256": identity.weights_sha256,
            "untrained": identity.untrained, "thresholds": model.thresholds.describe(),
            "scores_from_journal": model.from_journal, "scores_computed": model.computed,
            "not_scored": len(model.not_scored)}


def _not_scored(labels: Labels, scored: list[ModelScores]) -> list[dict]:
    """Each image some model could not score, once, with the reason and the models."""
    entries: dict[int, dict] = {}
    for model in scored:
        for index, reason in model.not_scored.items():
            entry = entries.setdefault(index, {
                "path": None if labels.files[index] is None else str(labels.files[index]),
                "sop_instance_uid": labels.uid(index), "reason": reason, "models": []})
            entry["models"].append(model.identity.name)
    return [entries[index] for index in sorted(entries)]


def _jsonable(value):
    """NaN (a ratio with nothing to divide by, e.g. NPV with no negative calls) as null: JSON
    has no NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _print(rows: list[dict], identities: list[dict], images: int, failed: list,
           from_journal: bool, stream: TextIO) -> None:
    for identity in identities:
        untrained = "; UNTRAINED weights: meaningless" if identity["untrained"] else ""
        stream.write(f"{identity['model']} (weights {identity['weights_sha256'][:12]}) on "
                     f"{images} images, threshold {identity['thresholds']}{untrained}\n")
        if from_journal:
            stream.write(f"  scores: {identity['scores_from_journal']} from the journal, "
                         f"{identity['scores_computed']} computed, "
                         f"{identity['not_scored']} not scored\n")
        stream.write(f"  {'finding':<28} {'n':>5} {'pos':>5} {'AUROC (95% CI)':>22} "
                     f"{'thresh':>6} {'sens':>6} {'spec':>6}\n")
        for row in (r for r in rows if r["model"] == identity["model"]):
            if "auroc" not in row:
                stream.write(f"  {row['label']:<28} {row['images']:>5} {row['positives']:>5}  "
                             f"{row['note']}\n")
                continue
            stream.write(f"  {row['label']:<28} {row['images']:>5} {row['positives']:>5} "
                         f"{row['auroc']:>8.3f} ({row['auroc_low']:.3f}-"
                         f"{row['auroc_high']:.3f}) {row['threshold']:>6.3g} "
                         f"{row['sensitivity']:>6.3f} {row['specificity']:>6.3f}\n")
    if failed:
        also = " or found in the journal" if from_journal else ""
        stream.write(f"{len(failed)} image(s) could not be classified{also}: see "
                     "metrics.json\n")
