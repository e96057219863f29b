"""Shared fixtures: weights folders holding UNTRAINED weights in TorchXRayVision's own file
formats (real weights cannot be downloaded here), with their ONNX graphs exported once per
session; captured events; SCPs on free ports; crafted files. Plain helpers and the shared data's
paths are in harness.py."""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import (
    PASSWORD,
    USER,
    Orthanc,
    PacsArchive,
    build_pacs_archive,
    free_port,
    CRAFTED,
    CXR,
    DATA,
    WG04_CR,
    Mirror,
    record_exported_graphs,
    write_crafted,
)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One test process per CPU already: a model in it (and in the commands it starts) gets
        # one thread, not one per CPU each.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
    if not CXR.is_dir():
        raise pytest.UsageError(
            f"test data not found at {DATA}: check out the project beside its shared/ folder "
            "or set XRVD_SHARED_DATA"
        )


# --- weights -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def untrained_weights(tmp_path_factory):
    """name -> a folder holding untrained weights for that model (written once per session).
    The folder is shared by the whole session: tests that change what is in it use a copy
    (weights_copy, ready_weights)."""
    from xrvd.pipeline.untrained import write_untrained_weights

    root = _run_folder(tmp_path_factory, "weights")
    written: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in written:
            with _held(root / f".{name}.lock"):
                if not (root / f".{name}.written").exists():
                    write_untrained_weights(name, root)
                    (root / f".{name}.written").touch()
            written[name] = root
        return root

    return folder


def _run_folder(tmp_path_factory, name: str) -> Path:
    """A folder for the whole run: with pytest-xdist, shared by its worker processes (each
    has a base folder of its own inside the run's), so that weights are written and graphs
    exported once per run, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def _held(lock_file: Path):
    """An exclusive lock between the run's worker processes (one writes, the others wait and
    then find it written)."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def exported_weights(untrained_weights):
    """name -> (folder, graph): the session's untrained weights for that model, with its ONNX
    graph exported and verified against PyTorch once per session, by xrvd's own loading code
    (Classifier.load exports what it does not find in the cache)."""
    from xrvd.pipeline import onnxrt
    from xrvd.pipeline.models import Classifier
    from xrvd.pipeline.registry import get_spec

    graphs: dict[str, Path] = {}

    def exported(name: str) -> tuple[Path, Path]:
        folder = untrained_weights(name)
        if name not in graphs:
            with _held(folder / f".{name}.export.lock"):  # a second worker finds it exported
                classifier = Classifier.load(name, folder, allow_untrained=True,
                                             backend="onnxruntime")
            cached = onnxrt.check_cache(get_spec(name), folder,
                                        classifier.identity.weights_sha256)
            assert cached.status == "verified", cached
            graphs[name] = cached.path
        return folder, graphs[name]

    return exported


@pytest.fixture
def weights_copy(untrained_weights, tmp_path):
    """name -> a private, writable weights folder (<tmp_path>/weights) holding only the untrained
    weights of that model: loading it exports the ONNX graph from scratch."""

    def copy(name: str) -> Path:
        from xrvd.pipeline.registry import get_spec

        source = untrained_weights(name) / get_spec(name).weights_file
        target = tmp_path / "weights"
        target.mkdir(exist_ok=True)
        shutil.copy(source, target / source.name)
        return target

    return copy


@pytest.fixture
def ready_weights(exported_weights, tmp_path):
    """name -> a private, writable weights folder (<tmp_path>/weights) holding the untrained
    weights of that model and their ONNX graph as the session exported it. The graph is
    recorded in <tmp_path>/state (the state_dir harness.write_config configures) or the
    state_dir given, so that a daemon or classifier on that state directory loads the verified
    graph from the cache instead of exporting it again; recorded=False records nothing (a load
    without a state directory uses the cache as it is). The weights file itself is left
    unrecorded, trusted on first use as a daemon's first start finds it."""

    def copy(name: str, state_dir: Path | None = None, *, recorded: bool = True) -> Path:
        folder, graph = exported_weights(name)
        sidecar = graph.with_name(graph.name + ".json")
        weights_file = json.loads(sidecar.read_text())["weights_file"]
        target = tmp_path / "weights"
        target.mkdir(exist_ok=True)
        for source in (folder / weights_file, graph, sidecar):
            shutil.copy(source, target / source.name)
        if recorded:
            assert record_exported_graphs(target, state_dir or tmp_path / "state")
        return target

    return copy


