"""Fixtures of the command tests: `xrvd serve` started as a real subprocess."""

from __future__ import annotations

import pytest

from ..harness import MODEL, DaemonProcess, write_config


@pytest.fixture
def daemon(tmp_path, ready_weights):
    """Start `xrvd serve` with harness.write_config's configuration, changed by the sections
    given (and with env added to its environment); returns the DaemonProcess once it is ready.
    Its weights folder holds the ONNX graph exported once per session, so it starts without
    exporting. Each daemon still running at the end is killed."""
    weights = ready_weights(MODEL)
    started: list[DaemonProcess] = []

    def make(env: dict[str, str] | None = None, **sections) -> DaemonProcess:
        config = write_config(tmp_path, weights, **sections)
        process = DaemonProcess(config, tmp_path / "state")
        started.append(process)
        process.start(env=env)
        assert process.find("model.backend", source="cache"), \
            "the daemon did not load the graph ready_weights prepared: it exported it again"
        return process

    yield make
    for process in started:
        process.stop()
