"""`xrvd serve` end to end with a real PACS: Orthanc (Debian package) on loopback,
authentication on, sends the shared chest fixtures to xrvd, and gets the Structured Reports
back, also after it was down for a while."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from xrvd.report.files import heatmap_files

from ..harness import (
    MODEL,
    NIH_SC,
    REJECT,
    RSNA_JPEG,
    WG04_CR,
    DaemonProcess,
    Orthanc,
    copy_with_new_uids,
    dciodvfy_errors,
    send,
    write_config,
)


@pytest.fixture
def pacs_and_xrvd(tmp_path, ready_weights):
    orthanc = Orthanc(tmp_path)
    config = write_config(
        tmp_path, ready_weights(MODEL),
        scp={"allowed_calling_aets": ["ORTHANC", "XRVDTEST"]},
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": orthanc.dicom_port}],
        delivery={"retry_seconds": 0.5, "max_retry_seconds": 2, "max_attempts": 100})
    xrvd = DaemonProcess(config, tmp_path / "state").start()
    orthanc.configure(xrvd.port)
    orthanc.start()
    yield orthanc, xrvd
    xrvd.stop()
    orthanc.stop()


def test_orthanc_sends_images_and_gets_reports_back(pacs_and_xrvd):
    orthanc, xrvd = pacs_and_xrvd
    files = [WG04_CR, NIH_SC, RSNA_JPEG, *sorted(REJECT.glob("*.dcm"))]
    ids = [orthanc.rest("POST", "/instances", f.read_bytes())["ID"] for f in files]
    orthanc.rest("POST", "/modalities/xrvd/store", {"Resources": ids, "Synchronous": True})
    chest = [pydicom.dcmread(f, stop_before_pixels=True) for f in (WG04_CR, NIH_SC, RSNA_JPEG)]
    xrvd.wait_for("report.sent", count=len(chest), timeout=120)
    sr_ids = []
    for image in chest:
        reports = orthanc.reports_in_study(str(image.StudyInstanceUID))
        assert len(reports) == 1, f"study {image.StudyInstanceUID}: {reports}"
        sr_ids.extend(reports)
    # Orthanc now holds our reports; forwarding them back to xrvd changes nothing.
    orthanc.rest("POST", "/modalities/xrvd/store", {"Resources": sr_ids, "Synchronous": True})
    xrvd.wait_for("instance.skipped", count=len(sr_ids), reason="own_output")
    assert len(xrvd.find("report.written")) == len(chest)


def test_reports_arrive_once_after_orthanc_restarts(pacs_and_xrvd, tmp_path):
    orthanc, xrvd = pacs_and_xrvd
    orthanc.stop()
    studies = [copy_with_new_uids(NIH_SC, tmp_path / f"{i}.dcm") for i in range(3)]
    assert send(xrvd.port, studies) == [0, 0, 0]
    xrvd.wait_for("report.send_failed", count=3, final=False)  # the PACS is down: retrying
    orthanc.start()
    xrvd.wait_for("report.sent", count=3, timeout=120)
    for ds in studies:
        assert len(orthanc.reports_in_study(str(ds.StudyInstanceUID))) == 1


def test_heatmaps_are_written_cited_and_delivered_with_their_report(tmp_path, ready_weights):
    """output.heatmaps: each positive finding's heatmap is a Secondary Capture in its own
    series of the study, cited by the SR's group for that finding, valid under dciodvfy, and
    Orthanc stores it with the report; sent back to xrvd, it is not classified."""
    orthanc = Orthanc(tmp_path)
    own = {"Cardiomegaly": 0.0, "Effusion": 0.0}  # these two positive, every other absent
    config = write_config(
        tmp_path, ready_weights(MODEL), model={"threshold": 1.0, "thresholds": own},
        output={"heatmaps": True, "folder": str(tmp_path / "out")},
        scp={"allowed_calling_aets": ["ORTHANC", "XRVDTEST"]},
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": orthanc.dicom_port}])
    xrvd = DaemonProcess(config, tmp_path / "state").start()
    try:
        orthanc.configure(xrvd.port)
        orthanc.start()
        images = [copy_with_new_uids(WG04_CR, tmp_path / "in" / "cr.dcm"),
                  copy_with_new_uids(NIH_SC, tmp_path / "in" / "sc.dcm")]
        assert send(xrvd.port, images) == [0, 0]
        xrvd.wait_for("report.sent", count=2, timeout=180)
        written = xrvd.find("report.written")
        assert [event["heatmaps"] for event in written] == [2, 2]
        for image in images:
            [report_path] = (tmp_path / "out").glob(f"{image.StudyInstanceUID}/*.dcm")
            report = pydicom.dcmread(report_path)
            cited = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                     for group in report.ContentSequence[-1].ContentSequence
                     for item in group.ContentSequence if item.ValueType == "IMAGE"
                     and item.ConceptNameCodeSequence[0].CodeValue == "121080"}
            files = heatmap_files(report_path)
            heatmaps = [pydicom.dcmread(path) for path in files]
            assert {str(h.SOPInstanceUID) for h in heatmaps} == cited and len(cited) == 2
            for heatmap in heatmaps:
                assert heatmap.SOPClassUID == SecondaryCaptureImageStorage
                assert heatmap.StudyInstanceUID == image.StudyInstanceUID
                assert heatmap.SeriesInstanceUID not in (report.SeriesInstanceUID,
                                                         image.SeriesInstanceUID)
                assert heatmap.BurnedInAnnotation == "YES"
                assert "not for diagnosis" in heatmap.ImageComments
            stored = orthanc.rest("POST", "/tools/find", {
                "Level": "Instance", "Expand": True,
                "Query": {"StudyInstanceUID": str(image.StudyInstanceUID)}})
            uids = {item["MainDicomTags"]["SOPInstanceUID"] for item in stored}
            assert {str(report.SOPInstanceUID), *cited} <= uids
            assert dciodvfy_errors(report_path) == []
            assert all(dciodvfy_errors(path) == [] for path in files)
        # Forwarded back to xrvd (a PACS routing everything), neither is classified again.
        ids = orthanc.rest("POST", "/tools/find", {"Level": "Instance",
                                                   "Query": {"Modality": "OT"}})
        assert len(ids) == 4
        orthanc.rest("POST", "/modalities/xrvd/store", {"Resources": ids, "Synchronous": True})
        xrvd.wait_for("instance.skipped", count=4)
        assert len(xrvd.find("report.written")) == 2
    finally:
        xrvd.stop()
        orthanc.stop()
