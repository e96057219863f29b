"""The spool and the journal (the store package is the only code that touches either).

An instance is acknowledged (C-STORE 0x0000, or moved out of the drop folder) only after its
file is fsync'd in the spool and its journal row is committed. The journal is SQLite in WAL
mode with synchronous=FULL; every state change is one transaction. Spool files are named by
random UUIDs, never by UIDs from the data.

States:
  study:    receiving -> processing -> classified   (back to receiving when images arrive late)
                                    -> failed       (after study.max_attempts)
  instance: stored -> classified | skipped(reason) | failed(reason);  superseded / duplicate
  run:      one per (study, model, weights, generation): started -> done
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from ..fsutil import fsync_path
from ..pipeline.select import never_classified, view_of
from .archive import ArchiveMixin
from .retention import RetentionMixin
from .records import (
    SCHEMA,
    InstanceRow,
    NotStorableError,
    StoreError,
    StoreOutcome,
    StudyClaim,
    content_digest,
    journal_path,
    migrate,
    read_header,
)


def transition_source(source: str) -> str:
    """What `transitions` (the journal's log-facing history) records of an instance's source:
    its kind only ("watch", "backfill", "recovered"), never a drop-folder file name or an
    archive path; a sender ("scp:AET@address") is not a patient identifier and stays.
    instances.source keeps the whole source: it is the journal's own record."""
    kind = source.split(":", 1)[0]
    if kind == "scp":
        return source
    return kind if re.fullmatch(r"[a-z_]+", kind) else "other"


class Store(ArchiveMixin, RetentionMixin):
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.spool = self.state_dir / "spool"
        self.incoming = self.spool / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(journal_path(self.state_dir), isolation_level=None,
                                   check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        migrate(self._db)
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._open_associations: dict[str, set[str]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- transactions ----------------------------------------------------------------

    def _transaction(self):
        store = self

        class _Tx:
            def __enter__(self_inner):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self_inner, kind, value, tb):
                try:
                    store._db.execute("COMMIT" if kind is None else "ROLLBACK")
                finally:
                    store._lock.release()
                return False

        return _Tx()

    def _transition(self, db, entity: str, entity_id: int, state: str,
                    reason: str | None = None) -> None:
        db.execute("INSERT INTO transitions(at, entity, entity_id, state, reason) "
                   "VALUES (?, ?, ?, ?, ?)", (time.time(), entity, entity_id, state, reason))

    # --- ingest ----------------------------------------------------------------------

    def store_file(self, source_path: Path, *, source: str, move: bool,
                   association: str | None = None) -> StoreOutcome:
        """Make an instance durable: copy or move it into the spool, fsync, journal it.

        Raises NotStorableError for files that are not DICOM instances, StoreError when the
        spool or journal cannot take it (nothing is left half written either way).
        """
        source_path = Path(source_path)
        ds = read_header(source_path)
        study_uid = str(ds.StudyInstanceUID).strip()
        sop_uid = str(ds.SOPInstanceUID).strip()
        name = uuid.uuid4().hex
        target = self.spool / name[:2] / f"{name}.dcm"
        try:
            digest = self._digest_if_seen(sop_uid, source_path)
            if digest is not None and self._is_duplicate(sop_uid, digest):
                self._note_association(association, study_uid)
                if move:
                    source_path.unlink(missing_ok=True)
                return StoreOutcome("duplicate", None, study_uid, sop_uid)
            target.parent.mkdir(exist_ok=True)
            if move and source_path.stat().st_dev == target.parent.stat().st_dev:
                fsync_path(source_path)
                os.rename(source_path, target)
            else:
                shutil.copyfile(source_path, target)
                fsync_path(target)
            fsync_path(target.parent)
            size = target.stat().st_size
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise StoreError(f"cannot write to the spool {self.spool}: {exc.strerror or exc}") \
                from exc
        try:
            outcome = self._journal_instance(ds, study_uid, sop_uid, digest, target, size,
                                             source)
        except sqlite3.Error as exc:
            if move:  # put the file back where it came from: it is not acknowledged
                try:
                    os.rename(target, source_path)
                except OSError:
                    target.unlink(missing_ok=True)
            else:
                target.unlink(missing_ok=True)
            raise StoreError(f"cannot record the instance in the journal: {exc}") from exc
        if move and source_path.exists() and outcome.status != "duplicate":
            source_path.unlink()  # copied across filesystems: the spool copy is durable now
        # No wake-up for the worker here: a new instance never makes a study ready at once
        # (it restarts the settle time), and waking a thread per instance slows receiving.
        self._note_association(association, study_uid)
        return outcome

    def _digest_if_seen(self, sop_uid: str, path: Path) -> str | None:
        """Content hashes cost ~1 ms per MB, so they are computed only when the SOP Instance
        UID is already known: a first copy needs none, a second is compared with it."""
        with self._lock:
            seen = self._db.execute("SELECT 1 FROM instances WHERE sop_uid = ? LIMIT 1",
                                    (sop_uid,)).fetchone()
        return content_digest(path) if seen else None

    def _latest_digest(self, db, sop_uid: str,
                       replacing: str | None = None) -> tuple[int, int, str] | None:
        """The latest version's id, version and content hash ("" when it cannot be known).
        replacing: the path being journaled now; when the latest version was read in place
        from that very path, the file has changed since and its old content is gone."""
        row = db.execute("SELECT id, version, content_sha256, path FROM instances "
                         "WHERE sop_uid = ? ORDER BY version DESC LIMIT 1", (sop_uid,)).fetchone()
        if row is None:
            return None
        instance_id, version, digest, path = row
        if digest is None and path == replacing:
            return instance_id, version, ""
        if digest is None:
            try:
                digest = content_digest(self.spool / path)
            except OSError:  # an archive file read in place has gone: nothing to compare
                return instance_id, version, ""
            db.execute("UPDATE instances SET content_sha256 = ? WHERE id = ?",
                       (digest, instance_id))
        return instance_id, version, digest

    def _is_duplicate(self, sop_uid: str, digest: str) -> bool:
        with self._transaction() as db:
            latest = self._latest_digest(db, sop_uid)
        return latest is not None and latest[2] == digest

    def _journal_instance(self, ds, study_uid, sop_uid, digest, target, size,
                          source) -> StoreOutcome:
        with self._transaction() as db:
            return self._journal(db, ds, study_uid, sop_uid, digest, target, size, source)

    def _journal(self, db, ds, study_uid: str, sop_uid: str, digest: str | None, target: Path,
                 size: int, source: str, *, in_place: bool = False) -> StoreOutcome:
        """Journal one instance inside the caller's transaction. in_place: the file stays where
        it is (an archive being back-filled) and is recorded by its absolute path."""
        now = time.time()
        # A copy of an instance already journaled changes nothing, not even its study: checked
        # first, so that it cannot reopen a classified study (a second report).
        stored_path = str(target.resolve() if in_place else target.relative_to(self.spool))
        previous = self._latest_digest(db, sop_uid, stored_path if in_place else None)
        if previous is not None and digest is None:
            digest = content_digest(target)  # raced with another copy, or read in place
        if previous is not None and previous[2] == digest:
            if not in_place:
                os.unlink(target)  # raced with an identical copy
            return StoreOutcome("duplicate", None, study_uid, sop_uid)
        study = db.execute("SELECT id, state FROM studies WHERE study_uid = ?",
                           (study_uid,)).fetchone()
        skip_reason = None
        if study is None:
            study_id = db.execute(
                "INSERT INTO studies(study_uid, state, last_instance_at, updated_at) "
                "VALUES (?, 'receiving', ?, ?)", (study_uid, now, now)).lastrowid
            self._transition(db, "study", study_id, "receiving")
        else:
            study_id, state = study
            skip_reason = never_classified(ds) if state != "receiving" else None
            if skip_reason is None and state in ("classified", "failed", "processing"):
                # Late images: the study is run again (a processing run finishes first).
                db.execute("UPDATE studies SET generation = generation + 1, attempts = 0, "
                           "state = CASE state WHEN 'processing' THEN 'processing' "
                           "ELSE 'receiving' END WHERE id = ?", (study_id,))
                self._transition(db, "study", study_id, "receiving", "new_instance")
            if skip_reason is None:
                db.execute("UPDATE studies SET last_instance_at = ?, updated_at = ? "
                           "WHERE id = ?", (now, now, study_id))
        version = 1 if previous is None else previous[1] + 1
        if previous is not None:
            db.execute("UPDATE instances SET state = 'superseded', updated_at = ? "
                       "WHERE id = ?", (now, previous[0]))
            self._transition(db, "instance", previous[0], "superseded", "new_version")
        instance_id = db.execute(
            "INSERT INTO instances(study_id, sop_uid, version, series_uid, sop_class_uid, "
            "content_sha256, path, size, source, state, reason, received_at, updated_at, "
            "view) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (study_id, sop_uid, version, str(ds.get("SeriesInstanceUID", "")),
             str(ds.get("SOPClassUID", "")), digest, stored_path, size, source,
             "skipped" if skip_reason else "stored", skip_reason, now, now,
             view_of(ds) or None)).lastrowid
        self._transition(db, "instance", instance_id, "stored", transition_source(source))
        if skip_reason:
            self._transition(db, "instance", instance_id, "skipped", skip_reason)
        return StoreOutcome("stored" if version == 1 else "new_version", instance_id,
                            study_uid, sop_uid, skip_reason)

    # --- associations still sending ----------------------------------------------------

    def association_opened(self, key: str) -> None:
        with self._lock:
            self._open_associations[key] = set()

    def association_closed(self, key: str) -> None:
        with self._work:
            self._open_associations.pop(key, None)
            self._work.notify_all()

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
        with self._lock:
            rows = self._db.execute(
                "SELECT id, sop_uid, path, state FROM instances WHERE study_id = ? AND "
                "state != 'superseded' AND purged_at IS NULL ORDER BY id",
                (study_id,)).fetchall()
        return [InstanceRow(i, sop, self.spool / path, state) for i, sop, path, state in rows]

    def mark_instance(self, instance_id: int, state: str, reason: str | None = None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE instances SET state = ?, reason = ?, updated_at = ? "
                       "WHERE id = ?", (state, reason, time.time(), instance_id))
            self._transition(db, "instance", instance_id, state, reason)

    def finish_run(self, claim: StudyClaim, scores: dict[int, dict[str, float]],
                   result_path: Path | None, destinations: Iterable[str] = (), *,
                   threshold: float | None = None, untrained: bool | None = None) -> str:
        """Record scores and close the run in one transaction; returns the study's new state
        (receiving again if images arrived while it was processed)."""
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
                       "threshold = ?, untrained = ? WHERE id = ?",
                       (now, str(result_path) if result_path else None, threshold, untrained,
                        claim.run_id))
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

    # --- start-up ------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """After a stop or crash: abandoned studies go back to the queue, received files that
        never reached the journal are journaled (they may have left the drop folder already),
        and temporary files are removed."""
        with self._transaction() as db:
            resumed = db.execute("UPDATE studies SET state = 'receiving' "
                                 "WHERE state = 'processing'").rowcount
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
        with self._lock:
            # Spool files only: archive files read in place (absolute paths, possibly
            # millions after a back-fill) can never be orphans in the spool.
            known = {row[0] for row in self._db.execute(
                "SELECT path FROM instances WHERE path NOT LIKE '/%'")}
        orphans = 0
        for path in self.spool.glob("??/*.dcm"):
            if str(path.relative_to(self.spool)) not in known:
                try:
                    self.store_file(path, source="recovered", move=True)
                    orphans += 1
                except (NotStorableError, StoreError):
                    path.unlink(missing_ok=True)
        return {"studies_resumed": resumed, "orphans_journaled": orphans}

    # --- delivery ----------------------------------------------------------------------

    def due_deliveries(self, destination: str, limit: int = 10) -> list[tuple[int, str, int, float]]:
        """(delivery id, report path, attempts, created_at) due now for one destination."""
        with self._lock:
            return self._db.execute(
                "SELECT d.id, r.result_path, d.attempts, d.created_at FROM deliveries d "
                "JOIN runs r ON r.id = d.run_id WHERE d.destination = ? AND "
                "d.state = 'pending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at "
                "LIMIT ?", (destination, time.time(), limit)).fetchall()

    def next_delivery_in(self, destination: str) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM deliveries WHERE destination = ? AND "
                "state = 'pending'", (destination,)).fetchone()
        return None if row[0] is None else max(0.0, row[0] - time.time())

    def delivery_done(self, delivery_id: int, state: str, error: str | None = None,
                      retry_in: float | None = None) -> None:
        """state 'sent' or 'failed'; or 'pending' again with retry_in seconds."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, "
                       "last_error = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                       (state, error, now + (retry_in or 0), now, delivery_id))
            self._transition(db, "delivery", delivery_id, state, error)

    def retry_failed(self) -> int:
        """Failed studies go back into the queue with fresh attempts (`xrvd retry`)."""
        now = time.time()
        with self._transaction() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM studies WHERE state = 'failed'")]
            db.execute("UPDATE studies SET state = 'receiving', attempts = 0, not_before = 0, "
                       "updated_at = ? WHERE state = 'failed'", (now,))
            for study_id in ids:
                self._transition(db, "study", study_id, "receiving", "retry")
            sends = db.execute("UPDATE deliveries SET state = 'pending', attempts = 0, "
                               "next_attempt_at = ?, created_at = ?, updated_at = ? "
                               "WHERE state = 'failed'", (now, now, now)).rowcount
        return len(ids) + sends

    # --- reading, for status and tests ---------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            studies = dict(self._db.execute(
                "SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall())
            instances = dict(self._db.execute(
                "SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall())
        return {"studies": studies, "instances": instances}

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()
