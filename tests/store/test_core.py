"""The store's guarantees: an instance is in the spool and the journal, or in neither; a study
waits for its open associations and its settle time; a crash resumes the same run; orphans and
half-received files are dealt with at start-up."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from xrvd.store import NotStorableError, Store, StoreError

from ..harness import NIH_SC, copy_with_new_uids


def spool_files(store: Store) -> list[Path]:
    return sorted(store.spool.glob("??/*.dcm"))


def test_store_copies_fsyncs_and_journals(store, tmp_path):
    outcome = store.store_file(NIH_SC, source="test", move=False)
    assert outcome.status == "stored"
    [path] = spool_files(store)
    assert path.read_bytes() == NIH_SC.read_bytes()
    assert "1.3" not in path.name  # spool names never come from UIDs
    assert store.counts() == {"studies": {"receiving": 1}, "instances": {"stored": 1}}


def test_journal_failure_leaves_nothing_half_written(store, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_journal_instance", broken)
    dropped = tmp_path / "dropped.dcm"
    copy_with_new_uids(NIH_SC, dropped)
    before = dropped.read_bytes()
    with pytest.raises(StoreError, match="journal"):
        store.store_file(dropped, source="watch:dropped.dcm", move=True)
    assert spool_files(store) == []
    assert dropped.read_bytes() == before  # still in the drop folder, not acknowledged


def test_disk_full_leaves_nothing_half_written(store, tmp_path, monkeypatch):
    import shutil as shutil_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil_module, "copyfile", full)
    with pytest.raises(StoreError, match="No space left"):
        store.store_file(NIH_SC, source="test", move=False)
    assert spool_files(store) == []
    assert store.counts()["instances"] == {}


def test_not_dicom_is_not_storable(store, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00" * 300)
    with pytest.raises(NotStorableError):
        store.store_file(garbage, source="test", move=True)
    assert garbage.exists()


def test_study_waits_for_open_association_and_settle_time(store):
    store.association_opened("a")
    outcome = store.store_file(NIH_SC, source="test", move=False, association="a")
    assert store.claim_ready_studies(0, "m", "w", 10) == []  # sender still connected
    # Nothing to wake up for until the association closes (it wakes the worker): a deadline
    # already passed would have the worker poll the journal in a loop meanwhile.
    assert store.next_deadline(0) is None
    store.association_closed("a")
    assert store.next_deadline(0) == 0
    assert 3599 < store.next_deadline(3600) <= 3600
    assert store.claim_ready_studies(3600, "m", "w", 10) == []  # not settled yet
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    assert claim.study_uid == outcome.study_uid


def test_crash_while_processing_resumes_the_same_run(tmp_path):
    store = Store(tmp_path / "state")
    store.store_file(NIH_SC, source="test", move=False)
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    store.close()  # as if killed while processing
    store = Store(tmp_path / "state")
    assert store.recover()["studies_resumed"] == 1
    [again] = store.claim_ready_studies(0, "m", "w", 10)
    assert again.run_id == claim.run_id
    store.finish_run(again, {}, None)
    assert store.claim_ready_studies(0, "m", "w", 10) == []
    store.close()


def test_orphan_spool_file_is_journaled_at_recovery(tmp_path):
    """Moved out of the drop folder but killed before the journal commit: not lost."""
    store = Store(tmp_path / "state")
    orphan = store.spool / "ab" / "abcdef.dcm"
    orphan.parent.mkdir()
    orphan.write_bytes(NIH_SC.read_bytes())
    assert store.recover()["orphans_journaled"] == 1
    assert store.counts()["instances"] == {"stored": 1}
    store.close()


def test_start_up_removes_stale_incoming_files(tmp_path):
    """A data set half received when the process died is never acknowledged: the next start
    removes its file instead of keeping it forever."""
    store = Store(tmp_path / "state")
    (store.incoming / "rx-partial.dcm").write_bytes(b"\0" * 1000)
    store.close()
    store = Store(tmp_path / "state")
    try:
        store.recover()
        assert list(store.incoming.iterdir()) == []
    finally:
        store.close()
