"""Run `xrvd serve` as a real subprocess and follow its JSON events.

Synchronisation is by events, never by sleeping: a reader thread parses stdout line by line and
tests wait for the event they need, with a timeout that only bounds a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import yaml
from pydicom.uid import generate_uid

from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

Event = dict


class DaemonProcess:
    """`xrvd serve` by default; any other xrvd command (back-fill) with `command` and
    ready=None (start returns at once instead of waiting for daemon.ready)."""

    def __init__(self, config_path: Path, state_dir: Path, command: tuple[str, ...] = ("serve",),
                 ready: str | None = "daemon.ready"):
        self.config_path = config_path
        self.state_dir = state_dir
        self.command = command
        self.ready = ready
        self.events: list[Event] = []
        self.stderr = ""
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 120, env: dict[str, str] | None = None) -> DaemonProcess:
        with self._cond:
            self.events = []
        env = dict(os.environ, **{ALLOW_UNTRAINED_ENV: "yes-these-scores-are-meaningless",
                                  "PYTHONUNBUFFERED": "1"}, **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xrvd", *self.command, "-c", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        if self.ready:
            self.wait_for(self.ready, timeout=timeout)
        return self

    def wait(self, timeout: float = 300) -> int:
        """The exit code of a command that ends by itself."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._join()
        return code

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "(not json)", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._join()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._join()
        return code

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._stderr_reader.join(timeout=10)
        # Closing a pipe that a reader thread is still blocked on deadlocks; a reader still
        # blocked here means a descendant of the process holds the pipe open.
        readers = (self._reader, self._stderr_reader)
        assert not any(r is not None and r.is_alive() for r in readers), \
            "the process ended but its output is held open by a leftover child process"
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    # --- events --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self.find("scp.listening")[0]["port"])

    def find(self, name: str, **fields) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name
                    and all(e.get(k) == v for k, v in fields.items())]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60,
                   what: str = "condition") -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: predicate() or (self.proc is not None and self.proc.poll() is not None
                                        and not self._reader.is_alive()), timeout)
        if not ok or not predicate():
            tail = "\n".join(json.dumps(e) for e in self.events[-15:])
            raise AssertionError(f"timed out waiting for {what}; last events:\n{tail}\n"
                                 f"stderr:\n{self.stderr[-2000:]}")

    def wait_for(self, name: str, count: int = 1, timeout: float = 60, **fields) -> list[Event]:
        self.wait_until(lambda: len(self.find(name, **fields)) >= count, timeout,
                        f"{count} x {name} {fields or ''}")
        return self.find(name, **fields)

    # --- the journal, read-only -----------------------------------------------------------

    def journal(self, sql: str, params: tuple = ()) -> list[tuple]:
        db = sqlite3.connect(f"file:{self.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()


def write_config(tmp_path: Path, weights_dir: Path, **sections) -> Path:
    config = {
        "state_dir": str(tmp_path / "state"),
        "model": {"name": "densenet121-res224-all", "weights_dir": str(weights_dir),
                  "batch_size": 4},
        "scp": {"port": 0, "allowed_calling_aets": ["STORESCU", "XRVDTEST"]},
        "study": {"settle_seconds": 0.5, "retry_seconds": 0.5},
        "output": {"json_sidecar": True},
        "log": {"level": "debug"},
        # In the worker thread unless a test asks for processes: each would load torch.
        "service": {"worker_processes": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path = tmp_path / "xrvd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def scp_association(store, scp_config=None, reserve=None, fixture=None):
    """A StorageSCP storing into `store` on a free port, and an established pynetdicom
    association to it proposing the fixture's (default: the NIH secondary capture) SOP class
    and transfer syntax; yields (scp, dataset, association). All three are closed afterwards,
    and the store too."""
    from pynetdicom import AE

    from xrvd.config import ScpConfig
    from xrvd.ingest.scp import StorageSCP

    from .conftest import NIH_SC

    scp = StorageSCP(scp_config or ScpConfig(port=0, allowed_calling_aets=["*"]), store,
                     reserve)
    port = scp.start()
    try:
        ds = pydicom.dcmread(fixture or NIH_SC)
        ae = AE(ae_title="TEST")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="XRVD")
        assert assoc.is_established
        try:
            yield scp, ds, assoc
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        scp.stop()
        store.close()


def copy_with_new_uids(source: Path, target: Path, *, study_uid: str | None = None,
                       **attributes) -> pydicom.Dataset:
    """A copy of a fixture as a new instance (new SOP, series and, unless given, study UID)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return ds


# --- crafted files: malformed headers that must get a reason code, never a finding -----------

CRAFTED = ("deep_nesting", "bits_stored_2000", "bits_stored_40", "rows_beyond_pixel_data")


def write_crafted(kind: str, source: Path, target: Path, *,
                  study_uid: str | None = None) -> pydicom.Dataset:
    """A copy of a fixture (an uncompressed 16-bit image such as the WG04 CR) with new UIDs and
    one malformed header, as a security probe sends it:
    deep_nesting: 5000 sequences nested in one another (pydicom raises RecursionError);
    bits_stored_2000, bits_stored_40: Bits Stored above the 16 Bits Allocated (40 as
    MONOCHROME2: an OverflowError inverts MONOCHROME1, MONOCHROME2 went on to a finding);
    rows_beyond_pixel_data: twice the Rows and Columns that the pixel data holds;
    two_frames_of_pixel_data: a single-frame header over two frames' worth of pixel data."""
    if kind == "deep_nesting":
        return write_nested_sequences(source, target, study_uid=study_uid)
    if kind == "two_frames_of_pixel_data":
        return copy_with_new_uids(source, target, study_uid=study_uid,
                                  PixelData=pydicom.dcmread(source).PixelData * 2)
    header = pydicom.dcmread(source, stop_before_pixels=True)
    attributes = {
        "bits_stored_2000": {"BitsStored": 2000},
        "bits_stored_40": {"BitsStored": 40, "PhotometricInterpretation": "MONOCHROME2"},
        "rows_beyond_pixel_data": {"Rows": header.Rows * 2, "Columns": header.Columns * 2},
    }[kind]
    return copy_with_new_uids(source, target, study_uid=study_uid, **attributes)


def write_nested_sequences(source: Path, target: Path, depth: int = 5000, *,
                           study_uid: str | None = None) -> pydicom.Dataset:
    """A copy of a fixture whose header holds `depth` Referenced Image Sequences nested in one
    another, of undefined length: pydicom parses each while it reads the header, one recursion
    per level. Written byte by byte, since pydicom would recurse writing it too. Returns the
    dataset without the nesting."""
    import struct

    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = copy_with_new_uids(source, target, study_uid=study_uid)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    tag = 0x00081140
    before, after = Dataset(), Dataset()
    for element in ds:
        if element.tag != tag:
            (before if element.tag < tag else after).add(element)
    undefined = 0xFFFFFFFF
    opener = (struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, undefined)
              + struct.pack("<HHI", 0xFFFE, 0xE000, undefined))  # sequence, item
    closer = (struct.pack("<HHI", 0xFFFE, 0xE00D, 0)  # item delimiter
              + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))  # sequence delimiter
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    write_dataset(out, before)
    out.write(opener * depth + closer * depth)
    write_dataset(out, after)
    target.write_bytes(out.getvalue())
    return ds
