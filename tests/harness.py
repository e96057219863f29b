"""Plain helpers the tests share (fixtures are in conftest.py): where the shared data lies,
system programs, reading a state directory's journal, running `xrvd serve` or `xrvd backfill`
as a real subprocess and following its JSON events, DICOM peers, and crafted files.

Synchronisation is by events, never by sleeping: a reader thread parses a daemon's stdout line
by line and tests wait for the event they need, with a timeout that only bounds a failure.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import http.server
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
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
# The frontal chest fixtures: each is classified.
FRONTAL = [WG04_CR, NIH_SC, RSNA_JPEG]
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
    return missing(f"{name} missing: apt-get install {package}", optional)


def missing(reason: str, optional: bool = False) -> None:
    """Skip the test for a missing system component (fail it under CI=true), or return None
    with optional=True."""
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


# DCMTK's storescu proposes uncompressed syntaxes unless told which compressed one to offer.
_DCMTK_PROPOSE = {
    pydicom.uid.JPEGBaseline8Bit: "-xy",
    pydicom.uid.JPEG2000Lossless: "-xv",
    pydicom.uid.JPEGLSLossless: "-xt",
    pydicom.uid.RLELossless: "-xr",
}


def storescu(port: int, files, calling_aet: str = "STORESCU") -> subprocess.CompletedProcess:
    """DCMTK's storescu (pynetdicom's own app where DCMTK is not installed), one run per
    transfer syntax so that each file goes in its own encoding."""
    dcmtk = require_tool("storescu", "dcmtk", optional=True)
    groups: dict[str, list[str]] = {}
    for f in files:
        syntax = pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
        groups.setdefault(_DCMTK_PROPOSE.get(syntax, ""), []).append(str(f))
    done = None
    for option, group in groups.items():
        if dcmtk:
            command = [dcmtk, "-R", *([option] if option else []), "-aet", calling_aet,
                       "-aec", "XRVD", "127.0.0.1", str(port), *group]
        else:
            command = [sys.executable, "-m", "pynetdicom", "storescu", "-cx", "-aet",
                       calling_aet, "-aec", "XRVD", "127.0.0.1", str(port), *group]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, TCP_NODELAY="1"))
        if done.returncode != 0:
            return done
    return done


# --- `xrvd serve` and `xrvd backfill` as subprocesses ------------------------------------------

Event = dict


class DaemonProcess:
    """`xrvd serve` by default; any other xrvd command (back-fill) with `command` and
    ready=None (start returns at once instead of waiting for daemon.ready)."""

    def __init__(self, config_path: Path, state_dir: Path, command: tuple[str, ...] = ("serve",),
                 ready: str | None = "daemon.ready", python: str = sys.executable):
        self.python = python  # another install's interpreter (the service install's)
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
            [self.python, "-m", "xrvd", *self.command, "-c", str(self.config_path)],
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


def build_archive(root: Path, copies: int) -> tuple[set[str], set[str]]:
    """The archive the folder back-fill tests crawl (local and Ray engines): nested folders of
    fixture copies with new UIDs, a study split over two folders, rejects and garbage.
    Returns (SOP UIDs that must be classified, their study UIDs)."""
    sops, studies = set(), set()
    for copy in range(copies):
        for number, source in enumerate(FRONTAL):
            ds = copy_with_new_uids(source, root / f"site{copy % 2}" / f"day{copy}" /
                                    f"img{number}.dcm")
            sops.add(ds.SOPInstanceUID)
            studies.add(ds.StudyInstanceUID)
    split = generate_uid()
    for folder in ("site0/split-a", "site1/split-b"):
        ds = copy_with_new_uids(FRONTAL[2], root / folder / "part.dcm", study_uid=split)
        sops.add(ds.SOPInstanceUID)
    studies.add(split)
    for reject in REJECT.glob("*.dcm"):
        copy_with_new_uids(reject, root / "other" / reject.name)
    copy_with_new_uids(TINY_CR, root / "other" / "tiny.dcm")
    lateral = copy_with_new_uids(FRONTAL[1], root / "other" / "lateral.dcm", ViewPosition="LL")
    assert lateral.SOPInstanceUID not in sops
    truncated = root / "other" / "truncated.dcm"
    copy_with_new_uids(FRONTAL[0], truncated)
    truncated.write_bytes(truncated.read_bytes()[:len(truncated.read_bytes()) // 2])
    (root / "notes.txt").write_text("not an image\n")
    (root / "site0" / "empty.dcm").write_bytes(b"")
    return sops, studies



def reports_by_study(output: Path) -> dict[str, list[Path]]:
    """Study folder -> the report files in it (a back-fill's output.folder)."""
    return {folder.name: sorted(folder.glob("*.dcm")) for folder in output.iterdir()
            if folder.is_dir()}


def runs_per_image(state_dir: Path) -> dict[str, int]:
    """SOP Instance UID -> how many runs scored it (1 each: nothing reported twice)."""
    return dict(journal_rows(
        state_dir, "SELECT i.sop_uid, COUNT(DISTINCT s.run_id) FROM scores s "
                   "JOIN instances i ON i.id = s.instance_id GROUP BY i.sop_uid"))

# --- a PACS: Orthanc on loopback, and an archive to fill it with -----------------------------

# Orthanc's REST API and DICOMweb are behind HTTP basic authentication, as at a real site.
USER, PASSWORD = "xrvd", "s3cret-for-tests"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A TCP port free on loopback now (for a program that cannot report the port it bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """Orthanc (Debian package) on loopback: AE title ORTHANC on `dicom_port`, REST (and,
    with dicomweb=True, DICOMweb) on `http_port`, its database under `folder`. Call
    configure, then start; start again after stop keeps the database.

    Any calling AE may store, C-FIND, C-GET and C-MOVE (a C-MOVE destination must be one of
    the configured modalities: Orthanc opens the association to it by name)."""

    def __init__(self, folder: Path, xrvd_port_file: Path | None = None):
        self.program = require_tool("Orthanc", "orthanc")
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = folder / "orthanc.json"
        self.proc: subprocess.Popen | None = None
        self._started = threading.Event()
        self._log: collections.deque[str] = collections.deque(maxlen=40)

    def configure(self, xrvd_port: int | None = None, *,
                  modalities: dict[str, tuple[str, str, int]] | None = None,
                  dicomweb: bool = False, find_cap: int | None = None) -> None:
        """xrvd_port: xrvd's SCP, as the modality "xrvd" (AE title XRVD on loopback).
        modalities: more known peers, name -> (AE title, host, port).
        dicomweb: load the DICOMweb plugin, at dicomweb_url (skips the test when the
        orthanc-dicomweb package is missing).
        find_cap: at most this many matches per query (Orthanc's LimitFindResults, and
        LimitFindInstances at the instance level), like a real PACS's result cap; the
        default, none."""
        known = {"xrvd": ["XRVD", "127.0.0.1", xrvd_port]} if xrvd_port is not None else {}
        known.update({name: list(peer) for name, peer in (modalities or {}).items()})
        plugins = []
        if dicomweb:
            if not DICOMWEB_PLUGIN.is_file():
                missing("the Orthanc DICOMweb plugin is missing: "
                         "apt-get install orthanc-dicomweb")
            plugins.append(str(DICOMWEB_PLUGIN))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({
            "Name": "xrvd-test-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "DicomModalities": known,
            # Callers need not be registered: the back-fill's AE title is the test's choice.
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "DicomCheckCalledAet": False,
            "LimitFindResults": find_cap or 0, "LimitFindInstances": find_cap or 0,
            "Plugins": plugins,
            **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}} if dicomweb else {}),
            "HttpServerEnabled": True, "DicomServerEnabled": True,
            "StableAge": 1,
        }))

    def start(self) -> Orthanc:
        self._started.clear()
        self._log.clear()
        self.proc = subprocess.Popen([self.program, str(self.config)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # The reader also sets _started when Orthanc exits, so a bad configuration fails here
        # at once, with Orthanc's last lines, instead of after the timeout.
        assert self._started.wait(60) and self.proc.poll() is None, \
            "Orthanc did not start:\n" + "".join(self._log)
        return self

    def _read(self):
        for line in self.proc.stdout:
            self._log.append(line)
            if "Orthanc has started" in line:
                self._started.set()
        self._started.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
            self._reader.join(timeout=10)
            self.proc.stdout.close()

    @staticmethod
    def authorization() -> str:
        """The Authorization header's value for Orthanc's REST API and DICOMweb."""
        return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def rest(self, method: str, path: str, body: bytes | dict | None = None):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                         data=data, method=method)
        request.add_header("Authorization", self.authorization())
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), without a trailing slash."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def statistics(self) -> dict:
        """GET /statistics: CountPatients, CountStudies, CountSeries, CountInstances, ..."""
        return self.rest("GET", "/statistics")

    def instances_count(self) -> int:
        return int(self.statistics()["CountInstances"])

    def upload(self, source: Path | bytes) -> str:
        """Store a DICOM file (a path or its bytes) through the REST API; its Orthanc ID."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        return self.rest("POST", "/instances", data)["ID"]

    def reports_in_study(self, study_uid: str) -> dict[str, str]:
        """Orthanc ID -> SOP Instance UID of the SR instances in a study."""
        found = self.rest("POST", "/tools/find", {
            "Level": "Instance", "Expand": True,
            "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}})
        return {item["ID"]: item["MainDicomTags"]["SOPInstanceUID"] for item in found}


@dataclass
class PacsArchive:
    """What build_pacs_archive wrote, and what a back-fill from it must do."""

    files: list[Path]
    frontal_sops: set[str]  # frontal chest images: each must be classified
    chest_studies: set[str]  # studies holding a frontal chest image: each gets a report
    non_chest_sops: set[str]  # CT and MR instances: never to be retrieved
    lateral_sops: set[str]  # lateral views beside a frontal one: not classified
    days: list[dt.date]
    busy_day: dt.date  # holds more chest studies than a small find cap
    studies: dict[str, dt.date] = field(default_factory=dict)  # every study UID -> its day


def build_pacs_archive(folder: Path, *, busy_day_studies: int = 8) -> PacsArchive:
    """DICOM files under `folder` for a PACS to hold, new UIDs each: studies on 4 days
    (2024-01-02..05), each with its own distinct StudyTime and accession number, of these
    kinds: frontal chest only; frontal and lateral (ViewPosition LL, a second series); CT
    only; MR only; a frontal chest series with a CT series in the same study. The busy day
    (2024-01-03) holds `busy_day_studies` chest studies and a CT and an MR study besides; every
    other day holds 4 studies, under a find cap of 5, the kinds in turn (each kind twice or
    more over those days). A day's studies are spread over 06:00..20:00. Patients
    (PACS000..PACS011) have several studies each.

    The frontal images are the shared chest fixtures, the large ones subsampled (WG04 to
    a quarter, the NIH image to half: still above the 256 px selection minimum) so that the
    whole archive is a few MB and uploads in about a second."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = folder / "sources"
    frontals = [_subsampled(WG04_CR, sources / "wg04.dcm", 4),
                _subsampled(NIH_SC, sources / "nih.dcm", 2), RSNA_JPEG]
    ct, mr = REJECT / "CT_small.dcm", REJECT / "MR_small.dcm"
    days = [dt.date(2024, 1, 2) + dt.timedelta(days=i) for i in range(4)]
    busy_day = days[1]
    archive = PacsArchive([], set(), set(), set(), set(), days, busy_day)
    every_kind = ("chest", "chest+lateral", "ct", "mr", "chest+ct")
    count = quiet = 0

    def study(day: dt.date, kind: str, seconds: int) -> None:
        nonlocal count
        count += 1
        uid = generate_uid()
        study_time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
        common = dict(StudyDate=day.strftime("%Y%m%d"), StudyTime=study_time,
                      PatientID=f"PACS{count % 12:03d}",
                      PatientName=f"PACS^PATIENT{count % 12:03d}",
                      AccessionNumber=f"ACC{count:05d}", StudyDescription=kind.upper())
        frontal = frontals[count % len(frontals)]

        def instance(source: Path, series: int, **attributes) -> str:
            target = folder / day.isoformat() / f"{count:03d}-{series}.dcm"
            ds = copy_with_new_uids(source, target, study_uid=uid, SeriesNumber=series,
                                    InstanceNumber=1, **_dated(source, day), **common,
                                    **attributes)
            archive.files.append(target)
            return str(ds.SOPInstanceUID)

        archive.studies[uid] = day
        if kind in ("chest", "chest+lateral", "chest+ct"):
            archive.frontal_sops.add(instance(frontal, 1))
            archive.chest_studies.add(uid)
        if kind == "chest+lateral":
            archive.lateral_sops.add(instance(frontal, 2, ViewPosition="LL"))
        if kind in ("ct", "chest+ct"):
            archive.non_chest_sops.add(instance(ct, 2 if kind == "chest+ct" else 1))
        if kind == "mr":
            archive.non_chest_sops.add(instance(mr, 1))

    for day in days:
        if day == busy_day:
            chest_kinds = ("chest", "chest+lateral", "chest+ct")
            kinds = [chest_kinds[i % 3] for i in range(busy_day_studies)] + ["ct", "mr"]
        else:
            kinds = [every_kind[(quiet + i) % len(every_kind)] for i in range(4)]
            quiet += 4
        # Spread over 06:00..20:00, so that splitting a day's window by time divides its
        # studies; `count` seconds more keeps the same slot on different days apart.
        step = 14 * 3600 // len(kinds)
        for i, kind in enumerate(kinds):
            study(day, kind, 6 * 3600 + i * step + count)
    shutil.rmtree(sources)
    return archive


def _dated(source: Path, day: dt.date) -> dict[str, str]:
    """The other dates a fixture's header holds, moved to the study's day (a back-fill may
    read any of them)."""
    header = pydicom.dcmread(source, stop_before_pixels=True)
    return {keyword: day.strftime("%Y%m%d")
            for keyword in ("SeriesDate", "AcquisitionDate", "ContentDate") if keyword in header}


def _subsampled(source: Path, target: Path, step: int) -> Path:
    """An uncompressed fixture with every `step`-th row and column of its pixels."""
    ds = pydicom.dcmread(source)
    pixels = np.ascontiguousarray(ds.pixel_array[::step, ::step])
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


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
