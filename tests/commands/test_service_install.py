"""The service install (no PyTorch, torchvision, TorchXRayVision or nvidia packages): `xrvd
serve` run by that install's interpreter scores from a model package exactly as the full
install scores from the weights. .ci/run builds the service install and names it in
XRVD_SERVICE_VENV; elsewhere this test is skipped with the lines that build one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

from xrvd.commands import models as modeladmin
from xrvd.pipeline.package import package_path
from xrvd.pipeline.registry import get_spec

from ..harness import (
    MODEL,
    NIH_SC,
    RSNA_JPEG,
    WG04_CR,
    DaemonProcess,
    missing,
    results,
    storescu,
    write_config,
)

SERVICE_VENV = "XRVD_SERVICE_VENV"
TORCH_PACKAGES = ("torch", "torchvision", "torchxrayvision", "nvidia")


def service_python() -> str:
    venv = os.environ.get(SERVICE_VENV)
    python = Path(venv or "/nonexistent") / "bin" / "python"
    if not python.exists():
        missing(f"no service install to test ({SERVICE_VENV} unset or wrong): "
                 "UV_PROJECT_ENVIRONMENT=/tmp/xrvd-service uv sync --locked --no-default-groups "
                 f"--group dev && export {SERVICE_VENV}=/tmp/xrvd-service")
    return str(python)


def scores_by_image(daemon: DaemonProcess) -> dict[str, dict[str, float]]:
    """The scores the journal holds (unrounded), by image."""
    scores: dict[str, dict[str, float]] = {}
    for uid, label, score in daemon.journal("SELECT i.sop_uid, s.label, s.score FROM scores s "
                                            "JOIN instances i ON i.id = s.instance_id"):
        scores.setdefault(uid, {})[label] = score
    assert len(results(daemon.state_dir)) == len(scores)  # one report per study, each written
    return scores


def serve(config: Path, state_dir: Path, python: str, files: list[Path]) -> DaemonProcess:
    daemon = DaemonProcess(config, state_dir, python=python).start()
    try:
        done = storescu(daemon.port, files)
        assert done.returncode == 0, done.stderr
        daemon.wait_for("study.classified", count=len(files))
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    return daemon


def test_the_service_install_scores_from_a_package_as_the_full_install(
        tmp_path, ready_weights, allow_untrained):
    python = service_python()
    installed = subprocess.run(
        [python, "-c", "import importlib.metadata as m; "
         "print('\\n'.join(d.metadata['Name'].lower() for d in m.distributions()))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert "xrvd" in installed and "onnxruntime" in installed
    assert not [name for name in installed if name.startswith(TORCH_PACKAGES)], installed

    weights = ready_weights(MODEL)
    record = modeladmin.export(MODEL, weights, threads=1)  # on the full install, as a site would
    carried = tmp_path / "service-models"
    carried.mkdir()
    shutil.copy(record["package"], carried / Path(record["package"]).name)
    files = [WG04_CR, NIH_SC, RSNA_JPEG]  # 15-bit MONOCHROME1 CR, 8-bit SC, JPEG baseline

    for install in ("full", "service"):
        (tmp_path / install).mkdir()
    full = serve(write_config(tmp_path / "full", weights), tmp_path / "full" / "state",
                 sys.executable, files)
    service = serve(write_config(tmp_path / "service", carried), tmp_path / "service" / "state",
                    python, files)
    assert service.find("model.backend", source="package")
    [ready] = service.find("daemon.ready")
    assert ready["install"] == "service"
    assert full.find("daemon.ready")[0]["install"] == "full"

    expected, got = scores_by_image(full), scores_by_image(service)
    assert set(got) == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                        for f in files} == set(expected)
    for uid, scores in expected.items():
        assert scores.keys() == got[uid].keys()
        worst = max(abs(scores[label] - got[uid][label]) for label in scores)
        assert worst <= 1e-5, (uid, worst, json.dumps(got[uid]))
    assert package_path(get_spec(MODEL), carried).exists()
