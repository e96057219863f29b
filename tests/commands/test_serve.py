"""`xrvd serve` end to end, as a real subprocess: DCMTK storescu and pynetdicom send to it,
files are dropped into its folder, crafted headers and its own reports come in by C-STORE,
only the frontal image of a study is reported, identifying values stay out of its events,
metrics and journal transitions, it is killed with SIGKILL part-way, and its first start
exports the ONNX graph; the worker process count it chooses. Its destinations are in
test_serve_delivery.py, running as a service in test_serve_service.py, a real PACS in
test_serve_orthanc.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from xrvd.report.build import FINDING_CODES, read_findings

from ..harness import (
    CRAFTED,
    CXR,
    IDENTIFIERS,
    MARKER,
    MODEL,
    NIH_SC,
    REJECT,
    RSNA_JPEG,
    TINY_CR,
    WG04_CR,
    DaemonProcess,
    copy_with_new_uids,
    dciodvfy_errors,
    everything_logged,
    journal_text,
    results,
    send,
    storescu,
    sidecar,
    write_config,
    write_crafted,
)


def associate(port: int, calling_aet: str = "XRVDTEST", contexts=None):
    ae = AE(ae_title=calling_aet)
    for sop_class in contexts or []:
        ae.add_requested_context(sop_class)
    return ae, ae.associate("127.0.0.1", port, ae_title="XRVD")


@pytest.mark.parametrize("worker_processes", [0, 2])
def test_storescu_sends_every_fixture(daemon, worker_processes):
    """Also with decoding and report writing in worker processes (the same results)."""
    xrvd = daemon(service={"worker_processes": worker_processes})
    files = sorted(CXR.glob("*.dcm")) + sorted(REJECT.glob("*.dcm"))
    done = storescu(xrvd.port, files)
    assert done.returncode == 0, done.stderr
    xrvd.wait_for("instance.stored", count=len(files))
    studies = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}
    xrvd.wait_for("study.classified", count=len(studies))
    classified = xrvd.journal(
        "SELECT sop_uid FROM instances WHERE state = 'classified'")
    expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                for f in (WG04_CR, NIH_SC, RSNA_JPEG)}
    assert {uid for (uid,) in classified} == expected
    skipped = dict(xrvd.journal("SELECT sop_uid, reason FROM instances "
                                "WHERE state = 'skipped'"))
    reasons = {f.name: skipped[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID]
               for f in [TINY_CR, *sorted(REJECT.glob("*.dcm"))]}
    assert reasons == {
        "tiny_cr_chest_mono1_32px.dcm": "too_small",
        "CT_small.dcm": "modality",
        "MR_small.dcm": "modality",
        "SC_rgb.dcm": "modality",
        "US_ybr_j2k.dcm": "modality",
        "highdicom_sr_document.dcm": "not_an_image",
    }
    for event in xrvd.find("instance.skipped"):
        assert event["reason"] and event["detail"]
    # One result per study that had a classifiable image, each naming its images once.
    written = results(xrvd.state_dir)
    assert len(written) == 3
    images = [img["sop_instance_uid"] for path in written for img in sidecar(path)["images"]]
    assert sorted(images) == sorted(expected)
    # Each report reads back (highdicom) into the scores the journal holds, and is valid.
    journal = xrvd.journal("SELECT i.sop_uid, s.label, s.score FROM scores s "
                           "JOIN instances i ON i.id = s.instance_id")
    for path in written:
        report = pydicom.dcmread(path)
        assert report.Manufacturer == "xrvd"
        for uid, findings in read_findings(report).items():
            stored = {FINDING_CODES[label][2]: score for u, label, score in journal
                      if u == uid}
            assert {k: round(v[0], 6) for k, v in findings.items()} == \
                {k: round(v, 6) for k, v in stored.items()}
    # No patient name or ID reaches the events (log.include_patient_identifiers is off).
    logged = json.dumps(xrvd.events, ensure_ascii=False) + xrvd.stderr
    for f in files:
        header = pydicom.dcmread(f, stop_before_pixels=True)
        for identifier in (str(header.get("PatientName", "")), str(header.get("PatientID", ""))):
            if len(identifier) > 2:
                assert identifier not in logged
    assert xrvd.terminate() == 0
    assert xrvd.find("daemon.stopped")
    for path in written:  # last: skipped where dicom3tools is not installed (fails in CI)
        assert dciodvfy_errors(path) == []


def test_pynetdicom_echo_and_store(daemon):
    xrvd = daemon()
    ae, assoc = associate(xrvd.port, contexts=[Verification])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    statuses = send(xrvd.port, [pydicom.dcmread(NIH_SC), pydicom.dcmread(RSNA_JPEG)])
    assert statuses == [0, 0]
    xrvd.wait_for("study.classified", count=2)
    assert len(results(xrvd.state_dir)) == 2


def test_unknown_calling_aet_is_rejected(daemon):
    xrvd = daemon()
    ae, assoc = associate(xrvd.port, calling_aet="INTRUDER", contexts=[Verification])
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
    event = xrvd.wait_for("association.rejected")[0]
    assert event["calling_aet"] == "INTRUDER" and event["reason"] == "calling_aet_not_allowed"
    done = storescu(xrvd.port, [NIH_SC], calling_aet="INTRUDER")
    assert done.returncode != 0
    assert xrvd.journal("SELECT COUNT(*) FROM instances") == [(0,)]


def test_oversize_instance_is_refused(daemon):
    xrvd = daemon(scp={"max_instance_bytes": 2_000_000})
    statuses = send(xrvd.port, [pydicom.dcmread(WG04_CR), pydicom.dcmread(NIH_SC)])
    assert statuses == [0xA700, 0]  # 7.2 MB refused: out of resources; 1 MB accepted
    refused = xrvd.wait_for("instance.refused")[0]
    assert refused["reason"] == "too_large"
    assert xrvd.journal("SELECT COUNT(*) FROM instances") == [(1,)]
    assert list((xrvd.state_dir / "spool" / ".incoming").iterdir()) == []


def test_duplicate_instance_is_recognised(daemon, tmp_path):
    xrvd = daemon()
    ds = pydicom.dcmread(NIH_SC)
    assert send(xrvd.port, [ds]) == [0]
    assert send(xrvd.port, [ds]) == [0]  # acknowledged, not stored twice
    xrvd.wait_for("instance.duplicate")
    changed = pydicom.dcmread(NIH_SC)
    changed.PatientComments = "corrected"
    assert send(xrvd.port, [changed]) == [0]
    xrvd.wait_for("instance.stored", status="new_version")
    rows = xrvd.journal("SELECT version, state FROM instances WHERE sop_uid = ? "
                        "ORDER BY version", (ds.SOPInstanceUID,))
    assert [version for version, _ in rows] == [1, 2]
    assert rows[0][1] == "superseded"


def test_late_instance_reruns_the_study(daemon, tmp_path):
    xrvd = daemon()
    study = pydicom.uid.generate_uid()
    first = copy_with_new_uids(NIH_SC, tmp_path / "a.dcm", study_uid=study)
    assert send(xrvd.port, [first]) == [0]
    xrvd.wait_for("study.classified", study_instance_uid=study)
    second = copy_with_new_uids(RSNA_JPEG, tmp_path / "b.dcm", study_uid=study)
    assert send(xrvd.port, [second]) == [0]
    xrvd.wait_for("study.classified", count=2, study_instance_uid=study)
    runs = xrvd.journal("SELECT generation, state FROM runs ORDER BY generation")
    assert runs == [(0, "done"), (1, "done")]
    first_report, latest_report = results(xrvd.state_dir)
    latest = sidecar(latest_report)
    assert latest["generation"] == 1 and len(latest["images"]) == 2
    rerun = pydicom.dcmread(latest_report)
    [predecessor] = rerun.PredecessorDocumentsSequence
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == pydicom.dcmread(first_report).SOPInstanceUID


def test_drop_folder(daemon, tmp_path):
    drop = tmp_path / "drop"
    (drop / "nested" / "deeper").mkdir(parents=True)
    # Left in the folder while the daemon was down (an hour ago): taken at start-up.
    present = copy_with_new_uids(NIH_SC, drop / "already-here")
    os.utime(drop / "already-here", (time.time() - 3600, time.time() - 3600))
    # File names are asserted on below: logged as they are (they are pseudonyms by default).
    xrvd = daemon(watch={"enabled": True, "folder": str(drop), "stable_seconds": 120},
                  log={"include_patient_identifiers": True})
    xrvd.wait_for("instance.stored", sop_instance_uid=present.SOPInstanceUID)

    garbage = drop / "nested" / "notes.txt"
    garbage.write_text("this is not an image\n")
    # A half-written file stays untouched while its writer keeps it open ...
    half = drop / "nested" / "deeper" / "IMG0001"
    copy_with_new_uids(WG04_CR, tmp_path / "whole.dcm")
    whole = (tmp_path / "whole.dcm").read_bytes()
    writer = open(half, "wb")
    writer.write(whole[: len(whole) // 2])
    writer.flush()
    # ... while a complete file dropped after it is taken, and the garbage rejected.
    later = copy_with_new_uids(RSNA_JPEG, tmp_path / "rsna.dcm")
    shutil.copy(tmp_path / "rsna.dcm", drop / "nested" / "rsna")
    xrvd.wait_for("instance.stored", sop_instance_uid=later.SOPInstanceUID)
    rejected = xrvd.wait_for("file.rejected")[0]
    assert rejected["file"] == "nested/notes.txt"
    assert half.exists() and not xrvd.find("file.rejected", file="nested/deeper/IMG0001")
    writer.write(whole[len(whole) // 2:])
    writer.close()
    xrvd.wait_for("instance.stored", file="nested/deeper/IMG0001")
    assert not half.exists() and not garbage.exists()
    reason = tmp_path / "rejected" / "nested" / "notes.txt.reason.txt"
    assert "not a DICOM" in reason.read_text() or "not a readable DICOM" in reason.read_text()
    assert (tmp_path / "rejected" / "nested" / "notes.txt").read_text() == \
        "this is not an image\n"
    xrvd.wait_for("study.classified", count=3)


def test_drop_folder_vanishes_and_comes_back(daemon, tmp_path):
    drop = tmp_path / "drop"
    # The new inotify watch may miss a file copied at once; the stability rule takes it.
    xrvd = daemon(watch={"enabled": True, "folder": str(drop), "stable_seconds": 1,
                         "poll_seconds": 0.5})
    shutil.rmtree(drop)
    xrvd.wait_for("watch.restarting")
    drop.mkdir(exist_ok=True)
    ds = copy_with_new_uids(NIH_SC, tmp_path / "x.dcm")
    shutil.copy(tmp_path / "x.dcm", drop / "x.dcm")
    xrvd.wait_for("instance.stored", sop_instance_uid=ds.SOPInstanceUID)


class _BackgroundSender:
    """Sends datasets on one association in a thread, recording each acknowledgement."""

    def __init__(self, port, datasets):
        self.statuses: dict[str, int] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(port, datasets), daemon=True)
        self._thread.start()

    def _run(self, port, datasets):
        ae = AE(ae_title="XRVDTEST")
        ae.add_requested_context(datasets[0].SOPClassUID,
                                 datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="XRVD")
        try:
            for ds in datasets if assoc.is_established else []:
                status = assoc.send_c_store(ds)
                if "Status" not in status:
                    break
                with self._cond:
                    self.statuses[ds.SOPInstanceUID] = int(status.Status)
                    self._cond.notify_all()
        finally:
            if assoc.is_established:
                assoc.release()
            with self._cond:
                self._cond.notify_all()

    def wait_acknowledged(self, count, timeout=60):
        with self._cond:
            assert self._cond.wait_for(
                lambda: len(self.statuses) >= count or not self._thread.is_alive(), timeout)

    def join(self):
        self._thread.join(timeout=60)
        return {uid for uid, status in self.statuses.items() if status == 0}


@pytest.mark.parametrize("kill_after", [3, 9])
def test_sigkill_while_receiving_loses_no_acknowledged_instance(daemon, tmp_path, kill_after):
    datasets = []
    studies = [pydicom.uid.generate_uid() for _ in range(4)]
    for i in range(16):
        datasets.append(copy_with_new_uids(NIH_SC, tmp_path / f"{i}.dcm",
                                           study_uid=studies[i % 4]))
    xrvd = daemon()
    sender = _BackgroundSender(xrvd.port, datasets)
    sender.wait_acknowledged(kill_after)
    xrvd.kill()  # more instances are in flight at this moment
    acknowledged = sender.join()
    assert len(acknowledged) >= kill_after
    xrvd.start()
    journaled = {uid for (uid,) in xrvd.journal("SELECT sop_uid FROM instances")}
    assert acknowledged <= journaled
    # Send the rest again, as a sender retrying after the failure would.
    remaining = [ds for ds in datasets if ds.SOPInstanceUID not in acknowledged]
    if remaining:
        assert set(send(xrvd.port, remaining)) == {0}
    xrvd.wait_until(lambda: xrvd.journal(
        "SELECT COUNT(*) FROM studies WHERE state = 'classified'") == [(4,)],
        what="all four studies classified")
    assert xrvd.journal("SELECT COUNT(DISTINCT sop_uid) FROM instances") == [(16,)]
    _assert_once_per_study(xrvd)


@pytest.mark.parametrize("kill_on", ["study.settled", "report.written"])
def test_sigkill_while_classifying_never_duplicates_results(daemon, tmp_path, kill_on):
    datasets = [copy_with_new_uids(NIH_SC, tmp_path / f"{i}.dcm") for i in range(6)]
    xrvd = daemon()
    assert send(xrvd.port, datasets) == [0] * 6
    xrvd.wait_for(kill_on)
    xrvd.kill()
    xrvd.start()
    xrvd.wait_until(lambda: xrvd.journal(
        "SELECT COUNT(*) FROM studies WHERE state = 'classified'") == [(6,)],
        what="all six studies classified")
    _assert_once_per_study(xrvd)


def _assert_once_per_study(xrvd):
    """One done run, and one result file, per study and generation (a generation is added
    only when images arrive after a study was classified); the latest result of each study
    names each of its images exactly once."""
    runs = xrvd.journal("SELECT s.study_uid, r.generation, r.result_path FROM runs r "
                        "JOIN studies s ON s.id = r.study_id WHERE r.state = 'done'")
    assert runs and len(runs) == len({(uid, gen) for uid, gen, _ in runs})
    files = results(xrvd.state_dir)
    assert sorted(files) == sorted(Path(path) for *_, path in runs)
    for (study_uid,) in xrvd.journal("SELECT study_uid FROM studies"):
        latest = max((gen, path) for uid, gen, path in runs if uid == study_uid)[1]
        images = list(read_findings(pydicom.dcmread(latest)))
        expected = xrvd.journal(
            "SELECT i.sop_uid FROM instances i JOIN studies s ON s.id = i.study_id "
            "WHERE s.study_uid = ? AND i.state != 'superseded'", (study_uid,))
        assert sorted(images) == sorted(uid for (uid,) in expected)


def test_first_start_exports_the_graph_and_the_next_takes_it_from_the_cache(tmp_path,
                                                                           weights_copy):
    """From weights alone (the other daemon tests start with the graph exported once per
    session): the first start exports the ONNX graph, checks it against PyTorch and records
    it in the state directory; a restart loads it from the cache."""
    config = write_config(tmp_path, weights_copy(MODEL))
    xrvd = DaemonProcess(config, tmp_path / "state")
    try:
        xrvd.start()
        [exported] = xrvd.find("model.exported")
        assert exported["verified"] is True
        assert [e["source"] for e in xrvd.find("model.backend")] == ["exported"]
        assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
        xrvd.wait_for("study.classified")
        assert xrvd.terminate() == 0
        xrvd.start()
        assert [e["source"] for e in xrvd.find("model.backend")] == ["cache"]
        assert not xrvd.find("model.exported")
        assert xrvd.terminate() == 0
    finally:
        xrvd.stop()


def test_serve_without_weights_says_what_to_do(tmp_path):
    config = write_config(tmp_path, tmp_path / "no-weights")
    done = subprocess.run([sys.executable, "-m", "xrvd", "serve", "-c", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"xrvd models fetch {MODEL}" in done.stderr
    assert f"xrvd models import {MODEL}" in done.stderr
    assert any(json.loads(line)["event"] == "daemon.start_failed"
               for line in done.stdout.splitlines())


def test_crafted_instances_by_c_store_get_their_reasons_and_spare_the_study(daemon, tmp_path,
                                                                           monkeypatch):
    """One study of a good CR and the crafted headers a probe sends (sent as files, as they
    are on disk): the unparseable one is refused with its reason and leaves nothing behind,
    the others are stored, skipped as invalid_header, and the good image is still reported."""
    from pydicom.uid import generate_uid
    from pynetdicom import _config

    # The sender streams each file's bytes as they are (pynetdicom's chunked send), never
    # parsing them: pydicom would stop at the crafted header before anything is sent.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    xrvd = daemon()
    study = generate_uid()
    good = copy_with_new_uids(WG04_CR, tmp_path / "good.dcm", study_uid=study)
    paths = {"good": tmp_path / "good.dcm"}
    for kind in CRAFTED:
        paths[kind] = tmp_path / f"{kind}.dcm"
        write_crafted(kind, WG04_CR, paths[kind], study_uid=study)
    ae = AE(ae_title="XRVDTEST")
    ae.add_requested_context(good.SOPClassUID, good.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", xrvd.port, ae_title="XRVD")
    assert assoc.is_established
    try:
        statuses = {kind: int(assoc.send_c_store(path).Status) for kind, path in paths.items()}
    finally:
        assoc.release()
    assert statuses == {"good": 0, "deep_nesting": 0xC000, "bits_stored_2000": 0,
                        "bits_stored_40": 0, "rows_beyond_pixel_data": 0}
    assert [e["reason"] for e in xrvd.find("instance.refused")] == ["invalid_header"]
    classified = xrvd.wait_for("study.classified", study_instance_uid=study)[0]
    assert (classified["classified"], classified["skipped"]) == (1, 3)
    assert sorted(e["reason"] for e in xrvd.find("instance.skipped")) == ["invalid_header"] * 3
    assert len(results(xrvd.state_dir)) == 1
    assert list((xrvd.state_dir / "spool" / ".incoming").iterdir()) == []
    assert xrvd.terminate() == 0


def test_own_report_coming_back_is_skipped(daemon, tmp_path):
    xrvd = daemon()
    assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
    xrvd.wait_for("report.written")
    [report_path] = results(xrvd.state_dir)
    report = pydicom.dcmread(report_path)
    assert send(xrvd.port, [report]) == [0]  # a PACS forwarding everything back to us
    skipped = xrvd.wait_for("instance.skipped", sop_instance_uid=report.SOPInstanceUID)[0]
    assert skipped["reason"] == "own_output"
    # and as an Enhanced SR too: recognised whatever its SOP class
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = \
        pydicom.uid.generate_uid()
    assert send(xrvd.port, [report]) == [0]
    again = xrvd.wait_for("instance.skipped", sop_instance_uid=report.SOPInstanceUID)[0]
    assert again["reason"] == "own_output"
    assert len(results(xrvd.state_dir)) == 1


def test_only_the_frontal_image_of_a_study_is_reported(daemon, tmp_path):
    xrvd = daemon()
    study = pydicom.uid.generate_uid()
    frontal = copy_with_new_uids(WG04_CR, tmp_path / "pa.dcm", study_uid=study)
    lateral = copy_with_new_uids(WG04_CR, tmp_path / "ll.dcm", study_uid=study,
                                 ViewPosition="LL")
    assert send(xrvd.port, [frontal, lateral]) == [0, 0]
    xrvd.wait_for("study.classified", study_instance_uid=study)
    [report_path] = results(xrvd.state_dir)
    assert set(read_findings(pydicom.dcmread(report_path))) == {frontal.SOPInstanceUID}
    skipped = xrvd.find("instance.skipped", sop_instance_uid=lateral.SOPInstanceUID)
    assert skipped[0]["reason"] == "lateral_view"


@pytest.mark.parametrize("include", [False, True], ids=["hashed", "included"])
def test_identifiers_stay_out_of_events_from_the_drop_folder_and_cstore(daemon, tmp_path,
                                                                         include):
    """An instance by C-STORE and a folder named after the patient dropped with an image and
    a text file in it: the marker reaches no event, metric or journal transition, unless
    log.include_patient_identifiers is true (then the file names are logged as they are)."""
    drop = tmp_path / "drop"
    xrvd = daemon(watch={"enabled": True, "folder": str(drop), "stable_seconds": 120},
                  service={"worker_processes": 0, "metrics": {"enabled": True, "port": 0}},
                  log={"level": "debug", "include_patient_identifiers": include})
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
