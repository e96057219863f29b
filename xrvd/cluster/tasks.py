"""Preparing and report writing as Ray tasks: worker.Submit for a cluster."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..pipeline.prepare import Prepared, PrepareJob
from ..pool import PREPARE_NICENESS, load_libraries
from ..report.files import ReportWritten

TASK_RETRIES = 3  # a task's process or node lost: run again elsewhere, this many times


def _below_the_model() -> None:
    """As pool.py's processes: below the model's threads, which wait for each other."""
    current = os.nice(0)
    if current < PREPARE_NICENESS:
        os.nice(PREPARE_NICENESS - current)


def _prepare_chunk(function: Callable[[PrepareJob], Prepared], jobs: list[PrepareJob]):
    """Two results: the outcomes without their arrays (with which of them had one) for the
    driver, and the arrays as one batch, left in this node's object store for the actors."""
    _below_the_model()
    results = [function(job) for job in jobs]
    arrays = [result.array for result in results if result.array is not None]
    outcomes = [dataclasses.replace(result, array=None) for result in results]
    has_array = [result.array is not None for result in results]
    return (outcomes, has_array), (np.concatenate(arrays) if arrays else None)


def _run_chunk(function: Callable[[Any], Any], jobs: list[Any]) -> list[Any]:
    _below_the_model()
    return [function(job) for job in jobs]


def _warm_up() -> int:
    _below_the_model()
    load_libraries()
    return os.getpid()


@dataclass(frozen=True)
class RemoteArray:
    """A converted image left on the node that made it: row `index` of a task's batch."""

    batch: Any  # ray.ObjectRef
    index: int

    def fetch(self, ray) -> np.ndarray:
        return np.asarray(ray.get(self.batch))[self.index:self.index + 1]


class RaySubmit:
    """A worker.Submit that runs a round's jobs as Ray tasks, `chunk` jobs each."""

    def __init__(self, ray, chunk: int):
        self.ray = ray
        self.chunk = max(chunk, 1)
        options = {"num_cpus": 1, "max_retries": TASK_RETRIES}
        self._prepare = ray.remote(num_returns=2, **options)(_prepare_chunk)
        self._run = ray.remote(**options)(_run_chunk)
        self._warm_up = ray.remote(**options)(_warm_up)

    def warm_up(self, tasks: int) -> int:
        """Start about `tasks` task processes and load their libraries (the conversion,
        highdicom's tables) before the first round, as the local pool does before its first:
        a second or two each. Returns how many processes answered."""
        return len(set(self.ray.get([self._warm_up.remote() for _ in range(tasks)])))

    def __call__(self, function: Callable[[Any], Any],
                 jobs: list[Any]) -> Callable[[], list[Any]]:
        chunks = [jobs[start:start + self.chunk] for start in range(0, len(jobs), self.chunk)]
        if jobs and isinstance(jobs[0], PrepareJob):
            refs = [self._prepare.remote(function, chunk) for chunk in chunks]
            return lambda: self._prepared(chunks, refs)
        refs = [self._run.remote(function, chunk) for chunk in chunks]
        return lambda: self._written(chunks, refs)

    def _prepared(self, chunks: list[list[PrepareJob]], refs: list) -> list[Prepared]:
        results: list[Prepared] = []
        for chunk, (outcomes_ref, batch_ref) in zip(chunks, refs, strict=True):
            try:
                outcomes, has_array = self.ray.get(outcomes_ref)
            except self.ray.exceptions.RayError as exc:
                # Lost beyond its retries: as a crash in the local pool, the studies are
                # retried (and fail after study.max_attempts).
                results.extend(Prepared(job.instance_id, error=f"the cluster lost the task "
                                        f"({type(exc).__name__}) while reading {job.path}")
                               for job in chunk)
                continue
            index = 0
            for outcome, has in zip(outcomes, has_array, strict=True):
                if has:
                    outcome = dataclasses.replace(outcome, array=RemoteArray(batch_ref, index))
                    index += 1
                results.append(outcome)
        return results

    def _written(self, chunks: list[list[Any]], refs: list) -> list[ReportWritten]:
        results: list[ReportWritten] = []
        for chunk, ref in zip(chunks, refs, strict=True):
            try:
                results.extend(self.ray.get(ref))
            except self.ray.exceptions.RayError as exc:
                results.extend(ReportWritten(error=f"the cluster lost the report's task "
                                             f"({type(exc).__name__})") for _ in chunk)
        return results

