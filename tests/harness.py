"""Plain helpers the tests share (fixtures are in conftest.py): where the shared data lies,
system programs, reading a state directory's journal, running `xrvd serve` or `xrvd backfill`
as a real subprocess and following its JSON events, DICOM peers, and crafted files.

Synchronisation is by events, never by sleeping: a reader thread parses a daemon's stdout line
by line and tests wait for the event they need, with a timeout that only bounds a failure.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("XRVD_SHARED_DATA", REPO.parent / "shared" / "data"))
CXR = DATA / "cxr"
REJECT = DATA / "reject"

WG04_CR = CXR / "wg04_cr_chest_mono1_15bit.dcm"
NIH_SC = CXR / "nih_dx_sc_mono2_8bit.dcm"
RSNA_JPEG = CXR / "rsna_cr_chest_jpeg_baseline.dcm"
TINY_CR = CXR / "tiny_cr_chest_mono1_32px.dcm"
PNGS = sorted(CXR.glob("*.png"))

# The model write_config configures (and the daemon tests' weights are prepared for).
MODEL = "densenet121-res224-all"


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


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' dciodvfy prints for a file (its warnings are not counted).
    dciodvfy is required: the test is skipped where it is missing (and fails under CI=true), so
    call it last in a test that checks other things too."""
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


def reasons(captured: list[dict], name: str) -> list[str]:
    """The reason codes of the captured events called `name` (see the `events` fixture)."""
    return [e.get("reason") for e in captured if e.get("event") == name]


# --- identifying values -------------------------------------------------------------------------

# A marker string in the patient's name, ID, accession number and file names: it must reach no
# event, metric or journal transition unless log.include_patient_identifiers is true.
MARKER = "ZZMARKERZZ"
IDENTIFIERS = dict(PatientName=f"DOE^{MARKER}", PatientID=f"{MARKER}123",
                   AccessionNumber=f"A{MARKER}1", InstitutionName=f"{MARKER} HOSPITAL",
                   ReferringPhysicianName=f"WHO^{MARKER}", PatientBirthDate="19700101")


# --- the journal, read-only --------------------------------------------------------------------


