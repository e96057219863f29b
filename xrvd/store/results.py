"""Classification results read back from the journal (`xrvd export`), read-only and streamed."""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterator
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
