"""`xrvd backfill`: annotate an existing archive with the daemon's own stages.

Two phases, both resumable from the journal:
1. crawl: stream the archive's paths, read each new file's header, journal it in place
   (store.register_in_place; batches of files share one transaction). Files seen before with
   the same size and mtime are passed over without being read.
2. classify: the daemon's Worker claims the studies and runs selection, conversion, batched
   inference and the report writer on them. Selection and conversion run in a pool of worker
   processes, one round ahead of inference, so decoding overlaps with the model.

Every study is claimed only after the crawl has journaled all of its files, so a study spread
over several folders still gets one report. An interrupted run leaves studies 'processing';
the next run's recovery puts them back in the queue, and a run whose report had already been
written is recognised (worker._adopt_existing_report) instead of reported twice.
"""

from __future__ import annotations

import datetime as dt
import functools
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TextIO

from .. import log
from ..config import Config
from ..ingest.scan import crawl
from ..errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL
from ..fsutil import StateDirLock
from ..pipeline.convert import ConvertOptions
from ..pipeline.prepare import PrepareJob, Prepared, prepare_instance
from ..pipeline.registry import get_spec
from ..pipeline.select import view_of
from ..pool import PreparePool
from .progress import Progress, print_table
from ..store import NotStorableError, Store
from ..store.archive import ArchiveFile
from ..store.records import open_read_only, read_header
from ..worker import Worker, select_rules

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
        self.rules = select_rules(config)
        self.log = log.get_logger(component="backfill")
        # An archive's folders and files are often named after the patient, and so may a
        # root be (one patient's folder): their paths are pseudonymised in every event.
        for root in request.paths:
            log.private_folder(root, itself=True)
            if Path(root).is_file():  # a DICOMDIR or one file: its folder's files too
                log.private_folder(Path(root).parent)
        self.found: Counter[str] = Counter()
        self.skip_reasons: Counter[str] = Counter()

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
                    self._skip_file(item.path, outcome.skipped, "journaled as skipped")
                else:
                    self.found["journaled"] += 1
            progress.advance(looked_at, found=looked_at)
            if limit is not None and new >= limit:
                break

    def _skip_file(self, path: Path, reason: str, detail: str) -> None:
        self.skip_reasons[reason] += 1
        self.log.info("file.skipped", file=str(path), reason=reason, detail=detail)

    # --- phase 2 ------------------------------------------------------------------------

    def classify(self, store: Store, worker: Worker, pool: PreparePool,
                 progress: Progress) -> None:
        total = store.query("SELECT COUNT(*) FROM instances WHERE state = 'stored'")[0][0]
        progress.start_phase("classify", total)
        round_size = max(self.config.model.batch_size, 4 * max(pool.processes, 1))
        while True:
            before = Counter(worker.tally)
            busy = worker.step(0.0, round_size, pool)
            self._advance(progress, worker.tally - before)
            if not busy:
                return

    @staticmethod
    def _advance(progress: Progress, delta: Counter[str]) -> None:
        skipped = sum(v for k, v in delta.items() if k.startswith("skipped:"))
        progress.advance(delta["classified"] + delta["adopted"] + skipped + delta["failed"],
                         classified=delta["classified"], skipped=skipped,
                         failed=delta["failed"])

    # --- the whole command ---------------------------------------------------------------

    def run(self) -> int:
        interactive = sys.stderr.isatty()
        lock = StateDirLock(self.config.state_dir, "backfill")
        lock.acquire()
        store = Store(self.config.state_dir)
        progress = Progress(interactive)
        started = time.monotonic()
        worker: Worker | None = None
        loader = _ClassifierLoader(self.config)  # torch imports while the crawl reads headers
        pool = PreparePool(self.request.workers)
        interrupted = False
        try:
            recovered = store.recover()
            self.log.info("backfill.started", roots=[str(p) for p in self.request.paths],
                          workers=self.request.workers, **recovered)
            self.register(store, progress)
            worker = Worker(self.config, store, loader.result())
            self.classify(store, worker, pool, progress)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
            pool.shutdown()
            waiting = store.query("SELECT COUNT(*) FROM studies WHERE state IN "
                                  "('receiving', 'processing')")[0][0]
            store.close()
            lock.release()
        tally = worker.tally if worker else Counter()
        self.summary(tally, time.monotonic() - started, progress, waiting, interrupted)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_PARTIAL if tally["failed"] or tally["failed_studies"] else EXIT_OK

    def summary(self, tally: Counter[str], elapsed: float, progress: Progress, waiting: int,
                interrupted: bool) -> None:
        rate = tally["classified"] / progress.elapsed() if tally["classified"] else 0.0
        skipped = self.skip_reasons + Counter({k.split(":", 1)[1]: v for k, v in tally.items()
                                               if k.startswith("skipped:")})
        rows = [
            ("files found", str(self.found["found"])),
            ("  seen by an earlier run", str(self.found["seen_before"])),
            ("  journaled now", str(self.found["journaled"])),
            ("  duplicates (same instance)", str(self.found["duplicate"])),
            ("images classified", str(tally["classified"])),
            ("images already reported", str(tally["adopted"])),
            ("files and images skipped", str(sum(skipped.values()))),
            *[(f"  {reason}", str(count)) for reason, count in skipped.most_common()],
            ("images failed", str(tally["failed"])),
            ("studies reported", str(tally["reported"])),
            ("studies with a report already", str(tally["already_reported"])),
            ("study attempts failed", str(tally["failed_studies"])),
            ("studies left for the next run", str(waiting)),
            ("time", f"{elapsed:.1f} s"),
            ("classification rate", f"{rate:.2f} images/s"),
        ]
        if self.config.destinations and tally["reported"]:
            rows.append(("reports queued for delivery", f"{tally['reported']} (sent by xrvd "
                         "serve with this state_dir)"))
        title = "xrvd backfill: interrupted; run the same command again to go on" \
            if interrupted else "xrvd backfill: done"
        print_table(rows, self.out, title)
        self.log.info("backfill.finished", interrupted=interrupted,
                      elapsed_s=round(elapsed, 2), rate_per_s=round(rate, 2),
                      **{k.replace(":", "_"): v for k, v in sorted(tally.items())},
                      **dict(self.found), skipped=dict(skipped))

    # --- --dry-run ------------------------------------------------------------------------

    def dry_run(self) -> int:
        """Every file's verdict, through the same stages up to (not including) the model: the
        header checks here, then selection, decoding and conversion in the pool, so a file
        that would fail to decode shows up now, not in the real run."""
        journal = _read_only_journal(self.config.state_dir)
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
                verdicts = []
                for path in batch:
                    if remaining == 0:
                        break
                    verdicts.append(self._would(path, journal))
                    if verdicts[-1] is None and remaining is not None:
                        remaining -= 1
                batch = batch[:len(verdicts)]
                jobs = [PrepareJob(n, str(path)) for n, (path, verdict)
                        in enumerate(zip(batch, verdicts, strict=True)) if verdict is None]
                for prepared in pool(function, jobs)():
                    verdicts[prepared.instance_id] = _verdict(prepared)
                for path, (action, reason, detail) in zip(batch, verdicts, strict=True):
                    actions[f"{action}:{reason}" if reason else action] += 1
                    self.out.write(f"{action:<10} {reason or '-':<16} {path}"
                                   f"{'  ' + detail if detail else ''}\n")
                if remaining == 0:
                    break
        finally:
            pool.shutdown()
            if journal is not None:
                journal.close()
        rows = [(key.replace(":", " "), str(count)) for key, count in actions.most_common()]
        print_table(rows or [("files found", "0")], self.out,
                    "xrvd backfill --dry-run: nothing was classified or journaled")
        return EXIT_OK

    def _would(self, path: Path,
               journal: sqlite3.Connection | None) -> tuple[str, str, str] | None:
        """The verdict from the file system, the journal and the header; None: decode it."""
        try:
            stat = path.stat()
        except OSError as exc:
            return "skip", "unreadable", exc.strerror or str(exc)
        if journal is not None:
            row = journal.execute(
                "SELECT a.size, a.mtime_ns, a.outcome, i.state, i.reason FROM archive_files a "
                "LEFT JOIN instances i ON i.id = a.instance_id WHERE a.path = ?",
                (str(path),)).fetchone()
            if row and (row[0], row[1]) == (stat.st_size, stat.st_mtime_ns):
                return "done", row[3] or row[2], row[4] or "journaled by an earlier run"
        try:
            header = read_header(path)
        except NotStorableError as exc:
            return "skip", exc.reason, str(exc)
        if before_since(header, self.request.since):
            return "skip", "before_since", f"study date {study_date(header)}"
        return None


