"""The drop folder waits while the disk is below its reserve, and goes on by itself."""

from __future__ import annotations

import os

from xrvd.config import WatchConfig
from xrvd.fsutil import DiskReserve
from xrvd.ingest.watch import DropFolderWatcher
from xrvd.store import Store

from .conftest import NIH_SC
from .harness import copy_with_new_uids


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