@pytest.fixture
def mirror(tmp_path):
    """A download mirror on a free loopback port: (its folder, its URL for the folder's v1/).
    Files named in harness.Mirror.truncate are sent cut short (reset afterwards)."""
    root = tmp_path / "mirror"
    root.mkdir()

    def handler(*args, **kwargs):
        return Mirror(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join()
    Mirror.truncate = set()


@pytest.fixture
def allow_untrained(monkeypatch):
    from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

    monkeypatch.setenv(ALLOW_UNTRAINED_ENV, "yes-these-scores-are-meaningless")


# --- events --------------------------------------------------------------------------------------


@pytest.fixture
def every_event_level():
    """Events at every level reach structlog's capture_logs, even after a command run earlier
    in the session configured a higher level."""
    import logging

    import structlog

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture
def events(every_event_level):
    """The structlog events logged during the test, at every level, as dicts (event name under
    "event")."""
    import structlog

    with structlog.testing.capture_logs() as captured:
        yield captured


# --- the store and its SCP ---------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    """A Store on <tmp_path>/state, closed afterwards."""
    from xrvd.store import Store

    store = Store(tmp_path / "state")
    yield store
    store.close()


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


# --- crafted files -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def crafted(tmp_path_factory) -> dict[str, Path]:
    """kind -> a copy of the WG04 CR with one malformed header of each kind in harness.CRAFTED
    (written once per session; copy one before changing it)."""
    folder = tmp_path_factory.mktemp("crafted")
    for kind in CRAFTED:
        write_crafted(kind, WG04_CR, folder / f"{kind}.dcm")
    return {kind: folder / f"{kind}.dcm" for kind in CRAFTED}


@dataclass
class Pacs:
    """A running Orthanc holding build_pacs_archive's studies, capping queries at `cap`, with
    xrvd's listener (AE XRVD on `xrvd_port`) known to it as a C-MOVE destination."""

    orthanc: Orthanc
    archive: PacsArchive
    cap: int
    xrvd_port: int

    def source(self, **settings) -> dict:
        """A `sources:` entry for it (by DICOM Q/R; `web_source` for DICOMweb)."""
        return {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                "port": self.orthanc.dicom_port, "result_cap": self.cap,
                "retry_seconds": 0.2, "max_retry_seconds": 1, "timeout_seconds": 20,
                **settings}

    def web_source(self, **settings) -> dict:
        return {"name": "pacs", "type": "dicomweb", "url": self.orthanc.dicomweb_url,
                "auth": {"type": "basic", "username": USER, "password": PASSWORD},
                "result_cap": self.cap, "retry_seconds": 0.2, "max_retry_seconds": 1,
                "timeout_seconds": 20, **settings}


@pytest.fixture
def pacs(tmp_path):
    yield from _pacs(tmp_path, dicomweb=False)


@pytest.fixture
def dicomweb_pacs(tmp_path):
    """The same PACS, also answering DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at
    orthanc.dicomweb_url, behind its HTTP basic auth (harness.USER, PASSWORD)."""
    yield from _pacs(tmp_path, dicomweb=True)


def _pacs(tmp_path, *, dicomweb: bool):
    orthanc = Orthanc(tmp_path / "orthanc")
    xrvd_port = free_port()
    cap = 5
    orthanc.configure(xrvd_port, find_cap=cap, dicomweb=dicomweb)
    orthanc.start()
    try:
        archive = build_pacs_archive(tmp_path / "archive")
        for path in archive.files:
            orthanc.upload(path)
        yield Pacs(orthanc, archive, cap, xrvd_port)
    finally:
        orthanc.stop()
