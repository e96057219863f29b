"""Scores read back from the journal for `xrvd evaluate --from-journal`: only those of the same
model and the same weights, of an instance's current version, from its latest run; back-filled
files found by their path too, with the size and mtime the back-fill saw."""

from __future__ import annotations

from xrvd.store.archive import ArchiveFile
from xrvd.store.records import read_header
from xrvd.store.results import open_journal, scores_for_images

from ..harness import NIH_SC, WG04_CR, copy_with_new_uids


def _classify(store, model: str, weights: str, scores: dict[int, dict[str, float]]) -> None:
    for claim in store.claim_ready_studies(0, model, weights, 10):
        store.finish_run(claim, scores, None)


def test_only_the_same_model_and_weights_and_the_current_version(store, tmp_path):
    source = tmp_path / "in.dcm"
    ds = copy_with_new_uids(NIH_SC, source)
    first = store.store_file(source, source="test", move=False)
    _classify(store, "m", "w", {first.instance_id: {"Pneumonia": 0.1, "Effusion": 0.7}})
    db = open_journal(tmp_path / "state")
    try:
        by_uid, by_path = scores_for_images(db, "m", "w", sop_uids=[ds.SOPInstanceUID, "1.2.3"])
        assert list(by_uid) == [ds.SOPInstanceUID] and by_path == {}
        assert by_uid[ds.SOPInstanceUID].scores == {"Pneumonia": 0.1, "Effusion": 0.7}
        assert by_uid[ds.SOPInstanceUID].size is None  # received, not back-filled
        for model, weights in (("m", "other weights"), ("other model", "w")):
            assert scores_for_images(db, model, weights, sop_uids=[ds.SOPInstanceUID]) == ({}, {})

        # A late image runs the study again: the latest run's scores count.
        late = tmp_path / "late.dcm"
        copy_with_new_uids(NIH_SC, late, study_uid=ds.StudyInstanceUID)
        second = store.store_file(late, source="test", move=False)
        _classify(store, "m", "w", {first.instance_id: {"Pneumonia": 0.2, "Effusion": 0.6},
                                    second.instance_id: {"Pneumonia": 0.3, "Effusion": 0.5}})
        by_uid, _ = scores_for_images(db, "m", "w", sop_uids=[ds.SOPInstanceUID])
        assert by_uid[ds.SOPInstanceUID].scores == {"Pneumonia": 0.2, "Effusion": 0.6}

        # A new version of the instance (other content) has not been scored: nothing to take.
        ds.PatientName = "OTHER^CONTENT"
        ds.save_as(source)
        assert store.store_file(source, source="test", move=False).status == "new_version"
        assert scores_for_images(db, "m", "w", sop_uids=[ds.SOPInstanceUID]) == ({}, {})
    finally:
        db.close()


def test_a_backfilled_file_is_found_by_its_path(store, tmp_path):
    archive = tmp_path / "archive"
    path = (archive / "a.dcm").resolve()
    ds = copy_with_new_uids(WG04_CR, path)
    [outcome] = store.register_in_place([ArchiveFile(path, path.stat(), read_header(path))])
    _classify(store, "m", "w", {outcome.instance_id: {"Pneumonia": 0.4}})
    db = open_journal(tmp_path / "state")
    try:
        by_uid, by_path = scores_for_images(db, "m", "w", paths=[str(path), "/nowhere.dcm"])
        assert by_uid == {} and list(by_path) == [str(path)]
        found = by_path[str(path)]
        assert (found.sop_uid, found.file, found.scores) == (ds.SOPInstanceUID, str(path),
                                                             {"Pneumonia": 0.4})
        assert (found.size, found.mtime_ns) == (path.stat().st_size, path.stat().st_mtime_ns)
    finally:
        db.close()
