"""Ingest into the journal: the selection verdict decided once, from the header parsed to
journal the instance, and the named reads that replace SQL outside the store."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement

from xrvd.pipeline.select import SelectRules
from xrvd.store import Store
from xrvd.store.archive import ArchiveFile, ArchiveJournal
from xrvd.store.records import SCHEMA, journal_path, read_header

from ..harness import NIH_SC, REJECT, WG04_CR, copy_with_new_uids


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "state")
    yield store
    store.close()


def _new(tmp_path: Path, fixture: Path, **attributes) -> Path:
    """A copy of a fixture as a new instance, in a new study unless study_uid is given."""
    path = tmp_path / "in" / f"{len(list(tmp_path.glob('in/*')))}.dcm"
    copy_with_new_uids(fixture, path, **attributes)
    return path


def _study(state_dir: Path, study_uid: str, columns: str = "state, generation") -> tuple:
    """A study's columns, read as `xrvd status` reads the journal: beside the store."""
    with closing(sqlite3.connect(journal_path(state_dir))) as db:
        return db.execute(f"SELECT {columns} FROM studies WHERE study_uid = ?",
                          (study_uid,)).fetchone()


def _instances(store: Store):
    """The instances of the one study waiting, as the worker gets them when it claims it."""
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    return claim, store.study_instances(claim.study_id)


def _classified_study(store: Store, tmp_path: Path) -> str:
    """A study of one frontal, classified: generation 0."""
    outcome = store.store_file(_new(tmp_path, WG04_CR), source="test", move=False)
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    assert store.finish_run(claim, {outcome.instance_id: {"Pneumonia": 0.1}}, None) == \
        "classified"
    return outcome.study_uid


@pytest.mark.parametrize("fixture, attributes, reason", [
    (WG04_CR, {"ViewPosition": "LL"}, "lateral_view"),
    (REJECT / "CT_small.dcm", {}, "modality"),
    (REJECT / "highdicom_sr_document.dcm", {}, "not_an_image"),
])
def test_not_selected_is_journaled_skipped_with_its_reason(store, tmp_path, fixture, attributes,
                                                          reason):
    outcome = store.store_file(_new(tmp_path, fixture, **attributes), source="test", move=False)
    assert outcome.status == "stored" and outcome.skipped == reason and outcome.skip_detail
    _, [row] = _instances(store)
    assert (row.state, row.reason, row.selected) == ("skipped", reason, True)
    assert store.count_instances("skipped") == 1 and store.count_instances("stored") == 0


def _crafted(tmp_path: Path, kind: str) -> Path:
    """A frontal whose header select() cannot read: a NumberOfFrames of "x" (pydicom will
    not write one, so it is patched into the file), or a ViewCodeSequence that is text."""
    if kind == "view_code_not_a_sequence":
        path = _new(tmp_path, WG04_CR)
        ds = pydicom.dcmread(path)
        del ds.ViewPosition
        ds.add(DataElement(0x00540220, "LO", "x"))
        ds.save_as(path)
        return path
    path = _new(tmp_path, WG04_CR, NumberOfFrames=1)
    element = b"\x28\x00\x08\x00IS\x02\x00"
    data = path.read_bytes()
    assert data.count(element + b"1 ") == 1
    path.write_bytes(data.replace(element + b"1 ", element + b"x "))
    return path


@pytest.mark.parametrize("kind", ["frames_not_a_number", "view_code_not_a_sequence"])
@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # pydicom, reading the "x"
def test_a_header_select_cannot_read_is_journaled_skipped(store, tmp_path, kind):
    """Acknowledged and journaled like any instance, never left half written in the spool."""
    outcome = store.store_file(_crafted(tmp_path, kind), source="test", move=False)
    assert outcome.skipped == "invalid_header" and "malformed" in outcome.skip_detail
    _, [row] = _instances(store)
    assert (row.state, row.reason, row.selected) == ("skipped", "invalid_header", True)
    assert row.path.exists()


