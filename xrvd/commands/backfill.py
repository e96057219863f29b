"""`xrvd backfill`: annotate an existing archive with the daemon's own stages.

Two phases, both resumable from the journal:
1. crawl: stream the archive's paths, read each new file's header, journal it in place with
   its selection verdict (store.register_in_place; batches of files share one transaction).
   Files seen before with the same size and mtime are passed over without being read.
2. classify: the runtime's Worker (as in `xrvd serve`) claims the studies and runs
   conversion, batched inference and the report writer on them. Conversion runs in a pool
   of worker processes, one round ahead of inference, so decoding overlaps with the model.

With `backfill.engine: ray` (`--engine ray`) the classify phase runs across a Ray cluster:
backfill_ray.py, the same Worker with its stages spread over the cluster (engine: cluster.py).

Every study is claimed only after the crawl has journaled all of its files, so a study spread
over several folders still gets one report. An interrupted run leaves studies 'processing';
the next run's recovery puts them back in the queue, and a run whose report had already been
written is recognised (report.files.find_existing_report) instead of reported twice.
"""

from __future__ import annotations

import datetime as dt
import functools
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TextIO

from pydicom.dataset import Dataset

from .. import log
from ..config import Config
from ..errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL
from ..events import Tally, WorkEvent
from ..ingest.scan import crawl
from ..pipeline.convert import ConvertOptions
from ..pipeline.prepare import Prepared, PrepareJob, prepare_instance
from ..pipeline.registry import get_spec
from ..pipeline.select import SelectRules, select
from ..pool import PreparePool
from ..runtime import Runtime
from ..store import NotStorableError, Store
from ..store.archive import ArchiveFile, ArchiveJournal
from ..store.records import read_header
from ..worker import Worker
from .progress import Progress, print_table

REGISTER_BATCH = 256


@dataclass(frozen=True)
class BackfillRequest:
    paths: tuple[Path, ...]
    recursive: bool = False
    dry_run: bool = False
    limit: int | None = None
    since: dt.date | None = None
    workers: int = 0  # 0: in this process


def parse_date(text: str) -> dt.date:
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            pass
    raise ValueError(f"{text!r} is not a date; use YYYY-MM-DD")


def study_date(header) -> dt.date | None:
    """The study's date from its header (Study, Series, Acquisition or Content Date)."""
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        value = str(header.get(keyword, "") or "").strip()
        if value:
            try:
                return parse_date(value[:8])
            except ValueError:
                continue
    return None


def before_since(header, since: dt.date | None) -> bool:
    """Files with no date at all are kept: an unknown date is not an old one."""
    found = study_date(header) if since else None
    return found is not None and found < since


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# --- the run --------------------------------------------------------------------------


