"""The drop folder watcher: files are taken once complete, whatever a callback or a scan does
wrong; crafted files are rejected with their reason; it waits while the disk is below its
reserve and goes on by itself. The whole daemon's drop folder is tested in
tests/commands/test_serve.py."""

from __future__ import annotations

import os
import shutil
import threading
import time

from structlog.testing import capture_logs

from xrvd.config import WatchConfig
from xrvd.fsutil import DiskReserve
from xrvd.ingest.watch import DropFolderWatcher
from xrvd.metrics import REGISTRY
from xrvd.store import Store

from ..harness import CRAFTED, NIH_SC, copy_with_new_uids, journal_rows, prepare


def refused(name: str) -> float:
    return REGISTRY.get_sample_value("xrvd_instances_refused_total", {"reason": name}) or 0.0


def test_watcher_survives_a_failing_callback(store, tmp_path, monkeypatch):
    drop = tmp_path / "drop"
    watcher = DropFolderWatcher(WatchConfig(enabled=True, folder=drop, stable_seconds=0.2,
                                            poll_seconds=0.1), store)
    calls = []

    def explode(path):
        calls.append(path)
        raise RuntimeError("bug in a callback")

    monkeypatch.setattr(watcher, "mark_closed", explode)
    watcher.start()
    try:
        copy_with_new_uids(NIH_SC, drop / "a.dcm")
        deadline = time.monotonic() + 30
        while store.counts()["instances"] != {"stored": 1}:  # the store signals each arrival
            assert time.monotonic() < deadline, "file never ingested"
            store.wait_for_work(0.1)
        assert calls and watcher._observer_healthy()
    finally:
        watcher.stop()


def test_drop_folder_waits_while_the_disk_is_low(tmp_path, events):
    store = Store(tmp_path / "state")
    free = {"bytes": 0}
    reserve = DiskReserve(tmp_path, 2**20, free=lambda _path: free["bytes"])
    drop = tmp_path / "drop"
    watcher = DropFolderWatcher(WatchConfig(enabled=True, folder=drop, stable_seconds=1),
                                store, reserve)
    dropped = drop / "a.dcm"
    copy_with_new_uids(NIH_SC, dropped)
    os.utime(dropped, (0, 0))  # long unchanged: complete
    try:
        assert watcher.scan() == 0
        assert dropped.exists() and store.counts()["instances"] == {}
        assert [e["reason"] for e in events if e["event"] == "watch.paused"] == ["disk_low"]
        free["bytes"] = 2**30
        assert watcher.scan() == 1
        assert not dropped.exists() and store.counts()["instances"] == {"stored": 1}
        assert [e["event"] for e in events if e["event"].startswith("watch.")] == [
            "watch.paused", "watch.resumed"]
    finally:
        store.close()


def test_drop_folder_rejects_an_unparseable_file_with_its_reason(crafted, store, tmp_path):
    drop, rejected = tmp_path / "drop", tmp_path / "rejected"
    drop.mkdir()
    for kind, path in crafted.items():
        shutil.copy(path, drop / path.name)
    good = copy_with_new_uids(NIH_SC, drop / "good.dcm")
    watcher = DropFolderWatcher(WatchConfig(folder=drop, rejected_folder=rejected,
                                            stable_seconds=3600), store)
    for path in drop.iterdir():
        watcher.mark_closed(path)  # complete: taken by this scan
    before = refused("invalid_header")
    with capture_logs() as events:
        assert watcher.scan() == len(CRAFTED)  # all but the deep nesting
    [event] = [e for e in events if e["event"] == "file.rejected"]
    assert (event["file"], event["reason"]) == ("deep_nesting.dcm", "invalid_header")
    assert refused("invalid_header") == before + 1
    assert not list(drop.iterdir())
    assert (rejected / "deep_nesting.dcm").read_bytes() == \
        crafted["deep_nesting"].read_bytes()
    reason = (rejected / "deep_nesting.dcm.reason.txt").read_text()
    assert reason.startswith("invalid_header: ") and "nested too deeply" in reason

    # The others are valid enough to store: the worker's stage gives each its reason.
    rows = journal_rows(store.state_dir, "SELECT id, sop_uid, path FROM instances")
    verdicts = {sop: prepare(store.spool / path, instance_id=n) for n, sop, path in rows}
    assert verdicts.pop(good.SOPInstanceUID).array is not None
    assert [v.skip_reason for v in verdicts.values()] == ["invalid_header"] * 3


class _Rescanned(BaseException):
    """Raised by a second scan: escapes the loop, which catches only Exception."""


class _Waited(threading.Event):
    """A stop event whose wait returns at once, as if the time had passed, and stops the loop."""

    def __init__(self):
        super().__init__()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        self.set()
        return True


class _FailingScans(DropFolderWatcher):
    def __init__(self, *args):
        super().__init__(*args)
        self.scans = 0
        self._stop = _Waited()

    def _observer_healthy(self) -> bool:
        return True  # no observer thread: the test runs the loop itself

    def scan(self) -> int:
        self.scans += 1
        if self.scans > 1:
            raise _Rescanned
        self.wake()  # reading a file makes file events, and they wake the watcher
        raise RuntimeError("the scan failed")


def test_a_failed_scan_waits_a_poll_interval_whatever_wakes_it(tmp_path):
    (tmp_path / "drop").mkdir()
    store = Store(tmp_path / "state")
    try:
        watcher = _FailingScans(WatchConfig(folder=tmp_path / "drop", poll_seconds=7), store)
        with capture_logs() as events:
            watcher._run()
        assert watcher.scans == 1
        assert watcher._stop.timeouts == [7]
        assert [e["event"] for e in events] == ["watch.scan_failed"]
    finally:
        store.close()
