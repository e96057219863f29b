"""Run `xrvd serve` as a real subprocess and follow its JSON events.

Synchronisation is by events, never by sleeping: a reader thread parses stdout line by line and
tests wait for the event they need, with a timeout that only bounds a failure.
"""

from __future__ import annotations

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
