"""Durable file operations shared by the store, the worker and the weights folder."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder, after a rename into it, makes the rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
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
