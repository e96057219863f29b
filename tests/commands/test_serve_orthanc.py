"""`xrvd serve` end to end with a real PACS: Orthanc (Debian package) on loopback,
authentication on, sends the shared chest fixtures to xrvd, and gets the Structured Reports
back, also after it was down for a while."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import pydicom
import pytest

from ..harness import (
    MODEL,
    NIH_SC,
    REJECT,
    RSNA_JPEG,
    WG04_CR,
    DaemonProcess,
    copy_with_new_uids,
    require_tool,
    send,
    write_config,
)

USER, PASSWORD = "xrvd", "s3cret-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, folder: Path, xrvd_port_file: Path | None = None):
        self.program = require_tool("Orthanc", "orthanc")
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = folder / "orthanc.json"
        self.proc: subprocess.Popen | None = None
        self._started = threading.Event()

    def configure(self, xrvd_port: int) -> None:
        self.config.write_text(json.dumps({
            "Name": "xrvd-test-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "DicomModalities": {"xrvd": ["XRVD", "127.0.0.1", xrvd_port]},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "Plugins": [], "HttpServerEnabled": True, "DicomServerEnabled": True,
            "StableAge": 1,
        }))

    def start(self) -> Orthanc:
        self._started.clear()
        self.proc = subprocess.Popen([self.program, str(self.config)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._started.wait(60), "Orthanc did not start"
        return self

    def _read(self):
        for line in self.proc.stdout:
            if "Orthanc has started" in line:
                self._started.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
            self._reader.join(timeout=10)
            self.proc.stdout.close()

    def rest(self, method: str, path: str, body: bytes | dict | None = None):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                         data=data, method=method)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def reports_in_study(self, study_uid: str) -> dict[str, str]:
        """Orthanc ID -> SOP Instance UID of the SR instances in a study."""
        found = self.rest("POST", "/tools/find", {
            "Level": "Instance", "Expand": True,
            "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}})
        return {item["ID"]: item["MainDicomTags"]["SOPInstanceUID"] for item in found}


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