class Backfill:
    def __init__(self, config: Config, request: BackfillRequest, out: TextIO = sys.stdout):
        self.config = config
        self.request = request
        self.out = out
        self.rules = SelectRules.from_config(config.select)
        self.log = log.get_logger(component="backfill")
        # An archive's folders and files are often named after the patient, and so may a
        # root be (one patient's folder): their paths are pseudonymised in every event.
        for root in request.paths:
            log.private_folder(root, itself=True)
            if Path(root).is_file():  # a DICOMDIR or one file: its folder's files too
                log.private_folder(Path(root).parent)
        self.found: Counter[str] = Counter()
        self.skip_reasons: Counter[str] = Counter()  # decided while crawling
        self.tally = Tally()  # what the worker did

    def exclude(self) -> list[Path]:
        return [self.config.state_dir, Path(self.config.output.folder)]

    def paths(self) -> Iterator[Path]:
        return crawl(self.request.paths, recursive=self.request.recursive,
                     exclude=self.exclude())

    # --- phase 1 ------------------------------------------------------------------------

    def register(self, store: Store, progress: Progress) -> None:
        progress.start_phase("crawl")
        new = 0
        limit = self.request.limit
        for batch in _batches(self.paths(), REGISTER_BATCH):
            files = []
            looked_at = 0
            for path in batch:
                if limit is not None and new >= limit:
                    break
                looked_at += 1
                self.found["found"] += 1
                try:
                    stat = path.stat()
                except OSError as exc:
                    self._skip_file(path, "unreadable", exc.strerror or str(exc))
                    continue
                if store.archive_seen(path, stat):
                    self.found["seen_before"] += 1
                    continue
                try:
                    header = read_header(path)
                except NotStorableError as exc:
                    # Journaled with its reason, so that a rerun passes over it unread.
                    self._skip_file(path, exc.reason, str(exc))
                    files.append(ArchiveFile(path, stat, None, f"{exc.reason}: {exc}",
                                             exc.reason))
                    continue
                if before_since(header, self.request.since):
                    self._skip_file(path, "before_since", f"study date {study_date(header)}")
                    continue
                files.append(ArchiveFile(path, stat, header))
                new += 1
            for item, outcome in zip(files, store.register_in_place(files), strict=True):
                if outcome is None:
                    continue
                if outcome.status == "duplicate":
                    self.found["duplicate"] += 1
                    self.log.info("file.duplicate", file=str(item.path),
                                  sop_instance_uid=outcome.sop_uid)
                elif outcome.skipped:
                    self._skip_file(item.path, outcome.skipped, outcome.skip_detail)
                else:
                    self.found["journaled"] += 1
            progress.advance(looked_at, found=looked_at)
            if limit is not None and new >= limit:
                break

    def _skip_file(self, path: Path, reason: str, detail: str) -> None:
        self.skip_reasons[reason] += 1
        self.log.info("file.skipped", file=str(path), reason=reason, detail=detail)

    # --- phase 2 ------------------------------------------------------------------------

    def classify(self, store: Store, worker: Worker, progress: Progress) -> None:
        progress.start_phase("classify", store.count_instances("stored"))
        round_size = self.round_size()
        while worker.step(0.0, round_size, worker.submit):
            pass

    # --- what an engine decides (backfill_ray.RayBackfill runs them on a cluster) ----------

    def runtime(self) -> Runtime:
        return Runtime(self.config, "backfill", processes=self.request.workers)

    def engine(self, runtime: Runtime, progress: Progress) -> Worker:
        return runtime.engine(deliver=False, on_event=self._on_event(progress))

    def round_size(self) -> int:
        """Studies claimed at a time: enough to keep every worker process busy while the model
        works."""
        return max(self.config.model.batch_size, 4 * max(self.request.workers, 1))

    def engine_rows(self) -> list[tuple[str, str]]:
        """Lines of the summary about where the work ran (none for this machine)."""
        return []

    def _on_event(self, progress: Progress) -> Callable[[WorkEvent], None]:
        def listen(event: WorkEvent) -> None:
            done = self.tally.images_done
            self.tally(event)
            if self.tally.images_done != done:
                progress.advance(self.tally.images_done - done,
                                 classified=self.tally.classified,
                                 skipped=sum(self.tally.skipped.values()),
                                 failed=self.tally.failed)
        return listen

    # --- the whole command ---------------------------------------------------------------

    def run(self) -> int:
        interactive = sys.stderr.isatty()
        runtime = self.runtime()
        progress = Progress(interactive)
        started = time.monotonic()
        interrupted = False
        waiting = 0
        try:
            recovered = runtime.open()
            self.log.info("backfill.started", roots=[str(p) for p in self.request.paths],
                          workers=self.request.workers, **recovered)
            self.register(runtime.store, progress)
            worker = self.engine(runtime, progress)
            self.classify(runtime.store, worker, progress)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
            if runtime.store is not None:
                waiting = runtime.store.unfinished_studies()
            runtime.close(drain=0.0)
        self.summary(time.monotonic() - started, progress, waiting, interrupted)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_PARTIAL if self.tally.failed or self.tally.failed_studies else EXIT_OK

    def summary(self, elapsed: float, progress: Progress, waiting: int,
                interrupted: bool) -> None:
        tally = self.tally
        rate = tally.classified / progress.elapsed() if tally.classified else 0.0
        skipped = self.skip_reasons + tally.skipped
        rows = [
            ("files found", str(self.found["found"])),
            ("  seen by an earlier run", str(self.found["seen_before"])),
            ("  journaled now", str(self.found["journaled"])),
            ("  duplicates (same instance)", str(self.found["duplicate"])),
            ("images classified", str(tally.classified)),
            ("images already reported", str(tally.adopted)),
            ("files and images skipped", str(sum(skipped.values()))),
            *[(f"  {reason}", str(count)) for reason, count in skipped.most_common()],
            ("images failed", str(tally.failed)),
            ("studies reported", str(tally.reported)),
            ("studies with a report already", str(tally.already_reported)),
            ("study attempts failed", str(tally.failed_studies)),
            ("studies left for the next run", str(waiting)),
            *self.engine_rows(),
            ("time", f"{elapsed:.1f} s"),
            ("classification rate", f"{rate:.2f} images/s"),
        ]
        if self.config.destinations and tally.reported:
            rows.append(("reports queued for delivery", f"{tally.reported} (sent by xrvd "
                         "serve with this state_dir)"))
        title = "xrvd backfill: interrupted; run the same command again to go on" \
            if interrupted else "xrvd backfill: done"
        print_table(rows, self.out, title)
        self.log.info("backfill.finished", interrupted=interrupted,
                      elapsed_s=round(elapsed, 2), rate_per_s=round(rate, 2),
                      classified=tally.classified, adopted=tally.adopted, failed=tally.failed,
                      reported=tally.reported, already_reported=tally.already_reported,
                      failed_studies=tally.failed_studies, **dict(self.found),
                      skipped=dict(skipped))

    # --- --dry-run ------------------------------------------------------------------------

    def dry_run(self) -> int:
        """Every file's verdict, through the same stages up to (not including) the model: the
        header checks here, then selection, decoding and conversion in the pool, so a file
        that would fail to decode shows up now, not in the real run."""
        journal = ArchiveJournal(self.config.state_dir)
        pool = PreparePool(self.request.workers)
        spec = get_spec(self.config.model.name)
        function = functools.partial(
            prepare_instance, rules=self.rules, resolution=spec.resolution,
            options=ConvertOptions(**self.config.convert.model_dump()))
        actions: Counter[str] = Counter()
        # --limit counts what the real run would journal now (files it would decode), and
        # stops where it would stop.
        remaining = self.request.limit
        try:
            for batch in _batches(self.paths(), 4 * max(pool.processes, 1)):
                verdicts: list[tuple[str, str, str] | None] = []
                selected: dict[int, str] = {}
                for path in batch:
                    if remaining == 0:
                        break
                    verdict, header = self._would(path, journal)
                    if header is not None:  # the real run journals it, with this verdict
                        if remaining is not None:
                            remaining -= 1
                        choice = select(header, self.rules)
                        if choice.classify:
                            selected[len(verdicts)] = f"{header.get('Modality', '')} " \
                                                      f"{choice.view}"
                        else:
                            verdict = ("skip", choice.reason, choice.detail)
                    verdicts.append(verdict)
                batch = batch[:len(verdicts)]
                jobs = [PrepareJob(n, str(batch[n]), select=False) for n in selected]
                for prepared in pool(function, jobs)():
                    verdicts[prepared.instance_id] = _verdict(
                        prepared, selected[prepared.instance_id])
                for path, (action, reason, detail) in zip(batch, verdicts, strict=True):
                    actions[f"{action}:{reason}" if reason else action] += 1
                    self.out.write(f"{action:<10} {reason or '-':<16} {path}"
                                   f"{'  ' + detail if detail else ''}\n")
                if remaining == 0:
                    break
        finally:
            pool.shutdown()
            journal.close()
        rows = [(key.replace(":", " "), str(count)) for key, count in actions.most_common()]
        print_table(rows or [("files found", "0")], self.out,
                    "xrvd backfill --dry-run: nothing was classified or journaled")
        return EXIT_OK

    def _would(self, path: Path, journal: ArchiveJournal
               ) -> tuple[tuple[str, str, str] | None, Dataset | None]:
        """(verdict, None) from the file system, the journal and the header checks, or
        (None, header) for a file the real run would journal now."""
        try:
            stat = path.stat()
        except OSError as exc:
            return ("skip", "unreadable", exc.strerror or str(exc)), None
        earlier = journal.earlier_verdict(path, stat)
        if earlier is not None:
            return ("done", *earlier), None
        try:
            header = read_header(path)
        except NotStorableError as exc:
            return ("skip", exc.reason, str(exc)), None
        if before_since(header, self.request.since):
            return ("skip", "before_since", f"study date {study_date(header)}"), None
        return None, header


