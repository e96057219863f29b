"""`xrvd evaluate --labels LABELS.csv OUT/`: how well the configured model does on a site's own
labelled images (issue 19, first part: the tables, for one model or several compared on the
same images; plots, the HTML report and the journal's scores come next). `--format nih|chexpert --images DIR` reads the public
datasets' own label files instead, so that their published tables can be reproduced.

LABELS.csv has a `path` column (an image file, relative to the CSV's folder or absolute) and
one column per finding, named as the model names it (`xrvd models list`), holding 1
(present), 0 (absent) or nothing (not labelled: the image is left out for that finding). Each
file is classified once, as `xrvd classify` does; per finding the command writes the number of
images, positives and prevalence, AUROC with DeLong's 95 % interval, sensitivity,
specificity, PPV and NPV at the configured threshold, and the threshold that reaches
--target-sensitivity on these images, to OUT/metrics.csv and OUT/metrics.json, and prints a
table.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import EXIT_OK, EXIT_PARTIAL, XrvdError
from ..pipeline.convert import ConvertOptions
from ..pipeline.models import Classifier
from ..pipeline.registry import get_spec
from ..stats import NotEnoughData, at_threshold, delong_interval, threshold_for
from .classify import classify_files

# Labels files are small tables; a larger one is not a labels file.
MAX_LABELS_BYTES = 64 << 20
COLUMNS = ("model", "label", "images", "positives", "prevalence", "auroc", "auroc_low",
           "auroc_high", "threshold", "sensitivity", "specificity", "ppv", "npv",
           "target_sensitivity", "threshold_for_target", "specificity_at_target", "note")


class LabelsError(XrvdError):
    """The labels table cannot be used as it is: the message says what to change."""

    reason = "labels_invalid"


@dataclass(frozen=True)
class Labels:
    files: list[Path]
    findings: dict[str, list[int | None]]  # per finding, per file: 1, 0 or None


def read_labels(path: Path, known: tuple[str, ...]) -> Labels:
    """The labels table; findings matched to the model's names without regard to case."""
    _check_size(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"cannot read the labels table {path}: {exc}") from exc
    columns = list(rows[0].keys()) if rows else []
    if "path" not in columns:
        raise LabelsError(f"{path}: the labels table needs a `path` column (the image files) "
                          f"and one column per finding; it has {columns[:10]}")
    by_name = {name.lower(): name for name in known}
    findings: dict[str, list[int | None]] = {}
    unknown = []
    for column in columns:
        if column == "path":
            continue
        name = by_name.get(column.strip().lower())
        if name is None:
            unknown.append(column)
            continue
        values = []
        for number, row in enumerate(rows, start=2):
            text = (row.get(column) or "").strip()
            if text not in ("", "0", "1", "0.0", "1.0"):
                raise LabelsError(f"{path}, line {number}, column {column}: {text!r} is not "
                                  "1, 0 or empty")
            values.append(None if text == "" else int(float(text)))
        findings[name] = values
    if unknown:
        raise LabelsError(f"{path}: the model does not report {unknown}; its findings are "
                          f"{list(known)}")
    if not findings:
        raise LabelsError(f"{path}: no finding columns; name them as the model does: "
                          f"{list(known)}")
    base = path.parent
    files = [Path(row["path"]) if Path(row["path"]).is_absolute() else base / row["path"]
             for row in rows]
    return Labels(files, findings)


