"""`xrvd backfill` and `xrvd export` on a real folder tree: resumable after SIGKILL, exactly one
classification per image and one report per study, also when only the output folder
remembers the reports."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from xrvd.cli import main
from xrvd.fsutil import StateDirLock

from .conftest import CXR, NIH_SC, REJECT, RSNA_JPEG, TINY_CR, WG04_CR
from .harness import DaemonProcess, copy_with_new_uids, write_config

MODEL = "densenet121-res224-all"
FRONTAL = [WG04_CR, NIH_SC, RSNA_JPEG]


def build_archive(root: Path, copies: int) -> tuple[set[str], set[str]]:
    """Nested folders of fixture copies with new UIDs, a study split over two folders, rejects
    and garbage. Returns (SOP UIDs that must be classified, their study UIDs)."""
    sops, studies = set(), set()
    for copy in range(copies):
        for number, source in enumerate(FRONTAL):
            ds = copy_with_new_uids(source, root / f"site{copy % 2}" / f"day{copy}" /
                                    f"img{number}.dcm")
            sops.add(ds.SOPInstanceUID)
            studies.add(ds.StudyInstanceUID)
    split = generate_uid()
    for folder in ("site0/split-a", "site1/split-b"):
        ds = copy_with_new_uids(FRONTAL[2], root / folder / "part.dcm", study_uid=split)
        sops.add(ds.SOPInstanceUID)
    studies.add(split)
    for reject in REJECT.glob("*.dcm"):
        copy_with_new_uids(reject, root / "other" / reject.name)
    copy_with_new_uids(TINY_CR, root / "other" / "tiny.dcm")
    lateral = copy_with_new_uids(FRONTAL[1], root / "other" / "lateral.dcm", ViewPosition="LL")
    assert lateral.SOPInstanceUID not in sops
    truncated = root / "other" / "truncated.dcm"
    copy_with_new_uids(FRONTAL[0], truncated)
    truncated.write_bytes(truncated.read_bytes()[:len(truncated.read_bytes()) // 2])
    (root / "notes.txt").write_text("not an image\n")
    (root / "site0" / "empty.dcm").write_bytes(b"")
    return sops, studies


def reports_by_study(output: Path) -> dict[str, list[Path]]:
    return {folder.name: sorted(folder.glob("*.dcm")) for folder in output.iterdir()
            if folder.is_dir()}


def scored_runs(daemon: DaemonProcess) -> dict[str, int]:
    """SOP Instance UID -> how many runs scored it."""
    return dict(daemon.journal(
        "SELECT i.sop_uid, COUNT(DISTINCT s.run_id) FROM scores s "
        "JOIN instances i ON i.id = s.instance_id GROUP BY i.sop_uid"))


def test_backfill_survives_sigkill_and_never_reports_twice(tmp_path, untrained_weights):
    archive = tmp_path / "archive"
    expected_sops, expected_studies = build_archive(archive, copies=4)
    output = tmp_path / "out"
    config = write_config(tmp_path, untrained_weights(MODEL), output={"folder": str(output)},
                          model={"name": MODEL, "weights_dir": str(untrained_weights(MODEL)),
                                 "batch_size": 2})
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

    runs = scored_runs(second)
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
    third = DaemonProcess(config, tmp_path / "state", command, ready=None).start()
    assert third.wait(timeout=300) == 0, third.stderr[-3000:]
    assert len(third.find("study.already_reported")) == len(expected_studies)
    assert not third.find("report.written")
    assert {path: path.stat().st_mtime_ns for path in written} == written
    assert set(scored_runs(third)) == expected_sops  # scores recovered from the reports


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


def test_dicomdir_media_and_limit(tmp_path, untrained_weights, allow_untrained, capsys):
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
    config = write_config(tmp_path, untrained_weights(MODEL),
                          output={"folder": str(tmp_path / "out")})

    # Not recursive: the DICOMDIR leads to the files in its sub-folders.
    assert main(["backfill", "-c", str(config), "--workers", "0", "--limit", "2",
                 str(media)]) == 0
    summary = capsys.readouterr()
    assert "images classified" in summary.out + summary.err
    assert '"study.classified"' in summary.out  # info events, as the config's log.level says
    db_path = tmp_path / "state" / "journal.sqlite3"
    with sqlite3.connect(db_path) as db:
        journaled = [row[0] for row in db.execute("SELECT sop_uid FROM instances")]
        classified = db.execute("SELECT COUNT(DISTINCT instance_id) FROM scores").fetchone()[0]
    assert sorted(journaled) == sorted(sops[:2])  # --limit 2: the CT was not taken yet
    assert classified == 2

    assert main(["backfill", "-c", str(config), "--workers", "0", "--log-level", "warning",
                 str(media / "DICOMDIR")]) == 0
    assert '"study.classified"' not in capsys.readouterr().out  # --log-level wins
    with sqlite3.connect(db_path) as db:
        reasons = dict(db.execute("SELECT sop_uid, reason FROM instances"))
    assert reasons[sops[2]] == "modality"

    out = tmp_path / "results.jsonl"
    assert main(["export", "-c", str(config), str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["sop_instance_uid"] for r in records) == sorted(sops[:2])
    assert all(set(r["findings"]["Pneumonia"]) == {"score", "positive"} for r in records)
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


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_without_a_journal_says_what_to_run(tmp_path, untrained_weights, capsys, fmt):
    config = write_config(tmp_path, untrained_weights(MODEL))
    assert main(["export", "-c", str(config), "--format", fmt, str(tmp_path / "x")]) == 2
    assert "xrvd backfill" in capsys.readouterr().err
