"""The runtime: one wiring of lock, journal, worker processes, model, worker and deliverer for
`serve` and `backfill`, closed in order, and the worker's typed events through it."""

from __future__ import annotations

import pydicom
import pytest

from xrvd.config import Config
from xrvd.errors import StateDirBusyError
from xrvd.events import Tally
from xrvd.runtime import Runtime

from .harness import NIH_SC, copy_with_new_uids

MODEL = "densenet121-res224-all"


@pytest.fixture
def config(tmp_path, exported_weights, allow_untrained):
    return Config(state_dir=tmp_path / "state",
                  model={"name": MODEL, "weights_dir": exported_weights(MODEL)[0]},
                  output={"folder": tmp_path / "out"},
                  study={"settle_seconds": 0, "retry_seconds": 0})


@pytest.fixture
def runtimes():
    opened: list[Runtime] = []
    yield opened
    for runtime in opened:
        runtime.close(drain=5.0)


def test_a_state_directory_is_held_by_one_runtime_at_a_time(config, runtimes):
    first = Runtime(config, "serve", processes=0)
    runtimes.append(first)
    first.open()
    second = Runtime(config, "backfill", processes=0)
    with pytest.raises(StateDirBusyError):
        second.open()
    second.close(drain=0.0)  # closing what never opened is harmless
    first.close(drain=0.0)
    third = Runtime(config, "backfill", processes=0)
    runtimes.append(third)
    assert third.open() == {"studies_resumed": 0, "orphans_journaled": 0}


def test_the_worker_tells_what_it_did_as_typed_events(config, runtimes, tmp_path):
    """Selection is told at ingest (the store's outcome); the worker tells what it decided:
    the classified images, and a spool file damaged after it was journaled."""
    runtime = Runtime(config, "backfill", processes=0)
    runtimes.append(runtime)
    runtime.open()
    study = pydicom.uid.generate_uid()
    outcomes = []
    for name, view in (("good", "PA"), ("lateral", "LL"), ("damaged", "PA")):
        path = tmp_path / f"{name}.dcm"
        copy_with_new_uids(NIH_SC, path, study_uid=study)
        ds = pydicom.dcmread(path)
        ds.ViewPosition = view
        ds.save_as(path)
        outcomes.append(runtime.store.store_file(path, source="test", move=False))
    assert [o.skipped for o in outcomes] == [None, "lateral_view", None]
    [damaged] = [row for row in runtime.store.study_instances(1)
                 if row.sop_uid == outcomes[2].sop_uid]
    damaged.path.write_bytes(damaged.path.read_bytes()[:5000])

    tally = Tally()
    worker = runtime.engine(deliver=False, on_event=tally)
    while worker.step(0.0, 8, worker.submit):
        pass
    assert (tally.classified, tally.reported, sum(tally.skipped.values())) == (1, 1, 1)
    assert set(tally.skipped) <= {"truncated", "invalid_header", "conversion_failed"}
    assert tally.images_done == 2  # the lateral was told by its ingest, not again
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1


def test_a_reload_reaches_the_store_worker_and_deliverer(config, runtimes):
    runtime = Runtime(config, "serve", processes=0)
    runtimes.append(runtime)
    runtime.open()
    worker = runtime.engine(deliver=True)
    new = config.model_copy(update={"select": config.select.model_copy(
        update={"views": ["PA"]})})
    runtime.apply(new)
    assert runtime.store.rules.views == ("PA",)
    assert worker.rules.views == ("PA",)
    assert runtime.config is new


def test_worker_processes_start_with_the_runtime_and_stop_with_it(config, runtimes):
    runtime = Runtime(config, "backfill", processes=1)
    runtimes.append(runtime)
    runtime.open()
    worker = runtime.engine(deliver=False)
    assert worker.submit is runtime.pool
    assert runtime.pool.processes == 1
    runtime.close(drain=0.0)
    assert runtime.pool._executor is None


def test_worker_processes_auto_follows_the_cpus_the_service_may_use(tmp_path, monkeypatch):
    from xrvd import runtime
    from xrvd.config import load_config
    from xrvd.errors import ConfigError

    assert load_config(None).service.worker_processes == "auto"
    for cpus, expected in [(1, 0), (2, 2), (3, 3), (16, runtime.AUTO_WORKER_PROCESSES_AT_MOST)]:
        monkeypatch.setattr(runtime, "available_cpus", lambda cpus=cpus: cpus)
        assert runtime.worker_process_count("auto") == expected
    assert runtime.worker_process_count(3) == 3
    config = tmp_path / "xrvd.yaml"
    config.write_text("service:\n  worker_processes: 0\n")
    assert load_config(config).service.worker_processes == 0
    config.write_text("service:\n  worker_processes: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert info.value.problems == [
        "service.worker_processes: must be auto or a whole number from 0 to 64, got 'many'"]
