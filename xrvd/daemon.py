"""`xrvd serve`: wires store, model, worker and listeners from the config, and runs until
SIGTERM or SIGINT, which stop new associations, let work in flight finish (or leave it for
the next start), and exit 0."""

from __future__ import annotations

import signal
import sys
import threading
import time

from . import __version__, log
from .config import Config
from .errors import XrvdError
from .ingest.scp import StorageSCP
from .ingest.watch import DropFolderWatcher
from .pipeline.models import Classifier
from .store import Store
from .worker import Worker

DRAIN_SECONDS = 20.0


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.log = log.get_logger(component="daemon")
        self.stopping = threading.Event()
        self.store: Store | None = None
        self.worker: Worker | None = None
        self.scp: StorageSCP | None = None
        self.watcher: DropFolderWatcher | None = None

    def start(self) -> None:
        config = self.config
        started = time.perf_counter()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.state_dir)
        recovered = self.store.recover()
        self.log.info("journal.recovered", state_dir=str(config.state_dir), **recovered)
        classifier = Classifier.load(
            config.model.name, config.weights_dir, allow_download=config.model.allow_download,
            download_url=config.model.download_url, device=config.model.device,
            threads=config.model.threads)
        identity = classifier.identity
        if identity.untrained:
            self.log.warning("model.untrained", detail="UNTRAINED test weights: results are "
                             "meaningless; never run like this in production")
        self.log.info("model.loaded", model=identity.name, weights_sha256=identity.weights_sha256,
                      duration_s=round(time.perf_counter() - started, 3))
        self.worker = Worker(config, self.store, classifier)
        self.worker.start()
        if config.scp.enabled:
            self.scp = StorageSCP(config.scp, self.store)
            self.scp.start()
        if config.watch.enabled:
            self.watcher = DropFolderWatcher(config.watch, self.store)
            self.watcher.start()
        self.log.info("daemon.ready", version=__version__, model=identity.name)

    def stop(self) -> None:
        self.log.info("daemon.stopping")
        if self.scp is not None:
            self.scp.stop(DRAIN_SECONDS)
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None and not self.worker.stop(DRAIN_SECONDS):
            self.log.warning("worker.abandoned", detail="work in progress resumes at the next "
                             "start")
        if self.store is not None:
            self.store.close()
        self.log.info("daemon.stopped")

    def request_stop(self, signum: int, _frame=None) -> None:
        self.log.info("signal.received", signal=signal.Signals(signum).name)
        self.stopping.set()


def serve(config: Config) -> int:
    log.configure(config.log.level, config.log.format,
                  include_patient_identifiers=config.log.include_patient_identifiers)
    daemon = Daemon(config)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    try:
        daemon.start()
    except XrvdError as exc:
        daemon.log.error("daemon.start_failed", reason=exc.reason, detail=str(exc))
        print(f"xrvd: cannot start: {exc}", file=sys.stderr)
        daemon.stop()
        return 2
    while not daemon.stopping.wait(1.0):
        pass
    daemon.stop()
    return 0
