"""The classifier (pipeline/models.py): the backend the config asks for, and threads that follow
the CPUs available. Both backends' scores, the ONNX cache and the fallback are tested in
test_onnxrt.py."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from xrvd.pipeline import models as models_module
from xrvd.pipeline.models import Classifier

DENSENET = "densenet121-res224-rsna"

# Info events reach capture_logs even after a CLI call configured logging at warning.
pytestmark = pytest.mark.usefixtures("every_event_level")


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def graphs(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".onnx", ".onnx.json")))


def test_backend_torch_and_the_config(weights_copy, allow_untrained, tmp_path):
    from xrvd.config import load_config

    folder = weights_copy(DENSENET)
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nmodel:\n  name: {DENSENET}\n"
                      f"  weights_dir: {folder}\n  backend: torch\n  threads: 1\n")
    classifier = Classifier.from_config(load_config(config))
    assert classifier.backend == "torch"
    assert graphs(folder) == []  # torch never exports
    assert load_config(None).model.backend == "auto"


def test_threads_zero_means_the_available_cpus(ready_weights, allow_untrained, monkeypatch):
    monkeypatch.setattr(models_module, "available_cpus", lambda: 1)
    folder = ready_weights(DENSENET, recorded=False)
    with capture_logs() as logs:
        Classifier.load(DENSENET, folder)
    assert events(logs, "model.backend")[0]["threads"] == 1
