"""Ingest: an instance made durable in the spool and journaled, with its selection verdict.

The verdict (classify, or skip with a reason code) is decided here, once, from the header
that `read_header` parsed to journal the instance: the worker classifies what was journaled
'stored' and never parses a header to select it again.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

from ..fsutil import fsync_path
from ..pipeline.select import select, view_of
from .records import StoreError, StoreOutcome, content_digest, read_header


def transition_source(source: str) -> str:
    """What `transitions` (the journal's log-facing history) records of an instance's source:
    its kind only ("watch", "backfill", "recovered"), never a drop-folder file name or an
    archive path; a sender ("scp:AET@address") is not a patient identifier and stays.
    instances.source keeps the whole source: it is the journal's own record."""
    kind = source.split(":", 1)[0]
    if kind == "scp":
        return source
    return kind if re.fullmatch(r"[a-z_]+", kind) else "other"


class JournalMixin:
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
        selection = select(ds, self.rules)  # never raises: a crafted value is invalid_header
        skip_reason = None if selection.classify else selection.reason or "not_selected"
        study = db.execute("SELECT id, state FROM studies WHERE study_uid = ?",
                           (study_uid,)).fetchone()
        if study is None:
            study_id = db.execute(
                "INSERT INTO studies(study_uid, state, last_instance_at, updated_at) "
                "VALUES (?, 'receiving', ?, ?)", (study_uid, now, now)).lastrowid
            self._transition(db, "study", study_id, "receiving")
        else:
            study_id, state = study
            # Only an image that will be classified can change a study's result: a late
            # lateral, CT or report (our own, forwarded back by a PACS) must not run the study
            # again, or xrvd would report forever.
            reopen = skip_reason is None and state != "receiving"
            if reopen:
                # Late images: the study is run again (a processing run finishes first).
                db.execute("UPDATE studies SET generation = generation + 1, attempts = 0, "
                           "state = CASE state WHEN 'processing' THEN 'processing' "
                           "ELSE 'receiving' END WHERE id = ?", (study_id,))
                self._transition(db, "study", study_id, "receiving", "new_instance")
            if reopen or state == "receiving":  # still arriving: the settle time restarts
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
            "view, selected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
            (study_id, sop_uid, version, str(ds.get("SeriesInstanceUID", "")),
             str(ds.get("SOPClassUID", "")), digest, stored_path, size, source,
             "skipped" if skip_reason else "stored", skip_reason, now, now,
             self._view(ds) or None)).lastrowid
        self._transition(db, "instance", instance_id, "stored", transition_source(source))
        if skip_reason:
            self._transition(db, "instance", instance_id, "skipped", skip_reason)
        return StoreOutcome("stored" if version == 1 else "new_version", instance_id,
                            study_uid, sop_uid, skip_reason, selection.detail)

    @staticmethod
    def _view(ds) -> str:
        """The view the header names ('' for none), for the journal's record. A crafted
        ViewCodeSequence (select() said invalid_header) raises here again: the view is only a
        record, never worth leaving an instance half journaled."""
        try:
            return view_of(ds)
        except Exception:  # noqa: BLE001 - whatever a crafted value makes pydicom raise
            return ""