def test_a_selected_frontal_is_stored_for_the_worker(store, tmp_path):
    outcome = store.store_file(_new(tmp_path, WG04_CR), source="test", move=False)
    assert outcome.skipped is None and outcome.skip_detail == ""
    _, [row] = _instances(store)
    assert (row.state, row.reason, row.selected) == ("stored", None, True)


def test_a_study_whose_first_instance_is_skipped_still_settles(store, tmp_path):
    """Created receiving, as any study: the worker claims it and finds nothing to classify."""
    outcome = store.store_file(_new(tmp_path, REJECT / "CT_small.dcm"), source="test",
                               move=False)
    assert _study(store.state_dir, outcome.study_uid) == ("receiving", 0)
    assert store.unfinished_studies() == 1


def test_a_late_skipped_instance_leaves_a_classified_study_alone(store, tmp_path):
    """A lateral, a CT, a report forwarded back: none can change the chest result, so none
    reopens the study (no second report); a late frontal does."""
    study_uid = _classified_study(store, tmp_path)
    for fixture, attributes in ((WG04_CR, {"ViewPosition": "LL"}),
                                (REJECT / "CT_small.dcm", {}),
                                (REJECT / "highdicom_sr_document.dcm", {})):
        late = store.store_file(_new(tmp_path, fixture, study_uid=study_uid, **attributes),
                                source="test", move=False)
        assert late.skipped is not None
        assert _study(store.state_dir, study_uid) == ("classified", 0)
    assert store.claim_ready_studies(0, "m", "w", 10) == []
    assert store.unfinished_studies() == 0

    frontal = store.store_file(_new(tmp_path, WG04_CR, study_uid=study_uid), source="test",
                               move=False)
    assert frontal.skipped is None
    assert _study(store.state_dir, study_uid) == ("receiving", 1)
    assert store.unfinished_studies() == 1


def test_a_skipped_instance_during_processing_does_not_run_the_study_again(store, tmp_path):
    outcome = store.store_file(_new(tmp_path, WG04_CR), source="test", move=False)
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    store.store_file(_new(tmp_path, WG04_CR, study_uid=outcome.study_uid, ViewPosition="LL"),
                     source="test", move=False)
    assert store.finish_run(claim, {outcome.instance_id: {"Pneumonia": 0.1}}, None) == \
        "classified"


def test_a_skipped_instance_restarts_the_settle_time_of_a_receiving_study(store, tmp_path):
    """Still arriving: the study waits for the rest of it, lateral or not."""
    first = store.store_file(_new(tmp_path, WG04_CR), source="test", move=False)
    [before] = _study(store.state_dir, first.study_uid, "last_instance_at")
    late = store.store_file(_new(tmp_path, WG04_CR, study_uid=first.study_uid,
                                 ViewPosition="LL"), source="test", move=False)
    assert late.skipped == "lateral_view"
    assert _study(store.state_dir, first.study_uid, "last_instance_at")[0] > before


def test_counts_by_name(store, tmp_path):
    assert store.count_instances("stored") == 0 and store.unfinished_studies() == 0
    store.store_file(_new(tmp_path, WG04_CR), source="test", move=False)
    store.store_file(_new(tmp_path, NIH_SC), source="test", move=False)
    store.store_file(_new(tmp_path, REJECT / "CT_small.dcm"), source="test", move=False)
    assert store.count_instances("stored") == 2 and store.count_instances("skipped") == 1
    assert store.unfinished_studies() == 3
    claims = store.claim_ready_studies(0, "m", "w", 1)
    assert store.unfinished_studies() == 3  # one of them processing
    store.finish_run(claims[0], {}, None)
    assert store.unfinished_studies() == 2


def test_new_rules_take_effect_for_the_next_instance(store, tmp_path):
    """The runtime assigns store.rules on a config reload; instances journaled before keep
    their verdict."""
    first = store.store_file(_new(tmp_path, NIH_SC), source="test", move=False)
    assert first.skipped is None  # DX without a body part: classified by default
    store.rules = SelectRules(classify_missing_body_part=False)
    second = store.store_file(_new(tmp_path, NIH_SC), source="test", move=False)
    assert second.skipped == "body_part_missing"
    assert store.count_instances("stored") == 1 and store.count_instances("skipped") == 1


