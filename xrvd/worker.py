"""The classification worker: claims settled studies from the journal and runs the pipeline
(select -> convert -> classify, images of several studies sharing a batch) on them.

A result is written under a name fixed by (study, model, weights, generation) and recorded in
the same step that closes the run, so a crash at any point re-does the run and replaces the
same file: never two results for one study and model.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from . import metrics
from .config import Config
from .errors import ImageError
from .fsutil import write_atomically
from .log import get_logger
from .pipeline.convert import ConvertOptions, prepare_dataset
from .pipeline.models import Classifier
from .pipeline.read import read_dicom
from .pipeline.report import build_report
from .pipeline.select import SelectRules, select
from .store import InstanceRow, Store, StudyClaim

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def safe_name(uid: str) -> str:
    """A file name for a UID: the UID itself when it is a well-formed one, else a hash."""
    if len(uid) <= 64 and _UID.fullmatch(uid):
        return uid
    import hashlib

    return "x" + hashlib.sha256(uid.encode()).hexdigest()[:40]


@dataclass
class _StudyWork:
    claim: StudyClaim
    started: float
    selected: list[tuple[InstanceRow, pydicom.Dataset, np.ndarray]] = field(default_factory=list)
    skipped: int = 0


class Worker:
    def __init__(self, config: Config, store: Store, classifier: Classifier,
                 on_report: Callable[[], None] = lambda: None):
        self.config = config
        self.store = store
        self.classifier = classifier
        self.on_report = on_report  # wakes delivery
        self.apply(config)
        self.options = ConvertOptions(**config.convert.model_dump())
        self.log = get_logger(component="worker", model=classifier.identity.name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xrvd-worker", daemon=True)
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None

    def apply(self, config: Config) -> None:
        """Take a reloaded config: thresholds, selection rules, settling, batch size."""
        self.config = config
        self.rules = SelectRules(
            modalities=tuple(m.upper() for m in config.select.modalities),
            views=tuple(v.upper() for v in config.select.views),
            classify_missing_view=config.select.classify_missing_view,
            body_parts=tuple(b.upper() for b in config.select.body_parts),
            classify_missing_body_part=config.select.classify_missing_body_part,
            min_size=config.select.min_size,
        )

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
        identity = self.classifier.identity
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                claims = self.store.claim_ready_studies(
                    self.config.study.settle_seconds, identity.name, identity.weights_sha256,
                    limit=self.config.model.batch_size)
                if not claims:
                    deadline = self.store.next_deadline(self.config.study.settle_seconds)
                    self.store.wait_for_work(1.0 if deadline is None else min(deadline, 1.0))
                    continue
                self.busy_since = time.monotonic()
                self.process(claims)
            except Exception as exc:  # noqa: BLE001 - the worker must keep running
                self.log.error("worker.error", error=repr(exc))
                self._stop.wait(1.0)
            finally:
                self.busy_since = None

    # --- one round: several studies, shared batches -------------------------------------

    def process(self, claims: list[StudyClaim]) -> None:
        work = []
        for claim in claims:
            self.log.info("study.settled", study_instance_uid=claim.study_uid,
                          generation=claim.generation)
            item = _StudyWork(claim, time.perf_counter())
            try:
                self._select_and_convert(item)
            except Exception as exc:  # noqa: BLE001 - one study never stops the others
                self._fail(claim, f"{type(exc).__name__}: {exc}")
                continue
            work.append(item)
        inputs = [(item, row, ds, array) for item in work for row, ds, array in item.selected]
        scores = self.classifier.predict_many([array for *_, array in inputs],
                                              self.config.model.batch_size) if inputs else []
        per_study: dict[int, dict[int, dict[str, float]]] = {item.claim.run_id: {}
                                                            for item in work}
        sources: dict[int, list[tuple[InstanceRow, pydicom.Dataset]]] = {
            item.claim.run_id: [] for item in work}
        for (item, row, ds, _), row_scores in zip(inputs, scores, strict=True):
            if not np.all(np.isfinite(row_scores)):
                self.store.mark_instance(row.id, "failed", "non_finite_scores")
                self.log.warning("instance.failed", sop_instance_uid=row.sop_uid,
                                 reason="non_finite_scores")
                continue
            per_study[item.claim.run_id][row.id] = {
                label: float(score)
                for label, score in zip(self.classifier.labels, row_scores, strict=True)}
            sources[item.claim.run_id].append((row, ds))
        for item in work:
            try:
                self._finish(item, per_study[item.claim.run_id], sources[item.claim.run_id])
            except Exception as exc:  # noqa: BLE001
                self._fail(item.claim, f"{type(exc).__name__}: {exc}")

    def _select_and_convert(self, item: _StudyWork) -> None:
        for row in self.store.study_instances(item.claim.study_id):
            try:
                header = pydicom.dcmread(row.path, stop_before_pixels=True, force=True)
                choice = select(header, self.rules)
                if not choice.classify:
                    self._skip(item, row, choice.reason or "not_selected", choice.detail)
                    continue
                ds = read_dicom(row.path)
                array = prepare_dataset(ds, self.classifier.resolution, self.options,
                                        row.path).array
            except ImageError as exc:
                self._skip(item, row, exc.reason, exc.detail)
                continue
            item.selected.append((row, ds, array))

    def _skip(self, item: _StudyWork, row: InstanceRow, reason: str, detail: str) -> None:
        item.skipped += 1
        metrics.SKIPPED.labels(reason).inc()
        self.store.mark_instance(row.id, "skipped", reason)
        self.log.info("instance.skipped", sop_instance_uid=row.sop_uid,
                      study_instance_uid=item.claim.study_uid, reason=reason, detail=detail)

    def _finish(self, item: _StudyWork, scores: dict[int, dict[str, float]],
                sources: list[tuple[InstanceRow, pydicom.Dataset]]) -> None:
        claim = item.claim
        result_path = self._write_result(claim, scores, sources) if scores else None
        state = self.store.finish_run(claim, scores, result_path,
                                      [d.name for d in self.config.destinations])
        if result_path is not None and self.config.destinations:
            self.on_report()
        metrics.CLASSIFIED.inc(len(scores))
        if result_path is not None:
            metrics.REPORTED.inc()
        metrics.CLASSIFY_SECONDS.observe(time.perf_counter() - item.started)
        metrics.END_TO_END_SECONDS.observe(max(0.0, time.time() - claim.last_instance_at))
        threshold = self.config.model.threshold
        self.log.info(
            "study.classified", study_instance_uid=claim.study_uid,
            generation=claim.generation, classified=len(scores), skipped=item.skipped,
            positives=sorted({label for labels in scores.values()
                              for label, score in labels.items() if score >= threshold}),
            result=str(result_path) if result_path else None, next_state=state,
            duration_s=round(time.perf_counter() - item.started, 4))

    def _fail(self, claim: StudyClaim, reason: str) -> None:
        metrics.FAILED.inc()
        state = self.store.fail_attempt(claim, reason, self.config.study.max_attempts,
                                        self.config.study.retry_seconds)
        event = "study.failed" if state == "failed" else "study.retry"
        self.log.error(event, study_instance_uid=claim.study_uid, reason=reason,
                       attempt=claim.attempts + 1)

    def _write_result(self, claim: StudyClaim, scores: dict[int, dict[str, float]],
                      sources: list[tuple[InstanceRow, pydicom.Dataset]]) -> Path:
        """The study's Structured Report (and optional JSON sidecar), written atomically
        under names fixed by the run: a crash and a re-run replace, never add."""
        identity = self.classifier.identity
        output = self.config.output
        threshold = self.config.model.threshold
        by_uid = {row.sop_uid: scores[row.id] for row, _ in sources}
        sr = build_report(
            [ds for _, ds in sources], by_uid, identity, threshold,
            generation=claim.generation, flavour=output.sr_flavour,
            series_number=output.series_number, series_description=output.series_description,
            predecessor=self._predecessor(claim))
        folder = Path(output.folder) / safe_name(claim.study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{identity.name}-{identity.weights_sha256[:12]}-g{claim.generation}"
        target = folder / f"{stem}.dcm"
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        write_atomically(target, buffer.getvalue())
        if output.json_sidecar:
            write_atomically(folder / f"{stem}.json",
                             json.dumps(self._sidecar(claim, sr, scores, sources),
                                        indent=2).encode())
        self.log.info("report.written", study_instance_uid=claim.study_uid, path=str(target),
                      sop_instance_uid=str(sr.SOPInstanceUID))
        return target

    def _predecessor(self, claim: StudyClaim) -> pydicom.Dataset | None:
        """The report of this study's previous run by the same model, if there was one."""
        path = self.store.previous_result(claim)
        if path is None or not Path(path).is_file():
            return None
        return pydicom.dcmread(path, stop_before_pixels=True)

    def _sidecar(self, claim: StudyClaim, sr: pydicom.Dataset,
                 scores: dict[int, dict[str, float]],
                 sources: list[tuple[InstanceRow, pydicom.Dataset]]) -> dict:
        identity = self.classifier.identity
        threshold = self.config.model.threshold
        return {
            "study_instance_uid": claim.study_uid,
            "generation": claim.generation,
            "report_sop_instance_uid": str(sr.SOPInstanceUID),
            "model": identity.name,
            "weights_sha256": identity.weights_sha256,
            "untrained": identity.untrained,
            "threshold": threshold,
            "images": [
                {
                    "sop_instance_uid": row.sop_uid,
                    "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
                    "view": str(ds.get("ViewPosition", "") or ""),
                    "findings": [
                        {"label": label, "score": round(score, 6),
                         "positive": score >= threshold}
                        for label, score in sorted(scores[row.id].items(),
                                                   key=lambda kv: kv[1], reverse=True)],
                }
                for row, ds in sources
            ],
        }
