"""`xrvd export`: one row per classified image, for analysis in pandas, R or a spreadsheet.

CSV and Parquet are wide (a score and a call column per label); JSON Lines nests the findings.
The file appears complete or not at all (written beside the target, then renamed).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import XrvdError
from ..pipeline.registry import MODELS
from ..store.results import ImageResult, iter_results, models_with_results, open_journal
from ..thresholds import Thresholds

FORMATS = ("csv", "jsonl", "parquet")
BASE_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "view",
                "model", "weights_sha256", "untrained", "generation", "threshold",
                "thresholds", "received_at", "classified_at", "report_path", "file")
PARQUET_BATCH = 10_000


class ExportError(XrvdError):
    pass


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def labels_for(models: list[str]) -> list[str]:
    """Every label any of these models predicts, in registry order, each once."""
    labels: dict[str, None] = {}
    for name in models:
        spec = MODELS.get(name)
        for label in spec.label_names if spec else ():
            labels.setdefault(label, None)
    return list(labels)


def thresholds_of(result: ImageResult, configured: Thresholds) -> Thresholds:
    """The thresholds the run recorded (journals from before they were recorded: the
    config's)."""
    if result.threshold is None:
        return configured
    return Thresholds.recorded(result.threshold, result.threshold_overrides)


def base_record(result: ImageResult, thresholds: Thresholds) -> dict:
    return {
        "study_instance_uid": result.study_uid, "series_instance_uid": result.series_uid,
        "sop_instance_uid": result.sop_uid, "view": result.view, "model": result.model,
        "weights_sha256": result.weights_sha256, "untrained": result.untrained,
        "generation": result.generation, "threshold": thresholds.default,
        # the findings called at a threshold of their own, as JSON ("" when there are none)
        "thresholds": thresholds.overrides_json() or "",
        "received_at": _iso(result.received_at), "classified_at": _iso(result.classified_at),
        "report_path": result.report_path or "", "file": result.file,
    }


def wide_records(results: Iterator[ImageResult], labels: list[str],
                 configured: Thresholds) -> Iterator[dict]:
    for result in results:
        thresholds = thresholds_of(result, configured)
        record = base_record(result, thresholds)
        for label in labels:
            score = result.scores.get(label)
            record[f"score_{label}"] = score
            record[f"positive_{label}"] = (None if score is None
                                           else thresholds.positive(label, score))
        yield record


def export(state_dir: Path, out: str, fmt: str, *, since: dt.date | None = None,
           model: str | None = None, configured: Thresholds = Thresholds()) -> int:
    """Write the export; returns the number of rows. configured: the thresholds of runs
    journaled before xrvd recorded them (the config's)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out == "-":
        raise ExportError("parquet cannot be written to stdout; give a file name")
    db = open_journal(state_dir)
    try:
        labels = labels_for([model] if model else models_with_results(db))
        start = dt.datetime.combine(since, dt.time()).timestamp() if since else 0.0
        results = iter_results(db, since=start, model=model)
        if out == "-":
            return _write_text(results, labels, fmt, sys.stdout, configured)
        target = Path(out)
        tmp = target.with_name(f".{target.name}.partial")
        try:
            if fmt == "parquet":
                count = _write_parquet(results, labels, tmp, configured)
            else:
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    count = _write_text(results, labels, fmt, f, configured)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return count
    finally:
        db.close()


def _write_text(results: Iterator[ImageResult], labels: list[str], fmt: str, f: io.TextIOBase,
                configured: Thresholds) -> int:
    count = 0
    if fmt == "csv":
        columns = [*BASE_COLUMNS, *(f"score_{label}" for label in labels),
                   *(f"positive_{label}" for label in labels)]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in wide_records(results, labels, configured):
            writer.writerow(record)
            count += 1
        return count
    for result in results:
        thresholds = thresholds_of(result, configured)
        record = base_record(result, thresholds)
        record["findings"] = {label: {"score": score, "threshold": thresholds.of(label),
                                      "positive": thresholds.positive(label, score)}
                              for label, score in sorted(result.scores.items(),
                                                         key=lambda kv: -kv[1])}
        f.write(json.dumps(record) + "\n")
        count += 1
    return count


def _write_parquet(results: Iterator[ImageResult], labels: list[str], path: Path,
                   configured: Thresholds) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError("Parquet export needs pyarrow: install xrvd with the 'parquet' "
                          "extra (uv sync --extra parquet, or pip install 'xrvd[parquet]'), "
                          "or export csv / jsonl") from exc
    fields = [pa.field(name, pa.string()) for name in BASE_COLUMNS]
    types = {"untrained": pa.bool_(), "generation": pa.int64(), "threshold": pa.float64(),
             "received_at": pa.timestamp("s", tz="UTC"),
             "classified_at": pa.timestamp("s", tz="UTC")}
    fields = [pa.field(f.name, types.get(f.name, pa.string())) for f in fields]
    fields += [pa.field(f"score_{label}", pa.float64()) for label in labels]
    fields += [pa.field(f"positive_{label}", pa.bool_()) for label in labels]
    schema = pa.schema(fields)
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict] = []
        for record in wide_records(results, labels, configured):
            for key in ("received_at", "classified_at"):
                record[key] = dt.datetime.fromisoformat(record[key])
            batch.append(record)
            if len(batch) >= PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or not count:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
