"""Classification results read back from the journal (`xrvd export`), read-only and streamed."""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .records import StoreError, journal_path, open_read_only


@dataclass(frozen=True)
class ImageResult:
    study_uid: str
    series_uid: str
    sop_uid: str
    view: str
    model: str
    weights_sha256: str
    untrained: bool | None
    generation: int
    threshold: float | None
    received_at: float
    classified_at: float
    report_path: str | None
    file: str
    scores: dict[str, float]
    # Findings the run called at a threshold of their own (model.thresholds), else `threshold`.
    threshold_overrides: dict[str, float] = field(default_factory=dict)


# The current result of every (study, model, weights): the latest finished generation.
_RESULTS = """
SELECT st.study_uid, i.series_uid, i.sop_uid, i.view, r.model, r.weights_sha256, r.untrained,
       r.generation, r.threshold, i.received_at, r.finished_at, r.result_path, i.path,
       r.id, i.id, s.label, s.score, r.thresholds
FROM runs r
JOIN studies st ON st.id = r.study_id
JOIN scores s ON s.run_id = r.id
JOIN instances i ON i.id = s.instance_id
WHERE r.state = 'done' AND r.finished_at >= ? {model_filter}
  AND r.generation = (SELECT MAX(r2.generation) FROM runs r2 WHERE r2.study_id = r.study_id
                      AND r2.model = r.model AND r2.weights_sha256 = r.weights_sha256
                      AND r2.state = 'done')
ORDER BY r.finished_at, r.id, i.id
"""


def open_journal(state_dir: Path) -> sqlite3.Connection:
    db = open_read_only(state_dir, timeout=30)
    if db is None:
        raise StoreError(f"no journal at {journal_path(state_dir)}: nothing has been "
                         "classified with this state_dir (run xrvd serve or xrvd backfill "
                         "first)")
    return db


def models_with_results(db: sqlite3.Connection) -> list[str]:
    return [row[0] for row in db.execute(
        "SELECT DISTINCT model FROM runs WHERE state = 'done' ORDER BY model")]


def iter_results(db: sqlite3.Connection, *, since: float = 0.0,
                 model: str | None = None) -> Iterator[ImageResult]:
    """One ImageResult per classified image, oldest classification first."""
    sql = _RESULTS.format(model_filter="AND r.model = ?" if model else "")
    params = (since, model) if model else (since,)
    rows = db.execute(sql, params)
    for _, group in itertools.groupby(rows, key=lambda row: (row[13], row[14])):
        group = list(group)
        first = group[0]
        yield ImageResult(
            study_uid=first[0], series_uid=first[1] or "", sop_uid=first[2],
            view=first[3] or "", model=first[4], weights_sha256=first[5],
            untrained=None if first[6] is None else bool(first[6]), generation=first[7],
            threshold=first[8], received_at=first[9], classified_at=first[10],
            report_path=first[11], file=first[12],
            scores={row[15]: row[16] for row in group},
            threshold_overrides=json.loads(first[17]) if first[17] else {})


@dataclass(frozen=True)
class JournalScores:
    """One image's scores as the journal holds them for one model and weights."""

    sop_uid: str
    file: str  # as journaled: absolute for a file back-filled in place, else in the spool
    scores: dict[str, float]
    classified_at: float
    # The file as a back-fill last saw it (matches by path only): a file changed since then
    # holds other pixels than were scored.
    size: int | None = None
    mtime_ns: int | None = None


# The current version of each instance (a newer one supersedes it), with the scores of the
# latest finished run of this model and weights that scored it. Driven from the instances so
# that runs (by study, model, weights) and scores (by run, instance) are found by their keys.
_SCORED = """
SELECT i.id, i.sop_uid, i.path, r.id, r.finished_at, s.label, s.score {extra}
FROM {source}
JOIN runs r ON r.study_id = i.study_id AND r.model = ? AND r.weights_sha256 = ?
JOIN scores s ON s.run_id = r.id AND s.instance_id = i.id
WHERE {key} IN ({marks}) AND i.state != 'superseded' AND r.state = 'done'
ORDER BY i.id, r.generation DESC, r.id DESC
"""
_CHUNK = 500  # keys per query: below SQLite's oldest limit on bound parameters (999)


def scores_for_images(db: sqlite3.Connection, model: str, weights_sha256: str, *,
                      sop_uids: Iterable[str] = (),
                      paths: Iterable[str] = ()) -> tuple[dict[str, JournalScores],
                                                          dict[str, JournalScores]]:
    """The journal's scores of these images by this model and these very weights (`xrvd
    evaluate --from-journal`): (by SOP Instance UID, by path). Paths are absolute and
    resolved, as a back-fill journals the files it reads in place (drop-folder and C-STORE
    instances are known by their UID only). An image no run of these weights has scored is
    absent."""
    by_uid: dict[str, JournalScores] = {}
    by_path: dict[str, JournalScores] = {}
    plain = dict(source="instances i", key="i.sop_uid", extra="")
    archived = dict(source="archive_files a JOIN instances i ON i.id = a.instance_id",
                    key="a.path", extra=", a.path, a.size, a.mtime_ns")
    backfilled = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                            "name = 'archive_files'").fetchone() is not None
    for keys, shape, found in ((sop_uids, plain, by_uid),
                               (paths if backfilled else (), archived, by_path)):
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            sql = _SCORED.format(marks=",".join("?" * len(chunk)), **shape)
            try:
                rows = db.execute(sql, (model, weights_sha256, *chunk)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read scores from the journal: {exc}") from exc
            for _, group in itertools.groupby(rows, key=lambda row: row[0]):
                group = list(group)
                first = group[0]
                # Only the latest run's scores: the order puts it first in each instance.
                latest = [row for row in group if row[3] == first[3]]
                archive = first[7:] if len(first) > 7 else (None, None, None)
                record = JournalScores(
                    sop_uid=first[1], file=first[2], classified_at=first[4],
                    scores={row[5]: row[6] for row in latest},
                    size=archive[1], mtime_ns=archive[2])
                found[archive[0] or first[1]] = record
    return by_uid, by_path
