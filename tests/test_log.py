"""Identifying values are hashed in every event (and kept out of the journal's transitions and
the metrics) unless `log.include_patient_identifiers` is true: the processor itself, the salt
kept in the state directory, and the three ways in (drop folder, back-fill, C-STORE) end to
end, with a marker string in the patient's name, ID, accession number and file names."""

from __future__ import annotations

import io
import json
import os
import stat
import time
import urllib.request
from pathlib import Path

import pytest
import structlog
from pynetdicom import AE

from xrvd import log
from xrvd.store.core import transition_source

from .conftest import NIH_SC, RSNA_JPEG, WG04_CR
from .harness import DaemonProcess, copy_with_new_uids, write_config

MODEL = "densenet121-res224-all"
MARKER = "ZZMARKERZZ"
IDENTIFIERS = dict(PatientName=f"DOE^{MARKER}", PatientID=f"{MARKER}123",
                   AccessionNumber=f"A{MARKER}1", InstitutionName=f"{MARKER} HOSPITAL",
                   ReferringPhysicianName=f"WHO^{MARKER}", PatientBirthDate="19700101")


@pytest.fixture
def events_to(request):
    """log.configure(...) into a StringIO; returns (stream, parsed events) readers."""
    stream = io.StringIO()

    def configure(**options) -> io.StringIO:
        stream.seek(0)
        stream.truncate()
        log.configure("debug", "json", stream=stream, **options)
        return stream

    yield configure
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- the processor ----------------------------------------------------------------------


def test_identifying_values_hash_the_same_within_a_salt_and_differently_across(events_to):
    path = f"/archive/DOE_{MARKER}_12345/img.dcm"
    stream = events_to(salt=b"a" * 32)
    logger = log.get_logger()
    logger.info("file.skipped", file=path, reason="not_dicom",
                detail=f"cannot read {path}: no permission")
    logger.info("instance.stored", PatientName=f"DOE^{MARKER}", patient_id=f"{MARKER}1",
                accession_number=f"A{MARKER}", file=path)
    first, second = lines(stream)
    assert MARKER not in stream.getvalue()
    assert first["file"] == second["file"] == log.pseudonym(path, b"a" * 32)
    assert first["file"].startswith("id:") and len(first["file"]) == len("id:") + 16
    assert first["detail"] == f"cannot read {first['file']}: no permission"
    assert first["reason"] == "not_dicom"  # reason codes are not identifiers

    stream = events_to(salt=b"b" * 32)
    log.get_logger().info("file.skipped", file=path)
    assert lines(stream)[0]["file"] != first["file"]

    stream = events_to(salt=b"b" * 32, include_patient_identifiers=True)
    log.get_logger().info("file.skipped", file=path, detail=f"cannot read {path}")
    assert lines(stream)[0] == {**lines(stream)[0], "file": path,
                                "detail": f"cannot read {path}"}


def test_nested_values_and_private_folders_are_covered(events_to, tmp_path):
    drop = tmp_path / "drop"
    stream = events_to(salt=b"s" * 32)
    log.private_folder(drop)
    log.get_logger().info(
        "daemon.unhealthy", folder=str(drop),
        problems=[f"cannot move {drop}/DOE_{MARKER}/x.dcm: disk full",
                  {"file": f"{MARKER}.dcm", "nested": {"patient_name": MARKER}}],
        study={"accession_number": [f"A{MARKER}", f"B{MARKER}"]},
        error=f"FileNotFoundError(2, 'No such file or directory', '{drop}/{MARKER} 1.dcm')")
    [event] = lines(stream)
    assert MARKER not in stream.getvalue()
    assert event["folder"] == str(drop)  # the configured folder itself is not private
    assert event["problems"][0].startswith("cannot move id:") and \
        event["problems"][0].endswith(": disk full")
    assert event["problems"][1]["file"].startswith("id:")
    assert event["study"]["accession_number"][0] != event["study"]["accession_number"][1]
    assert event["error"].startswith("FileNotFoundError(2, 'No such file or directory', 'id:")


def test_free_text_for_events_and_the_journal(events_to):
    path = f"/archive/DOE_{MARKER}/x.dcm"
    events_to(salt=b"t" * 32)
    text = log.redact_text(f"{path} is gone (No such file or directory)", Path(path))
    assert text == f"{log.pseudonym(path, b't' * 32)} is gone (No such file or directory)"
    missing = FileNotFoundError(2, "No such file or directory", path)
    assert log.error_text(missing) == "FileNotFoundError: No such file or directory"
    assert log.error_text(ValueError("bad")) == "ValueError: bad"
    events_to(salt=b"t" * 32, include_patient_identifiers=True)
    assert log.redact_text(f"{path} is gone", path) == f"{path} is gone"

    assert transition_source(f"watch:DOE_{MARKER}/x.dcm") == "watch"
    assert transition_source("backfill") == "backfill"
    assert transition_source("scp:MODALITY@10.0.0.7") == "scp:MODALITY@10.0.0.7"
    assert transition_source(path) == "other"


