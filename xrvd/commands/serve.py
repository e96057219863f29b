"""`xrvd serve`: wires store, model, worker and listeners from the config and supervises them.

Under systemd (Type=notify) it says READY=1 once the model is loaded and every listener is up,
keeps STATUS= current, pings WATCHDOG=1 only while the worker and listeners are really alive
(a stuck worker stops the pings, so systemd restarts the service), and says STOPPING=1 and
RELOADING=1 around a stop or reload. SIGTERM/SIGINT stop new associations, let work in flight
finish (or leave it for the next start) and exit 0. SIGHUP reloads what can change safely.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path

from .. import __version__, log, metrics
from ..config import Config, load_config
from ..errors import ConfigError, XrvdError
from ..pipeline.models import install_kind
from ..runtime import Runtime, worker_process_count
from ..systemd import Notifier

# Keys a reload cannot change in a running process; they need a restart.
RESTART_ONLY = ("state_dir", "model.name", "model.weights_dir", "model.device",
                "model.threads", "convert", "scp.enabled", "scp.ae_title", "scp.bind",
                "scp.port", "scp.tls", "scp.tls_port", "scp.max_associations", "scp.max_pdu",
                "scp.max_pending", "scp.network_timeout", "watch", "output",
                "service.metrics", "service.worker_processes", "model.backend")


def _get(config: Config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump() if hasattr(value, "model_dump") else value


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.log = log.get_logger(component="daemon")
        self.notifier = Notifier()
        self.signals = _Signals()
        self.stopping = False
        self.runtime = Runtime(config, "serve", processes=worker_process_count(
            config.service.worker_processes))
        self.metrics_server: metrics.MetricsServer | None = None
        self.model_name = config.model.name

    # --- start and stop -----------------------------------------------------------------

    def start(self) -> None:
        config, runtime = self.config, self.runtime
        started = time.perf_counter()
        recovered = runtime.open()
        self.log.info("journal.recovered", state_dir=str(config.state_dir), **recovered)
        worker = runtime.engine(deliver=True)
        identity = worker.classifier.identity
        if identity.untrained:
            self.log.warning("model.untrained", detail="UNTRAINED test weights: results are "
                             "meaningless; never run like this in production")
        self.log.info("model.loaded", model=identity.name, weights_sha256=identity.weights_sha256,
                      duration_s=round(time.perf_counter() - started, 3))
        worker.start()
        runtime.listen()
        if config.service.metrics.enabled:
            self.metrics_server = metrics.MetricsServer(
                config.service.metrics.bind, config.service.metrics.port,
                lambda: self.problems() + self.conditions())
            self.metrics_server.start()
            self.log.info("metrics.listening", bind=config.service.metrics.bind,
                          port=self.metrics_server.port)
        self.notifier.notify(READY=1, STATUS=self.status_line())
        self.log.info("daemon.ready", version=__version__, model=identity.name,
                      install=install_kind()[0], watchdog_s=self.notifier.watchdog_seconds)

    def stop(self) -> None:
        self.notifier.notify(STOPPING=1, STATUS="stopping: finishing work in flight")
        self.log.info("daemon.stopping")
        self.runtime.close(self.config.service.drain_seconds)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.log.info("daemon.stopped")
        self.notifier.close()

    # --- supervision ----------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the daemon is not healthy; empty when it is."""
        found = []
        worker, scp, watcher = self.runtime.worker, self.runtime.scp, self.runtime.watcher
        if worker is None or not worker.alive():
            found.append("worker thread is not running")
        elif worker.stalled_for() > self.config.service.worker_stall_seconds:
            found.append(f"worker stuck for {worker.stalled_for():.0f} s")
        if self.config.scp.enabled and (scp is None or not scp.alive()):
            found.append("DICOM listener is not running")
        if self.config.watch.enabled and (watcher is None or not watcher.alive()):
            found.append("drop folder watcher is not running")
        if self.runtime.deliverer is not None and not self.runtime.deliverer.alive():
            found.append("a delivery thread is not running")
        return found

    def conditions(self) -> list[str]:
        """What keeps the daemon from accepting work although nothing in it is broken (a
        /healthz reason; a restart would not help, so the watchdog keeps being pinged)."""
        reserve = self.runtime.reserve
        if reserve is not None and reserve.was_low:
            return [f"disk low: {reserve.describe()}"]
        return []

    def _watch_disk(self) -> None:
        """disk.low once when free space falls below the reserve, disk.ok when it is back."""
        reserve = self.runtime.reserve
        if reserve is None:
            return
        free = reserve.free()
        low = free < reserve.min_free_bytes
        metrics.DISK_FREE.set(free)
        metrics.DISK_LOW.set(int(low))
        if low != reserve.was_low:
            reserve.was_low = low
            if low:
                self.log.error("disk.low", free_mb=free // 2**20,
                               min_free_mb=reserve.min_free_bytes // 2**20,
                               detail=reserve.describe() + "; new instances are refused "
                               "(A700) and the drop folder waits until space returns")
            else:
                self.log.info("disk.ok", free_mb=free // 2**20,
                              detail="free space is back above the reserve: receiving again")

    def _apply_retention(self) -> None:
        """Delete the spool files that storage.keep_spool no longer keeps."""
        store, storage = self.runtime.store, self.config.storage
        if store is None:
            return
        files, freed = store.purge_spool(storage.keep_spool.split()[0], storage.keep_days)
        if files:
            self.log.info("spool.purged", files=files, bytes=freed,
                          keep_spool=storage.keep_spool)
        metrics.SPOOL_BYTES.set(store.spool_usage()[1])

    def status_line(self) -> str:
        if self.runtime.store is None:
            return "starting"
        counts = self.runtime.store.counts()["studies"]
        for state in ("receiving", "processing", "classified", "failed"):
            metrics.QUEUE.labels(state).set(counts.get(state, 0))
        return (f"{counts.get('receiving', 0)} studies waiting, "
                f"{counts.get('processing', 0)} processing, "
                f"{counts.get('classified', 0)} classified, {counts.get('failed', 0)} failed; "
                f"model {self.model_name}")

    def run(self) -> None:
        """Supervise until asked to stop: watchdog pings, STATUS, reloads."""
        watchdog = self.notifier.watchdog_seconds
        tick = min(1.0, watchdog / 3) if watchdog else 1.0
        next_status = 0.0
        reported: list[str] = []
        while True:
            self._take_signals(self.signals.wait(tick))
            if self.stopping:
                return
            try:
                reported, next_status = self._supervise(watchdog, reported, next_status)
            except Exception as exc:  # noqa: BLE001 - supervision must never end the daemon
                self.log.error("daemon.supervision_failed", error=repr(exc))

    def _supervise(self, watchdog: float | None, reported: list[str],
                   next_status: float) -> tuple[list[str], float]:
        problems = self.problems()
        if problems != reported:
            if problems:
                self.log.error("daemon.unhealthy", problems=problems)
            else:
                self.log.info("daemon.healthy")
            reported = problems
        if not problems and watchdog:
            self.notifier.notify(WATCHDOG=1)
        self._watch_disk()
        if time.monotonic() >= next_status:
            self._apply_retention()
            trouble = problems + self.conditions()
            self.notifier.notify(STATUS=("UNHEALTHY: " + "; ".join(trouble)) if trouble
                                 else self.status_line())
            next_status = time.monotonic() + self.config.service.status_seconds
        return reported, next_status

    def reload(self) -> None:
        """SIGHUP: apply allow-lists, thresholds, selection, settling and log level without
        dropping associations; a config that fails validation is refused, the old one stays."""
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6))
        try:
            if self.config_path is None:
                raise ConfigError("<defaults>", ["started without --config: nothing to reload"])
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.log.error("config.reload_failed", problems=exc.problems,
                           detail="keeping the configuration in use")
            self.notifier.notify(READY=1, STATUS=self.status_line())
            return
        needs_restart = [key for key in RESTART_ONLY if _get(new, key) != _get(self.config, key)]
        log.configure(new.log.level, new.log.format,
                      include_patient_identifiers=new.log.include_patient_identifiers,
                      salt=log.load_salt(self.config.state_dir))  # state_dir: restart only
        self.runtime.apply(new)
        self.config = new
        self.log.info("config.reloaded", path=str(self.config_path),
                      needs_restart=needs_restart or None)
        self.notifier.notify(READY=1, STATUS=self.status_line())

    def _take_signals(self, received: list[int]) -> None:
        for signum in received:
            self.log.info("signal.received", signal=signal.Signals(signum).name)
            if signum == signal.SIGHUP and not self.stopping:
                self.reload()
            elif signum != signal.SIGHUP:
                self.stopping = True


