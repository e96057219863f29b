"""The C-STORE SCP's answer when an instance cannot be taken (the store fails, a write fails,
the instance is over its size limit, the disk is below its reserve or fills up): out of
resources for that instance (the association goes on), nothing half written, and storing
resumes by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from xrvd.config import ScpConfig
from xrvd.fsutil import DiskReserve
from xrvd.store import Store, StoreError

from ..harness import WG04_CR, journal_rows, reasons, scp_association

OUT_OF_RESOURCES = 0xA700


class _FullStore(Store):
    def store_file(self, *args, **kwargs):
        raise StoreError("cannot write to the spool: No space left on device")


class _BrokenStore(Store):
    def store_file(self, *args, **kwargs):
        raise RuntimeError("a bug in the store")


def _leftovers(store: Store) -> list[Path]:
    return list(store.incoming.iterdir())


def test_scp_answers_out_of_resources_when_the_store_fails(tmp_path):
    store = _FullStore(tmp_path / "state")
    with scp_association(store) as (_, ds, assoc):
        assert assoc.send_c_store(ds).Status == OUT_OF_RESOURCES
        assert _leftovers(store) == []


def test_a_handler_error_is_answered_logged_and_leaves_no_file(tmp_path, events):
    store = _BrokenStore(tmp_path / "state")
    with scp_association(store) as (_, ds, assoc):
        status = assoc.send_c_store(ds)
        assert status.Status == 0xC211
        assert assoc.is_established
        assert _leftovers(store) == []
    assert reasons(events, "instance.refused") == ["internal_error"]


def test_scp_refuses_an_instance_it_cannot_write_and_keeps_the_association(tmp_path):
    """A write into the spool that fails (here: a file size limit, as a full disk would)
    gets 'out of resources' for that instance; the association goes on."""
    import resource

    store = Store(tmp_path / "state")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG
    try:
        with scp_association(store) as (_, ds, assoc):
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
            try:
                refused = assoc.send_c_store(ds)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            assert refused.Status == OUT_OF_RESOURCES
            assert assoc.is_established
            assert _leftovers(store) == []
            assert assoc.send_c_store(ds).Status == 0x0000  # the sender's retry is taken
            assert journal_rows(store.state_dir, "SELECT COUNT(*) FROM instances") == [(1,)]
    finally:
        signal.signal(signal.SIGXFSZ, previous)


def test_an_instance_over_the_size_limit_is_cut_off_while_it_arrives(tmp_path, events):
    """The 7 MB CR against a 1 MB limit: refused, and its file was removed as soon as it
    passed the limit (nothing is left in the incoming folder, nothing journaled)."""
    store = Store(tmp_path / "state")
    config = ScpConfig(port=0, allowed_calling_aets=["*"], max_instance_bytes=2**20)
    with scp_association(store, config, fixture=WG04_CR) as (_, ds, assoc):
        assert assoc.send_c_store(ds).Status == OUT_OF_RESOURCES
        assert assoc.is_established
        assert _leftovers(store) == []
        assert journal_rows(store.state_dir, "SELECT COUNT(*) FROM instances") == [(0,)]
    assert reasons(events, "instance.refused") == ["too_large"]


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs where root may mount one (as in CI), else an ordinary folder whose free
    space the test sets (DiskReserve's free function)."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True).returncode == 0
    yield mount, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_low_disk_refuses_before_writing_and_resumes_when_space_returns(small_disk, events):
    folder, mounted = small_disk
    store = Store(folder / "state")
    ballast = folder / "ballast"
    reserve_bytes = 12 * 2**20
    if mounted:
        reserve = DiskReserve(folder, reserve_bytes)
    else:
        state = {"free": 100 * 2**20}
        reserve = DiskReserve(folder, reserve_bytes, free=lambda _path: state["free"])
    with scp_association(store, reserve=reserve, fixture=WG04_CR) as (_, ds, assoc):
        # Fill the disk to just under the reserve.
        if mounted:
            with open(ballast, "wb") as f:
                f.write(b"\0" * (reserve.free() - reserve_bytes + 2**20))
        else:
            state["free"] = reserve_bytes - 2**20
        assert reserve.low()
        refused = assoc.send_c_store(ds)
        assert refused.Status == OUT_OF_RESOURCES
        assert "disk space" in refused.ErrorComment
        assert _leftovers(store) == []
        assert journal_rows(store.state_dir, "SELECT COUNT(*) FROM instances") == [(0,)]
        if mounted:
            ballast.unlink()
        else:
            state["free"] = 100 * 2**20
        assert assoc.send_c_store(ds).Status == 0x0000  # space is back: stored
        assert journal_rows(store.state_dir, "SELECT COUNT(*) FROM instances") == [(1,)]
    assert reasons(events, "instance.refused") == ["disk_low"]


def test_a_full_disk_mid_instance_leaves_nothing_half_written(small_disk):
    """No reserve, and a disk that fills while the 7 MB CR arrives: the write fails, the
    instance is refused, the partial file is removed; a smaller one fits afterwards."""
    folder, mounted = small_disk
    if not mounted:
        pytest.skip("needs a small file system: run as root where tmpfs can be mounted")
    store = Store(folder / "state")
    with scp_association(store, reserve=DiskReserve(folder, 0), fixture=WG04_CR) as \
            (_, ds, assoc):
        with open(folder / "ballast", "wb") as f:
            f.write(b"\0" * (os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
                             - 3 * 2**20))
        assert assoc.send_c_store(ds).Status == OUT_OF_RESOURCES
        assert _leftovers(store) == []
        assert not list(store.spool.glob("??/*.dcm"))
        (folder / "ballast").unlink()
        ds.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
        assert assoc.send_c_store(ds).Status == 0x0000
