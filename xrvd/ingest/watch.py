"""Watched drop folder: files dropped in (any name, any depth) are moved into the spool.

A file is taken only when it is complete: closed after writing (inotify), renamed into the
folder, or unchanged for `watch.stable_seconds`. File-system events only wake the scanner;
the scanner walks the folder itself, so a missed event, files present at start-up, and a
folder that vanished and came back are all handled the same way. What is not DICOM goes to the
rejected folder with a `.reason.txt`, never deleted and never retried forever.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..config import WatchConfig
from ..fsutil import DiskReserve
from .. import metrics
from . import note_skipped
from ..log import error_text, get_logger, private_folder
from ..store import NotStorableError, Store, StoreError

MAX_STORE_FAILURES = 5  # then the file is rejected rather than retried forever


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float
    closed: bool = False
    failures: int = 0


class _Wake(FileSystemEventHandler):
    """Never raises: watchdog stops its dispatcher thread on an unhandled exception."""

    def __init__(self, watcher: DropFolderWatcher):
        self.watcher = watcher

    def on_any_event(self, event) -> None:
        try:
            if isinstance(event, FileClosedEvent):
                self.watcher.mark_closed(Path(os.fsdecode(event.src_path)))
            elif isinstance(event, FileMovedEvent):
                self.watcher.mark_closed(Path(os.fsdecode(event.dest_path)))
            self.watcher.wake()
        except Exception as exc:  # noqa: BLE001 - a callback must never kill the observer
            self.watcher.log.error("watch.callback_failed", error=error_text(exc))


class DropFolderWatcher:
    def __init__(self, config: WatchConfig, store: Store, reserve: DiskReserve | None = None):
        assert config.folder is not None and config.rejected_folder is not None
        self.folder = Path(config.folder)
        self.rejected = Path(config.rejected_folder)
        self.stable_seconds = config.stable_seconds
        self.poll_seconds = config.poll_seconds
        self.store = store
        self.reserve = reserve
        self.paused = False  # while the disk is below its reserve: files wait where they are
        self.log = get_logger(component="watch")
        # What is dropped here is named by whoever sent it, often after the patient: its
        # paths are pseudonymised in every event, whatever key or message holds them.
        private_folder(self.folder)
        private_folder(self.rejected)
        self._seen: dict[Path, _Seen] = {}
        self._closed: set[Path] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer: Observer | None = None
        self._thread = threading.Thread(target=self._run, name="xrvd-watch", daemon=True)
        self.last_scan = 0.0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_observer()
        self._thread.start()
        self.log.info("watch.started", folder=str(self.folder), rejected=str(self.rejected))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._stop_observer()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def mark_closed(self, path: Path) -> None:
        with self._lock:
            self._closed.add(path)

    def _start_observer(self) -> None:
        observer = Observer()
        observer.schedule(_Wake(self), str(self.folder), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def _observer_healthy(self) -> bool:
        observer = self._observer
        return (observer is not None and observer.is_alive()
                and all(emitter.is_alive() for emitter in observer.emitters)
                and bool(observer.emitters))

    # --- scanning -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.folder.is_dir() or not self._observer_healthy():
                    self._recover()
                self.scan()
            except Exception as exc:  # noqa: BLE001 - the watcher must keep running
                self.log.error("watch.scan_failed", error=error_text(exc))
                # Not woken early: reading files makes file events that wake the watcher, so
                # a scan that fails again at once would spin on its own events.
                self._stop.wait(self.poll_seconds)
                self._wake.clear()
                continue
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def _recover(self) -> None:
        self.log.warning("watch.restarting", folder=str(self.folder),
                         reason="folder missing" if not self.folder.is_dir()
                         else "observer stopped")
        self._stop_observer()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_observer()

    def _next_wait(self) -> float:
        with self._lock:
            pending = bool(self._seen)
        # Pending files need a look when they may have become stable.
        return min(self.poll_seconds, self.stable_seconds / 2) if pending else self.poll_seconds

    def scan(self) -> int:
        """Walk the folder once; ingest every complete file. Returns how many were taken."""
        if self._disk_low():
            return 0
        now = time.time()
        present: set[Path] = set()
        taken = 0
        for path in self._walk():
            present.add(path)
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if self._ready(path, stat, now):
                taken += self._ingest(path)
        with self._lock:
            for gone in set(self._seen) - present:
                del self._seen[gone]
            self._closed &= present
        self.last_scan = now
        return taken

    def _disk_low(self) -> bool:
        low = self.reserve is not None and self.reserve.low()
        if low != self.paused:
            self.paused = low
            if low:
                self.log.warning("watch.paused", reason="disk_low",
                                 detail=self.reserve.describe() + "; files wait in the drop "
                                 "folder until space returns")
            else:
                self.log.info("watch.resumed", detail="free space is back above the reserve")
        return low

    def _walk(self):
        stack = [self.folder]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # in-progress copies (rsync, many uploaders) are hidden files
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield Path(entry.path)

    def _ready(self, path: Path, stat: os.stat_result, now: float) -> bool:
        with self._lock:
            closed = path in self._closed
            self._closed.discard(path)
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                # New or still changing; files older than the stability window (present at
                # start-up, or copied preserving times) count from their modification time.
                since = min(now, stat.st_mtime_ns / 1e9)
                seen = _Seen(stat.st_size, stat.st_mtime_ns, since,
                             closed, seen.failures if seen else 0)
                self._seen[path] = seen
            elif closed:
                seen.closed = True
            return seen.closed or now - seen.since >= self.stable_seconds

    def _ingest(self, path: Path) -> int:
        relative = path.relative_to(self.folder)
        try:
            outcome = self.store.store_file(path, source=f"watch:{relative}", move=True)
        except NotStorableError as exc:
            self._reject(path, relative, exc.reason, str(exc))
            return 0
        except (StoreError, OSError, MemoryError) as exc:
            with self._lock:
                seen = self._seen.get(path)
                failures = seen.failures + 1 if seen else 1
                if seen:
                    seen.failures = failures
            # The file's path goes in its own key (pseudonymised), never inside the message.
            self.log.error("watch.store_failed", file=str(relative), error=error_text(exc),
                           attempt=failures)
            if failures >= MAX_STORE_FAILURES:
                self._reject(path, relative, StoreError.reason, f"could not be stored after "
                             f"{failures} attempts: {error_text(exc)}")
            return 0
        except Exception as exc:  # noqa: BLE001 - one file must not stop the others
            # Retried, it would fail the same way at every scan: set aside with what happened.
            self._reject(path, relative, "unexpected_error",
                         f"storing it failed unexpectedly ({error_text(exc)}); "
                         "report this to xrvd's maintainers with the file")
            return 0
        with self._lock:
            self._seen.pop(path, None)
        name = "instance.duplicate" if outcome.status == "duplicate" else "instance.stored"
        (metrics.DUPLICATES if outcome.status == "duplicate"
         else metrics.RECEIVED.labels("watch")).inc()
        self.log.info(name, file=str(relative), sop_instance_uid=outcome.sop_uid,
                      study_instance_uid=outcome.study_uid, status=outcome.status)
        note_skipped(self.log, outcome)
        return 1

    def _reject(self, path: Path, relative: Path, reason: str, detail: str) -> None:
        target = self.rejected / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        stem, n = target, 1
        while target.exists() or target.with_name(target.name + ".reason.txt").exists():
            target = stem.with_name(f"{stem.name}.{n}")
            n += 1
        try:
            if path.stat().st_dev == target.parent.stat().st_dev:
                os.replace(path, target)
            else:
                _copy_then_remove(path, target)
            target.with_name(target.name + ".reason.txt").write_text(
                f"{reason}: {detail}\nreceived as {relative} at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        except OSError as exc:
            self.log.error("watch.reject_failed", file=str(relative), error=error_text(exc))
            return
        with self._lock:
            self._seen.pop(path, None)
        metrics.REFUSED.labels(reason).inc()
        self.log.warning("file.rejected", file=str(relative), moved_to=str(target),
                         reason=reason, detail=detail)


def _copy_then_remove(source: Path, target: Path) -> None:
    import shutil

    shutil.copy2(source, target)
    source.unlink()