class _Signals:
    """Signals for the supervising loop. The handler only notes the signal and writes a
    byte to a pipe, both safe at any point: a handler runs in the main thread between two of
    its bytecodes, and one that took a lock (Event.set, a log write) while the interrupted
    code held it (Event.wait, the same log write) would deadlock the daemon in its stop."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._received: list[int] = []

    def install(self, *signums: int) -> None:
        for signum in signums:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame=None) -> None:
        self._received.append(signum)
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def wait(self, timeout: float) -> list[int]:
        """The signals received, once each, waiting up to `timeout` for the first."""
        if not self._received:
            select.select([self._read], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 512):
                pass
        taken = []
        while self._received:  # popped one by one: a signal may arrive between any two
            taken.append(self._received.pop(0))
        return taken


def serve(config: Config, config_path: str | Path | None = None) -> int:
    log.configure(config.log.level, config.log.format,
                  include_patient_identifiers=config.log.include_patient_identifiers,
                  salt=log.load_salt(config.state_dir))
    daemon = Daemon(config, str(config_path) if config_path else None)
    daemon.signals.install(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        daemon.start()
    except XrvdError as exc:
        daemon.log.error("daemon.start_failed", reason=exc.reason, detail=str(exc))
        print(f"xrvd: cannot start: {exc}", file=sys.stderr)
        daemon.stop()
        return 2
    daemon.run()
    daemon.stop()
    return 0
