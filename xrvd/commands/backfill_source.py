"""`xrvd backfill --source NAME`: annotate the archive where it lives, in a PACS.

1. query: each day of the window not queried before is asked for its studies (study-level
   C-FIND, split at the PACS's result cap: ingest/retrieve.py); the studies found and the day
   are journaled together (store/sources.py).
   `--dry-run` stops after the query and lists what would be retrieved (backfill_plan.py).
2. retrieve: each study found is listed by series and only the wanted modalities' series are
   retrieved (C-GET or C-MOVE), paced by the source's schedule, rate and back-off; a study
   this model and these weights already reported is never asked for again.
3. classify and report: the runtime's worker (as in `xrvd serve`, in its own thread) takes
   each study once its retrieval is over, while the next one is retrieved, and the deliverer sends the reports to the destinations before the run
   ends (they are journaled; whatever is left goes with the next run or `xrvd serve`).

Interrupted (Ctrl-C, SIGTERM, kill -9), the same command goes on where it stopped: days are
not queried again, studies retrieved are not retrieved again, and the worker resumes every
study left unfinished.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from .. import log
from ..config import Config
from ..errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL
from ..events import Tally, WorkEvent
from ..ingest.retrieve import Pacer, RetrieveError, make_client
from ..runtime import Runtime
from ..sources import Source
from ..store import Store
from ..worker import Worker
from .backfill import configure_output, interruptible
from .backfill_plan import dry_run
from .progress import Progress, print_table

# How long the end of a run waits for the last reports to reach the destinations.
DELIVERY_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class SourceRequest:
    source: str
    since: dt.date
    until: dt.date
    modalities: tuple[str, ...] = ()  # () : the source's
    limit: int | None = None  # studies retrieved in this run, at most
    dry_run: bool = False
    workers: int = 0


def describe(source: Source) -> str:
    if source.type == "dicomweb":
        return f"{source.name} ({source.url}, DICOMweb)"
    return (f"{source.name} ({source.ae_title}@{source.host}:{source.port}, "
            f"C-{source.retrieve.upper()})")


def days(since: dt.date, until: dt.date) -> list[dt.date]:
    return [since + dt.timedelta(days=n) for n in range((until - since).days + 1)]


class SourceUnavailable(Exception):
    """The source failed max_attempts times in a row (down, refusing, out of resources)."""


class SourceBackfill:
    def __init__(self, config: Config, request: SourceRequest, out: TextIO = sys.stdout):
        self.config = config
        self.request = request
        source = config.source(request.source)
        if request.modalities:
            source = source.model_copy(update={"modalities": list(request.modalities)})
        self.source: Source = source
        self.out = out
        self.log = log.get_logger(component="backfill", source=source.name)
        self.first_day = request.since.strftime("%Y%m%d")
        self.last_day = request.until.strftime("%Y%m%d")
        self.modalities_key = ",".join(source.modalities)
        self.tally = Tally()
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        self._failures_in_a_row = 0
        self._lock = threading.Lock()

    # --- query -------------------------------------------------------------------------------

    def query(self, client, store: Store, progress: Progress) -> None:
        window = days(self.request.since, self.request.until)
        progress.start_phase("query", len(window))
        for day in window:
            key = day.strftime("%Y%m%d")
            if store.source_day_queried(self.source.name, key, self.modalities_key):
                self.counts["days_queried_before"] += 1
                progress.advance(1)
                continue
            found = self._with_retries(lambda day=day: client.find_studies(day, self.stop))
            new = store.record_source_day(self.source.name, key, self.modalities_key,
                                          [s.study_uid for s in found.studies], found.windows)
            self.counts["days_queried"] += 1
            self.counts["studies_found"] += new
            self.counts["windows_capped"] += found.capped_windows
            self.log.info("source.queried", day=day.isoformat(), studies=len(found.studies),
                          new=new, windows=found.windows)
            progress.advance(1, studies=new)

    def _with_retries(self, call: Callable):
        """A query, retried with the source's back-off while the source fails."""
        while True:
            try:
                result = call()
            except RetrieveError as exc:
                if not exc.retry:
                    raise
                self._source_failed(exc)
                if self.stop.wait(min(self.source.retry_seconds * 2 ** (
                        self._failures_in_a_row - 1), self.source.max_retry_seconds)):
                    raise KeyboardInterrupt from None
                continue
            self._failures_in_a_row = 0
            return result

    def _source_failed(self, exc: RetrieveError) -> None:
        with self._lock:
            self._failures_in_a_row += 1
            failures = self._failures_in_a_row
        self.log.warning("source.failed", reason=exc.reason, detail=str(exc),
                         attempt=failures, max_attempts=self.source.max_attempts)
        if failures >= self.source.max_attempts:
            raise SourceUnavailable(f"{self.source.name}: {exc} ({failures} attempts in a row)")

    # --- retrieve ------------------------------------------------------------------------------

    def retrieve(self, client, store: Store, worker: Worker,
                 progress: Progress) -> None:
        identity = worker.classifier.identity
        pacer = Pacer(self.source)
        limit = self.request.limit
        started = 0
        due = store.source_studies_due(self.source.name, self.first_day, self.last_day)
        progress.start_phase("retrieve", len(due))
        paused_logged = [0.0]

        def pause(seconds: float) -> None:
            if time.monotonic() - paused_logged[0] > 600:
                paused_logged[0] = time.monotonic()
                self.log.info("source.paused", seconds=round(seconds), schedule=pacer.schedule
                              and self.source.schedule)

        with concurrent.futures.ThreadPoolExecutor(
                self.source.max_concurrent_retrieves,
                thread_name_prefix="xrvd-retrieve") as pool:
            in_flight: set[concurrent.futures.Future] = set()
            while True:
                if not due and not in_flight:
                    due = store.source_studies_due(self.source.name, self.first_day,
                                                   self.last_day)
                    waiting = store.source_next_retry_in(self.source.name, self.first_day,
                                                         self.last_day)
                    if not due and waiting is None:
                        break
                while (due and len(in_flight) < self.source.max_concurrent_retrieves
                       and (limit is None or started < limit)):
                    if not pacer.wait(self.stop, pause):
                        raise KeyboardInterrupt
                    study_uid, _day = due.pop(0)
                    started += 1
                    in_flight.add(pool.submit(self._retrieve_one, client, store, pacer,
                                              study_uid, identity, progress))
                if limit is not None and started >= limit and not in_flight:
                    break
                done, in_flight = concurrent.futures.wait(
                    in_flight, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    future.result()  # SourceUnavailable, a fatal RetrieveError: stop the run
                if not worker.alive():
                    raise RuntimeError("the worker stopped; see worker.error in the log")
                if not due and not in_flight:
                    waiting = store.source_next_retry_in(self.source.name, self.first_day,
                                                         self.last_day)
                    if waiting and self.stop.wait(min(waiting, 1.0)):
                        raise KeyboardInterrupt

    def _retrieve_one(self, client, store: Store, pacer: Pacer, study_uid: str,
                      identity, progress: Progress) -> None:
        name = self.source.name
        if store.study_reported(study_uid, identity.name, identity.weights_sha256):
            store.source_study_finished(name, study_uid, "not_retrieved",
                                        reason="already_reported")
            self.log.info("study.not_retrieved", study_instance_uid=study_uid,
                          reason="already_reported")
            self._count(progress, "already_reported")
            return
        try:
            series = client.find_series(study_uid)
            if not series:
                store.source_study_finished(name, study_uid, "not_retrieved", reason="no_series")
                self.log.info("study.not_retrieved", study_instance_uid=study_uid,
                              reason="no_series", modalities=self.source.modalities)
                self._count(progress, "no_series")
                return
            started = time.perf_counter()
            result = client.retrieve(study_uid, series)
            if result.failed:
                raise RetrieveError("incomplete", f"the PACS failed to send {result.failed} of "
                                    f"{result.failed + result.instances} instances")
        except Exception as exc:  # noqa: BLE001 - whatever the PACS did: this study's failure
            if not isinstance(exc, RetrieveError):
                self.log.exception("study.retrieve_error", study_instance_uid=study_uid)
                exc = RetrieveError("unexpected", f"{type(exc).__name__}: {str(exc)[:300]}")
            if exc.fatal:
                raise exc from None
            if not exc.retry:
                store.source_study_finished(name, study_uid, "failed", reason=str(exc))
                self.log.error("study.retrieve_failed", study_instance_uid=study_uid,
                               reason=exc.reason, detail=str(exc))
                self._count(progress, "failed")
                return
            delay = pacer.failed()
            if exc.reason in ("unreachable", "refused", "aborted"):
                # The source's fault, not the study's: counted against the source only.
                store.source_study_retry(name, study_uid, exc.reason, 10**9, delay)
                self._source_failed(exc)
                return
            attempts = store.source_study_retry(name, study_uid, str(exc),
                                                self.source.max_attempts, delay)
            self.log.warning("study.retrieve_failed", study_instance_uid=study_uid,
                             reason=exc.reason, detail=str(exc), attempt=attempts,
                             max_attempts=self.source.max_attempts)
            if attempts >= self.source.max_attempts:
                self._count(progress, "failed")
            return
        pacer.succeeded()
        with self._lock:
            self._failures_in_a_row = 0
        store.source_study_finished(name, study_uid, "retrieved",
                                    series=[s.series_uid for s in series],
                                    instances=result.instances, size=result.bytes)
        self.log.info("study.retrieved", study_instance_uid=study_uid, series=len(series),
                      instances=result.instances, bytes=result.bytes,
                      failed_suboperations=result.failed,
                      duration_s=round(time.perf_counter() - started, 3))
        with self._lock:
            self.counts["instances_retrieved"] += result.instances
            self.counts["bytes_retrieved"] += result.bytes
        self._count(progress, "retrieved")

    def _count(self, progress: Progress, what: str) -> None:
        with self._lock:
            self.counts[what] += 1
            progress.advance(1, **{what: 1})

    # --- the rest of the work ----------------------------------------------------------------

    def finish(self, store: Store, worker: Worker, runtime: Runtime) -> None:
        """Wait for the worker to classify every study retrieved, then (a while) for the
        reports to go out."""
        while store.unfinished_studies() and worker.alive():
            if self.stop.wait(0.2):
                raise KeyboardInterrupt
        if runtime.deliverer is None:
            return
        deadline = time.monotonic() + DELIVERY_WAIT_SECONDS
        runtime.deliverer.wake()
        while store.deliveries_pending() and time.monotonic() < deadline:
            if self.stop.wait(0.2):
                raise KeyboardInterrupt

    def _on_event(self, progress: Progress) -> Callable[[WorkEvent], None]:
        def listen(event: WorkEvent) -> None:
            self.tally(event)
        return listen

    def run(self) -> int:
        # A study is complete when its retrieval is over (the retrieval holds it till then):
        # the worker takes it at once, in its own thread, while the next one is retrieved.
        config = self.config.model_copy(update={
            "study": self.config.study.model_copy(update={"settle_seconds": 0.0})})
        runtime = Runtime(config, "backfill", processes=self.request.workers)
        progress = Progress(sys.stderr.isatty())
        started = time.monotonic()
        interrupted = False
        unavailable: str | None = None
        waiting = pending = 0
        try:
            recovered = runtime.open()
            self.log.info("backfill.started", source=self.source.name,
                          since=self.request.since.isoformat(),
                          until=self.request.until.isoformat(),
                          modalities=self.source.modalities, how=describe(self.source),
                          **recovered)
            if getattr(self.source, "retrieve", None) == "move":
                if not config.scp.enabled:
                    raise RetrieveError("listener_disabled", "retrieve: move sends the studies "
                                        "to xrvd's listener, and scp.enabled is false: enable "
                                        "it, or use retrieve: get", fatal=True)
                runtime.listen(watch=False)  # the PACS sends to xrvd's own listener
            worker = runtime.engine(deliver=bool(config.destinations),
                                    on_event=self._on_event(progress))
            worker.start()
            client = make_client(self.source, runtime.store,
                                 max_instance_bytes=config.scp.max_instance_bytes,
                                 reserve=runtime.reserve)
            self.query(client, runtime.store, progress)
            self.retrieve(client, runtime.store, worker, progress)
            self.finish(runtime.store, worker, runtime)
        except KeyboardInterrupt:
            interrupted = True
        except SourceUnavailable as exc:
            unavailable = str(exc)
            self.log.error("source.unavailable", detail=unavailable)
        except RetrieveError as exc:  # not worth retrying: the configuration must change
            unavailable = str(exc)
            self.log.error("source.unavailable", reason=exc.reason, detail=unavailable)
        finally:
            self.stop.set()
            progress.close()
            if runtime.store is not None:
                waiting = runtime.store.unfinished_studies()
                pending = runtime.store.deliveries_pending()
            runtime.close(drain=0.0)
        self.summary(time.monotonic() - started, waiting, pending, interrupted, unavailable)
        if interrupted:
            return EXIT_INTERRUPTED
        if unavailable or self.tally.failed or self.tally.failed_studies or \
                self.counts["failed"]:
            return EXIT_PARTIAL
        return EXIT_OK

    def summary(self, elapsed: float, waiting: int, pending: int, interrupted: bool,
                unavailable: str | None) -> None:
        c, tally = self.counts, self.tally
        rate = c["retrieved"] / elapsed if elapsed > 0 else 0.0
        rows = [
            ("source", describe(self.source)),
            ("days", f"{self.request.since.isoformat()} to {self.request.until.isoformat()}"),
            ("  queried now", str(c["days_queried"])),
            ("  queried by an earlier run", str(c["days_queried_before"])),
            ("studies found now", str(c["studies_found"])),
            ("studies retrieved", str(c["retrieved"])),
            ("  instances", str(c["instances_retrieved"])),
            ("  MB", f"{c['bytes_retrieved'] / 1e6:.1f}" if c["bytes_retrieved"] or
             not c["instances_retrieved"] else "- (sent to the listener by C-MOVE)"),
            ("studies not retrieved: reported before", str(c["already_reported"])),
            ("studies not retrieved: no series of " + "/".join(self.source.modalities),
             str(c["no_series"])),
            ("studies failed to retrieve", str(c["failed"])),
            ("images classified", str(tally.classified)),
            ("images skipped", str(sum(tally.skipped.values()))),
            *[(f"  {reason}", str(count)) for reason, count in tally.skipped.most_common()],
            ("images failed", str(tally.failed)),
            ("studies reported", str(tally.reported)),
            ("studies left for the next run", str(waiting)),
            ("reports waiting for delivery", str(pending)),
            ("time", f"{elapsed:.1f} s"),
            ("retrieval rate", f"{rate * 3600:.0f} studies/h"),
        ]
        if c["windows_capped"]:
            rows.append(("windows at the result cap (see log)", str(c["windows_capped"])))
        if unavailable:
            rows.append(("stopped", unavailable))
        title = ("xrvd backfill: interrupted; run the same command again to go on"
                 if interrupted else "xrvd backfill: stopped early; run the same command "
                 "again to go on" if unavailable else "xrvd backfill: done")
        print_table(rows, self.out, title)
        self.log.info("backfill.finished", source=self.source.name, interrupted=interrupted,
                      unavailable=unavailable, elapsed_s=round(elapsed, 2),
                      classified=tally.classified, reported=tally.reported,
                      failed=tally.failed, waiting=waiting, deliveries_pending=pending,
                      **dict(c))


def run_source_backfill(config: Config, request: SourceRequest,
                        log_level: str | None = None) -> int:
    out = configure_output(config, request.dry_run, log_level)
    backfill = SourceBackfill(config, request, out)
    if request.dry_run:
        return dry_run(config, backfill.source, days(request.since, request.until), out)
    return interruptible(backfill.run)