def _verdict(prepared: Prepared) -> tuple[str, str, str]:
    if prepared.error is not None:
        return "fail", "error", prepared.error
    if prepared.skip_reason is not None:
        return "skip", prepared.skip_reason, prepared.skip_detail
    header = prepared.header
    return "classify", "", f"{header.get('Modality', '')} {view_of(header) or 'unknown'}"


def _read_only_journal(state_dir: Path) -> sqlite3.Connection | None:
    db = open_read_only(state_dir)
    if db is None:
        return None
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    if "archive_files" not in tables:
        db.close()
        return None
    return db


class _ClassifierLoader:
    """Loads the model in a thread: importing torch takes seconds the crawl can use."""

    def __init__(self, config: Config):
        self._classifier = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, args=(config,), daemon=True,
                                        name="xrvd-model-loader")
        self._thread.start()

    def _load(self, config: Config) -> None:
        from ..pipeline.models import Classifier

        try:
            self._classifier = Classifier.from_config(config)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._classifier


def run_backfill(config: Config, request: BackfillRequest,
                 log_level: str | None = None) -> int:
    """On a terminal: a progress bar and the summary table. Otherwise (a service, a pipe): JSON
    events on stdout, `backfill.progress` every 10 s, and the table on stderr. log_level (the
    command line's --log-level) overrides the default level of either."""
    interactive = sys.stderr.isatty()
    # A dry run writes nothing, not even the salt: it reads it if there is one.
    salt = log.load_salt(config.state_dir, create=not request.dry_run)
    if interactive or request.dry_run:
        log.configure(log_level or "warning", "console", stream="stderr",
                      include_patient_identifiers=config.log.include_patient_identifiers,
                      salt=salt)
    else:
        log.configure(log_level or config.log.level, config.log.format,
                      include_patient_identifiers=config.log.include_patient_identifiers,
                      salt=salt)
    out = sys.stdout if interactive or request.dry_run else sys.stderr
    backfill = Backfill(config, request, out)
    if request.dry_run:
        return backfill.dry_run()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return backfill.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: the summary says what is left
