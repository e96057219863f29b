"""A pool of worker processes for the stages that need no model: selection, decoding and
conversion (pipeline/prepare.py) and report writing (reportwriter.py). It is a worker.Submit:
the worker hands it a round's jobs and collects the results later, so that the processes
work on one round while the model classifies another.

Processes, not threads: those stages are mostly Python (pydicom, highdicom) and would hold the
GIL the model's thread and the DICOM listener need.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from .pipeline.prepare import PrepareJob, Prepared
from .report.files import ReportWritten

PREPARE_NICENESS = 10


_warm_up_barrier = None


def load_libraries() -> None:
    """Import and initialise what the jobs use: the conversion (pydicom, numpy, the resize's
    weights) and highdicom's tables, which it reads on first use. Done by the fork server
    before it forks the processes (forkserver.py), so they share it, and again (at no cost
    then) by each process as it starts, which loads its own copy where it was spawned. No
    torch: the resize is numpy's (pipeline/resize.py)."""
    from .pipeline import prepare  # noqa: F401 - pydicom, numpy, the conversion
    from .report.template import is_image_class

    is_image_class("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage


def _init_process(barrier, service_pid: int) -> None:
    global _warm_up_barrier
    _warm_up_barrier = barrier
    _exit_with(service_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # pydicom's and highdicom's warnings quote values from the data (patient names among
    # them) and would reach the service's log unredacted; outcomes come back as results.
    warnings.simplefilter("ignore")
    load_libraries()
    # Below the model's threads: a preempted inference thread stalls all of them (they wait
    # for each other at every layer), while preparing and report writing only need to keep
    # one round ahead. They get the cores whenever the model waits.
    os.nice(PREPARE_NICENESS)


def _warm_up() -> int:
    """Wait for the sibling processes: each takes exactly one of these, so that when all
    have returned, every process has started and loaded its libraries (_init_process)."""
    try:
        _warm_up_barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass  # a sibling died or is slow: it is only a warm-up
    return os.getpid()


def _exit_with(pid: int) -> None:
    """A service killed with SIGKILL must not leave its worker processes running. They are
    the fork server's children, not the service's, so they watch the service itself: a pidfd
    (Linux) that becomes readable when it ends, or a poll every second elsewhere."""
    def watch() -> None:
        try:
            handle = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfds here, or the service is gone already
            while _alive(pid):
                time.sleep(1.0)
        else:
            select.select([handle], [], [])
        os._exit(1)

    if not _alive(pid):
        os._exit(1)
    threading.Thread(target=watch, name="xrvd-exit-with-service", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def _context() -> multiprocessing.context.BaseContext:
    """Not fork: the parent has torch's or ONNX Runtime's thread pools (and the model loader
    thread) running, which a forked child must not inherit. A fork server is a fresh process
    that imports what the workers need once (forkserver.py) and forks each of them from
    itself, so they share those pages; spawn where there is none."""
    try:
        context = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context("spawn")
    context.set_forkserver_preload([f"{__package__}.forkserver"])
    return context


class PreparePool:
    """Worker processes for selection, decoding and conversion (worker.Submit)."""

    def __init__(self, processes: int):
        self.processes = processes
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        if processes:
            self._start()

    def _start(self) -> None:
        context = _context()
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self.processes, mp_context=context, initializer=_init_process,
            initargs=(context.Barrier(self.processes), os.getpid()))
        # Start them now, while the caller loads the model or crawls.
        self._warming = [self._executor.submit(_warm_up) for _ in range(self.processes)]

    def wait_warm(self) -> None:
        """Return once every process has started and loaded its libraries (about 2 s):
        a service is ready when it can work at full speed."""
        if self._executor is not None:
            concurrent.futures.wait(self._warming)

    def __call__(self, function: Callable[[Any], Any],
                 jobs: list[Any]) -> Callable[[], list[Any]]:
        if self._executor is None:
            results = [function(job) for job in jobs]
            return lambda: results
        executor = self._executor
        futures = [executor.submit(function, job) for job in jobs]
        return lambda: [self._result(executor, job, future)
                        for job, future in zip(jobs, futures, strict=True)]

    def _result(self, executor: concurrent.futures.ProcessPoolExecutor, job: Any,
                future: concurrent.futures.Future) -> Any:
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            # A decoder crashed its process: the study is retried (and fails after
            # study.max_attempts); the pool is replaced (once) for everything else.
            if self._executor is executor:
                self.shutdown()
                self._start()
            detail = "a worker process died (crashed decoder or out of memory)"
            if isinstance(job, PrepareJob):
                return Prepared(job.instance_id, error=f"{detail} while reading {job.path}")
            return ReportWritten(error=detail)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
