"""Where a received data set is written while it arrives: a file in the spool's `.incoming`
folder, bounded while it streams.

The file is refused before a byte is written when the disk is below its reserve, and cut off
as soon as it grows past `scp.max_instance_bytes`; a write that fails (disk full) is noted
too. None of these raise into pynetdicom, which would abort the association: the rest of the
data set is read and dropped, and the C-STORE handler answers 'out of resources' for that
instance alone, as DCMTK's storescp does, and the association goes on.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import DiskReserve, start_writeback

_WRITEBACK_EVERY = 4 << 20


@dataclass(frozen=True)
class Refusal:
    reason: str  # disk_low | too_large | store_failed
    detail: str


class IncomingFile:
    """What pynetdicom streams a received data set into (it calls write, file.flush and
    close, and reads name). Every few MB it asks the kernel to start writing back what
    arrived, so the fsync before the acknowledgement finds most of the data already on disk;
    the pages stay cached for the worker, which reads the file next."""

    def __init__(self, folder: Path, owner: Incoming, refusal: Refusal | None):
        self._owner = owner
        self._written = 0
        self._unsynced = 0
        self._tmp = None
        self.name = str(folder / f"rx-refused-{id(self):x}.dcm")
        if refusal is not None:
            owner.refuse(self.name, refusal)
            return
        try:
            self._tmp = tempfile.NamedTemporaryFile(dir=folder, prefix="rx-", suffix=".dcm",
                                                    delete=False, mode="wb")
            self.name = self._tmp.name
        except OSError as exc:
            owner.refuse(self.name, _write_failed(folder, exc))

    @property
    def file(self) -> IncomingFile:
        return self  # pynetdicom flushes `file` after every fragment

    def write(self, data) -> int:
        if self._tmp is None:
            return len(data)
        self._written += len(data)
        if self._written > self._owner.max_bytes:
            self._discard(Refusal("too_large", f"the instance is larger than "
                                  f"scp.max_instance_bytes ({self._owner.max_bytes} bytes)"))
            return len(data)
        try:
            self._unsynced += self._tmp.file.write(data)
            if self._unsynced >= _WRITEBACK_EVERY:
                self._tmp.file.flush()
                start_writeback(self._tmp.file.fileno())
                self._unsynced = 0
        except OSError as exc:
            self._discard(_write_failed(Path(self.name).parent, exc))
        return len(data)

    def flush(self) -> None:
        if self._tmp is not None:
            try:
                self._tmp.file.flush()
            except OSError as exc:
                self._discard(_write_failed(Path(self.name).parent, exc))

    def close(self) -> None:
        if self._tmp is not None:
            try:
                self._tmp.close()
            except OSError as exc:
                self._discard(_write_failed(Path(self.name).parent, exc))

    def _discard(self, refusal: Refusal) -> None:
        """Stop writing and give the space back now, not when the whole data set is in."""
        self._owner.refuse(self.name, refusal)
        self._remove()

    def abandon(self) -> None:
        """The peer went away before the data set was complete: nobody will take the file,
        nor its refusal."""
        self._owner.take_refusal(self.name)
        self._remove()

    def _remove(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            return
        try:
            tmp.close()
        except OSError:
            pass
        Path(self.name).unlink(missing_ok=True)


def _write_failed(folder: Path, exc: OSError) -> Refusal:
    return Refusal("store_failed", f"cannot write to {folder}: {exc.strerror or exc}; "
                   "free space there")


class Incoming:
    """The incoming files of one SCP, and why any of them was refused (the C-STORE handler
    takes the refusal by the file's name)."""

    def __init__(self, folder: Path, max_bytes: int, reserve: DiskReserve | None = None):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.reserve = reserve
        self._refused: dict[str, Refusal] = {}
        self._lock = threading.Lock()

    def open(self) -> IncomingFile:
        refusal = None
        if self.reserve is not None and self.reserve.low():
            refusal = Refusal("disk_low", self.reserve.describe())
        return IncomingFile(self.folder, self, refusal)

    def refuse(self, name: str, refusal: Refusal) -> None:
        with self._lock:
            self._refused.setdefault(name, refusal)

    def take_refusal(self, name: str | os.PathLike) -> Refusal | None:
        with self._lock:
            return self._refused.pop(str(name), None)
