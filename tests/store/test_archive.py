"""Archive files registered in place (back-fill): the same instance found again is a
duplicate and does not reopen its study; a file changed in place is a new version that does."""

from __future__ import annotations

import os

import numpy as np
import pydicom

from xrvd.store.archive import ArchiveFile
from xrvd.store.records import read_header

from ..harness import NIH_SC, copy_with_new_uids, journal_rows


def test_archive_copy_of_a_reported_instance_does_not_reopen_its_study(store, tmp_path):
    """The same instance found again in the archive (a copy at another path) is a duplicate:
    its classified study keeps its state and generation, so no second report is written."""
    first = tmp_path / "archive" / "a" / "nih.dcm"
    copy_with_new_uids(NIH_SC, first)
    [outcome] = store.register_in_place([ArchiveFile(first, os.stat(first), read_header(first))])
    assert outcome.status == "stored"
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    store.finish_run(claim, {outcome.instance_id: {"Pneumonia": 0.1}}, None)
    studies = "SELECT state, generation FROM studies"
    before = journal_rows(store.state_dir, studies)

    copy = tmp_path / "archive" / "b" / "nih-copy.dcm"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    [again] = store.register_in_place([ArchiveFile(copy, os.stat(copy), read_header(copy))])
    assert again.status == "duplicate"
    assert journal_rows(store.state_dir, studies) == before == [("classified", 0)]
    assert store.claim_ready_studies(0, "m", "w", 10) == []


def test_archive_file_changed_in_place_is_a_new_version(store, tmp_path):
    """A back-filled file rewritten with other pixels (same SOP Instance UID) is journaled as
    version 2 and reopens its study: its old content cannot be compared any more."""
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
    assert journal_rows(store.state_dir, "SELECT version, state FROM instances "
                        "ORDER BY version") == [(1, "superseded"), (2, "stored")]
    assert journal_rows(store.state_dir, "SELECT state, generation FROM studies") == [
        ("receiving", 1)]
