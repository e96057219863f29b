"""The journal's schema and the records the store hands out."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pydicom

from ..errors import XrvdError, malformed_header_detail

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    last_instance_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    sop_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    series_uid TEXT,
    sop_class_uid TEXT,
    content_sha256 TEXT,  -- computed only when a second copy of the SOP UID arrives
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (sop_uid, version)
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_id, state);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    model TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    result_path TEXT,
    started_at REAL NOT NULL,
    finished_at REAL,
    UNIQUE (study_id, model, weights_sha256, generation)
);
CREATE TABLE IF NOT EXISTS scores (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    instance_id INTEGER NOT NULL REFERENCES instances(id),
    label TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (run_id, instance_id, label)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (run_id, destination)
);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    entity TEXT NOT NULL,
    entity_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT
);
-- Files of an existing archive seen by `xrvd backfill` (read in place, never copied): a rerun
-- skips what it has seen unless the file changed since.
CREATE TABLE IF NOT EXISTS archive_files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    outcome TEXT NOT NULL,  -- stored | duplicate | new_version | not_dicom | invalid_header
    instance_id INTEGER REFERENCES instances(id),
    reason TEXT,
    seen_at REAL NOT NULL
);
-- A PACS back-fill (`xrvd backfill --source`): the days it has queried, and every study it
-- found there with what became of it, so that a rerun or a kill -9 goes on where it stopped
-- and never retrieves a study twice.
CREATE TABLE IF NOT EXISTS source_days (
    source TEXT NOT NULL,
    day TEXT NOT NULL,  -- YYYYMMDD
    modalities TEXT NOT NULL,  -- what the query asked for, e.g. CR,DX
    studies INTEGER NOT NULL,
    windows INTEGER NOT NULL,  -- queries it took (a window is split at the result cap)
    queried_at REAL NOT NULL,
    PRIMARY KEY (source, day, modalities)
);
CREATE TABLE IF NOT EXISTS source_studies (
    source TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    day TEXT NOT NULL,
    state TEXT NOT NULL,  -- found | retrieved | not_retrieved | failed
    reason TEXT,  -- not_retrieved: no_series | already_reported; failed: the last error
    series TEXT,  -- the series retrieved, backslash-separated
    instances INTEGER NOT NULL DEFAULT 0,  -- instances the PACS sent
    bytes INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, study_uid)
);
"""

# Columns added after the first release: (table, column, declaration). Journals written by an
# older xrvd gain them at open; rows from before hold NULL.
ADDED_COLUMNS = (
    ("instances", "view", "TEXT"),
    ("runs", "threshold", "REAL"),
    # JSON {finding: threshold} of model.thresholds, for the findings this model reports.
    ("runs", "thresholds", "TEXT"),
    ("runs", "untrained", "INTEGER"),
    ("instances", "purged_at", "REAL"),  # when retention deleted its spool file
    # 1: the verdict (state 'stored' or 'skipped', with its reason) was decided at ingest.
    # NULL: journaled by an older xrvd, whose 'stored' says nothing about selection.
    ("instances", "selected", "INTEGER"),
)


def migrate(db) -> None:
    for table, column, declaration in ADDED_COLUMNS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    # Retention looks only at the spool files it has not deleted yet.
    db.execute("CREATE INDEX IF NOT EXISTS instances_in_spool ON instances(study_id) "
               "WHERE purged_at IS NULL AND path NOT LIKE '/%'")


JOURNAL = "journal.sqlite3"


def journal_path(state_dir: Path) -> Path:
    return Path(state_dir) / JOURNAL


def open_read_only(state_dir: Path, timeout: float = 10) -> sqlite3.Connection | None:
    """The journal for reading while xrvd may be writing it; None when there is none yet."""
    path = journal_path(state_dir)
    if not path.exists():
        return None
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)


class StoreError(XrvdError):
    """The instance could not be made durable (disk full, journal error): refuse it."""

    reason = "store_failed"


class NotStorableError(XrvdError):
    """The file is not a DICOM instance the journal can hold: not DICOM, no UIDs (reason
    not_dicom), or a DICOM header pydicom cannot parse (invalid_header)."""

    reason = "not_dicom"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


@dataclass(frozen=True)
class StoreOutcome:
    status: str  # stored | duplicate | new_version
    instance_id: int | None
    study_uid: str
    sop_uid: str
    skipped: str | None = None  # reason, when journaled as skipped (not selected)
    skip_detail: str = ""  # what a person reads about that reason


@dataclass(frozen=True)
class InstanceRow:
    id: int
    sop_uid: str
    path: Path
    state: str
    reason: str | None = None
    # True: the verdict (state 'stored' or 'skipped') was decided at ingest; None: journaled
    # by an older xrvd, whose 'stored' instance the worker must still select.
    selected: bool | None = None


@dataclass(frozen=True)
class StudyClaim:
    study_id: int
    study_uid: str
    generation: int
    attempts: int
    run_id: int
    last_instance_at: float


def read_header(path: Path) -> pydicom.Dataset:
    """The header without pixel data; raises NotStorableError, with the reason, for any file
    that is not a DICOM instance, whatever it makes pydicom raise."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        uids = {keyword: str(ds.get(keyword, "") or "").strip()
                for keyword in ("StudyInstanceUID", "SOPInstanceUID")}
    except MemoryError:
        raise  # the machine's fault, not the file's
    except OSError as exc:
        raise NotStorableError(f"not a readable DICOM file: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a crafted header raises anything (RecursionError)
        if _is_dicom(path, exc):
            raise NotStorableError(malformed_header_detail(exc), "invalid_header") from exc
        raise NotStorableError(f"not a readable DICOM file: {exc}") from exc
    for keyword, value in uids.items():
        if not value or len(value) > 64:
            raise NotStorableError(f"not a DICOM instance: no valid {keyword}")
    return ds


def _is_dicom(path: Path, exc: Exception) -> bool:
    """A file pydicom failed on is DICOM with a malformed header, not some other file, when it
    has the DICOM marker, or when pydicom got as far as nesting sequences in it."""
    if isinstance(exc, RecursionError):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def content_digest(path: Path) -> str:
    """SHA-256 of the file after its meta header, so the same instance sent by two senders
    (whose meta headers differ) is recognised as the same content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        start = 0
        head = f.read(144)
        if len(head) >= 144 and head[128:132] == b"DICM" and head[132:136] == b"\x02\x00\x00\x00":
            start = 144 + int.from_bytes(head[140:144], "little")
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
