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

FORMATS = ("csv", "jsonl", "parquet")
BASE_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "view",
                "model", "weights_sha256", "untrained", "generation", "threshold",
                "received_at", "classified_at", "report_path", "file")
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


def threshold_of(result: ImageResult, default: float) -> float:
    """The threshold the run recorded (journals from before it was recorded: the config's)."""
    return result.threshold if result.threshold is not None else default


def base_record(result: ImageResult, threshold: float) -> dict:
    return {
        "study_instance_uid": result.study_uid, "series_instance_uid": result.series_uid,
        "sop_instance_uid": result.sop_uid, "view": result.view, "model": result.model,
        "weights_sha256": result.weights_sha256, "untrained": result.untrained,
        "generation": result.generation, "threshold": threshold,
        "received_at": _iso(result.received_at), "classified_at": _iso(result.classified_at),
        "report_path": result.report_path or "", "file": result.file,
    }


def wide_records(results: Iterator[ImageResult], labels: list[str],
                 default_threshold: float) -> Iterator[dict]:
    for result in results:
        threshold = threshold_of(result, default_threshold)
        record = base_record(result, threshold)
        for label in labels:
            score = result.scores.get(label)
            record[f"score_{label}"] = score
            record[f"positive_{label}"] = None if score is None else score >= threshold
        yield record


def export(state_dir: Path, out: str, fmt: str, *, since: dt.date | None = None,
           model: str | None = None, default_threshold: float = 0.5) -> int:
    """Write the export; returns the number of rows."""
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
            return _write_text(results, labels, fmt, sys.stdout, default_threshold)
        target = Path(out)
        tmp = target.with_name(f".{target.name}.partial")
        try:
            if fmt == "parquet":
                count = _write_parquet(results, labels, tmp, default_threshold)
            else:
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    count = _write_text(results, labels, fmt, f, default_threshold)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return count
    finally:
        db.close()


def _write_text(results: Iterator[ImageResult], labels: list[str], fmt: str, f: io.TextIOBase,
                default_threshold: float) -> int:
    count = 0
    if fmt == "csv":
        columns = [*BASE_COLUMNS, *(f"score_{label}" for label in labels),
                   *(f"positive_{label}" for label in labels)]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in wide_records(results, labels, default_threshold):
            writer.writerow(record)
            count += 1
        return count
    for result in results:
        threshold = threshold_of(result, default_threshold)
        record = base_record(result, threshold)
        record["findings"] = {label: {"score": score, "positive": score >= threshold}
                              for label, score in sorted(result.scores.items(),
                                                         key=lambda kv: -kv[1])}
        f.write(json.dumps(record) + "\n")
        count += 1
    return count


def _write_parquet(results: Iterator[ImageResult], labels: list[str], path: Path,
                   default_threshold: float) -> int:
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
        for record in wide_records(results, labels, default_threshold):
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
