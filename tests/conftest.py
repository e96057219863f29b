"""Shared fixtures: the shared data folder and weights folders holding UNTRAINED weights in
TorchXRayVision's own file formats (real weights cannot be downloaded here)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("XRVD_SHARED_DATA", REPO.parent / "shared" / "data"))
CXR = DATA / "cxr"
REJECT = DATA / "reject"

WG04_CR = CXR / "wg04_cr_chest_mono1_15bit.dcm"
NIH_SC = CXR / "nih_dx_sc_mono2_8bit.dcm"
RSNA_JPEG = CXR / "rsna_cr_chest_jpeg_baseline.dcm"
TINY_CR = CXR / "tiny_cr_chest_mono1_32px.dcm"
PNGS = sorted(CXR.glob("*.png"))


def pytest_configure(config):
    if not CXR.is_dir():
        raise pytest.UsageError(
            f"test data not found at {DATA}: check out the project beside its shared/ folder "
            "or set XRVD_SHARED_DATA"
        )


@pytest.fixture(scope="session")
def untrained_weights(tmp_path_factory):
    """name -> a folder holding untrained weights for that model (written once per session)."""
    from xrvd.pipeline.untrained import write_untrained_weights

    root = tmp_path_factory.mktemp("weights")
    written: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in written:
            write_untrained_weights(name, root)
            written[name] = root
        return root

    return folder


@pytest.fixture
def weights_copy(untrained_weights, tmp_path):
    """A private, writable weights folder with untrained weights for the given model."""

    def copy(name: str) -> Path:
        from xrvd.pipeline.registry import get_spec

        source = untrained_weights(name) / get_spec(name).weights_file
        target = tmp_path / "weights"
        target.mkdir(exist_ok=True)
        shutil.copy(source, target / source.name)
        return target

    return copy


@pytest.fixture
def allow_untrained(monkeypatch):
    from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

    monkeypatch.setenv(ALLOW_UNTRAINED_ENV, "yes-these-scores-are-meaningless")
