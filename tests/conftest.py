"""Shared fixtures: the shared data folder and weights folders holding UNTRAINED weights in
TorchXRayVision's own file formats (real weights cannot be downloaded here)."""

from __future__ import annotations

import os
import shutil
import sys
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


def require_tool(name: str, package: str, *, optional: bool = False) -> str | None:
    """The path of a system program a test talks to (DCMTK, dicom3tools, Orthanc, systemd,
    openssl), e.g. require_tool("dciodvfy", "dicom3tools").

    It is looked up on PATH without the virtual environment's bin folder (pynetdicom installs
    a `storescu` of its own there, which `uv run` puts first), then in the sbin folders (Debian
    puts Orthanc in /usr/sbin, often not on a user's PATH). When it is missing, the test is
    skipped with the line that installs it; with optional=True, None is returned instead, for a
    test with a fallback of its own. Under CI=true a missing program fails the test either way:
    CI must install it (.ci/run does).
    """
    venv_bin = os.path.realpath(os.path.dirname(sys.executable))
    folders = [p for p in os.environ.get("PATH", "").split(os.pathsep)
               if p and os.path.realpath(p) != venv_bin]
    folders += [p for p in ("/usr/local/sbin", "/usr/sbin", "/sbin") if p not in folders]
    found = shutil.which(name, path=os.pathsep.join(folders))
    if found:
        return found
    reason = f"{name} missing: apt-get install {package}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run must install it)", pytrace=False)
    if optional:
        return None
    pytest.skip(reason)


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


@pytest.fixture
def events():
    """The structlog events logged during the test, at every level (a command run earlier may
    have configured a higher one), as dicts (event name under "event")."""
    import logging

    import structlog

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as captured:
            yield captured
    finally:
        structlog.configure(**saved)


def reasons(captured: list[dict], name: str) -> list[str]:
    return [e.get("reason") for e in captured if e.get("event") == name]


@pytest.fixture
def listener(tmp_path):
    """Start StorageSCPs on free ports with the given scp settings (any caller allowed unless
    they say otherwise); each is stopped and its store closed afterwards."""
    from xrvd.config import ScpConfig
    from xrvd.ingest.scp import StorageSCP
    from xrvd.store import Store

    made = []

    def start(**settings):
        settings.setdefault("allowed_calling_aets", ["*"])
        scp = StorageSCP(ScpConfig(port=0, **settings), Store(tmp_path / f"state{len(made)}"))
        scp.start()
        made.append(scp)
        return scp

    yield start
    for scp in made:
        scp.stop(drain_seconds=1)
        scp.store.close()