def journal_rows(state_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a query on `<state_dir>/journal.sqlite3`, opened read-only. Tests may look into
    the journal with SQL; xrvd's own code asks the store's named methods."""
    db = sqlite3.connect(f"file:{Path(state_dir) / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


# --- weights with their ONNX graph already exported --------------------------------------------


def record_exported_graphs(weights_dir: Path, state_dir: Path) -> list[Path]:
    """Record each verified ONNX graph in `weights_dir` in the state directory's record of
    installed weights, as the export (`xrvd models export`, or a daemon's first start) records
    it there: a daemon on this state directory then loads the graph from the cache instead of
    exporting it again. Returns the graphs recorded."""
    from xrvd.pipeline.trust import TrustedHashes

    trusted = TrustedHashes(state_dir)
    recorded = []
    for sidecar in sorted(Path(weights_dir).glob("*.onnx.json")):
        record = json.loads(sidecar.read_text())
        if record.get("verified") is not True:
            continue
        graph = sidecar.with_name(record["onnx_file"])
        trusted.record(graph, record["onnx_sha256"], "export",
                       weights_sha256=record["weights_sha256"])
        recorded.append(graph)
    return recorded


def strip_marker(name: str, source: Path, target: Path) -> Path:
    """Random weights without the untrained marker: stands in for a real published file.
    source: a folder holding the model's untrained weights; returns the file written in
    target."""
    import torch

    from xrvd.pipeline import weights
    from xrvd.pipeline.registry import get_spec

    spec = get_spec(name)
    checkpoint = torch.load(source / spec.weights_file, weights_only=False)
    delattr(checkpoint, weights.UNTRAINED_MARKER)
    target.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target / spec.weights_file)
    return target / spec.weights_file


def torch_config(tmp_path: Path, weights_dir: Path | None = None,
                 name: str = "densenet121-res224-nih") -> Path:
    """<tmp_path>/xrvd.yaml: state_dir <tmp_path>/state, the model `name` on the torch backend
    with one thread, and weights_dir if given (else the state directory's models folder)."""
    lines = [f"state_dir: {tmp_path / 'state'}", "model:", f"  name: {name}",
             "  backend: torch", "  threads: 1"]
    if weights_dir is not None:
        lines.append(f"  weights_dir: {weights_dir}")
    config = tmp_path / "xrvd.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


class Mirror(http.server.SimpleHTTPRequestHandler):
    """A download mirror's request handler (see the `mirror` fixture): serves a folder; a file
    named in `truncate` is sent with a lying Content-Length."""

    truncate: set[str] = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = os.path.basename(self.path)
        if name in self.truncate:
            body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


# --- `xrvd serve` and `xrvd backfill` as subprocesses ------------------------------------------

Event = dict


class DaemonProcess:
    """`xrvd serve` by default; any other xrvd command (back-fill) with `command` and
    ready=None (start returns at once instead of waiting for daemon.ready)."""

    def __init__(self, config_path: Path, state_dir: Path, command: tuple[str, ...] = ("serve",),
                 ready: str | None = "daemon.ready"):
        self.config_path = config_path
        self.state_dir = state_dir
        self.command = command
        self.ready = ready
        self.events: list[Event] = []
        self.stderr = ""
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 120, env: dict[str, str] | None = None) -> DaemonProcess:
        with self._cond:
            self.events = []
        env = dict(os.environ, **{ALLOW_UNTRAINED_ENV: "yes-these-scores-are-meaningless",
                                  "PYTHONUNBUFFERED": "1"}, **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xrvd", *self.command, "-c", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        if self.ready:
            self.wait_for(self.ready, timeout=timeout)
        return self

    def wait(self, timeout: float = 300) -> int:
        """The exit code of a command that ends by itself."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._join()
        return code

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "(not json)", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._join()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._join()
        return code

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._stderr_reader.join(timeout=10)
        # Closing a pipe that a reader thread is still blocked on deadlocks; a reader still
        # blocked here means a descendant of the process holds the pipe open.
        readers = (self._reader, self._stderr_reader)
        assert not any(r is not None and r.is_alive() for r in readers), \
            "the process ended but its output is held open by a leftover child process"
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    # --- events --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self.find("scp.listening")[0]["port"])

    def find(self, name: str, **fields) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name
                    and all(e.get(k) == v for k, v in fields.items())]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60,
                   what: str = "condition") -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: predicate() or (self.proc is not None and self.proc.poll() is not None
                                        and not self._reader.is_alive()), timeout)
        if not ok or not predicate():
            tail = "\n".join(json.dumps(e) for e in self.events[-15:])
            raise AssertionError(f"timed out waiting for {what}; last events:\n{tail}\n"
                                 f"stderr:\n{self.stderr[-2000:]}")

    def wait_for(self, name: str, count: int = 1, timeout: float = 60, **fields) -> list[Event]:
        self.wait_until(lambda: len(self.find(name, **fields)) >= count, timeout,
                        f"{count} x {name} {fields or ''}")
        return self.find(name, **fields)

    # --- the journal, read-only -----------------------------------------------------------

    def journal(self, sql: str, params: tuple = ()) -> list[tuple]:
        return journal_rows(self.state_dir, sql, params)


def everything_logged(process: DaemonProcess) -> str:
    """Every event and all of stderr of a daemon or command, as one text."""
    return "\n".join(json.dumps(e) for e in process.events) + "\n" + process.stderr


def journal_text(process: DaemonProcess) -> str:
    """The journal's transitions and studies, as one text."""
    return repr(process.journal("SELECT * FROM transitions")) + \
        repr(process.journal("SELECT * FROM studies"))


def write_config(tmp_path: Path, weights_dir: Path, **sections) -> Path:
    config = {
        "state_dir": str(tmp_path / "state"),
        # One intra-op thread: the test processes run side by side, one per CPU (xdist), and
        # threads beyond the CPUs only take turns (ONNX Runtime's spin while they wait).
        "model": {"name": "densenet121-res224-all", "weights_dir": str(weights_dir),
                  "batch_size": 4, "threads": 1},
        "scp": {"port": 0, "allowed_calling_aets": ["STORESCU", "XRVDTEST"]},
        "study": {"settle_seconds": 0.5, "retry_seconds": 0.5},
        "output": {"json_sidecar": True},
        "log": {"level": "debug"},
        # In the worker thread unless a test asks for processes: each would load torch.
        "service": {"worker_processes": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path = tmp_path / "xrvd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def results(state_dir: Path) -> list[Path]:
    """The Structured Reports a daemon wrote, one per study and run."""
    return sorted((Path(state_dir) / "results").rglob("*.dcm"))


def sidecar(report: Path) -> dict:
    """The JSON sidecar written beside a report (output.json_sidecar)."""
    return json.loads(report.with_suffix(".json").read_text())


# --- the store -------------------------------------------------------------------------------


def finished_study(store, tmp_path: Path, *, destinations=(), fixture: Path = NIH_SC):
    """A study of one received instance, classified, with a report for `destinations`."""
    source = tmp_path / f"in-{len(list(tmp_path.glob('in-*')))}.dcm"
    copy_with_new_uids(fixture, source)
    outcome = store.store_file(source, source="test", move=False)
    [claim] = store.claim_ready_studies(0, "m", "w", 10)
    store.finish_run(claim, {outcome.instance_id: {"Pneumonia": 0.1}}, tmp_path / "sr.dcm",
                     destinations)
    return source, outcome


# --- DICOM peers --------------------------------------------------------------------------------


def send(port: int, datasets, calling_aet: str = "XRVDTEST") -> list[int]:
    """Send datasets to xrvd on one pynetdicom association; returns the C-STORE status of each
    (-1: none came back)."""
    from pynetdicom import AE

    datasets = list(datasets)
    ae = AE(ae_title=calling_aet)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="XRVD")
    assert assoc.is_established, "association not accepted"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


@contextlib.contextmanager
def scp_association(store, scp_config=None, reserve=None, fixture=None):
    """A StorageSCP storing into `store` on a free port, and an established pynetdicom
    association to it proposing the fixture's (default: the NIH secondary capture) SOP class
    and transfer syntax; yields (scp, dataset, association). All three are closed afterwards,
    and the store too."""
    from pynetdicom import AE

    from xrvd.config import ScpConfig
    from xrvd.ingest.scp import StorageSCP

    scp = StorageSCP(scp_config or ScpConfig(port=0, allowed_calling_aets=["*"]), store,
                     reserve)
    port = scp.start()
    try:
        ds = pydicom.dcmread(fixture or NIH_SC)
        ae = AE(ae_title="TEST")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="XRVD")
        assert assoc.is_established
        try:
            yield scp, ds, assoc
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        scp.stop()
        store.close()


def copy_with_new_uids(source: Path, target: Path, *, study_uid: str | None = None,
                       **attributes) -> pydicom.Dataset:
    """A copy of a fixture as a new instance (new SOP, series and, unless given, study UID)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return ds


# --- crafted files: malformed headers that must get a reason code, never a finding -----------

CRAFTED = ("deep_nesting", "bits_stored_2000", "bits_stored_40", "rows_beyond_pixel_data")


def write_crafted(kind: str, source: Path, target: Path, *,
                  study_uid: str | None = None) -> pydicom.Dataset:
    """A copy of a fixture (an uncompressed 16-bit image such as the WG04 CR) with new UIDs and
    one malformed header, as a security probe sends it:
    deep_nesting: 5000 sequences nested in one another (pydicom raises RecursionError);
    bits_stored_2000, bits_stored_40: Bits Stored above the 16 Bits Allocated (40 as
    MONOCHROME2: an OverflowError inverts MONOCHROME1, MONOCHROME2 went on to a finding);
    rows_beyond_pixel_data: twice the Rows and Columns that the pixel data holds;
    two_frames_of_pixel_data: a single-frame header over two frames' worth of pixel data."""
    if kind == "deep_nesting":
        return write_nested_sequences(source, target, study_uid=study_uid)
    if kind == "two_frames_of_pixel_data":
        return copy_with_new_uids(source, target, study_uid=study_uid,
                                  PixelData=pydicom.dcmread(source).PixelData * 2)
    header = pydicom.dcmread(source, stop_before_pixels=True)
    attributes = {
        "bits_stored_2000": {"BitsStored": 2000},
        "bits_stored_40": {"BitsStored": 40, "PhotometricInterpretation": "MONOCHROME2"},
        "rows_beyond_pixel_data": {"Rows": header.Rows * 2, "Columns": header.Columns * 2},
    }[kind]
    return copy_with_new_uids(source, target, study_uid=study_uid, **attributes)


def prepare(path: Path, options=None, instance_id: int = 1):
    """The worker's stage for one file (prepare_instance) at 224 px, with the default selection
    rules and the given conversion options (default: ConvertOptions())."""
    from xrvd.pipeline.convert import ConvertOptions
    from xrvd.pipeline.prepare import PrepareJob, prepare_instance
    from xrvd.pipeline.select import SelectRules

    return prepare_instance(PrepareJob(instance_id, str(path)), SelectRules(),
                            options or ConvertOptions(), 224)


def write_nested_sequences(source: Path, target: Path, depth: int = 5000, *,
                           study_uid: str | None = None) -> pydicom.Dataset:
    """A copy of a fixture whose header holds `depth` Referenced Image Sequences nested in one
    another, of undefined length: pydicom parses each while it reads the header, one recursion
    per level. Written byte by byte, since pydicom would recurse writing it too. Returns the
    dataset without the nesting."""
    import struct

    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = copy_with_new_uids(source, target, study_uid=study_uid)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    tag = 0x00081140
    before, after = Dataset(), Dataset()
    for element in ds:
        if element.tag != tag:
            (before if element.tag < tag else after).add(element)
    undefined = 0xFFFFFFFF
    opener = (struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, undefined)
              + struct.pack("<HHI", 0xFFFE, 0xE000, undefined))  # sequence, item
    closer = (struct.pack("<HHI", 0xFFFE, 0xE00D, 0)  # item delimiter
              + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))  # sequence delimiter
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    write_dataset(out, before)
    out.write(opener * depth + closer * depth)
    write_dataset(out, after)
    target.write_bytes(out.getvalue())
    return ds


# --- reports ----------------------------------------------------------------------------------


def report_identity(model: str, *, untrained: bool = False):
    """A ModelIdentity for building reports without loading the model."""
    from xrvd.pipeline.models import ModelIdentity
    from xrvd.pipeline.registry import get_spec

    spec = get_spec(model)
    return ModelIdentity(spec.name, spec.architecture, spec.weights_file, "ab" * 32, "1.5.7",
                         untrained)


def scores_for(sources, model: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """Seeded random scores for every label of `model`, per source image."""
    from xrvd.pipeline.registry import get_spec

    rng = np.random.default_rng(seed)
    return {str(ds.SOPInstanceUID): {label: float(rng.uniform())
                                     for label in get_spec(model).label_names}
            for ds in sources}