def test_rules_given_at_opening(tmp_path):
    store = Store(tmp_path / "state", SelectRules(modalities=("CR",)))
    try:
        assert store.store_file(_new(tmp_path, NIH_SC), source="test",
                                move=False).skipped == "modality"
    finally:
        store.close()


# --- the archive's record, read-only (`xrvd backfill --dry-run`) -----------------------------


def test_archive_journal_without_a_journal_creates_none(tmp_path):
    state_dir = tmp_path / "state"
    path = _new(tmp_path, WG04_CR)
    journal = ArchiveJournal(state_dir)
    assert journal.earlier_verdict(path, path.stat()) is None
    journal.close()
    assert not state_dir.exists()


def test_archive_journal_of_a_journal_that_never_saw_an_archive(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with closing(sqlite3.connect(journal_path(state_dir))) as db:
        db.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY)")
        db.commit()
    path = _new(tmp_path, WG04_CR)
    journal = ArchiveJournal(state_dir)
    assert journal.earlier_verdict(path, path.stat()) is None
    journal.close()


def test_archive_journal_after_register_in_place(store, tmp_path):
    frontal = _new(tmp_path, WG04_CR)
    lateral = _new(tmp_path, WG04_CR, ViewPosition="LL")
    garbage = tmp_path / "in" / "garbage.bin"
    garbage.write_bytes(b"\0" * 300)
    store.register_in_place([
        ArchiveFile(frontal, frontal.stat(), read_header(frontal)),
        ArchiveFile(lateral, lateral.stat(), read_header(lateral)),
        ArchiveFile(garbage, garbage.stat(), None, "not_dicom: no DICM marker", "not_dicom"),
    ])
    journal = ArchiveJournal(store.state_dir)  # beside the open store, as a dry run may be
    try:
        assert journal.earlier_verdict(frontal, frontal.stat()) == \
            ("stored", "journaled by an earlier run")
        assert journal.earlier_verdict(lateral, lateral.stat()) == ("skipped", "lateral_view")
        assert journal.earlier_verdict(garbage, garbage.stat()) == \
            ("not_dicom", "journaled by an earlier run")
        unseen = _new(tmp_path, WG04_CR)
        assert journal.earlier_verdict(unseen, unseen.stat()) is None
        os.utime(frontal, ns=(frontal.stat().st_atime_ns, frontal.stat().st_mtime_ns + 1000))
        assert journal.earlier_verdict(frontal, frontal.stat()) is None  # changed since
    finally:
        journal.close()


# --- journals written by an older xrvd -----------------------------------------------------


def test_an_old_journal_opens_and_its_rows_are_still_to_be_selected(tmp_path):
    """Its 'stored' says nothing about selection: selected None tells the worker to select."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with closing(sqlite3.connect(journal_path(state_dir))) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO studies(id, study_uid, state, last_instance_at, updated_at) "
                   "VALUES (1, '1.2.3', 'receiving', 0, 0)")
        db.execute("INSERT INTO instances(study_id, sop_uid, version, path, size, source, "
                   "state, received_at, updated_at) "
                   "VALUES (1, '1.2.3.4', 1, 'ab/old.dcm', 10, 'test', 'stored', 0, 0)")
        db.commit()
    store = Store(state_dir)
    try:
        _, [row] = _instances(store)
        assert (row.sop_uid, row.state, row.reason, row.selected) == \
            ("1.2.3.4", "stored", None, None)
        assert row.path == store.spool / "ab" / "old.dcm"
        late = store.store_file(_new(tmp_path, WG04_CR, study_uid="1.2.3"), source="test",
                                move=False)
        rows = store.study_instances(1)
        assert [r.selected for r in rows] == [None, True]
        assert rows[1].id == late.instance_id
    finally:
        store.close()
