"""A PACS back-fill's own record (`xrvd backfill --source`): which days of a source were
queried, and what became of every study found there. The instances a retrieval brings in are
journaled like any received instance (journal.py); this record is what lets a rerun, or the
run after a kill -9, go on where it stopped without asking the PACS for a study twice."""

from __future__ import annotations

import time
from collections.abc import Iterable


class SourcesMixin:
    def source_day_queried(self, source: str, day: str, modalities: str) -> bool:
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM source_days WHERE source = ? AND day = ? AND modalities = ?",
                (source, day, modalities)).fetchone() is not None

    def record_source_day(self, source: str, day: str, modalities: str,
                          study_uids: Iterable[str], windows: int) -> int:
        """The studies one day's queries found, and the day as queried, in one transaction
        (a day interrupted half-way is queried again). Returns how many studies are new."""
        now = time.time()
        new = 0
        with self._transaction() as db:
            for study_uid in study_uids:
                new += db.execute(
                    "INSERT OR IGNORE INTO source_studies(source, study_uid, day, state, "
                    "updated_at) VALUES (?, ?, ?, 'found', ?)",
                    (source, study_uid, day, now)).rowcount
            db.execute(
                "INSERT OR REPLACE INTO source_days(source, day, modalities, studies, windows, "
                "queried_at) VALUES (?, ?, ?, (SELECT COUNT(*) FROM source_studies WHERE "
                "source = ? AND day = ?), ?, ?)",
                (source, day, modalities, source, day, windows, now))
        return new

    def source_studies_due(self, source: str, first_day: str, last_day: str,
                           limit: int | None = None) -> list[tuple[str, str]]:
        """(study UID, day) of the studies still to retrieve, oldest day first; those waiting
        for a retry come once their back-off has passed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid, day FROM source_studies WHERE source = ? AND state = 'found' "
                "AND day BETWEEN ? AND ? AND not_before <= ? ORDER BY day, study_uid "
                "LIMIT ?", (source, first_day, last_day, time.time(),
                            -1 if limit is None else limit)).fetchall()
        return [(uid, day) for uid, day in rows]

    def source_next_retry_in(self, source: str, first_day: str, last_day: str) -> float | None:
        """Seconds until the next study waiting for a retry is due; None when none waits."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(not_before) FROM source_studies WHERE source = ? AND "
                "state = 'found' AND day BETWEEN ? AND ?", (source, first_day, last_day)
            ).fetchone()
        return None if row[0] is None else max(0.0, row[0] - time.time())

    def source_study_finished(self, source: str, study_uid: str, state: str, *,
                              reason: str | None = None, series: Iterable[str] = (),
                              instances: int = 0, size: int = 0) -> None:
        """state: retrieved, not_retrieved (reason: no_series, already_reported) or failed."""
        with self._transaction() as db:
            db.execute(
                "UPDATE source_studies SET state = ?, reason = ?, series = ?, instances = ?, "
                "bytes = ?, updated_at = ? WHERE source = ? AND study_uid = ?",
                (state, reason, "\\".join(series) or None, instances, size, time.time(),
                 source, study_uid))

    def source_study_retry(self, source: str, study_uid: str, reason: str,
                           max_attempts: int, delay: float) -> int:
        """Count a failed attempt: the study waits `delay` seconds, or is failed once it has
        had max_attempts. Returns the attempts so far."""
        now = time.time()
        with self._transaction() as db:
            attempts = db.execute(
                "UPDATE source_studies SET attempts = attempts + 1, reason = ?, not_before = ?, "
                "updated_at = ? WHERE source = ? AND study_uid = ? RETURNING attempts",
                (reason, now + delay, now, source, study_uid)).fetchone()[0]
            if attempts >= max_attempts:
                db.execute("UPDATE source_studies SET state = 'failed' WHERE source = ? AND "
                           "study_uid = ?", (source, study_uid))
        return attempts

    def study_reported(self, study_uid: str, model: str, weights_sha256: str) -> bool:
        """Whether this study already has a report from this model and these weights."""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM runs JOIN studies ON studies.id = runs.study_id WHERE "
                "studies.study_uid = ? AND runs.model = ? AND runs.weights_sha256 = ? AND "
                "runs.state = 'done'", (study_uid, model, weights_sha256)).fetchone() is not None

    def source_tally(self, source: str) -> dict[str, int]:
        """Studies by state (and not_retrieved by reason), instances and bytes retrieved,
        days queried."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, reason, COUNT(*), SUM(instances), SUM(bytes) FROM "
                "source_studies WHERE source = ? GROUP BY state, reason", (source,)).fetchall()
            days = self._db.execute("SELECT COUNT(*) FROM source_days WHERE source = ?",
                                    (source,)).fetchone()[0]
        tally = {"days_queried": days, "instances_retrieved": 0, "bytes_retrieved": 0}
        for state, reason, count, instances, size in rows:
            key = f"{state}:{reason}" if state == "not_retrieved" else state
            tally[key] = tally.get(key, 0) + count
            tally["instances_retrieved"] += instances or 0
            tally["bytes_retrieved"] += size or 0
        return tally