def _check_size(path: Path) -> None:
    """Before a labels table is read whole (by csv here, or by pandas in TorchXRayVision)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LabelsError(f"cannot read the labels table {path}: {exc}") from exc
    if size > MAX_LABELS_BYTES:
        raise LabelsError(f"{path} is larger than {MAX_LABELS_BYTES} bytes: not a labels table "
                          "(NIH's Data_Entry_2017.csv is 8 MB, CheXpert's train.csv 26 MB)")


def read_dataset_labels(kind: str, csv_path: Path, images: Path,
                        known: tuple[str, ...]) -> Labels:
    """A public dataset's own label file, read by TorchXRayVision's dataset class as its
    published tables were made (NIH ChestX-ray14's Data_Entry_2017.csv; CheXpert's
    train.csv/valid.csv, whose -1 "uncertain" labels the library leaves out, and whose "No
    Finding" rows it takes as negative for every finding): frontal views (PA and AP), every
    image (not one per patient). Needs the full install."""
    try:
        import torchxrayvision as xrv
    except ImportError as exc:
        raise LabelsError(f"--format {kind} reads the label file with TorchXRayVision, which "
                          "this service install does not have: run it on a full install, or "
                          "write a generic labels table (--format csv)") from exc
    if not csv_path.is_file() or not images.is_dir():
        raise LabelsError(f"--format {kind} needs the label file ({csv_path}) and the folder "
                          f"of its images (--images {images})")
    _check_size(csv_path)
    try:
        if kind == "nih":
            dataset = xrv.datasets.NIH_Dataset(imgpath=str(images), csvpath=str(csv_path),
                                               views=["PA", "AP"], unique_patients=False)
            files = [images / name for name in dataset.csv["Image Index"]]
        else:
            dataset = xrv.datasets.CheX_Dataset(imgpath=str(images), csvpath=str(csv_path),
                                                views=["PA", "AP"], unique_patients=False)
            files = [images / str(name).replace("CheXpert-v1.0-small/", "")
                     .replace("CheXpert-v1.0/", "") for name in dataset.csv["Path"]]
    except (KeyError, ValueError, OSError) as exc:
        raise LabelsError(f"{csv_path} is not a {kind} label file as TorchXRayVision reads it "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    findings = {}
    for column, pathology in enumerate(dataset.pathologies):
        if pathology in known:
            findings[pathology] = [None if math.isnan(value) else int(value)
                                   for value in dataset.labels[:, column]]
    if not findings:
        raise LabelsError(f"{csv_path}: none of the model's findings {list(known)} is labelled "
                          f"in it ({list(dataset.pathologies)})")
    return Labels(files, findings)


def metrics_for(scores: list[float | None], labels: list[int | None], threshold: float,
                target_sensitivity: float) -> dict:
    """One finding's row: the images that have both a score and a label."""
    pairs = [(s, y) for s, y in zip(scores, labels, strict=True)
             if s is not None and y is not None]
    row: dict = {"images": len(pairs), "positives": sum(y for _, y in pairs),
                 "threshold": threshold, "target_sensitivity": target_sensitivity}
    row["prevalence"] = row["positives"] / len(pairs) if pairs else math.nan
    values, truth = [s for s, _ in pairs], [y for _, y in pairs]
    try:
        interval = delong_interval(values, truth)
    except NotEnoughData as exc:
        return {**row, "note": str(exc)}
    called = at_threshold(values, truth, threshold)
    chosen = threshold_for(values, truth, sensitivity=target_sensitivity)
    return {**row, "auroc": interval.auroc, "auroc_low": interval.low,
            "auroc_high": interval.high, "sensitivity": called.sensitivity,
            "specificity": called.specificity, "ppv": called.ppv, "npv": called.npv,
            "threshold_for_target": chosen,
            "specificity_at_target": at_threshold(values, truth, chosen).specificity,
            "note": ""}


def evaluate(config, labels_path: Path, out: Path, *, models: tuple[str, ...] = (),
             target_sensitivity: float = 0.9, kind: str = "csv", images: Path | None = None,
             stream: TextIO | None = None) -> int:
    """models: the models to compare (default: the configured one), one after the other on the
    same images. kind: csv (a generic labels table) or a public dataset's own label file (nih,
    chexpert) with `images`, the folder of its images."""
    names = list(dict.fromkeys(models)) or [config.model.name]
    known = tuple(dict.fromkeys(label for name in names for label in get_spec(name).label_names))
    labels = read_labels(labels_path, known) if kind == "csv" else \
        read_dataset_labels(kind, labels_path, images or labels_path.parent, known)
    rows: list[dict] = []
    identities: list[dict] = []
    failed: dict[str, str] = {}
    for name in names:
        classifier = Classifier.from_config(config, name=name)
        results = classify_files(labels.files, classifier, threshold=config.model.threshold,
                                 batch_size=config.model.batch_size,
                                 options=ConvertOptions(**config.convert.model_dump()))
        scores = [{f.label: f.score for f in r.findings} if r.error is None else None
                  for r in results]
        for finding, values in labels.findings.items():
            if finding in classifier.labels:
                rows.append({"model": name, "label": finding, **metrics_for(
                    [None if s is None else s[finding] for s in scores], values,
                    config.model.threshold, target_sensitivity)})
        identity = classifier.identity
        identities.append({"model": identity.name, "weights_sha256": identity.weights_sha256,
                           "untrained": identity.untrained})
        failed.update({r.path: r.error.reason for r in results if r.error is not None})
        del classifier  # one model in memory at a time
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    not_classified = [{"path": path, "reason": reason} for path, reason in failed.items()]
    (out / "metrics.json").write_text(json.dumps({
        "models": identities, "labels_file": str(labels_path), "images": len(labels.files),
        "not_classified": not_classified,
        "findings": [{key: _jsonable(value) for key, value in row.items()} for row in rows],
    }, indent=2, allow_nan=False), encoding="utf-8")
    _print(rows, identities, len(labels.files), not_classified, out, stream or sys.stdout)
    return EXIT_PARTIAL if failed else EXIT_OK


def _jsonable(value):
    """NaN (a ratio with nothing to divide by, e.g. NPV with no negative calls) as null: JSON
    has no NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _print(rows: list[dict], identities: list[dict], images: int, failed: list, out: Path,
           stream: TextIO) -> None:
    for identity in identities:
        untrained = "; UNTRAINED weights: meaningless" if identity["untrained"] else ""
        stream.write(f"{identity['model']} (weights {identity['weights_sha256'][:12]}) on "
                     f"{images} images{untrained}\n")
        stream.write(f"  {'finding':<28} {'n':>5} {'pos':>5} {'AUROC (95% CI)':>22} "
                     f"{'sens':>6} {'spec':>6}\n")
        for row in (r for r in rows if r["model"] == identity["model"]):
            if "auroc" not in row:
                stream.write(f"  {row['label']:<28} {row['images']:>5} {row['positives']:>5}  "
                             f"{row['note']}\n")
                continue
            stream.write(f"  {row['label']:<28} {row['images']:>5} {row['positives']:>5} "
                         f"{row['auroc']:>8.3f} ({row['auroc_low']:.3f}-"
                         f"{row['auroc_high']:.3f}) {row['sensitivity']:>6.3f} "
                         f"{row['specificity']:>6.3f}\n")
    if failed:
        stream.write(f"{len(failed)} image(s) could not be classified: see metrics.json\n")
    stream.write(f"written: {out / 'metrics.csv'}, {out / 'metrics.json'}\n")