def test_the_salt_is_made_once_kept_private_and_never_written_by_readers(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert log.load_salt(state, create=False) == log.process_salt()
    assert not (state / log.SALT_FILE).exists()  # a command that only reads writes nothing

    salt = log.load_salt(state)
    assert salt != log.process_salt() and len(salt) >= 16
    assert stat.S_IMODE((state / log.SALT_FILE).stat().st_mode) == 0o600
    assert log.load_salt(state) == salt == log.load_salt(state, create=False)
    assert [p.name for p in state.iterdir()] == [log.SALT_FILE]  # no temporary left

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert log.load_salt(not_a_folder) == log.process_salt()  # cannot write: process salt


# --- end to end: nothing leaks by any way in --------------------------------------------


def send(port: int, datasets) -> list[int]:
    ae = AE(ae_title="XRVDTEST")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="XRVD")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def everything_logged(process: DaemonProcess) -> str:
    return "\n".join(json.dumps(e) for e in process.events) + "\n" + process.stderr


def journal_text(process: DaemonProcess) -> str:
    return repr(process.journal("SELECT * FROM transitions")) + \
        repr(process.journal("SELECT * FROM studies"))


@pytest.mark.parametrize("include", [False, True], ids=["hashed", "included"])
def test_drop_folder_and_cstore(tmp_path, weights_copy, include):
    drop = tmp_path / "drop"
    config = write_config(tmp_path, weights_copy(MODEL),
                          watch={"enabled": True, "folder": str(drop), "stable_seconds": 120},
                          service={"worker_processes": 0,
                                   "metrics": {"enabled": True, "port": 0}},
                          log={"level": "debug", "include_patient_identifiers": include})
    xrvd = DaemonProcess(config, tmp_path / "state")
    try:
        xrvd.start()
        sent = copy_with_new_uids(NIH_SC, tmp_path / "sent.dcm", **IDENTIFIERS)
        assert send(xrvd.port, [sent]) == [0]

        dropped = copy_with_new_uids(WG04_CR, tmp_path / "staged" / f"img_{MARKER}.dcm",
                                     **IDENTIFIERS)
        garbage = tmp_path / "staged" / f"notes_{MARKER}.txt"
        garbage.write_text(f"not an image of {MARKER}\n")
        for staged in (tmp_path / "staged").iterdir():  # complete an hour ago: taken at once
            os.utime(staged, (time.time() - 3600, time.time() - 3600))
        os.rename(tmp_path / "staged", drop / f"DOE_{MARKER}_12345")

        xrvd.wait_for("instance.stored", sop_instance_uid=dropped.SOPInstanceUID)
        xrvd.wait_for("file.rejected")
        xrvd.wait_for("study.classified", study_instance_uid=sent.StudyInstanceUID)
        xrvd.wait_for("study.classified", study_instance_uid=dropped.StudyInstanceUID)
        port = xrvd.wait_for("metrics.listening")[0]["port"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert xrvd.terminate() == 0
    finally:
        xrvd.stop()

    assert 'xrvd_instances_refused_total{reason="not_dicom"} 1.0' in metrics
    assert MARKER not in metrics
    assert MARKER not in journal_text(xrvd)
    assert xrvd.journal("SELECT COUNT(*) FROM instances WHERE source LIKE ?",
                        (f"watch:%{MARKER}%",)) == [(1,)]  # the journal's own record stays
    logged = everything_logged(xrvd)
    if include:
        assert f"DOE_{MARKER}_12345/img_{MARKER}.dcm" in logged
    else:
        assert MARKER not in logged
        [rejected] = xrvd.find("file.rejected")
        assert rejected["file"].startswith("id:") and rejected["moved_to"].startswith("id:")


@pytest.mark.parametrize("include", [False, True], ids=["hashed", "included"])
def test_backfill(tmp_path, untrained_weights, include):
    archive = tmp_path / "archive"
    patient = archive / f"DOE_{MARKER}_12345"
    copy_with_new_uids(RSNA_JPEG, patient / f"img_{MARKER}.dcm", **IDENTIFIERS)
    copy_with_new_uids(NIH_SC, patient / f"lateral_{MARKER}.dcm", ViewPosition="LL",
                       **IDENTIFIERS)
    (patient / f"notes_{MARKER}.txt").write_text(f"not an image of {MARKER}\n")
    (patient / f"empty_{MARKER}.dcm").write_bytes(b"")
    config = write_config(tmp_path, untrained_weights(MODEL),
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
