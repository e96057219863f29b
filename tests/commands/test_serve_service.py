"""`xrvd serve` running as a service: sd_notify and the watchdog, a stalled worker seen by
/healthz, SIGHUP reloads, a disk below its reserve, spool retention. The unit file is checked
in tests/test_systemd.py; status, retry and echo in test_ops.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ..harness import MODEL, NIH_SC, copy_with_new_uids, send


class NotifySocket:
    """The datagram socket systemd would own; collects every message the daemon sends."""

    def __init__(self, folder: Path):
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._cond:
                self.messages.append(fields)
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, after: int = 0, timeout=60) -> int:
        """Index of the first message after `after` holding key (=value)."""
        def found():
            for i, message in enumerate(self.messages[after:], after):
                if key in message and (value is None or message[key] == value):
                    return i
            return None

        with self._cond:
            assert self._cond.wait_for(lambda: found() is not None, timeout), \
                f"no {key}={value} from the daemon; got {self.messages[-5:]}"
            return found()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_notify_watchdog_stall_health_and_stop(daemon, tmp_path):
    notify = NotifySocket(tmp_path)
    try:
        xrvd = daemon(
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000"},
            study={"settle_seconds": 1},
            service={"worker_stall_seconds": 2, "status_seconds": 0.3, "drain_seconds": 1,
                     "metrics": {"enabled": True, "port": 0}})
        ready = notify.wait_for("READY", "1")
        assert "STATUS" in notify.messages[ready]
        first_ping = notify.wait_for("WATCHDOG", "1", after=ready)
        notify.wait_for("WATCHDOG", "1", after=first_ping + 1)
        status = notify.messages[notify.wait_for("STATUS", after=ready + 1)]["STATUS"]
        assert "studies waiting" in status and MODEL in status

        port = xrvd.wait_for("metrics.listening")[0]["port"]
        base = f"http://127.0.0.1:{port}"
        assert json.load(urllib.request.urlopen(f"{base}/healthz"))["healthy"] is True
        assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
        xrvd.wait_for("study.classified")
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        assert 'xrvd_instances_received_total{source="scp"} 1.0' in text
        assert "xrvd_images_classified_total 1.0" in text
        assert "xrvd_study_end_to_end_seconds_count 1.0" in text

        # Stall the worker for real: the next image's spool file becomes a FIFO nobody
        # writes to, so reading it blocks, as on a hung network mount.
        ds = copy_with_new_uids(NIH_SC, tmp_path / "stall.dcm")
        assert send(xrvd.port, [ds]) == [0]
        [(path,)] = xrvd.journal("SELECT path FROM instances WHERE sop_uid = ?",
                                 (ds.SOPInstanceUID,))
        spooled = xrvd.state_dir / "spool" / path
        spooled.unlink()
        os.mkfifo(spooled)
        unhealthy = xrvd.wait_for("daemon.unhealthy")[0]
        assert "worker stuck" in unhealthy["problems"][0]
        # The event and the notify socket are two channels: a healthy STATUS sent before
        # the problem was seen may still arrive after the event.
        mark = notify.wait_for("STATUS", after=len(notify.messages))
        while not notify.messages[mark]["STATUS"].startswith("UNHEALTHY"):
            mark = notify.wait_for("STATUS", after=mark + 1)
        later = notify.wait_for("STATUS", after=mark + 1)  # another status period passes ...
        assert not any("WATCHDOG" in m for m in notify.messages[mark:later + 1])  # ... no ping
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/healthz")
        assert info.value.code == 503

        with open(spooled, "wb"):  # release the reader; that image is then skipped
            pass
        assert xrvd.terminate() == 0
        notify.wait_for("STOPPING", "1")
    finally:
        notify.close()


def test_sighup_reloads_allow_list_and_keeps_associations(daemon, tmp_path):
    xrvd = daemon()
    config_path = tmp_path / "xrvd.yaml"
    ae = AE(ae_title="NEWCALLER")
    ae.add_requested_context(Verification)
    assert ae.associate("127.0.0.1", xrvd.port, ae_title="XRVD").is_rejected

    held = AE(ae_title="XRVDTEST")
    held.add_requested_context(Verification)
    open_assoc = held.associate("127.0.0.1", xrvd.port, ae_title="XRVD")
    assert open_assoc.is_established

    config = yaml.safe_load(config_path.read_text())
    config["scp"]["allowed_calling_aets"] = ["NEWCALLER"]
    config["model"]["threshold"] = 0.7
    config_path.write_text(yaml.safe_dump(config))
    xrvd.signal(signal.SIGHUP)
    reloaded = xrvd.wait_for("config.reloaded")[0]
    assert reloaded["needs_restart"] is None
    accepted = ae.associate("127.0.0.1", xrvd.port, ae_title="XRVD")
    assert accepted.is_established
    accepted.release()
    assert open_assoc.send_c_echo().Status == 0  # the open association was not dropped
    open_assoc.release()

    config["model"]["threshold"] = 1.7
    config["scp"]["allowed_calling_aets"] = ["SOMEONEELSE"]
    config_path.write_text(yaml.safe_dump(config))
    xrvd.signal(signal.SIGHUP)
    failed = xrvd.wait_for("config.reload_failed")[0]
    assert "model.threshold: must be between 0 and 1, got 1.7" in failed["problems"]
    still = ae.associate("127.0.0.1", xrvd.port, ae_title="XRVD")
    assert still.is_established  # the old, valid policy stays
    still.release()
    assert xrvd.terminate() == 0


def test_low_disk_refuses_reports_health_and_resumes_on_reload(daemon, tmp_path):
    """A reserve larger than the disk: C-STORE answers A700 before anything is written, a
    disk.low event and /healthz say why, the watchdog keeps being pinged (a restart would not
    help); a reload with a reserve that fits makes it receive again, by itself."""
    xrvd = daemon(storage={"min_free_mb": 2**40},
                   service={"status_seconds": 0.2, "metrics": {"enabled": True, "port": 0}})
    low = xrvd.wait_for("disk.low")[0]
    assert "storage.min_free_mb" in low["detail"]
    base = f"http://127.0.0.1:{xrvd.wait_for('metrics.listening')[0]['port']}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{base}/healthz")
    assert info.value.code == 503
    assert any("disk low" in p for p in json.load(info.value)["problems"])
    assert "xrvd_disk_low 1.0" in urllib.request.urlopen(f"{base}/metrics").read().decode()
    assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0xA700]
    assert xrvd.find("instance.refused", reason="disk_low")
    assert not list((xrvd.state_dir / "spool" / ".incoming").iterdir())
    assert xrvd.journal("SELECT COUNT(*) FROM instances") == [(0,)]
    assert not xrvd.find("daemon.unhealthy")

    config_path = tmp_path / "xrvd.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["storage"]["min_free_mb"] = 0
    config_path.write_text(yaml.safe_dump(config))
    xrvd.signal(signal.SIGHUP)
    xrvd.wait_for("disk.ok")
    assert json.load(urllib.request.urlopen(f"{base}/healthz"))["healthy"] is True
    assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
    xrvd.wait_for("study.classified")
    assert xrvd.terminate() == 0


def test_spool_files_go_once_the_study_is_reported(daemon):
    """keep_spool none: once the study is classified (no destinations), its received file is
    deleted from the spool, and `xrvd status` counts none."""
    xrvd = daemon(storage={"keep_spool": "none"}, service={"status_seconds": 0.2})
    assert send(xrvd.port, [pydicom.dcmread(NIH_SC)]) == [0]
    xrvd.wait_for("study.classified")
    purged = xrvd.wait_for("spool.purged")[0]
    assert purged["files"] == 1
    assert not list((xrvd.state_dir / "spool").glob("??/*.dcm"))
    assert xrvd.terminate() == 0
