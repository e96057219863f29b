"""The classification worker: claims settled studies from the journal and runs the pipeline
(select -> convert -> classify, images of several studies sharing a batch -> report) on them.

A round has three steps, `begin` (prepare the instances), `complete` (classify, start writing
the reports) and `finish` (record them), each handing its jobs to a `Submit`: the daemon runs
them in this thread, one after the other; a back-fill runs preparing and writing in a pool of
processes, overlapping with the model's work on the next round.

A result is written under a name fixed by (study, model, weights, generation) and recorded in
the same step that closes the run, so a crash at any point re-does the run and replaces the
same file: never two results for one study and model.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from . import metrics
from .config import Config
from .events import (
    ImageFailed,
    ImagesAdopted,
    ImagesClassified,
    ImageSkipped,
    Listener,
    StudyFailed,
    ignore,
)
from .log import get_logger, redact_text
from .pipeline.convert import ConvertOptions
from .pipeline.models import Classifier
from .pipeline.prepare import Prepared, PrepareJob, prepare_instance
from .pipeline.select import SelectRules
from .report.files import (
    HeatmapJob,
    OutputSettings,
    ReportJob,
    ReportWritten,
    UnreadableReport,
    find_existing_report,
    write_report,
)
from .store import InstanceRow, Store, StudyClaim
from .thresholds import Thresholds


@dataclass
class _StudyWork:
    claim: StudyClaim
    started: float
    selected: list[tuple[InstanceRow, pydicom.Dataset, np.ndarray]] = field(default_factory=list)
    skipped: int = 0
    error: str | None = None
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # instance id -> ...
    sources: list[tuple[InstanceRow, pydicom.Dataset]] = field(default_factory=list)
    heatmaps: list[HeatmapJob] = field(default_factory=list)  # its positive findings


# Hands jobs to whatever runs them (this thread, a pool); returns how to collect the results.
Submit = Callable[[Callable[[Any], Any], list[Any]], Callable[[], list[Any]]]


def run_here(function: Callable[[Any], Any], jobs: list[Any]) -> Callable[[], list[Any]]:
    results = [function(job) for job in jobs]
    return lambda: results


@dataclass
class Round:
    work: list[_StudyWork]
    rows: list[tuple[_StudyWork, InstanceRow]]
    results: Callable[[], list[Prepared]]


@dataclass
class Reporting:
    work: list[_StudyWork]
    reported: list[_StudyWork]  # those with a report being written, in job order
    results: Callable[[], list[ReportWritten]]


def _failure(exc: Exception) -> str:
    """A study's failure, for its event and the journal. Archive files are read only in
    prepare_instance, whose errors name them and go through Worker._private; what gets here
    (the journal, the model, report writing) names xrvd's own files, with any path under a
    private folder pseudonymised all the same."""
    return redact_text(f"{type(exc).__name__}: {exc}")


class Worker:
    def __init__(self, config: Config, store: Store, classifier: Classifier,
                 on_report: Callable[[], None] = lambda: None, on_event: Listener = ignore):
        self.config = config
        self.store = store
        self.classifier = classifier
        self.on_report = on_report  # wakes delivery
        self.on_event = on_event  # what was done, for a caller's progress display
        self.log = get_logger(component="worker", model=classifier.identity.name)
        self.apply(config)
        self.options = ConvertOptions(**config.convert.model_dump())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xrvd-worker", daemon=True)
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self.submit: Submit = run_here  # the daemon may give it a pool.PreparePool
        self._preparing: Round | None = None
        self._reporting: Reporting | None = None

    def apply(self, config: Config) -> None:
        """Take a reloaded config: thresholds, selection rules, settling, batch size."""
        self.config = config
        self.rules = SelectRules.from_config(config.select)
        labels = self.classifier.labels
        self.thresholds = Thresholds.of_config(config.model, labels)
        unused = Thresholds.unused(config.model, labels)
        if unused:
            self.log.warning("model.thresholds_unused", findings=unused,
                             detail="the model does not report these findings")
        unavailable = self.classifier.maps_unavailable if config.output.heatmaps else None
        self.heatmaps = config.output.heatmaps and unavailable is None
        if unavailable is not None:
            self.log.warning("heatmaps.unsupported", reason=unavailable,
                             detail="reports are written without heatmaps")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> bool:
        """Finish the batch in hand (or abandon it: it resumes at the next start)."""
        self._stop.set()
        self.store.wake()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the worker has been stuck: busy on one round, or not looping at all."""
        now = time.monotonic()
        busy = now - self.busy_since if self.busy_since is not None else 0.0
        return max(busy, now - self.heartbeat - 5.0, 0.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            self.busy_since = time.monotonic()
            try:
                busy = self.step(self.config.study.settle_seconds, self.config.model.batch_size,
                                 self.submit)
            except Exception as exc:  # noqa: BLE001 - the worker must keep running
                self.log.error("worker.error", error=repr(exc))
                self._stop.wait(1.0)
                continue
            finally:
                self.busy_since = None
            if not busy:
                deadline = self.store.next_deadline(self.config.study.settle_seconds)
                self.store.wait_for_work(1.0 if deadline is None else min(deadline, 1.0))
        while self._preparing is not None or self._reporting is not None:
            self.step(0.0, 0, self.submit, claim=False)  # finish what is in flight

    def step(self, settle_seconds: float, limit: int, submit: Submit = run_here, *,
             claim: bool = True) -> bool:
        """One turn of the pipeline: claim and begin a round, classify the round begun on the
        previous turn, record the reports of the one before. With run_here each turn does its
        stages one after the other; with a pool, preparing and report writing overlap with
        the model. Returns False when there was nothing to do."""
        identity = self.classifier.identity
        claims = self.store.claim_ready_studies(
            settle_seconds, identity.name, identity.weights_sha256, limit=limit) \
            if claim else []
        preparing, reporting = self._preparing, self._reporting
        self._preparing = self._reporting = None
        # A stage that raises takes only its own studies down, as failed attempts (retried
        # after study.retry_seconds): none is left 'processing' until the next start.
        try:
            try:
                upcoming = self.begin(claims, submit) if claims else None
            except Exception as exc:
                self._fail_all(claims, exc)
                raise
            self._preparing = upcoming
            try:
                classified = self.complete(preparing, submit) if preparing is not None \
                    else None
            except Exception as exc:
                self._fail_all([item.claim for item in preparing.work], exc)
                raise
            self._reporting = classified
        finally:
            if reporting is not None:  # its reports are written: record them in any case
                self.finish(reporting)
        return any(stage is not None for stage in (upcoming, classified, reporting))

    def _fail_all(self, claims: list[StudyClaim], exc: Exception) -> None:
        for claim in claims:
            self._fail(claim, _failure(exc))

    # --- one round: several studies, shared batches -------------------------------------

    def prepare_function(self) -> Callable[[PrepareJob], Prepared]:
        """The per-instance stage with this worker's rules bound (picklable, for a pool)."""
        return functools.partial(prepare_instance, rules=self.rules, options=self.options,
                                 resolution=self.classifier.resolution)

    def begin(self, claims: list[StudyClaim], submit: Submit = run_here) -> Round:
        """List the claimed studies' instances and hand them to `submit` for preparing;
        `complete` collects the results. Splitting the two lets a caller with a process pool
        prepare the next round while this one is being classified."""
        work: list[_StudyWork] = []
        rows: list[tuple[_StudyWork, InstanceRow]] = []
        for claim in claims:
            self.log.info("study.settled", study_instance_uid=claim.study_uid,
                          generation=claim.generation)
            item = _StudyWork(claim, time.perf_counter())
            try:
                instances = self.store.study_instances(claim.study_id)
            except Exception as exc:  # noqa: BLE001 - one study never stops the others
                self._fail(claim, _failure(exc))
                continue
            for row in instances:
                if row.selected and row.state == "skipped":
                    item.skipped += 1  # turned down at ingest (or by an earlier run), told then
                else:
                    rows.append((item, row))
            work.append(item)
        # Rows journaled by an older xrvd were never selected: the worker decides for them.
        jobs = [PrepareJob(row.id, str(row.path), select=row.selected is None)
                for _, row in rows]
        return Round(work, rows, submit(self.prepare_function(), jobs))

    def complete(self, round_: Round, submit: Submit = run_here) -> Reporting:
        """Classify a prepared round and hand its reports to `submit` for writing; `finish`
        records them. A caller with a pool writes one round's reports while the model
        classifies the next."""
        for (item, row), prepared in zip(round_.rows, round_.results(), strict=True):
            if prepared.error is not None:
                item.error = item.error or self._private(prepared.error, row)
            elif prepared.skip_reason is not None:
                self._skip(item, row, prepared.skip_reason,
                           self._private(prepared.skip_detail, row))
            else:
                item.selected.append((row, prepared.header, prepared.array))
        work = []
        for item in round_.work:
            if item.error is not None:
                self._fail(item.claim, item.error)
            elif not self._adopt_existing_report(item):
                work.append(item)
        inputs = [(item, row, ds, array) for item in work for row, ds, array in item.selected]
        scores, maps = self._predict([array for *_, array in inputs])
        for item in work:
            item.selected = []  # the arrays are not needed any more
        for index, ((item, row, ds, _), row_scores) in enumerate(zip(inputs, scores,
                                                                     strict=True)):
            if not np.all(np.isfinite(row_scores)):
                self.store.mark_instance(row.id, "failed", "non_finite_scores")
                self.on_event(ImageFailed("non_finite_scores"))
                self.log.warning("instance.failed", sop_instance_uid=row.sop_uid,
                                 reason="non_finite_scores")
                continue
            item.scores[row.id] = {
                label: float(score)
                for label, score in zip(self.classifier.labels, row_scores, strict=True)}
            item.sources.append((row, ds))
            if maps is not None:
                positive = sorted(
                    ((score, column, label) for column, (label, score)
                     in enumerate(item.scores[row.id].items())
                     if self.thresholds.positive(label, score)), reverse=True)
                item.heatmaps.extend(
                    HeatmapJob(row.sop_uid, str(row.path), label, score, maps[index, column])
                    for score, column, label in
                    positive[:self.config.output.max_heatmaps_per_image])
        reported = [item for item in work if item.scores]
        jobs = [self._report_job(item) for item in reported]
        return Reporting(work, reported, submit(write_report, jobs))

    def _predict(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores, and with output.heatmaps the class activation maps (N, labels, h, w)."""
        batch_size = self.config.model.batch_size
        if not self.heatmaps or not arrays:
            return self.classifier.predict_many(arrays, batch_size), None
        return self.classifier.predict_many(arrays, batch_size, maps=True)

    def finish(self, reporting: Reporting) -> None:
        written = dict(zip((id(item) for item in reporting.reported), reporting.results(),
                           strict=True))
        for item in reporting.work:
            outcome = written.get(id(item))
            try:
                if outcome is not None and outcome.error is not None:
                    raise RuntimeError(f"report not written: {outcome.error}")
                self._finish(item, outcome)
            except Exception as exc:  # noqa: BLE001
                self._fail(item.claim, _failure(exc))

    def _report_job(self, item: _StudyWork) -> ReportJob:
        output = self.config.output
        return ReportJob(
            study_uid=item.claim.study_uid, generation=item.claim.generation,
            sources=[ds for _, ds in item.sources],
            scores={row.sop_uid: item.scores[row.id] for row, _ in item.sources},
            identity=self.classifier.identity, thresholds=self.thresholds,
            output=OutputSettings(Path(output.folder), output.sr_flavour, output.series_number,
                                  output.series_description, output.json_sidecar),
            predecessor=self.store.previous_result(item.claim),
            heatmaps=tuple(item.heatmaps), fit=self.options.fit)

    def _adopt_existing_report(self, item: _StudyWork) -> bool:
        """A report by this model and weights already in the output folder that covers every
        image selected now (the journal was reset, or a crash came between writing the report
        and recording it): record its scores instead of writing a second report."""
        if not item.selected:
            return False
        try:
            existing = find_existing_report(Path(self.config.output.folder),
                                            item.claim.study_uid, self.classifier.identity)
        except UnreadableReport as exc:  # classify as if it were not there
            self.log.warning("report.existing_unreadable", path=str(exc.path), error=exc.error)
            return False
        if existing is None or any(row.sop_uid not in existing.scores
                                   for row, _, _ in item.selected):
            return False
        scores = {row.id: existing.scores[row.sop_uid] for row, _, _ in item.selected}
        state = self._record_run(item.claim, scores, existing.path)
        self.on_event(ImagesAdopted(len(scores)))
        self.log.info("study.already_reported", study_instance_uid=item.claim.study_uid,
                      result=str(existing.path), classified=len(scores), next_state=state)
        return True

    def _private(self, text: str, row: InstanceRow) -> str:
        """A message about one instance's file, for events and the journal: an archive file
        read in place is named by its own path (often after the patient), pseudonymised here;
        spool files have random names."""
        in_place = not row.path.is_relative_to(self.store.spool)
        return redact_text(text, row.path) if in_place else redact_text(text)

    def _skip(self, item: _StudyWork, row: InstanceRow, reason: str, detail: str) -> None:
        item.skipped += 1
        self.on_event(ImageSkipped(reason))
        metrics.SKIPPED.labels(reason).inc()
        self.store.mark_instance(row.id, "skipped", reason)
        self.log.info("instance.skipped", sop_instance_uid=row.sop_uid,
                      study_instance_uid=item.claim.study_uid, reason=reason, detail=detail)

    def _finish(self, item: _StudyWork, written: ReportWritten | None) -> None:
        claim, scores = item.claim, item.scores
        result_path = Path(written.path) if written is not None else None
        if written is not None:
            self.log.info("report.written", study_instance_uid=claim.study_uid,
                          path=written.path, sop_instance_uid=written.sop_instance_uid,
                          heatmaps=written.heatmaps or None)
            paths = {heatmap.sop_uid: Path(heatmap.source_path) for heatmap in item.heatmaps}
            for sop_uid, label, error in written.heatmap_errors:
                # the error may name an archive file read in place (often after the patient)
                self.log.warning("heatmap.failed", study_instance_uid=claim.study_uid,
                                 sop_instance_uid=sop_uid, finding=label,
                                 error=redact_text(error, paths[sop_uid]))
        state = self._record_run(claim, scores, result_path)
        metrics.CLASSIFIED.inc(len(scores))
        self.on_event(ImagesClassified(len(scores), reported=result_path is not None))
        if result_path is not None:
            metrics.REPORTED.inc()
        metrics.CLASSIFY_SECONDS.observe(time.perf_counter() - item.started)
        metrics.END_TO_END_SECONDS.observe(max(0.0, time.time() - claim.last_instance_at))
        self.log.info(
            "study.classified", study_instance_uid=claim.study_uid,
            generation=claim.generation, classified=len(scores), skipped=item.skipped,
            positives=sorted({label for labels in scores.values()
                              for label, score in labels.items()
                              if self.thresholds.positive(label, score)}),
            result=str(result_path) if result_path else None, next_state=state,
            duration_s=round(time.perf_counter() - item.started, 4))

    def _record_run(self, claim: StudyClaim, scores: dict[int, dict[str, float]],
                    result_path: Path | None) -> str:
        """Journal a finished run (and its report's deliveries); wake the deliverer for them."""
        state = self.store.finish_run(
            claim, scores, result_path, [d.name for d in self.config.destinations],
            threshold=self.thresholds.default, thresholds=self.thresholds.overrides_json(),
            untrained=self.classifier.identity.untrained)
        if result_path is not None and self.config.destinations:
            self.on_report()
        return state

    def _fail(self, claim: StudyClaim, reason: str) -> None:
        metrics.FAILED.inc()
        state = self.store.fail_attempt(claim, reason, self.config.study.max_attempts,
                                        self.config.study.retry_seconds)
        self.on_event(StudyFailed(reason, final=state == "failed"))
        event = "study.failed" if state == "failed" else "study.retry"
        self.log.error(event, study_instance_uid=claim.study_uid, reason=reason,
                       attempt=claim.attempts + 1)
