"""The store's guarantees."""

from __future__ import annotations

import errno
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

from xrvd.config import WatchConfig
from xrvd.ingest.watch import DropFolderWatcher
from xrvd.pipeline.select import SelectRules, select
from xrvd.store import NotStorableError, Store, StoreError

from .conftest import NIH_SC, REJECT, RSNA_JPEG, TINY_CR, WG04_CR
from .harness import copy_with_new_uids


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "state")
    yield store
    store.close()


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


def test_watcher_survives_a_failing_callback(store, tmp_path, monkeypatch):
    drop = tmp_path / "drop"
    watcher = DropFolderWatcher(WatchConfig(enabled=True, folder=drop, stable_seconds=0.2,
                                            poll_seconds=0.1), store)
    calls = []

    def explode(path):
        calls.append(path)
        raise RuntimeError("bug in a callback")

    monkeypatch.setattr(watcher, "mark_closed", explode)
    watcher.start()
    try:
        copy_with_new_uids(NIH_SC, drop / "a.dcm")
        deadline = time.monotonic() + 30
        while store.counts()["instances"] != {"stored": 1}:  # the store signals each arrival
            assert time.monotonic() < deadline, "file never ingested"
            store.wait_for_work(0.1)
        assert calls and watcher._observer_healthy()
    finally:
        watcher.stop()


@pytest.mark.parametrize("path, changes, reason", [
    (WG04_CR, {}, None),
    (NIH_SC, {}, None),  # Secondary Capture, Modality DX, no body part or view
    (RSNA_JPEG, {}, None),
    (WG04_CR, {"ViewPosition": "LL"}, "lateral_view"),
    (WG04_CR, {"BodyPartExamined": "HAND"}, "body_part"),
    (TINY_CR, {}, "too_small"),
    (REJECT / "CT_small.dcm", {}, "modality"),
    (REJECT / "highdicom_sr_document.dcm", {}, "not_an_image"),
    (REJECT / "SC_rgb.dcm", {"Modality": "DX"}, "not_greyscale"),
    (NIH_SC, {"NumberOfFrames": 3}, "multi_frame"),
    (WG04_CR, {"Manufacturer": "xrvd"}, "own_output"),
])
def test_selection(path, changes, reason):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    choice = select(ds)
    assert choice.reason == reason
    assert choice.classify == (reason is None)


def test_selection_rules_are_configurable():
    ds = pydicom.dcmread(NIH_SC, stop_before_pixels=True)
    assert select(ds, SelectRules(classify_missing_view=False)).reason == "view_missing"
    assert select(ds, SelectRules(classify_missing_body_part=False)).reason == \
        "body_part_missing"


def test_archive_copy_of_a_reported_instance_does_not_reopen_its_study(store, tmp_path):
    """The same instance found again in the archive (a copy at another path) is a duplicate:
    its classified study keeps its state and generation, so no second report is written."""
    import os

    from xrvd.store.archive import ArchiveFile
    from xrvd.store.records import read_header

    first = tmp_path / "archive" / "a" / "nih.dcm"
    copy_with_new_uids(NIH_SC, first)
    [outcome] = store.register_in_place([ArchiveFile(first, os.stat(first), read_header(first))])
    assert outcome.status == "stored"
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    store.finish_run(claim, {outcome.instance_id: {"Pneumonia": 0.1}}, None)
    before = store.query("SELECT state, generation FROM studies")

    copy = tmp_path / "archive" / "b" / "nih-copy.dcm"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    [again] = store.register_in_place([ArchiveFile(copy, os.stat(copy), read_header(copy))])
    assert again.status == "duplicate"
    assert store.query("SELECT state, generation FROM studies") == before == [("classified", 0)]
    assert store.claim_ready_studies(0, "m", "w", 10) == []


def test_archive_file_changed_in_place_is_a_new_version(store, tmp_path):
    """A back-filled file rewritten with other pixels (same SOP Instance UID) is journaled as
    version 2 and reopens its study: its old content cannot be compared any more."""
    import os

    import numpy as np

    from xrvd.store.archive import ArchiveFile
    from xrvd.store.records import read_header

    path = tmp_path / "archive" / "nih.dcm"
    copy_with_new_uids(NIH_SC, path)
    [first] = store.register_in_place([ArchiveFile(path, os.stat(path), read_header(path))])
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    store.finish_run(claim, {first.instance_id: {"Pneumonia": 0.1}}, None)

    ds = pydicom.dcmread(path)
    ds.PixelData = (255 - ds.pixel_array).astype(np.uint8).tobytes()
    ds.save_as(path)
    [changed] = store.register_in_place([ArchiveFile(path, os.stat(path), read_header(path))])
    assert changed.status == "new_version" and changed.instance_id != first.instance_id
    assert store.query("SELECT version, state FROM instances ORDER BY version") == [
        (1, "superseded"), (2, "stored")]
    assert store.query("SELECT state, generation FROM studies") == [("receiving", 1)]


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
