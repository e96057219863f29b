"""`xrvd serve` delivering its reports by C-STORE to destinations: a real pynetdicom peer stands
in for the PACS; one that is down, one that answers with a warning, one that refuses SR.
Sending itself (TLS) is tested in tests/test_deliver.py."""

from __future__ import annotations

import json
import threading

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from xrvd.cli import main
from xrvd.report.build import read_findings

from ..harness import NIH_SC, copy_with_new_uids, send

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


def test_reports_reach_every_destination_once_despite_one_down(daemon, pacs, tmp_path,
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


def test_warning_status_counts_as_stored(daemon, pacs, tmp_path):
    coerced = pacs(status=0xB000)  # "coercion of data elements": stored, with changes
    xrvd = daemon(destinations=[{"name": "coercing", "ae_title": "PACS",
                                 "host": "127.0.0.1", "port": coerced.port}],
                  delivery={"max_attempts": 3, "retry_seconds": 0.1})
    assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
    sent = xrvd.wait_for("report.sent")[0]
    assert sent["detail"] == "status 0xB000"
    assert len(coerced.received) == 1 and not xrvd.find("report.send_failed")


def test_destination_refusing_sr_is_marked_failed(daemon, pacs, tmp_path):
    picky = pacs(accept_sr=False)
    xrvd = daemon(destinations=[{"name": "picky", "ae_title": "PACS", "host": "127.0.0.1",
                                 "port": picky.port}],
                  delivery={"max_attempts": 2, "retry_seconds": 0.1})
    assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
    failed = xrvd.wait_for("report.send_failed", final=True)[0]
    assert "does not accept" in failed["detail"]
    assert picky.received == []
