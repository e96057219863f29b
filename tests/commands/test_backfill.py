"""`xrvd backfill` on a real folder tree (and `xrvd export` of what it found): resumable after
SIGKILL, exactly one classification per image and one report per study, also when only the
output folder remembers the reports; dry runs, DICOMDIR media, crafted files journaled with
their reason; identifying values kept out of its events and journal."""

from __future__ import annotations

import csv
import json

import pytest
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from xrvd.cli import main
from xrvd.errors import EXIT_OK
from xrvd.fsutil import StateDirLock
from xrvd.report.files import heatmap_files

from ..harness import (
    CRAFTED,
    CXR,
    FRONTAL,
    IDENTIFIERS,
    MARKER,
    MODEL,
    NIH_SC,
    REJECT,
    RSNA_JPEG,
    WG04_CR,
    DaemonProcess,
    build_archive,
    copy_with_new_uids,
    everything_logged,
    journal_rows,
    journal_text,
    record_exported_graphs,
    reports_by_study,
    runs_per_image,
    sidecar,
    write_config,
    write_crafted,
)


def test_backfill_survives_sigkill_and_never_reports_twice(tmp_path, ready_weights):
    archive = tmp_path / "archive"
    expected_sops, expected_studies = build_archive(archive, copies=4)
    output = tmp_path / "out"
    weights = ready_weights(MODEL)
    config = write_config(tmp_path, weights, output={"folder": str(output)},
                          model={"name": MODEL, "weights_dir": str(weights), "batch_size": 2})
    command = ("backfill", str(archive), "--recursive", "--workers", "1")

    first = DaemonProcess(config, tmp_path / "state", command, ready=None).start()
    try:
        first.wait_until(lambda: any(e["classified"] for e in first.find("study.classified")),
                         timeout=240, what="a first study with a classified image")
        first.kill()
    finally:
        first.stop()
    done_before_kill = sum(e["classified"] for e in first.find("study.classified"))
    assert 0 < done_before_kill < len(expected_sops), "the kill must land part-way"

    second = DaemonProcess(config, tmp_path / "state", command, ready=None).start()
    assert second.wait(timeout=300) == 0, second.stderr[-3000:]
    [finished] = second.find("backfill.finished")
    assert finished["seen_before"] > 0  # the first run's journal was used, not re-read

    runs = runs_per_image(second.state_dir)
    assert set(runs) == expected_sops
    assert set(runs.values()) == {1}
    reports = reports_by_study(output)
    assert len(reports) == len(expected_studies)
    assert all(len(files) == 1 for files in reports.values())
    skipped = dict(second.journal("SELECT reason, COUNT(*) FROM instances "
                                  "WHERE state = 'skipped' GROUP BY reason"))
    assert {"modality", "lateral_view", "too_small", "not_an_image"} <= set(skipped)
    assert skipped["truncated"] == 1
    not_dicom = second.journal("SELECT COUNT(*) FROM archive_files "
                               "WHERE outcome = 'not_dicom'")[0][0]
    assert not_dicom == 2  # notes.txt, empty.dcm: journaled with their reason, not lost

    exported = tmp_path / "results.csv"
    assert main(["export", "-c", str(config), str(exported)]) == 0
    with open(exported, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["sop_instance_uid"] for row in rows) == sorted(expected_sops)
    assert all(row["model"] == MODEL and row["untrained"] == "True" for row in rows)
    assert all(0.0 <= float(row["score_Pneumonia"]) <= 1.0 for row in rows)
    assert all(row["positive_Pneumonia"] == str(float(row["score_Pneumonia"]) >= 0.5)
               for row in rows)

    # The journal is lost; the output folder still holds the reports: none is written again.
    written = {path: path.stat().st_mtime_ns for files in reports.values() for path in files}
    (tmp_path / "state").rename(tmp_path / "state-lost")
    # (the ONNX graph recorded again, as `xrvd models export` would: not exported in the run)
    record_exported_graphs(weights, tmp_path / "state")
    third = DaemonProcess(config, tmp_path / "state", command, ready=None).start()
    assert third.wait(timeout=300) == 0, third.stderr[-3000:]
    assert len(third.find("study.already_reported")) == len(expected_studies)
    assert not third.find("report.written")
    assert {path: path.stat().st_mtime_ns for path in written} == written
    assert set(runs_per_image(third.state_dir)) == expected_sops  # scores recovered from the reports


def test_dry_run_classifies_and_journals_nothing(tmp_path, untrained_weights, capsys):
    archive = tmp_path / "archive"
    expected_sops, _ = build_archive(archive, copies=1)
    copy_with_new_uids(FRONTAL[1], archive / "old" / "old.dcm", StudyDate="18991231")
    config = write_config(tmp_path, untrained_weights(MODEL),
                          output={"folder": str(tmp_path / "out")})

    assert main(["backfill", "-c", str(config), "-r", "--dry-run", "--since", "1900-01-01",
                 str(archive)]) == 0
    lines = capsys.readouterr().out.splitlines()
    classify = [line for line in lines if line.startswith("classify ")]
    assert len(classify) == len(expected_sops)
    by_file = {line.split()[2]: line.split()[:2] for line in lines
               if line.startswith(("classify ", "skip "))}
    assert by_file[str(archive / "other" / "lateral.dcm")] == ["skip", "lateral_view"]
    assert by_file[str(archive / "notes.txt")] == ["skip", "not_dicom"]
    assert by_file[str(archive / "old" / "old.dcm")] == ["skip", "before_since"]
    assert not (tmp_path / "state" / "journal.sqlite3").exists()
    assert not (tmp_path / "out").exists()


