"""`xrvd classify`: score image files with one model and print the findings.

Files are converted one by one and scored in batches, so memory stays bounded however many
files are given. A file that cannot be classified is reported with its reason; the others are
still classified.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImageError, NonFiniteScoresError, UnreadableFileError
from ..log import get_logger
from ..pipeline.convert import ConvertOptions, prepare_file
from ..pipeline.models import Classifier, ModelIdentity
from ..pipeline.prepare import conversion_errors
from ..pipeline.untrained import UNTRAINED_BANNER
from ..thresholds import Thresholds

FORMATS = ("table", "json", "csv")


@dataclass(frozen=True)
class Finding:
    label: str
    score: float
    positive: bool
    threshold: float = 0.5  # the one it was called at


@dataclass
class FileResult:
    path: str
    findings: list[Finding] = field(default_factory=list)  # strongest first
    error: ImageError | None = None


def classify_files(paths: Iterable[str | os.PathLike], classifier: Classifier, *,
                   threshold: Thresholds | float = 0.5, batch_size: int = 8,
                   options: ConvertOptions = ConvertOptions()) -> list[FileResult]:
    """threshold: the operating points (a plain number: one for every finding)."""
    thresholds = Thresholds.coerce(threshold)
    log = get_logger(model=classifier.identity.name)
    results: list[FileResult] = []
    pending: list[tuple[FileResult, np.ndarray]] = []

    def flush() -> None:
        started = time.perf_counter()
        scores = classifier.predict(np.concatenate([array for _, array in pending]))
        elapsed = (time.perf_counter() - started) / len(pending)
        for (result, _), row in zip(pending, scores, strict=True):
            if not np.all(np.isfinite(row)):
                result.error = NonFiniteScoresError(
                    result.path, "the model produced non-finite scores (NaN or infinity) for "
                    "this image, so none are reported; check that it is a chest radiograph")
                log.warning("image.rejected", file=result.path, reason=result.error.reason)
                continue
            result.findings = sorted(
                (Finding(label, float(score), thresholds.positive(label, score),
                         thresholds.of(label))
                 for label, score in zip(classifier.labels, row, strict=True)),
                key=lambda finding: finding.score, reverse=True,
            )
            log.info("image.classified", file=result.path, duration_s=round(elapsed, 4),
                     positives=[f.label for f in result.findings if f.positive])
        pending.clear()

    for path in paths:
        result = FileResult(str(path))
        results.append(result)
        started = time.perf_counter()
        try:
            model_input = _prepare(path, classifier.resolution, options)
        except ImageError as exc:
            result.error = exc
            log.warning("image.rejected", file=result.path, reason=exc.reason, detail=exc.detail)
            continue
        log.debug("image.converted", file=result.path, source_shape=model_input.source_shape,
                  duration_s=round(time.perf_counter() - started, 4))
        pending.append((result, model_input.array))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return results


def _prepare(path: str | os.PathLike, resolution: int, options: ConvertOptions):
    """prepare_file, with every failure of this one file as an ImageError: a missing or
    unreadable file, or a crafted one, gets its line and the others are still classified."""
    try:
        with conversion_errors(path):
            return prepare_file(path, resolution, options)
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot read the file ({exc.strerror or exc}); check "
                                  "its path and permissions") from exc


# --- output ---------------------------------------------------------------------------


def render(results: list[FileResult], identity: ModelIdentity, threshold: Thresholds,
           fmt: str) -> str:
    if fmt == "json":
        return render_json(results, identity, threshold)
    if fmt == "csv":
        return render_csv(results, identity)
    return render_table(results, identity, threshold)


def render_table(results: list[FileResult], identity: ModelIdentity,
                 threshold: Thresholds) -> str:
    lines: list[str] = []
    for result in results:
        lines.append(f"{result.path}")
        if result.error is not None:
            lines.append(f"  NOT CLASSIFIED ({result.error.reason}): {result.error.detail}")
            lines.append("")
            continue
        lines.append(f"  model {identity.name}, threshold {threshold.describe()}")
        if identity.untrained:
            lines.append(f"  !! {UNTRAINED_BANNER}")
        width = max(len("Finding"), *(len(f.label) for f in result.findings))
        own = bool(threshold.per_finding)  # a threshold column only when they differ
        head = f"  {'Finding':<{width}}  {'Score':>5}  " + ("Thresh  " if own else "")
        lines.append(head + "Call")
        for finding in result.findings:
            # Untrained scores must never read as a finding, not even in a demo.
            call = ("n/a (untrained)" if identity.untrained
                    else "POSITIVE" if finding.positive else "negative")
            at = f"{finding.threshold:6.3f}  " if own else ""
            lines.append(f"  {finding.label:<{width}}  {finding.score:5.3f}  {at}{call}")
        lines.append("")
    return "\n".join(lines)


def render_json(results: list[FileResult], identity: ModelIdentity,
                threshold: Thresholds) -> str:
    document = {
        "model": {
            "name": identity.name,
            "architecture": identity.architecture,
            "weights_file": identity.weights_file,
            "weights_sha256": identity.weights_sha256,
            "torchxrayvision_version": identity.torchxrayvision_version,
        },
        "threshold": threshold.default,
        "thresholds": threshold.overrides,
        "untrained": identity.untrained,
        "results": [_json_result(result) for result in results],
    }
    if identity.untrained:
        document["warning"] = UNTRAINED_BANNER
    return json.dumps(document, indent=2)


def _json_result(result: FileResult) -> dict:
    if result.error is not None:
        return {"file": result.path, "error": {"reason": result.error.reason,
                                               "message": result.error.detail}}
    return {
        "file": result.path,
        "findings": [
            {"label": f.label, "score": round(f.score, 6), "threshold": f.threshold,
             "positive": f.positive}
            for f in result.findings
        ],
    }


CSV_COLUMNS = ("file", "model", "label", "score", "threshold", "positive", "untrained",
               "error_reason", "error")


def render_csv(results: list[FileResult], identity: ModelIdentity) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    untrained = str(identity.untrained).lower()
    for result in results:
        if result.error is not None:
            writer.writerow([result.path, identity.name, "", "", "", "", untrained,
                             result.error.reason, result.error.detail])
            continue
        for f in result.findings:
            writer.writerow([result.path, identity.name, f.label, f"{f.score:.6f}",
                             f"{f.threshold:g}", str(f.positive).lower(), untrained, "", ""])
    return out.getvalue()
