"""The worker in-process: failures are bounded and never stop it, a damaged spool file skips
its own image only, a round whose model call raises is retried."""

from __future__ import annotations

import time

import pytest

from xrvd.config import Config
from xrvd.pipeline.models import Classifier
from xrvd.store import Store
from xrvd.worker import Worker

from .harness import MODEL, NIH_SC, copy_with_new_uids, journal_rows


def wait_for_states(store: Store, expected: dict[str, int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while store.counts()["studies"] != expected:
        assert time.monotonic() < deadline, f"studies {store.counts()['studies']}"
        store.wait_for_work(0.05)


@pytest.fixture
def worker_factory(tmp_path, exported_weights):
    workers = []

    def make(**overrides):
        config = Config(state_dir=tmp_path / "state",
                        model={"name": MODEL, "weights_dir": exported_weights(MODEL)[0]},
                        study={"settle_seconds": 0, "retry_seconds": 0, "max_attempts": 2},
                        **overrides)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        store = Store(config.state_dir)
        classifier = Classifier.load(MODEL, config.weights_dir, allow_untrained=True)
        worker = Worker(config, store, classifier)
        workers.append((worker, store))
        return worker, store

    yield make
    for worker, store in workers:
        worker.stop()
        store.close()


def test_a_failing_study_is_marked_failed_after_bounded_attempts(worker_factory, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the output folder should be")
    worker, store = worker_factory(output={"folder": blocked})
    copy_with_new_uids(NIH_SC, tmp_path / "a.dcm")
    store.store_file(tmp_path / "a.dcm", source="test", move=False)
    worker.start()
    wait_for_states(store, {"failed": 1})
    [(reason, attempts)] = journal_rows(store.state_dir,
                                        "SELECT reason, attempts FROM studies")
    assert attempts == 2
    assert "FileExistsError" in reason or "NotADirectoryError" in reason
    assert worker.alive()


def test_worker_keeps_going_after_a_failed_study(worker_factory, tmp_path):
    worker, store = worker_factory()
    worker.start()
    copy_with_new_uids(NIH_SC, tmp_path / "a.dcm")
    store.store_file(tmp_path / "a.dcm", source="test", move=False)
    broken = tmp_path / "b.dcm"
    copy_with_new_uids(NIH_SC, broken)
    outcome = store.store_file(broken, source="test", move=False)
    # The spool copy is damaged after it was stored: that image is skipped, not fatal.
    [(path,)] = journal_rows(store.state_dir, "SELECT path FROM instances WHERE sop_uid = ?",
                             (outcome.sop_uid,))
    (store.spool / path).write_bytes((store.spool / path).read_bytes()[:5000])
    wait_for_states(store, {"classified": 2})
    [(state, reason)] = journal_rows(store.state_dir, "SELECT state, reason FROM instances "
                                     "WHERE sop_uid = ?", (outcome.sop_uid,))
    assert (state, reason) == ("skipped", "truncated")
    assert worker.alive()


def test_a_round_whose_model_call_raises_is_retried_not_stranded(worker_factory, tmp_path):
    """An unexpected error in a whole round (here the model itself) fails that round's
    studies as attempts, which are retried; none stays 'processing' until a restart."""
    worker, store = worker_factory()
    predict_many = worker.classifier.predict_many
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the model fell over")
        return predict_many(*args, **kwargs)

    worker.classifier.predict_many = fails_once
    copy_with_new_uids(NIH_SC, tmp_path / "a.dcm")
    store.store_file(tmp_path / "a.dcm", source="test", move=False)
    worker.start()
    wait_for_states(store, {"classified": 1})
    assert len(calls) == 2  # failed once, then classified on its retry
    assert worker.alive()
