"""The worker's side of the journal: which studies have settled, their instances, their runs.

A study settles when no instance has arrived for study.settle_seconds and no association
that sent to it is still open; the associations still sending are held in memory only (after
a restart none is open).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from .records import InstanceRow, StudyClaim


class ClaimsMixin:
    # --- associations still sending ----------------------------------------------------

    def association_opened(self, key: str) -> None:
        with self._lock:
            self._open_associations[key] = set()

    def association_closed(self, key: str) -> None:
        with self._work:
            self._open_associations.pop(key, None)
            self._work.notify_all()

    def hold_study(self, key: str, study_uid: str) -> None:
        """Keep a study from settling while something still brings it instances that do not
        arrive on one association of ours (a C-MOVE: the PACS may open several); released
        with association_closed(key)."""
        with self._lock:
            self._open_associations.setdefault(key, set()).add(study_uid)

    def _note_association(self, key: str | None, study_uid: str) -> None:
        if key is not None:
            with self._lock:
                self._open_associations.setdefault(key, set()).add(study_uid)

    def open_studies(self) -> set[str]:
        with self._lock:
            return set().union(*self._open_associations.values())

    # --- worker ------------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> None:
        with self._work:
            self._work.wait(timeout)

    def wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def claim_ready_studies(self, settle_seconds: float, model: str, weights_sha256: str,
                            limit: int) -> list[StudyClaim]:
        """Studies with no new instance for settle_seconds and no sending association open,
        marked processing, each with its run (re-used if a crash interrupted it)."""
        now = time.time()
        busy = self.open_studies()
        claims: list[StudyClaim] = []
        with self._lock:  # cheap look first: the write lock only when there is work
            waiting = self._db.execute(
                "SELECT COUNT(*) FROM studies WHERE state = 'receiving' AND "
                "last_instance_at <= ? AND not_before <= ?",
                (now - settle_seconds, now)).fetchone()[0]
        if not waiting:
            return claims
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, study_uid, generation, attempts, last_instance_at FROM studies "
                "WHERE state = 'receiving' AND last_instance_at <= ? AND not_before <= ? "
                "ORDER BY last_instance_at", (now - settle_seconds, now)).fetchall()
            for study_id, study_uid, generation, attempts, last_instance_at in rows:
                if study_uid in busy:
                    continue
                run = db.execute(
                    "SELECT id, state FROM runs WHERE study_id = ? AND model = ? AND "
                    "weights_sha256 = ? AND generation = ?",
                    (study_id, model, weights_sha256, generation)).fetchone()
                if run is not None and run[1] == "done":
                    db.execute("UPDATE studies SET state = 'classified', updated_at = ? "
                               "WHERE id = ?", (now, study_id))
                    continue
                run_id = run[0] if run else db.execute(
                    "INSERT INTO runs(study_id, model, weights_sha256, generation, state, "
                    "started_at) VALUES (?, ?, ?, ?, 'started', ?)",
                    (study_id, model, weights_sha256, generation, now)).lastrowid
                db.execute("UPDATE studies SET state = 'processing', updated_at = ? "
                           "WHERE id = ?", (now, study_id))
                self._transition(db, "study", study_id, "processing")
                claims.append(StudyClaim(study_id, study_uid, generation, attempts, run_id,
                                         last_instance_at))
                if len(claims) >= limit:
                    break
        return claims

    def next_deadline(self, settle_seconds: float) -> float | None:
        """Seconds until the earliest receiving study could settle (None: nothing waiting).
        Studies an open association has sent to are left out: it wakes the worker when it
        closes, and until then their passed deadlines would have the worker poll in a loop."""
        busy = self.open_studies()
        with self._lock:
            for study_uid, deadline in self._db.execute(
                    "SELECT study_uid, MAX(last_instance_at + ?, not_before) AS deadline "
                    "FROM studies WHERE state = 'receiving' ORDER BY deadline",
                    (settle_seconds,)):
                if study_uid not in busy:
                    return max(0.0, deadline - time.time())
        return None

    def study_instances(self, study_id: int) -> list[InstanceRow]:
        """The study's current instances (not superseded, file not purged), with the verdict
        decided at ingest: selected None for rows an older xrvd journaled without one."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, sop_uid, path, state, reason, selected FROM instances "
                "WHERE study_id = ? AND state != 'superseded' AND purged_at IS NULL "
                "ORDER BY id", (study_id,)).fetchall()
        return [InstanceRow(i, sop, self.spool / path, state, reason,
                            None if selected is None else bool(selected))
                for i, sop, path, state, reason, selected in rows]

    def mark_instance(self, instance_id: int, state: str, reason: str | None = None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE instances SET state = ?, reason = ?, updated_at = ? "
                       "WHERE id = ?", (state, reason, time.time(), instance_id))
            self._transition(db, "instance", instance_id, state, reason)

    def finish_run(self, claim: StudyClaim, scores: dict[int, dict[str, float]],
                   result_path: Path | None, destinations: Iterable[str] = (), *,
                   threshold: float | None = None, thresholds: str | None = None,
                   untrained: bool | None = None) -> str:
        """Record scores and close the run in one transaction; returns the study's new state
        (receiving again if images arrived while it was processed). thresholds: the JSON of
        the findings called at a threshold of their own."""
        now = time.time()
        with self._transaction() as db:
            db.execute("DELETE FROM scores WHERE run_id = ?", (claim.run_id,))
            db.executemany(
                "INSERT INTO scores(run_id, instance_id, label, score) VALUES (?, ?, ?, ?)",
                [(claim.run_id, instance_id, label, score)
                 for instance_id, labels in scores.items() for label, score in labels.items()])
            db.executemany("UPDATE instances SET state = 'classified', updated_at = ? "
                           "WHERE id = ?", [(now, instance_id) for instance_id in scores])
            db.execute("UPDATE runs SET state = 'done', finished_at = ?, result_path = ?, "
                       "threshold = ?, thresholds = ?, untrained = ? WHERE id = ?",
                       (now, str(result_path) if result_path else None, threshold, thresholds,
                        untrained, claim.run_id))
            if result_path is not None:
                db.executemany(
                    "INSERT OR IGNORE INTO deliveries(run_id, destination, state, "
                    "next_attempt_at, created_at, updated_at) VALUES (?, ?, 'pending', ?, ?, ?)",
                    [(claim.run_id, name, now, now, now) for name in destinations])
            generation = db.execute("SELECT generation FROM studies WHERE id = ?",
                                    (claim.study_id,)).fetchone()[0]
            state = "classified" if generation == claim.generation else "receiving"
            db.execute("UPDATE studies SET state = ?, reason = NULL, updated_at = ? "
                       "WHERE id = ?", (state, now, claim.study_id))
            self._transition(db, "study", claim.study_id, state)
        return state

    def previous_result(self, claim: StudyClaim) -> str | None:
        """The result of the latest finished earlier run of this study by the same model."""
        with self._lock:
            row = self._db.execute(
                "SELECT r.result_path FROM runs r JOIN runs c ON c.id = ? "
                "WHERE r.study_id = c.study_id AND r.model = c.model AND r.state = 'done' "
                "AND r.generation < c.generation AND r.result_path IS NOT NULL "
                "ORDER BY r.generation DESC LIMIT 1", (claim.run_id,)).fetchone()
        return row[0] if row else None

    def fail_attempt(self, claim: StudyClaim, reason: str, max_attempts: int,
                     retry_after: float) -> str:
        """A study's processing failed: retry later, or mark it failed for good."""
        now = time.time()
        attempts = claim.attempts + 1
        state = "failed" if attempts >= max_attempts else "receiving"
        with self._transaction() as db:
            db.execute("UPDATE studies SET state = ?, attempts = ?, reason = ?, not_before = ?, "
                       "updated_at = ? WHERE id = ?",
                       (state, attempts, reason, now + retry_after, now, claim.study_id))
            self._transition(db, "study", claim.study_id, state, reason)
        return state
