"""The one place that opens a state directory and wires what works in it, for `xrvd serve`
and `xrvd backfill` alike: the lock, the journal (and its recovery), the worker processes, the
model, the worker, the deliverer and, for a service, the listeners. It closes them in the
reverse order, so a stop or a crash at any point leaves nothing the next start cannot resume.

Commands decide what to print and when to stop; they never build these objects themselves.
"""

from __future__ import annotations

import threading
from pathlib import Path

from . import log
from .config import Config
from .cpus import available_cpus
from .deliver import Deliverer
from .events import Listener, ignore
from .fsutil import DiskReserve, StateDirLock, reserve_bytes
from .ingest.net import RequestorAE
from .ingest.scp import StorageSCP
from .ingest.watch import DropFolderWatcher
from .pipeline.models import Classifier
from .pipeline.select import SelectRules
from .pool import PreparePool
from .store import Store
from .worker import Worker

AUTO_WORKER_PROCESSES_AT_MOST = 4


def worker_process_count(setting: int | str) -> int:
    """service.worker_processes. `auto`: one per CPU the service may use, at most 4 (each
    takes about 150 MB, and per image they need about half the model's CPU time), and none
    on a single CPU, where they would only take turns with the model and the receiver."""
    if setting != "auto":
        return int(setting)
    cpus = available_cpus()
    return 0 if cpus < 2 else min(cpus, AUTO_WORKER_PROCESSES_AT_MOST)


class Runtime:
    """Use as: open() -> engine() -> [listen()] -> close(). `role` names the holder in the state directory's lock ("serve", "backfill")."""

    def __init__(self, config: Config, role: str, *, processes: int):
        self.config = config
        self.role = role
        self.processes = processes
        self.log = log.get_logger(component=role)
        self.lock = StateDirLock(config.state_dir, role)
        self.store: Store | None = None
        self.reserve: DiskReserve | None = None
        self.pool: PreparePool | None = None
        self.worker: Worker | None = None
        self.deliverer: Deliverer | None = None
        self.scp: StorageSCP | None = None
        self.watcher: DropFolderWatcher | None = None
        self._model: _ModelLoader | None = None  # started by open()
        self._locked = False

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    def open(self) -> dict[str, int]:
        """Lock the state directory, open the journal and resume what a stop or crash left;
        the model loads in a thread and the worker processes start, while the caller crawls
        (engine() waits for both)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        self._locked = True
        self.store = Store(self.state_dir, SelectRules.from_config(self.config.select))
        self.reserve = DiskReserve(self.state_dir, reserve_bytes(
            self.state_dir, self.config.storage.min_free_mb))
        recovered = self.store.recover()
        # The model first: starting the pool waits for its fork server to import the
        # conversion and highdicom (a second or two), which the model's load can use.
        self._model = _ModelLoader(self.config)
        if self.processes:
            self.pool = PreparePool(self.processes)
        return recovered

    def engine(self, *, deliver: bool, on_event: Listener = ignore) -> Worker:
        """The worker (waiting for the model), with the deliverer when `deliver`: a back-fill
        leaves its reports queued for the service that owns the destinations."""
        classifier = self._model.result()
        if deliver:
            self.deliverer = Deliverer(self.config, self.store, RequestorAE)
            self.deliverer.start()
        self.worker = Worker(self.config, self.store, classifier,
                             on_report=self.deliverer.wake if self.deliverer else lambda: None,
                             on_event=on_event)
        if self.pool is not None:
            self.pool.wait_warm()
            self.worker.submit = self.pool
        return self.worker

    def listen(self, *, watch: bool = True) -> None:
        """The ways in of a service: the DICOM listener and the drop folder, as configured
        (a back-fill by C-MOVE needs the listener alone)."""
        config = self.config
        if config.scp.enabled:
            self.scp = StorageSCP(config.scp, self.store, self.reserve)
            self.scp.start()
        if watch and config.watch.enabled:
            self.watcher = DropFolderWatcher(config.watch, self.store, self.reserve)
            self.watcher.start()

    def apply(self, new: Config) -> None:
        """A reloaded config: what can change in a running process (the caller has checked
        which keys need a restart)."""
        if self.store is not None:
            self.store.rules = SelectRules.from_config(new.select)
        if self.scp is not None:
            self.scp.apply_policy(new.scp)
        if self.reserve is not None:
            self.reserve.min_free_bytes = reserve_bytes(new.state_dir, new.storage.min_free_mb)
        if self.worker is not None:
            self.worker.apply(new)
        if self.deliverer is not None:
            self.deliverer.apply(new)
        self.config = new

    def close(self, drain: float) -> None:
        """Stop taking work, let work in flight finish for up to `drain` seconds (or leave it
        for the next start), and release the state directory."""
        if self.scp is not None:
            self.scp.stop(drain)
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None and self.worker.alive() and not self.worker.stop(drain):
            self.log.warning("worker.abandoned", detail="work in progress resumes at the next "
                             "start")
        if self.pool is not None:
            self.pool.shutdown()
        if self.deliverer is not None:
            self.deliverer.stop(drain)
        if self.store is not None:
            self.store.close()
        if self._locked:
            self.lock.release()
            self._locked = False


class _ModelLoader:
    def __init__(self, config: Config):
        self._classifier: Classifier | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, args=(config,), daemon=True,
                                        name="xrvd-model-loader")
        self._thread.start()

    def _load(self, config: Config) -> None:
        try:
            self._classifier = Classifier.from_config(config)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc

    def result(self) -> Classifier:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._classifier
