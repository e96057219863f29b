"""The spool and the journal (the store package is the only code that touches either).

An instance is acknowledged (C-STORE 0x0000, or moved out of the drop folder) only after its
file is fsync'd in the spool and its journal row is committed. The journal is SQLite in WAL
mode with synchronous=FULL; every state change is one transaction. Spool files are named by
random UUIDs, never by UIDs from the data.

States:
  study:    receiving -> processing -> classified   (back to receiving when images arrive late)
                                    -> failed       (after study.max_attempts)
  instance: stored -> classified | failed(reason);  skipped(reason) when not selected at
            ingest (or, for rows an older xrvd journaled, by the worker);  superseded / duplicate
  run:      one per (study, model, weights, generation): started -> done

Store is composed of one mixin per concern: journal.py (ingest), claims.py (the worker's
studies and runs), deliveries.py, archive.py (back-fill in place), retention.py, sources.py (PACS
back-fill).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from ..pipeline.select import SelectRules
from .archive import ArchiveMixin
from .claims import ClaimsMixin
from .deliveries import DeliveriesMixin
from .journal import JournalMixin, transition_source
from .records import SCHEMA, NotStorableError, StoreError, journal_path, migrate
from .retention import RetentionMixin
from .sources import SourcesMixin

__all__ = ["Store", "transition_source"]


class Store(JournalMixin, ClaimsMixin, DeliveriesMixin, ArchiveMixin, RetentionMixin,
            SourcesMixin):
    def __init__(self, state_dir: Path, rules: SelectRules | None = None):
        self.state_dir = Path(state_dir)
        # Decides each instance's verdict as it is journaled; the runtime assigns the new
        # rules on a config reload (instances journaled before keep their verdict).
        self.rules = rules if rules is not None else SelectRules()
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

    # --- counts ----------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Studies and instances by state."""
        with self._lock:
            studies = dict(self._db.execute(
                "SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall())
            instances = dict(self._db.execute(
                "SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall())
        return {"studies": studies, "instances": instances}

    def count_instances(self, state: str) -> int:
        """Instances in one state ('stored': journaled, waiting to be classified)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM instances WHERE state = ?",
                                    (state,)).fetchone()[0]

    def unfinished_studies(self) -> int:
        """Studies still to be classified: receiving, or processing when a run stopped."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM studies WHERE state IN "
                                    "('receiving', 'processing')").fetchone()[0]
