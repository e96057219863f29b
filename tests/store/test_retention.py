"""Spool retention: a study's received files go once it is done with them, as
storage.keep_spool says, and nothing about duplicates or reports changes because of it."""

from __future__ import annotations

import os

from xrvd.store import Store
from xrvd.store.archive import ArchiveFile
from xrvd.store.records import read_header

from ..harness import NIH_SC, WG04_CR, copy_with_new_uids, finished_study, journal_rows


def _spool_files(store: Store):
    return list(store.spool.glob("??/*.dcm"))


def test_a_finished_study_loses_its_files_and_a_resend_stays_a_duplicate(store, tmp_path):
    source, outcome = finished_study(store, tmp_path)
    assert store.spool_usage()[0] == 1
    files, freed = store.purge_spool("failed")
    assert (files, freed) == (1, os.path.getsize(source))
    assert _spool_files(store) == [] and store.spool_usage() == (0, 0)
    again = store.store_file(source, source="test", move=False)
    assert again.status == "duplicate"  # recognised from the hash kept in the journal
    assert journal_rows(store.state_dir, "SELECT state, generation FROM studies") == [
        ("classified", 0)]
    assert store.purge_spool("failed") == (0, 0)


def test_files_stay_until_every_report_is_delivered(store, tmp_path):
    finished_study(store, tmp_path, destinations=["pacs"])
    assert store.purge_spool("none") == (0, 0)
    [(delivery_id,)] = journal_rows(store.state_dir, "SELECT id FROM deliveries")
    store.delivery_done(delivery_id, "sent")
    assert store.purge_spool("none")[0] == 1


def test_failed_studies_and_failed_deliveries_are_kept_unless_keep_spool_is_none(store,
                                                                                tmp_path):
    finished_study(store, tmp_path, destinations=["pacs"])
    [(delivery_id,)] = journal_rows(store.state_dir, "SELECT id FROM deliveries")
    store.delivery_done(delivery_id, "failed", "PACS down")
    copy_with_new_uids(WG04_CR, tmp_path / "failing.dcm")
    store.store_file(tmp_path / "failing.dcm", source="test", move=False)
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    store.fail_attempt(claim, "RuntimeError: broken", max_attempts=1, retry_after=0)
    assert store.purge_spool("failed") == (0, 0)
    assert store.purge_spool("none")[0] == 2


def test_days_keep_files_of_recently_finished_studies(store, tmp_path):
    finished_study(store, tmp_path)
    assert store.purge_spool("days", keep_days=1) == (0, 0)
    assert store.purge_spool("days", keep_days=0)[0] == 1


def test_studies_in_progress_and_archive_files_are_never_deleted(store, tmp_path):
    copy_with_new_uids(NIH_SC, tmp_path / "waiting.dcm")
    store.store_file(tmp_path / "waiting.dcm", source="test", move=False)
    archived = tmp_path / "archive" / "a.dcm"
    copy_with_new_uids(NIH_SC, archived)
    [outcome] = store.register_in_place([ArchiveFile(archived, os.stat(archived),
                                                     read_header(archived))])
    claims = store.claim_ready_studies(0, "m", "w", 10)
    archive_claim = next(c for c in claims if store.study_instances(c.study_id)[0].id
                         == outcome.instance_id)
    store.finish_run(archive_claim, {outcome.instance_id: {"Pneumonia": 0.1}}, None)
    assert store.purge_spool("none") == (0, 0)
    assert archived.exists()


def test_a_late_image_is_classified_without_the_purged_ones(store, tmp_path):
    source, first = finished_study(store, tmp_path)
    store.purge_spool("failed")
    late = tmp_path / "late.dcm"
    copy_with_new_uids(NIH_SC, late, study_uid=first.study_uid)
    second = store.store_file(late, source="test", move=False)
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    assert [row.id for row in store.study_instances(claim.study_id)] == [second.instance_id]