def _verdict(prepared: Prepared, selected: str) -> tuple[str, str, str]:
    if prepared.error is not None:
        return "fail", "error", prepared.error
    if prepared.skip_reason is not None:
        return "skip", prepared.skip_reason, prepared.skip_detail
    return "classify", "", selected


def run_backfill(config: Config, request: BackfillRequest,
                 log_level: str | None = None) -> int:
    out = configure_output(config, request.dry_run, log_level)
    if request.dry_run:  # on this machine whatever the engine: nothing is classified
        return Backfill(config, request, out).dry_run()
    if config.backfill.engine == "ray":
        from .backfill_ray import run_ray_backfill

        return run_ray_backfill(config, request, out)
    return interruptible(Backfill(config, request, out).run)


def configure_output(config: Config, dry_run: bool, log_level: str | None) -> TextIO:
    """On a terminal: a progress bar and the summary table. Otherwise (a service, a pipe): JSON
    events on stdout, `backfill.progress` every 10 s, and the table on stderr. log_level (the
    command line's --log-level) overrides the default level of either. Returns where the
    table goes."""
    interactive = sys.stderr.isatty()
    # A dry run writes nothing, not even the salt: it reads it if there is one.
    salt = log.load_salt(config.state_dir, create=not dry_run)
    if interactive or dry_run:
        log.configure(log_level or "warning", "console", stream="stderr",
                      include_patient_identifiers=config.log.include_patient_identifiers,
                      salt=salt)
    else:
        log.configure(log_level or config.log.level, config.log.format,
                      include_patient_identifiers=config.log.include_patient_identifiers,
                      salt=salt)
    return sys.stdout if interactive or dry_run else sys.stderr


def interruptible(run: Callable[[], int]) -> int:
    """SIGTERM stops a run as Ctrl-C does: the summary says what is left."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: the summary says what is left
