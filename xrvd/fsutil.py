"""Durable file operations shared by the store, the worker and the weights folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder, after a rename into it, makes the rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Have the kernel start writing a file's dirty pages to disk now, without waiting and
    without dropping them from the page cache (Linux's sync_file_range), so that a later
    fsync finds less to do and readers still find the data in memory. Elsewhere a no-op."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def drop_cached_pages(path: str | os.PathLike) -> None:
    """Tell the kernel a file's cached pages will not be needed again (pages not yet written
    to disk stay until they are). Advice only: errors are ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):  # no posix_fadvise on this platform
        pass
    finally:
        os.close(fd)


def write_atomically(target: Path, data: bytes) -> None:
    """Write, fsync, rename into place, fsync the folder: readers see all of it or nothing."""
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_path(target.parent)


def write_atomically_readable(target: Path, data: bytes) -> None:
    """Write, fsync, rename into place, fsync the folder, under a private temporary name (two
    processes writing the same target never share one), readable by every user: files an
    administrator writes as root are read by the service's own user."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(target.parent)


class StateDirLock:
    """One xrvd process at a time per state directory (like Orthanc's storage lock): start-up
    recovery re-queues every study left 'processing', which is only safe when nobody else is
    processing them. The lock is an flock, released by the kernel when the process dies."""

    def __init__(self, state_dir: Path, purpose: str):
        self.path = Path(state_dir) / "xrvd.lock"
        self.purpose = purpose
        self._file = None

    def acquire(self) -> None:
        import fcntl

        from .errors import StateDirBusyError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StateDirBusyError(
                f"{self.path.parent} is in use by {holder}. Stop it, or give this command a "
                "config with its own state_dir (back-fills can share output.folder with the "
                "daemon: reports already there are not written again)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"xrvd {self.purpose} (pid {os.getpid()})\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system holding path."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


class DiskReserve:
    """The free space xrvd keeps on the state directory's file system (storage.min_free_mb):
    below it nothing new is accepted (C-STORE answers 'out of resources' before the data set
    is written, the drop folder pauses), and everything resumes by itself when space returns.
    `free` is a parameter so that a test can lower it where it cannot mount a small disk."""

    def __init__(self, path: Path, min_free_bytes: int, free=free_bytes):
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self._free = free
        self.was_low = False

    def free(self) -> int:
        try:
            return self._free(self.path)
        except OSError:
            return 0  # a file system that cannot be asked cannot be written either

    def low(self) -> bool:
        return self.free() < self.min_free_bytes

    def describe(self) -> str:
        return (f"{self.free() // 2**20} MB free on {self.path}'s file system, below the "
                f"{self.min_free_bytes // 2**20} MB reserve (storage.min_free_mb); free space "
                "there or lower the reserve")


DEFAULT_RESERVE_BYTES = 1 << 30


def reserve_bytes(path: Path, min_free_mb: int | None) -> int:
    """storage.min_free_mb, or by default 1 GB, or 2 % of a disk too small for that to be
    sensible (under 50 GB)."""
    if min_free_mb is not None:
        return min_free_mb * 2**20
    try:
        stat = os.statvfs(path)
    except OSError:
        return DEFAULT_RESERVE_BYTES
    return min(DEFAULT_RESERVE_BYTES, stat.f_blocks * stat.f_frsize // 50)
