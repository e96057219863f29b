"""Reports delivered by C-STORE to destinations: a real pynetdicom peer stands in for the
PACS; one that is down, one that refuses SR, our own SR coming back, a lateral + frontal
study."""

from __future__ import annotations

import json
import subprocess
import threading

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from xrvd.cli import main
from xrvd.report.build import read_findings

from .conftest import NIH_SC, WG04_CR, require_tool
from .harness import copy_with_new_uids
from .test_daemon import daemon, results, send  # noqa: F401 - the daemon fixture

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22"}


class Pacs:
    """A storage SCP on a free loopback port that keeps what it receives."""

    def __init__(self, accept_sr: bool = True, status: int = 0x0000):
        self.status = status
        self.received: list[pydicom.Dataset] = []
        self._cond = threading.Condition()
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            if accept_sr or context.abstract_syntax not in SR_CLASSES:
                ae.add_supported_context(context.abstract_syntax)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._cond:
            self.received.append(ds)
            self._cond.notify_all()
        return self.status

    def wait_for(self, count: int, timeout: float = 60) -> list[pydicom.Dataset]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.received) >= count, timeout), \
                f"PACS received {len(self.received)} of {count}"
            return list(self.received)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def pacs():
    started: list[Pacs] = []

    def make(**kwargs) -> Pacs:
        started.append(Pacs(**kwargs))
        return started[-1]

    yield make
    for server in started:
        server.close()


def closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reports_reach_every_destination_once_despite_one_down(daemon, pacs, tmp_path,  # noqa: F811
                                                               capsys):
    up, enhanced = pacs(), pacs()
    down = closed_port()
    xrvd = daemon(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": up.port},
            {"name": "old-archive", "ae_title": "PACS", "host": "127.0.0.1",
             "port": enhanced.port, "sr_flavour": "enhanced"},
            {"name": "down", "ae_title": "PACS", "host": "127.0.0.1", "port": down},
        ],
        delivery={"max_attempts": 3, "retry_seconds": 0.2, "timeout_seconds": 5})
    sources = [copy_with_new_uids(NIH_SC, tmp_path / f"{i}.dcm") for i in range(2)]
    assert send(xrvd.port, sources) == [0, 0]
    [first, second] = sorted(up.wait_for(2), key=lambda ds: ds.StudyInstanceUID)
    assert {first.SOPClassUID, second.SOPClassUID} == {"1.2.840.10008.5.1.4.1.1.88.34"}
    assert {ds.SOPClassUID for ds in enhanced.wait_for(2)} == {"1.2.840.10008.5.1.4.1.1.88.22"}
    # Same study as the image, and the findings the journal holds.
    by_study = {ds.StudyInstanceUID: ds for ds in sources}
    for report in (first, second):
        image = by_study[report.StudyInstanceUID]
        assert set(read_findings(report)) == {image.SOPInstanceUID}
    failures = xrvd.wait_for("report.send_failed", count=2, final=True, destination="down")
    assert "refused" in failures[0]["detail"] or "no association" in failures[0]["detail"]
    assert len(up.received) == 2 and len(enhanced.received) == 2  # exactly once each

    config = tmp_path / "xrvd.yaml"
    assert main(["status", "-c", str(config), "--json"]) == 0
    status = {d["name"]: d for d in json.loads(capsys.readouterr().out)["destinations"]}
    assert status["pacs"]["sent"] == 2 and status["old-archive"]["sent"] == 2
    assert status["down"]["failed"] == 2 and status["down"]["last_error"]


def test_warning_status_counts_as_stored(daemon, pacs, tmp_path):  # noqa: F811
    coerced = pacs(status=0xB000)  # "coercion of data elements": stored, with changes
    xrvd = daemon(destinations=[{"name": "coercing", "ae_title": "PACS",
                                 "host": "127.0.0.1", "port": coerced.port}],
                  delivery={"max_attempts": 3, "retry_seconds": 0.1})
    assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
    sent = xrvd.wait_for("report.sent")[0]
    assert sent["detail"] == "status 0xB000"
    assert len(coerced.received) == 1 and not xrvd.find("report.send_failed")


def test_destination_refusing_sr_is_marked_failed(daemon, pacs, tmp_path):  # noqa: F811
    picky = pacs(accept_sr=False)
    xrvd = daemon(destinations=[{"name": "picky", "ae_title": "PACS", "host": "127.0.0.1",
                                 "port": picky.port}],
                  delivery={"max_attempts": 2, "retry_seconds": 0.1})
    assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
    failed = xrvd.wait_for("report.send_failed", final=True)[0]
    assert "does not accept" in failed["detail"]
    assert picky.received == []


def test_own_report_coming_back_is_skipped(daemon, tmp_path):  # noqa: F811
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


def test_only_the_frontal_image_of_a_study_is_reported(daemon, tmp_path):  # noqa: F811
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


def test_delivery_over_tls(tmp_path):
    """A TLS peer with a certificate for 127.0.0.1: the report is sent when the CA is
    trusted, and refused when it is not."""
    import ssl

    from xrvd.config import Destination
    from xrvd.deliver import send_report
    from xrvd.report.build import build_report

    from .test_report import identity, scores_for

    openssl = require_tool("openssl", "openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(cert), str(key))
    received = []
    ae = AE(ae_title="PACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.34")
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_context,
                             evt_handlers=[(evt.EVT_C_STORE,
                                            lambda e: received.append(e.dataset) or 0)])
    try:
        source = pydicom.dcmread(NIH_SC, stop_before_pixels=True)
        report = build_report([source], scores_for([source], "densenet121-res224-nih"),
                              identity("densenet121-res224-nih"), 0.5)
        path = tmp_path / "sr.dcm"
        report.save_as(path, enforce_file_format=True)
        peer = {"name": "tls", "ae_title": "PACS", "host": "127.0.0.1",
                "port": server.server_address[1]}
        stored, detail = send_report(str(path), Destination(**peer, tls={"ca_file": cert}), 10)
        assert stored, detail
        assert [ds.SOPInstanceUID for ds in received] == [report.SOPInstanceUID]
        other_ca = tmp_path / "other.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=other", "-keyout", str(tmp_path / "k2.pem"),
                        "-out", str(other_ca)], check=True, capture_output=True)
        stored, detail = send_report(str(path), Destination(**peer, tls={"ca_file": other_ca}),
                                     10)
        assert not stored and len(received) == 1
    finally:
        server.shutdown()