def test_dry_run_limit_counts_what_the_run_would_take(tmp_path, untrained_weights, capsys):
    """--limit N in a dry run shows the N files the real run would journal, however many
    non-DICOM files the crawl meets first."""
    archive = tmp_path / "archive"
    for n in range(3):
        (archive / f"a-notes{n}.txt").parent.mkdir(parents=True, exist_ok=True)
        (archive / f"a-notes{n}.txt").write_text("not an image")  # crawled first
    for n, source in enumerate(FRONTAL[:2]):
        copy_with_new_uids(source, archive / f"image{n}.dcm")
    config = write_config(tmp_path, untrained_weights(MODEL),
                          output={"folder": str(tmp_path / "out")})
    assert main(["backfill", "-c", str(config), "--dry-run", "--limit", "2",
                 "--workers", "0", str(archive)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[2] for line in lines if line.startswith("classify ")) == [
        str(archive / "image0.dcm"), str(archive / "image1.dcm")]


def test_dicomdir_media_and_limit(tmp_path, ready_weights, allow_untrained, capsys):
    staging = tmp_path / "staging"
    media = tmp_path / "media"
    fileset = FileSet()
    sops = []
    for number, source in enumerate([*FRONTAL[1:], REJECT / "CT_small.dcm"]):
        # the attributes a DICOMDIR's patient/study/series records require
        ds = copy_with_new_uids(source, staging / f"{number}.dcm", StudyDate="20240102",
                                StudyTime="101500", StudyID="1", AccessionNumber="A1",
                                PatientID="P1", SeriesNumber=1, InstanceNumber=number + 1)
        fileset.add(ds)
        sops.append(ds.SOPInstanceUID)
    fileset.write(media)
    assert (media / "DICOMDIR").is_file()
    config = write_config(tmp_path, ready_weights(MODEL),
                          output={"folder": str(tmp_path / "out")})

    # Not recursive: the DICOMDIR leads to the files in its sub-folders.
    assert main(["backfill", "-c", str(config), "--workers", "0", "--limit", "2",
                 str(media)]) == 0
    summary = capsys.readouterr()
    assert "images classified" in summary.out + summary.err
    assert '"study.classified"' in summary.out  # info events, as the config's log.level says
    state = tmp_path / "state"
    journaled = [uid for (uid,) in journal_rows(state, "SELECT sop_uid FROM instances")]
    [(classified,)] = journal_rows(state, "SELECT COUNT(DISTINCT instance_id) FROM scores")
    assert sorted(journaled) == sorted(sops[:2])  # --limit 2: the CT was not taken yet
    assert classified == 2

    assert main(["backfill", "-c", str(config), "--workers", "0", "--log-level", "warning",
                 str(media / "DICOMDIR")]) == 0
    assert '"study.classified"' not in capsys.readouterr().out  # --log-level wins
    reasons = dict(journal_rows(state, "SELECT sop_uid, reason FROM instances"))
    assert reasons[sops[2]] == "modality"

    out = tmp_path / "results.jsonl"
    assert main(["export", "-c", str(config), str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["sop_instance_uid"] for r in records) == sorted(sops[:2])
    assert all(set(r["findings"]["Pneumonia"]) == {"score", "threshold", "positive"}
               for r in records)
    parquet = tmp_path / "results.parquet"
    assert main(["export", "-c", str(config), str(parquet)]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    assert table.num_rows == 2
    assert table.schema.field("score_Pneumonia").type == "double"


def test_backfill_refuses_a_state_dir_in_use(tmp_path, untrained_weights, capsys):
    config = write_config(tmp_path, untrained_weights(MODEL))
    lock = StateDirLock(tmp_path / "state", "serve")
    lock.acquire()
    try:
        assert main(["backfill", "-c", str(config), str(CXR)]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "in use by xrvd serve" in err and "state_dir" in err


def test_backfill_reports_paths_that_do_not_exist(tmp_path, untrained_weights, capsys):
    config = write_config(tmp_path, untrained_weights(MODEL))
    assert main(["backfill", "-c", str(config), "--dry-run", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_backfill_journals_crafted_files_with_their_reason_and_goes_on(
        tmp_path, ready_weights, allow_untrained, capsys):
    archive = tmp_path / "archive"
    study = generate_uid()
    good = copy_with_new_uids(WG04_CR, archive / "study" / "good.dcm", study_uid=study)
    paths = {kind: archive / "study" / f"{kind}.dcm" for kind in CRAFTED}
    sops = {kind: write_crafted(kind, WG04_CR, path, study_uid=study).SOPInstanceUID
            for kind, path in paths.items()}
    output = tmp_path / "out"
    config = str(write_config(tmp_path, ready_weights(MODEL),
                              output={"folder": str(output)}))
    command = ["backfill", "-c", config, "--workers", "0", "--recursive", str(archive)]

    assert main([*command, "--dry-run"]) == EXIT_OK
    verdicts = {line.split()[2]: line.split()[:2] for line in capsys.readouterr().out.splitlines()
                if line.startswith(("classify ", "skip "))}
    assert verdicts[str(archive / "study" / "good.dcm")] == ["classify", "-"]
    assert all(verdicts[str(path)] == ["skip", "invalid_header"] for path in paths.values())

    # Skipped inputs are not failures: as for files that are not DICOM, the run is done.
    assert main(command) == EXIT_OK
    first = _events(capsys.readouterr().out, "backfill.finished")[0]
    assert first["classified"] == 1 and first["skipped"] == {"invalid_header": len(CRAFTED)}
    state = tmp_path / "state"
    [(outcome, reason)] = journal_rows(state, "SELECT outcome, reason FROM archive_files "
                                       "WHERE path = ?", (str(paths["deep_nesting"]),))
    instances = dict(journal_rows(state, "SELECT sop_uid, reason FROM instances"))
    scored = [uid for (uid,) in journal_rows(
        state, "SELECT DISTINCT i.sop_uid FROM scores s JOIN instances i ON i.id = s.instance_id")]
    assert outcome == "invalid_header" and reason.startswith("invalid_header: ")
    sops.pop("deep_nesting")  # never journaled as an instance: its header has no UIDs to read
    assert instances == {good.SOPInstanceUID: None,
                         **{sop: "invalid_header" for sop in sops.values()}}
    assert scored == [good.SOPInstanceUID]
    assert len(list(output.rglob("*.dcm"))) == 1  # the study's report, for the good image

    assert main(command) == EXIT_OK  # the rerun passes over every file, the crafted ones too
    again = _events(capsys.readouterr().out, "backfill.finished")[0]
    assert again["seen_before"] == len(CRAFTED) + 1 and again.get("classified", 0) == 0


def _events(stdout: str, name: str) -> list[dict]:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [event for event in events if event.get("event") == name]


@pytest.mark.parametrize("include", [False, True], ids=["hashed", "included"])
def test_identifiers_stay_out_of_events_and_journal(tmp_path, ready_weights, include):
    """A folder named after the patient with an image, a lateral, a text file and an empty
    file: the marker reaches no event or journal transition unless
    log.include_patient_identifiers is true."""
    archive = tmp_path / "archive"
    patient = archive / f"DOE_{MARKER}_12345"
    copy_with_new_uids(RSNA_JPEG, patient / f"img_{MARKER}.dcm", **IDENTIFIERS)
    copy_with_new_uids(NIH_SC, patient / f"lateral_{MARKER}.dcm", ViewPosition="LL",
                       **IDENTIFIERS)
    (patient / f"notes_{MARKER}.txt").write_text(f"not an image of {MARKER}\n")
    (patient / f"empty_{MARKER}.dcm").write_bytes(b"")
    config = write_config(tmp_path, ready_weights(MODEL),
                          output={"folder": str(tmp_path / "out")},
                          log={"level": "debug", "include_patient_identifiers": include})
    backfill = DaemonProcess(config, tmp_path / "state",
                             ("backfill", str(archive), "--recursive", "--workers", "0"),
                             ready=None).start()
    assert backfill.wait(timeout=300) == 0, backfill.stderr[-3000:]
    assert backfill.find("study.classified") and backfill.find("file.skipped")

    assert MARKER not in journal_text(backfill)
    logged = everything_logged(backfill)
    if include:
        assert str(patient / f"notes_{MARKER}.txt") in logged
    else:
        assert MARKER not in logged
        assert all(e["file"].startswith("id:") for e in backfill.find("file.skipped"))


@pytest.mark.parametrize("workers", ["0", "2"])  # in the worker thread, in the pool
def test_heatmaps_for_the_strongest_positive_findings_only(tmp_path, ready_weights,
                                                          allow_untrained, capsys, workers):
    """Every finding positive (threshold 0): output.max_heatmaps_per_image bounds what one
    image makes, and those are its strongest findings, each cited by the report."""
    archive = tmp_path / "archive"
    source = copy_with_new_uids(NIH_SC, archive / "one.dcm")
    config = write_config(tmp_path, ready_weights(MODEL), model={"threshold": 0.0},
                          output={"folder": str(tmp_path / "out"), "heatmaps": True,
                                  "max_heatmaps_per_image": 2})
    assert main(["backfill", "-c", str(config), "--workers", workers, str(archive)]) == 0
    [report] = (tmp_path / "out").glob("*/*.dcm")  # the heatmaps are in a folder beside it
    [image] = sidecar(report)["images"]
    assert image["sop_instance_uid"] == source.SOPInstanceUID
    with_heatmap = [f["label"] for f in image["findings"] if "heatmap_sop_instance_uid" in f]
    assert with_heatmap == [f["label"] for f in image["findings"]][:2]  # strongest first
    assert len(heatmap_files(report)) == 2
