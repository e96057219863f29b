"""Instances of an existing archive, journaled where they lie (`xrvd backfill`).

The archive is never modified: its files are recorded by absolute path, read in place by the
worker, and never deleted, moved or rewritten. `archive_files` remembers every file looked at
(with its size and mtime), so an interrupted back-fill re-run skips what it has already seen
without reading it again, and a file changed since is journaled as a new version.
`ArchiveJournal` reads that record without writing anything (`xrvd backfill --dry-run`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from .records import StoreError, StoreOutcome, open_read_only


@dataclass(frozen=True)
class ArchiveFile:
    path: Path
    stat: os.stat_result
    header: pydicom.Dataset | None  # None: not a DICOM instance (reason says why)
    reason: str | None = None
    outcome: str = "not_dicom"  # the reason code, when header is None


class ArchiveMixin:
    def archive_seen(self, path: Path, stat: os.stat_result) -> bool:
        """True when this exact file (same size and mtime) was journaled before."""
        with self._lock:
            row = self._db.execute("SELECT size, mtime_ns FROM archive_files WHERE path = ?",
                                   (str(path),)).fetchone()
        return row is not None and tuple(row) == (stat.st_size, stat.st_mtime_ns)

    def register_in_place(self, files: list[ArchiveFile],
                          source: str = "backfill") -> list[StoreOutcome | None]:
        """Journal a batch of archive files in one transaction (one fsync for all of them).
        Returns each file's outcome, None for files that are not DICOM instances."""
        outcomes: list[StoreOutcome | None] = []
        now = time.time()
        try:
            with self._transaction() as db:
                for item in files:
                    outcome = None
                    if item.header is not None:
                        ds = item.header
                        outcome = self._journal(
                            db, ds, str(ds.StudyInstanceUID).strip(),
                            str(ds.SOPInstanceUID).strip(), None, item.path, item.stat.st_size,
                            source, in_place=True)
                    db.execute(
                        "INSERT OR REPLACE INTO archive_files(path, size, mtime_ns, outcome, "
                        "instance_id, reason, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (str(item.path), item.stat.st_size, item.stat.st_mtime_ns,
                         outcome.status if outcome else item.outcome,
                         outcome.instance_id if outcome else None,
                         (outcome.skipped if outcome else item.reason), now))
                    outcomes.append(outcome)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record archive files in the journal: {exc}") from exc
        return outcomes


class ArchiveJournal:
    """What earlier back-fills journaled of an archive, read-only: opening it creates no
    journal. Empty when there is no journal yet, or none that has seen an archive."""

    def __init__(self, state_dir: Path):
        self._db = open_read_only(state_dir)
        if self._db is not None and not self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'archive_files'"
        ).fetchone():
            self._db.close()
            self._db = None

    def earlier_verdict(self, path: Path, stat: os.stat_result) -> tuple[str, str] | None:
        """(the instance's state, or the file's outcome when it has no instance; the
        instance's reason, or "journaled by an earlier run") for a file journaled before with
        this very size and mtime; None when it was not, or has changed since."""
        if self._db is None:
            return None
        row = self._db.execute(
            "SELECT a.size, a.mtime_ns, a.outcome, i.state, i.reason FROM archive_files a "
            "LEFT JOIN instances i ON i.id = a.instance_id WHERE a.path = ?",
            (str(path),)).fetchone()
        if row is None or (row[0], row[1]) != (stat.st_size, stat.st_mtime_ns):
            return None
        return row[3] or row[2], row[4] or "journaled by an earlier run"

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
