"""`xrvd serve`: wires store, model, worker and listeners from the config and supervises them.

Under systemd (Type=notify) it says READY=1 once the model is loaded and every listener is up,
keeps STATUS= current, pings WATCHDOG=1 only while the worker and listeners are really alive
(a stuck worker stops the pings, so systemd restarts the service), and says STOPPING=1 and
RELOADING=1 around a stop or reload. SIGTERM/SIGINT stop new associations, let work in flight
finish (or leave it for the next start) and exit 0. SIGHUP reloads what can change safely.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from .. import __version__, log, metrics
from ..config import Config, load_config
from ..deliver import Deliverer
from ..errors import ConfigError, XrvdError
from ..ingest.scp import StorageSCP
from ..ingest.watch import DropFolderWatcher
from ..cpus import available_cpus
from ..pipeline.models import Classifier
from ..fsutil import DiskReserve, StateDirLock, reserve_bytes
from ..pool import PreparePool
from ..store import Store
from ..systemd import Notifier
from ..worker import Worker

# Keys a reload cannot change in a running process; they need a restart.
RESTART_ONLY = ("state_dir", "model.name", "model.weights_dir", "model.device",
                "model.threads", "convert", "scp.enabled", "scp.ae_title", "scp.bind",
                "scp.port", "scp.tls", "scp.tls_port", "scp.max_associations", "scp.max_pdu",
                "scp.max_pending", "scp.network_timeout", "watch", "output",
                "service.metrics", "service.worker_processes", "model.backend")


AUTO_WORKER_PROCESSES_AT_MOST = 4


def worker_process_count(setting: int | str) -> int:
    """service.worker_processes. `auto`: one per CPU the service may use, at most 4 (each
    takes about 150 MB, and per image they need about half the model's CPU time), and none
    on a single CPU, where they would only take turns with the model and the receiver."""
    if setting != "auto":
        return int(setting)
    cpus = available_cpus()
    return 0 if cpus < 2 else min(cpus, AUTO_WORKER_PROCESSES_AT_MOST)


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
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self.store: Store | None = None
        self.worker: Worker | None = None
        self.scp: StorageSCP | None = None
        self.watcher: DropFolderWatcher | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self.deliverer: Deliverer | None = None
        self.pool: PreparePool | None = None
        self.model_name = config.model.name
        self.lock = StateDirLock(config.state_dir, "serve")
        self.reserve: DiskReserve | None = None

    # --- start and stop -----------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        started = time.perf_counter()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        self.store = Store(config.state_dir)
        self.reserve = DiskReserve(config.state_dir, reserve_bytes(
            config.state_dir, config.storage.min_free_mb))
        recovered = self.store.recover()
        self.log.info("journal.recovered", state_dir=str(config.state_dir), **recovered)
        processes = worker_process_count(config.service.worker_processes)
        if processes:  # they start while the model loads
            self.pool = PreparePool(processes)
        classifier = Classifier.from_config(config)
        identity = classifier.identity
        if identity.untrained:
            self.log.warning("model.untrained", detail="UNTRAINED test weights: results are "
                             "meaningless; never run like this in production")
        self.log.info("model.loaded", model=identity.name, weights_sha256=identity.weights_sha256,
                      duration_s=round(time.perf_counter() - started, 3))
        self.deliverer = Deliverer(config, self.store)
        self.deliverer.start()
        self.worker = Worker(config, self.store, classifier, on_report=self.deliverer.wake)
        if self.pool is not None:
            self.pool.wait_warm()
            self.worker.submit = self.pool
        self.worker.start()
        if config.scp.enabled:
            self.scp = StorageSCP(config.scp, self.store, self.reserve)
            self.scp.start()
        if config.watch.enabled:
            self.watcher = DropFolderWatcher(config.watch, self.store, self.reserve)
            self.watcher.start()
        if config.service.metrics.enabled:
            self.metrics_server = metrics.MetricsServer(
                config.service.metrics.bind, config.service.metrics.port,
                lambda: self.problems() + self.conditions())
            self.metrics_server.start()
            self.log.info("metrics.listening", bind=config.service.metrics.bind,
                          port=self.metrics_server.port)
        self.notifier.notify(READY=1, STATUS=self.status_line())
        self.log.info("daemon.ready", version=__version__, model=identity.name,
                      watchdog_s=self.notifier.watchdog_seconds)

    def stop(self) -> None:
        self.notifier.notify(STOPPING=1, STATUS="stopping: finishing work in flight")
        self.log.info("daemon.stopping")
        drain = self.config.service.drain_seconds
        if self.scp is not None:
            self.scp.stop(drain)
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None and not self.worker.stop(drain):
            self.log.warning("worker.abandoned", detail="work in progress resumes at the next "
                             "start")
        if self.pool is not None:
            self.pool.shutdown()
        if self.deliverer is not None:
            self.deliverer.stop(drain)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.store is not None:
            self.store.close()
        self.lock.release()
        self.log.info("daemon.stopped")
        self.notifier.close()

    # --- supervision ----------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the daemon is not healthy; empty when it is."""
        found = []
        if self.worker is None or not self.worker.alive():
            found.append("worker thread is not running")
        elif self.worker.stalled_for() > self.config.service.worker_stall_seconds:
            found.append(f"worker stuck for {self.worker.stalled_for():.0f} s")
        if self.config.scp.enabled and (self.scp is None or not self.scp.alive()):
            found.append("DICOM listener is not running")
        if self.config.watch.enabled and (self.watcher is None or not self.watcher.alive()):
            found.append("drop folder watcher is not running")
        if self.deliverer is not None and not self.deliverer.alive():
            found.append("a delivery thread is not running")
        return found

    def conditions(self) -> list[str]:
        """What keeps the daemon from accepting work although nothing in it is broken (a
        /healthz reason; a restart would not help, so the watchdog keeps being pinged)."""
        if self.reserve is not None and self.reserve.was_low:
            return [f"disk low: {self.reserve.describe()}"]
        return []

    def _watch_disk(self) -> None:
        """disk.low once when free space falls below the reserve, disk.ok when it is back."""
        reserve = self.reserve
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
        store, storage = self.store, self.config.storage
        if store is None:
            return
        files, freed = store.purge_spool(storage.keep_spool.split()[0], storage.keep_days)
        if files:
            self.log.info("spool.purged", files=files, bytes=freed,
                          keep_spool=storage.keep_spool)
        metrics.SPOOL_BYTES.set(store.spool_usage()[1])

    def status_line(self) -> str:
        if self.store is None:
            return "starting"
        counts = self.store.counts()["studies"]
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
        while not self.stopping.wait(tick):
            try:
                reported, next_status = self._supervise(watchdog, reported, next_status)
            except Exception as exc:  # noqa: BLE001 - supervision must never end the daemon
                self.log.error("daemon.supervision_failed", error=repr(exc))

    def _supervise(self, watchdog: float | None, reported: list[str],
                   next_status: float) -> tuple[list[str], float]:
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.reload()
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
        if self.scp is not None:
            self.scp.apply_policy(new.scp)
        if self.reserve is not None:
            self.reserve.min_free_bytes = reserve_bytes(new.state_dir, new.storage.min_free_mb)
        if self.worker is not None:
            self.worker.apply(new)
        self.config = new
        if self.deliverer is not None:
            self.deliverer.apply(new)
        self.log.info("config.reloaded", path=str(self.config_path),
                      needs_restart=needs_restart or None)
        self.notifier.notify(READY=1, STATUS=self.status_line())

    def request_stop(self, signum: int, _frame=None) -> None:
        self.log.info("signal.received", signal=signal.Signals(signum).name)
        self.stopping.set()

    def request_reload(self, signum: int, _frame=None) -> None:
        self.log.info("signal.received", signal=signal.Signals(signum).name)
        self.reload_requested.set()


def serve(config: Config, config_path: str | Path | None = None) -> int:
    log.configure(config.log.level, config.log.format,
                  include_patient_identifiers=config.log.include_patient_identifiers,
                  salt=log.load_salt(config.state_dir))
    daemon = Daemon(config, str(config_path) if config_path else None)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGHUP, daemon.request_reload)
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
