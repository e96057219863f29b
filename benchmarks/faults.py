"""Faults: `xrvd serve` killed with SIGKILL (the whole process tree) while DCMTK's storescu
sends to it, then its PACS (Orthanc) stopped for a while; afterwards, is anything acknowledged
lost, and is any report duplicated?

Run by hand (never by the test suite; it takes minutes):

    uv run --locked python benchmarks/faults.py                      # 100 kills, 120 s outage
    uv run --locked python benchmarks/faults.py --kills 5 --outage-seconds 15   # a short run

Phase 1, kills: `xrvd serve` (untrained weights, `service.worker_processes: auto`, so a fork
server and worker processes run beside the daemon; Orthanc as its destination) receives studies
of 1-3 copies of the shared chest fixtures with new UIDs, one storescu association per image,
one after the other. At a random moment (uniform in --kill-window seconds after `daemon.ready`)
the whole service process tree (the daemon and every descendant, found through /proc, and its
process group) gets SIGKILL, and the daemon is started again. An image counts as acknowledged
only when storescu reports a C-STORE response with status Success for it; images that were not
acknowledged are sent again after the restart (as a modality would retry), up to --retries
times. After the last kill the daemon is started once more and drains: no study receiving or
processing and no delivery pending in the journal.
Phase 2, PACS outage: studies keep coming while Orthanc is stopped for --outage-seconds, then
Orthanc is started again on the same ports and xrvd drains its delivery queue.

Figures (a table at the end): instances acknowledged; acknowledged but not in the journal
(lost); acknowledged but left unfinished; reports written per study and generation (the output
folder, and the journal's done runs) and held by Orthanc per study and generation (Orthanc keeps
one instance per SOP Instance UID, so a resend of the same report is not a duplicate there; a
second report of one generation is); reports expected, delivered, missing and duplicated per
phase; the spool's size and file count, the state directory's free space and the spool
retention setting used (`storage.keep_spool` where this xrvd has it); leftovers of the kills
(processes that outlived the SIGKILL, fork-server folders left in TMPDIR).

Exit status: 0 when nothing was lost, duplicated, unexpected in Orthanc or left undelivered; 1
otherwise (or when a drain did not finish in time); 2 for a setup problem (no storescu, no
Orthanc, xrvd does not start); 130 when interrupted.

Everything runs in a temporary folder (--keep keeps it: configs, the daemon's JSON logs, one
per start, the journal, the reports, Orthanc's storage). All processes (xrvd and its children,
storescu, Orthanc) are started in their own sessions and stopped on exit, Ctrl-C and SIGTERM
included; every wait has a time limit (--max-minutes bounds the whole run).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import yaml
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
CXR = ROOT.parent / "shared" / "data" / "cxr"
MODEL = "densenet121-res224-all"
ALLOW = {"XRVD_TESTING_ALLOW_UNTRAINED_WEIGHTS": "yes-these-scores-are-meaningless"}
CALLING_AET = "BENCH"
ORTHANC_USER, ORTHANC_PASSWORD = "xrvd", "faults-benchmark"
# Fixtures sent by default: small and quick (1 MB uncompressed, 0.1 MB JPEG baseline), and a
# 32 px CR that xrvd journals and skips (too_small): skipped instances must not be lost either.
TEMPLATES = {"nih_dx_sc_mono2_8bit.dcm": 6, "rsna_cr_chest_jpeg_baseline.dcm": 3,
             "tiny_cr_chest_mono1_32px.dcm": 1}
# storescu proposes uncompressed transfer syntaxes unless told which compressed one to offer.
PROPOSE = {pydicom.uid.JPEGBaseline8Bit: "-xy", pydicom.uid.JPEG2000Lossless: "-xv",
           pydicom.uid.JPEGLSLossless: "-xt", pydicom.uid.RLELossless: "-xr"}


def system_tool(name: str, *candidates: str) -> str | None:
    """A system program, never the virtual environment's (pynetdicom installs a `storescu`)."""
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    venv_bin = os.path.realpath(os.path.dirname(sys.executable))
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and os.path.realpath(p) != venv_bin)
    return shutil.which(name, path=path)


STORESCU = system_tool("storescu", "/usr/bin/storescu")
ORTHANC = system_tool("Orthanc", "/usr/sbin/Orthanc")


class Interrupted(Exception):
    """SIGTERM or the --max-minutes deadline: stop and clean up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes -----------------------------------------------------------------------------


def become_subreaper() -> bool:
    """Orphans of the killed service (worker processes whose parent died first) are re-parented
    to this process instead of init, so that they can be found, killed and reaped here."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """(parent pid, process group, state, start time) from /proc, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), fields[0], int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of `root` and every process below it (all threads' children: a
    scan of /proc, not /proc/PID/task/PID/children, which lists one thread's only)."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append(int(entry))
                started[int(entry)] = info[3]
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in started and pid not in found:
            found[pid] = started[pid]
            stack.extend(children.get(pid, ()))
    return found


def _alive(pid: int, start_time: int) -> bool:
    info = _stat(pid)
    return info is not None and info[3] == start_time and info[2] != "Z"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not (or no longer) ours to reap: its own parent or init did


def kill_tree(proc: subprocess.Popen, timeout: float = 15) -> tuple[int, int]:
    """SIGKILL the process and all its descendants at once: its process group (it was started
    in a session of its own, so the group is the whole service unless a child left it) in one
    call, then every descendant found in /proc that is not in the group. Returns (processes
    killed, processes still alive after `timeout`)."""
    tree = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid, start_time in {**tree, **descendants(proc.pid)}.items():
        if _alive(pid, start_time):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while True:
        for pid in tree:
            if pid != proc.pid:
                _reap(pid)  # orphans re-parented to this subreaper
        # Gone from /proc altogether: dead and reaped (zombies are re-parented here first).
        left = {pid: start for pid, start in tree.items()
                if (info := _stat(pid)) is not None and info[3] == start}
        if not left or time.monotonic() > deadline:
            return len(tree), sum(1 for pid, start in left.items() if _alive(pid, start))
        time.sleep(0.05)


def stray_children(known: set[int]) -> list[int]:
    """Processes re-parented to this one (the subreaper) that it did not start itself."""
    me = os.getpid()
    strays = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in known:
            info = _stat(int(entry))
            if info is not None and info[0] == me and info[2] != "Z":
                strays.append(int(entry))
    return strays


def _stop_session(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM to the process's group, SIGKILL to whatever of it is left after `grace`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    kill_tree(proc, timeout=5)


# --- xrvd ----------------------------------------------------------------------------------


class Xrvd:
    """`xrvd serve` as a subprocess in its own session. Its JSON events go to one log file per
    start (no pipes: a killed daemon's children could hold a pipe open), which is read for
    `scp.listening` and `daemon.ready`."""

    def __init__(self, config: Path, work: Path, env: dict[str, str]):
        self.config = config
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0
        self.start_seconds: list[float] = []

    def start(self, timeout: float) -> int:
        self.starts += 1
        log = self.logs / f"xrvd-{self.starts:03d}.jsonl"
        started = time.monotonic()
        with open(log, "wb") as out, open(log.with_suffix(".stderr"), "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xrvd", "serve", "-c", str(self.config)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True)
        port = None
        with open(log, encoding="utf-8", errors="replace") as events:
            pending = ""
            while True:
                chunk = events.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        event = _json(line)
                        if event.get("event") == "scp.listening":
                            port = int(event["port"])
                        elif event.get("event") == "daemon.ready" and port is not None:
                            self.port = port
                            self.start_seconds.append(time.monotonic() - started)
                            return port
                elif self.proc.poll() is not None:
                    raise RuntimeError(f"xrvd serve exited with {self.proc.returncode} before "
                                       f"it was ready; see {log} and its .stderr:\n"
                                       f"{log.with_suffix('.stderr').read_text()[-2000:]}")
                elif time.monotonic() - started > timeout:
                    raise RuntimeError(f"xrvd serve not ready after {timeout:.0f} s; see {log}")
                else:
                    time.sleep(0.05)

    def kill(self) -> tuple[int, int]:
        assert self.proc is not None
        self.port = None
        return kill_tree(self.proc)

    def terminate(self, timeout: float = 120) -> int | None:
        """SIGTERM (drain and exit 0), then SIGKILL for whatever is left."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.port = None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        kill_tree(self.proc, timeout=5)
        return code

    def events(self) -> list[dict]:
        found = []
        for log in sorted(self.logs.glob("xrvd-*.jsonl")):
            for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip():
                    found.append(_json(line))
        return found


def _json(line: str) -> dict:
    try:
        event = json.loads(line)
        return event if isinstance(event, dict) else {}
    except json.JSONDecodeError:
        return {"event": "(not json)", "line": line}


# --- Orthanc -------------------------------------------------------------------------------


class Orthanc:
    """Orthanc as the PACS (as tests/test_orthanc.py runs it): its own storage, DICOM and HTTP
    ports picked once and kept across restarts, HTTP authentication on."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = folder / "orthanc.json"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def configure(self, xrvd_port: int) -> None:
        self.config.write_text(json.dumps({
            "Name": "xrvd-faults-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            # xrvd's port changes at every start (scp.port 0); Orthanc only receives from it.
            "DicomModalities": {"xrvd": ["XRVD", "127.0.0.1", xrvd_port]},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "Plugins": [], "HttpServerEnabled": True, "DicomServerEnabled": True,
            "StableAge": 1,
        }))

    def start(self, timeout: float = 60) -> None:
        self.starts += 1
        with open(self.folder / f"orthanc-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.rest("GET", "/system", timeout=2)
                if self._dicom_open():
                    return
            except (OSError, urllib.error.URLError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start; see {log.name} in {self.folder}")
            time.sleep(0.1)

    def _dicom_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        _stop_session(self.proc, grace=60)

    def rest(self, method: str, path: str, body: dict | None = None, timeout: float = 60):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode())
        token = base64.b64encode(f"{ORTHANC_USER}:{ORTHANC_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def reports(self) -> list[dict]:
        """Every SR instance Orthanc holds: study UID, SOP Instance UID, InstanceNumber (xrvd
        numbers its reports generation + 1). Three listings (Orthanc 1.10 has no
        RequestedTags in /tools/find)."""
        studies = {s["ID"]: s["MainDicomTags"].get("StudyInstanceUID")
                   for s in self.rest("GET", "/studies?expand")}
        series = {s["ID"]: studies.get(s["ParentStudy"])
                  for s in self.rest("GET", "/series?expand")
                  if s["MainDicomTags"].get("Modality") == "SR"}
        found = []
        for instance in self.rest("GET", "/instances?expand"):
            if instance["ParentSeries"] in series:
                tags = instance["MainDicomTags"]
                found.append({"study_uid": series[instance["ParentSeries"]],
                              "sop_uid": tags.get("SOPInstanceUID"),
                              "number": tags.get("InstanceNumber")})
        return found


# --- the sender ----------------------------------------------------------------------------


@dataclass
class Image:
    sop_uid: str
    study_uid: str
    phase: str
    path: Path
    option: str  # storescu's proposal option for its transfer syntax ("" for uncompressed)
    attempts: int = 0
    acknowledged: bool = False


@dataclass
class SenderStats:
    runs: int = 0
    outcomes: Counter = field(default_factory=Counter)


class Sender(threading.Thread):
    """DCMTK storescu, one run (association) per image, studies one after the other, always to
    the daemon's current port; waits while the daemon is down. Images not acknowledged are
    sent again (before new studies) up to `retries` more times."""

    def __init__(self, folder: Path, rng: random.Random, images_per_study: tuple[int, int],
                 retries: int, pause: float):
        super().__init__(name="storescu-sender", daemon=True)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rng = rng
        self.images_per_study = images_per_study
        self.retries = retries
        self.pause = pause
        self.templates = []
        for name, weight in TEMPLATES.items():
            raw = (CXR / name).read_bytes()
            syntax = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True) \
                .file_meta.TransferSyntaxUID
            self.templates.append((raw, PROPOSE.get(syntax, ""), weight))
        self.images: dict[str, Image] = {}
        self.studies: dict[str, str] = {}  # study UID -> phase
        self.phase = ""
        self.stats = SenderStats()
        self._retry: list[Image] = []
        self._port: int | None = None
        self._cond = threading.Condition()
        self._stop_new = True  # no new studies (until a phase begins): retries only
        self._stopping = False
        self._busy = False
        self._current: subprocess.Popen | None = None
        self.error: BaseException | None = None

    # main thread side
    def set_port(self, port: int | None) -> None:
        with self._cond:
            self._port = port
            self._cond.notify_all()

    def new_studies(self, allowed: bool, phase: str | None = None) -> None:
        with self._cond:
            self._stop_new = not allowed
            if phase:
                self.phase = phase
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """After new_studies(False): True once retries are done and nothing is in flight."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (self._stop_new and not self._retry and not self._busy)
                or self.error is not None, timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        current = self._current
        if current is not None:
            _stop_session(current, grace=2)
        self.join(timeout=30)

    # sender thread side
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._stopping or (
                    self._port is not None and (self._retry or not self._stop_new)))
                if self._stopping:
                    return
                self._busy = True
                port = self._port
                retry = self._retry.pop(0) if self._retry else None
            if retry is not None:
                self._send(retry, port)
                continue
            study_uid = generate_uid()
            self.studies[study_uid] = self.phase
            for _ in range(self.rng.randint(*self.images_per_study)):
                image = self._generate(study_uid)
                with self._cond:
                    port = self._port
                    if port is None or self._stopping:  # the daemon is down: send it later
                        self._retry.append(image)
                        continue
                self._send(image, port)
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._stopping, self.pause)

    def _generate(self, study_uid: str) -> Image:
        raw, option, _ = self.rng.choices(self.templates,
                                          weights=[t[2] for t in self.templates])[0]
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        path = self.folder / f"{len(self.images):06d}.dcm"
        ds.save_as(path)
        image = Image(str(ds.SOPInstanceUID), study_uid, self.phase, path, option)
        self.images[image.sop_uid] = image
        return image

    def _send(self, image: Image, port: int) -> None:
        image.attempts += 1
        command = [STORESCU, "-v", "-aet", CALLING_AET, "-aec", "XRVD",
                   "-to", "20", "-ta", "20", "-td", "60",
                   *([image.option] if image.option else []), "127.0.0.1", str(port),
                   str(image.path)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=dict(os.environ, TCP_NODELAY="1"))
        self._current = proc
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            _stop_session(proc, grace=1)
            output, _ = proc.communicate()
        finally:
            self._current = None
        self.stats.runs += 1
        text = output.decode(errors="replace")
        # Acknowledged: storescu received a C-STORE response with status Success for the
        # image (whatever happened to the association afterwards).
        image.acknowledged = "Received Store Response (Success" in text
        if image.acknowledged:
            self.stats.outcomes["acknowledged"] += 1
            image.path.unlink(missing_ok=True)
            return
        if "Received Store Response" in text:
            self.stats.outcomes["refused (C-STORE status not Success)"] += 1
        elif proc.returncode == 0:
            self.stats.outcomes["no response, exit status 0"] += 1
        else:
            self.stats.outcomes["failed (no response)"] += 1
        with self._cond:
            if image.attempts <= self.retries and not self._stopping:
                self._retry.append(image)


# --- the journal and the reports -----------------------------------------------------------


def journal(state_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def drained(state_dir: Path) -> tuple[bool, str]:
    try:
        (busy,), = journal(state_dir, "SELECT COUNT(*) FROM studies "
                                      "WHERE state IN ('receiving', 'processing')")
        (pending,), = journal(state_dir, "SELECT COUNT(*) FROM deliveries "
                                         "WHERE state = 'pending'")
    except sqlite3.Error as exc:  # a schema another xrvd version lacks, a busy journal
        return False, f"journal not readable: {exc}"
    return busy == 0 and pending == 0, f"{busy} studies receiving or processing, " \
                                       f"{pending} deliveries pending"


def wait_drained(state_dir: Path, timeout: float, check: callable) -> tuple[bool, float, str]:
    started = time.monotonic()
    while True:
        check()
        done, detail = drained(state_dir)
        if done or time.monotonic() - started > timeout:
            return done, time.monotonic() - started, detail
        time.sleep(0.25)


def written_reports(folder: Path) -> list[dict]:
    """Every SR file in the output folder: study UID, SOP Instance UID, generation."""
    found = []
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.append({"study_uid": str(ds.StudyInstanceUID), "sop_uid": str(ds.SOPInstanceUID),
                      "generation": int(ds.InstanceNumber) - 1, "path": str(path)})
    return found


def spool_usage(state_dir: Path) -> tuple[int, int]:
    size = count = 0
    for path in (state_dir / "spool").rglob("*"):
        if path.is_file():
            size += path.stat().st_size
            count += 1
    return size, count


def finished_files(state_dir: Path, delivered_only: bool = False) -> int:
    """Spool files (on disk) of classified studies; delivered_only: of those whose reports
    are all delivered (what keep_spool none/failed deletes)."""
    undelivered = ("AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN runs r ON r.id = d.run_id "
                   "WHERE r.study_id = s.id AND d.state != 'sent')") if delivered_only else ""
    rows = journal(state_dir, "SELECT i.path FROM instances i JOIN studies s ON "
                              "s.id = i.study_id WHERE s.state = 'classified' AND "
                              f"i.path NOT LIKE '/%' {undelivered}")
    return sum(1 for (path,) in rows if (state_dir / "spool" / path).exists())


def storage_field(name: str):
    """The `storage.<name>` setting's field if this xrvd's Config has it, else None."""
    from xrvd.config import Config

    storage = Config.model_fields.get("storage")
    model = getattr(storage, "annotation", None) if storage else None
    return (getattr(model, "model_fields", {}) or {}).get(name)


# --- the run -------------------------------------------------------------------------------


def write_config(work: Path, weights: Path, orthanc: Orthanc, args) -> tuple[Path, str]:
    config = {
        "state_dir": str(work / "state"),
        "model": {"name": MODEL, "weights_dir": str(weights)},
        "scp": {"port": 0, "allowed_calling_aets": [CALLING_AET]},
        "study": {"settle_seconds": args.settle_seconds, "retry_seconds": 1},
        "output": {"folder": str(work / "results")},
        "service": {"worker_processes": args.worker_processes},
        "destinations": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
        # Delivery resumes within seconds of the PACS's return.
        "delivery": {"retry_seconds": 1, "max_retry_seconds": 5, "max_attempts": 100000,
                     "timeout_seconds": 10},
    }
    if storage_field("keep_spool") is not None and args.keep_spool is not None:
        config["storage"] = {"keep_spool": yaml.safe_load(args.keep_spool)}
    path = work / "xrvd.yaml"
    path.write_text(yaml.safe_dump(config))
    if storage_field("keep_spool") is None:
        note = "storage.keep_spool: not in this xrvd's config (spool files are kept)"
        return path, note + ("; --keep-spool ignored" if args.keep_spool is not None else "")
    from xrvd.config import load_config

    storage = load_config(path).storage
    source = "set by --keep-spool" if args.keep_spool is not None else "xrvd's default"
    note = f"storage.keep_spool: {storage.keep_spool!r} ({source})"
    if hasattr(storage, "min_free_mb"):
        note += f", storage.min_free_mb: {storage.min_free_mb!r}"
    return path, note


class Run:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.deadline = time.monotonic() + args.max_minutes * 60
        self.orthanc: Orthanc | None = None
        self.xrvd: Xrvd | None = None
        self.sender: Sender | None = None
        self.kills: list[dict] = []
        self.phases: dict[str, dict] = {}
        self.failures: list[str] = []
        self.drain_ok = True
        self.purge_wait: tuple[float, int] | None = None

    def check(self) -> None:
        """Raise when the run must stop: past the deadline, or the sender failed."""
        if time.monotonic() > self.deadline:
            raise Interrupted(f"--max-minutes {self.args.max_minutes} reached")
        if self.sender is not None and self.sender.error is not None:
            raise RuntimeError(f"the sender failed: {self.sender.error!r}")

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.check()
            time.sleep(min(left, 0.1))

    def start_xrvd(self) -> None:
        self.check()
        port = self.xrvd.start(timeout=max(30.0, min(300.0, self.deadline - time.monotonic())))
        self.sender.set_port(port)

    def setup(self) -> None:
        from xrvd.pipeline.untrained import write_untrained_weights

        weights = self.work / "weights"
        write_untrained_weights(MODEL, weights)
        self.orthanc = Orthanc(self.work / "orthanc")
        config, self.spool_setting = write_config(self.work, weights, self.orthanc, self.args)
        tmp = self.work / "tmp"  # the fork server's socket folders that kills leave behind
        tmp.mkdir()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp), **ALLOW)
        self.xrvd = Xrvd(config, self.work, env)
        self.state_dir = self.work / "state"
        self.sender = Sender(self.work / "send", self.rng, tuple(self.args.images_per_study),
                             self.args.retries, self.args.pause)
        self.start_xrvd()
        self.orthanc.configure(self.xrvd.port)
        self.orthanc.start()
        self.sender.start()

    def drain(self, phase: str) -> None:
        """No new studies; images not yet acknowledged are sent again; then the journal must
        show nothing receiving, processing or pending."""
        self.sender.new_studies(False)
        limit = self.args.drain_seconds
        if not self.sender.wait_idle(timeout=limit):
            self.failures.append(f"{phase}: the sender's retries did not finish in {limit} s")
        done, took, detail = wait_drained(self.state_dir, limit, self.check)
        self.phases.setdefault(phase, {})["drain_s"] = took
        if not done:
            self.drain_ok = False
            self.failures.append(f"{phase}: not drained after {limit} s ({detail})")

    def kills_phase(self) -> None:
        low, high = self.args.kill_window
        started = time.monotonic()
        self.sender.new_studies(True, "kills")
        for number in range(self.args.kills):
            delay = self.rng.uniform(low, high)
            self.sleep(delay)
            in_flight = self.sender._current is not None
            self.sender.set_port(None)
            killed, survivors = self.xrvd.kill()
            (processing,), = journal(self.state_dir, "SELECT COUNT(*) FROM studies "
                                                     "WHERE state = 'processing'")
            (sending,), = journal(self.state_dir, "SELECT COUNT(*) FROM deliveries "
                                                  "WHERE state = 'pending'")
            self.kills.append({"after_s": delay, "processes": killed, "survivors": survivors,
                               "storescu": in_flight, "processing": processing > 0,
                               "pending": sending > 0})
            strays = stray_children(self.known_children())
            for pid in strays:  # re-parented to us and not in the tree we saw: kill them too
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _reap(pid)
            self.kills[-1]["strays"] = len(strays)
            print(f"kill {number + 1}/{self.args.kills}: {delay:.2f} s after ready, "
                  f"{killed} processes, {survivors} survived, "
                  f"{self.sender.stats.outcomes['acknowledged']} acknowledged so far",
                  flush=True)
            self.start_xrvd()
        self.drain("kills")
        self.phases["kills"]["seconds"] = time.monotonic() - started

    def outage_phase(self) -> None:
        started = time.monotonic()
        self.sender.new_studies(True, "outage")
        self.sleep(self.args.outage_lead)
        print(f"outage: Orthanc stopped for {self.args.outage_seconds:.0f} s", flush=True)
        self.orthanc.stop()
        self.sleep(self.args.outage_seconds)
        self.orthanc.start()
        back = time.monotonic()
        print("outage: Orthanc started again", flush=True)
        self.sleep(self.args.outage_lead)
        self.drain("outage")
        self.phases["outage"]["seconds"] = time.monotonic() - started
        self.phases["outage"]["after_return"] = self._sent_after(back)

    def _sent_after(self, monotonic_back: float) -> tuple[int, float, float] | None:
        """(reports sent, seconds to the first, seconds to the last) after Orthanc's return."""
        wall_back = time.time() - (time.monotonic() - monotonic_back)
        times = [at for event in self.xrvd.events() if event.get("event") == "report.sent"
                 and (at := _timestamp(event)) is not None and at >= wall_back]
        return (len(times), min(times) - wall_back, max(times) - wall_back) if times else None

    def wait_purged(self) -> None:
        """With storage.keep_spool none or failed, the daemon deletes the files of finished,
        delivered studies on its periodic sweep: wait (bounded) until it has."""
        if not self.spool_setting.startswith(("storage.keep_spool: 'none'",
                                              "storage.keep_spool: 'failed'")):
            return
        started = time.monotonic()
        while True:
            self.check()
            held = finished_files(self.state_dir, delivered_only=True)
            if not held or time.monotonic() - started > self.args.retention_wait:
                self.purge_wait = (time.monotonic() - started, held)
                return
            time.sleep(0.5)

    def known_children(self) -> set[int]:
        known = set()
        for proc in (self.xrvd.proc, self.orthanc.proc, self.sender._current):
            if proc is not None:
                known.add(proc.pid)
        return known

    def cleanup(self) -> None:
        if self.sender is not None and self.sender.is_alive():
            self.sender.stop()
        if self.xrvd is not None and self.xrvd.proc is not None:
            kill_tree(self.xrvd.proc, timeout=10)
        if self.orthanc is not None:
            self.orthanc.stop()
        for pid in stray_children(set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _reap(pid)


def _timestamp(event: dict) -> float | None:
    value = event.get("timestamp") or event.get("ts") or event.get("time")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        from datetime import datetime

        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed.timestamp()  # naive: local time (structlog's utc=False)
    return None


def analyse(run: Run) -> dict:
    state_dir = run.state_dir
    images = run.sender.images
    acknowledged = {uid for uid, image in images.items() if image.acknowledged}
    rows = journal(state_dir, "SELECT i.sop_uid, i.version, i.state, i.reason, s.study_uid "
                              "FROM instances i JOIN studies s ON s.id = i.study_id")
    latest: dict[str, tuple] = {}
    for sop_uid, version, state, reason, study_uid in rows:
        if sop_uid not in latest or version > latest[sop_uid][0]:
            latest[sop_uid] = (version, state, reason, study_uid)
    lost = sorted(acknowledged - set(latest))
    unfinished = sorted(uid for uid in acknowledged & set(latest)
                        if latest[uid][1] not in ("classified", "skipped"))
    unacknowledged_but_journaled = sum(1 for uid, image in images.items()
                                       if not image.acknowledged and uid in latest)
    study_states = Counter(state for (state,) in journal(state_dir,
                                                         "SELECT state FROM studies"))
    runs = journal(state_dir, "SELECT s.study_uid, r.generation, r.result_path, r.state "
                              "FROM runs r JOIN studies s ON s.id = r.study_id")
    done = [(uid, gen, path) for uid, gen, path, state in runs if state == "done"]
    done_twice = sum(n - 1 for n in Counter((uid, gen) for uid, gen, _ in done).values() if n > 1)
    deliveries = Counter(state for (state,) in journal(
        state_dir, "SELECT state FROM deliveries WHERE destination = 'orthanc'"))

    files = written_reports(run.work / "results")
    files_per_generation = Counter((r["study_uid"], r["generation"]) for r in files)
    file_duplicates = {key: n for key, n in files_per_generation.items() if n > 1}
    expected = {r["sop_uid"]: r for r in files}  # each written report goes to Orthanc
    in_orthanc = run.orthanc.reports()
    orthanc_per_generation = Counter((r["study_uid"], int(r["number"] or 0) - 1)
                                     for r in in_orthanc)
    orthanc_duplicates = {key: n for key, n in orthanc_per_generation.items() if n > 1}
    orthanc_uids = Counter(r["sop_uid"] for r in in_orthanc)
    unexpected = [r for r in in_orthanc if r["sop_uid"] not in expected]
    per_study_orthanc = Counter(r["study_uid"] for r in in_orthanc)
    per_study_files = Counter(r["study_uid"] for r in files)
    more_in_orthanc = sum(1 for study, n in per_study_orthanc.items()
                          if n > per_study_files.get(study, 0))

    events = run.xrvd.events()
    sends = Counter(e.get("report") for e in events if e.get("event") == "report.sent")
    resent = sum(1 for n in sends.values() if n > 1)
    rewritten = sum(1 for n in Counter(e.get("path") or e.get("report") for e in events
                                       if e.get("event") == "report.written").values() if n > 1)
    send_failed = Counter("final" if e.get("final") else "retrying" for e in events
                          if e.get("event") == "report.send_failed")
    errors = Counter(e.get("event") for e in events
                     if e.get("level") in ("error", "critical") or e.get("event") == "(not json)")

    phases = {}
    for phase in ("kills", "outage"):
        studies = {uid for uid, p in run.sender.studies.items() if p == phase}
        if not studies:
            continue
        wanted = [r for r in files if r["study_uid"] in studies]
        delivered = [r for r in wanted if orthanc_uids.get(r["sop_uid"])]
        phases[phase] = {
            "studies": len(studies),
            "images acknowledged": sum(1 for uid in acknowledged
                                       if images[uid].study_uid in studies),
            "reports expected": len(wanted),
            "delivered once": sum(1 for r in delivered if orthanc_uids[r["sop_uid"]] == 1),
            "missing": len(wanted) - len(delivered),
            "duplicated": sum(n - 1 for (study, _), n in orthanc_duplicates.items()
                              if study in studies),
            "unexpected in Orthanc": sum(1 for r in unexpected if r["study_uid"] in studies),
            "resent (same SOP UID)": sum(1 for r in wanted if sends.get(r["path"], 0) > 1),
        }

    spool_bytes, spool_files = spool_usage(state_dir)
    disk = os.statvfs(state_dir)
    leaked_tmp = sum(1 for _ in (run.work / "tmp").glob("pymp-*"))
    return {
        "sent": len(images), "acknowledged": len(acknowledged), "lost": lost,
        "unfinished": [(uid, latest[uid][1], latest[uid][2]) for uid in unfinished],
        "unacknowledged_but_journaled": unacknowledged_but_journaled,
        "study_states": dict(study_states), "done_twice": done_twice,
        "files": len(files), "file_duplicates": file_duplicates,
        "orthanc": len(in_orthanc), "orthanc_duplicates": orthanc_duplicates,
        "unexpected": unexpected, "more_in_orthanc": more_in_orthanc,
        "missing_in_orthanc": [uid for uid in expected if uid not in orthanc_uids],
        "deliveries": dict(deliveries), "resent": resent, "errors": dict(errors),
        "rewritten": rewritten, "send_failed": dict(send_failed),
        "phases": phases, "spool_bytes": spool_bytes, "spool_files": spool_files,
        "finished_files": finished_files(state_dir),
        "delivered_files": finished_files(state_dir, delivered_only=True),
        "free_bytes": disk.f_bavail * disk.f_frsize, "leaked_tmp": leaked_tmp,
        "integrity": journal(state_dir, "PRAGMA integrity_check")[0][0],
    }


def report(run: Run, result: dict, wall: float) -> int:
    args = run.args
    kills = run.kills
    lost = len(result["lost"])
    # Extra reports of one study and generation: files, done runs, SR instances in Orthanc.
    duplicates = (result["done_twice"] + sum(n - 1 for n in result["file_duplicates"].values())
                  + sum(n - 1 for n in result["orthanc_duplicates"].values()))
    unexpected = len(result["unexpected"])
    missing = len(result["missing_in_orthanc"])
    starts = run.xrvd.start_seconds
    rows = [("kills (SIGKILL to the whole tree)", f"{len(kills)}")] if not kills else [
        ("kills (SIGKILL to the whole tree)", f"{len(kills)}"),
        ("  processes per kill", f"{min(k['processes'] for k in kills)}-"
                                 f"{max(k['processes'] for k in kills)}"),
        ("  survivors after SIGKILL / strays", f"{sum(k['survivors'] for k in kills)} / "
                                               f"{sum(k['strays'] for k in kills)}"),
        ("  with storescu in flight / a study processing",
         f"{sum(k['storescu'] for k in kills)} / {sum(k['processing'] for k in kills)}"),
        ("  with a delivery pending", f"{sum(k['pending'] for k in kills)}"),
        ("  fork-server folders left in TMPDIR", f"{result['leaked_tmp']}")]
    rows += [
        ("xrvd starts; start to ready: first, restarts",
         f"{len(starts)}; {starts[0]:.1f} s, " + (
             f"mean {sum(starts[1:]) / len(starts[1:]):.1f} s, max {max(starts[1:]):.1f} s"
             if starts[1:] else "-")),
        ("storescu runs (one image each)", f"{run.sender.stats.runs}"),
        ("  outcomes", ", ".join(f"{k} {v}" for k, v in
                                 sorted(run.sender.stats.outcomes.items()))),
        ("images generated / acknowledged", f"{result['sent']} / {result['acknowledged']}"),
        ("acknowledged, missing from the journal (LOST)", f"{lost}"),
        ("acknowledged, not classified or skipped", f"{len(result['unfinished'])}"),
        ("not acknowledged but journaled", f"{result['unacknowledged_but_journaled']}"),
        ("studies by state", ", ".join(f"{k} {v}" for k, v in
                                       sorted(result["study_states"].items()))),
        ("reports written (output folder)", f"{result['files']}"),
        ("  study+generation with >1 report file", f"{len(result['file_duplicates'])}"),
        ("  study+generation with >1 done run", f"{result['done_twice']}"),
        ("reports in Orthanc", f"{result['orthanc']}"),
        ("  study+generation with >1 SR in Orthanc", f"{len(result['orthanc_duplicates'])}"),
        ("  SRs in Orthanc not in the output folder", f"{len(result['unexpected'])}"),
        ("  studies with more SRs in Orthanc than written", f"{result['more_in_orthanc']}"),
        ("  written but not in Orthanc (missing)", f"{missing}"),
        ("  reports sent more than once (same SOP UID)", f"{result['resent']}"),
        ("  report.written again for the same file", f"{result['rewritten']}"),
        ("report.send_failed events", ", ".join(f"{k} {v}" for k, v in
                                               sorted(result["send_failed"].items())) or "none"),
        ("deliveries to orthanc by state", ", ".join(f"{k} {v}" for k, v in
                                                     sorted(result["deliveries"].items()))),
    ]
    for phase, figures in result["phases"].items():
        extra = run.phases.get(phase, {})
        title = {"kills": f"phase kills ({args.kills} kills)",
                 "outage": f"phase outage ({args.outage_seconds:.0f} s without Orthanc)"}[phase]
        rows.append((title, f"{extra.get('seconds', 0):.0f} s, drained in "
                            f"{extra.get('drain_s', 0):.1f} s"))
        for key, value in figures.items():
            rows.append((f"  {key}", f"{value}"))
        if phase == "outage":
            after = extra.get("after_return")
            rows.append(("  report.sent after Orthanc's return", "none" if after is None else
                         f"{after[0]}, the first after {after[1]:.1f} s, "
                         f"the last after {after[2]:.1f} s"))
    rows += [
        ("spool (state_dir/spool)", f"{result['spool_bytes'] / 2**20:.1f} MiB in "
                                    f"{result['spool_files']} files"),
        ("  of them, files of classified studies", f"{result['finished_files']}, "
         f"{result['delivered_files']} with every report delivered"),
        ("free space in the state dir", f"{result['free_bytes'] / 2**30:.1f} GiB"),
        ("spool retention", run.spool_setting),
        ("  after the drain", "no wait (the spool is kept)" if run.purge_wait is None else
         f"{run.purge_wait[1]} files of delivered studies still held after "
         f"{run.purge_wait[0]:.1f} s" if run.purge_wait[1] else
         f"files of delivered studies gone {run.purge_wait[0]:.1f} s after the drain"),
        ("error events in xrvd's log", ", ".join(f"{k} {v}" for k, v in
                                                 sorted(result["errors"].items())) or "none"),
        ("journal integrity_check", result["integrity"]),
        ("wall time", f"{wall / 60:.1f} min"),
    ]
    width = max(len(label) for label, _ in rows)
    print()
    print(f"xrvd fault benchmark (seed {args.seed}, {len(os.sched_getaffinity(0))} CPUs)")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for uid in result["lost"][:10]:
        image = run.sender.images[uid]
        print(f"LOST: SOP {uid} of study {image.study_uid} (phase {image.phase})")
    for uid, state, reason in result["unfinished"][:10]:
        print(f"UNFINISHED: SOP {uid} is {state} ({reason})")
    for (study, gen), n in list(result["file_duplicates"].items())[:10]:
        print(f"DUPLICATE FILES: study {study} generation {gen}: {n} reports")
    for (study, gen), n in list(result["orthanc_duplicates"].items())[:10]:
        print(f"DUPLICATE IN ORTHANC: study {study} generation {gen}: {n} SR instances")
    for item in result["unexpected"][:10]:
        print(f"UNEXPECTED IN ORTHANC: {item}")
    for uid in result["missing_in_orthanc"][:10]:
        print(f"MISSING IN ORTHANC: SR {uid}")
    for failure in run.failures:
        print(f"PROBLEM: {failure}")
    bad = lost or duplicates or unexpected or missing or not run.drain_ok or run.failures
    print("result:", "FAIL" if bad else "ok",
          f"(lost {lost}, duplicates {duplicates}, unexpected reports in Orthanc {unexpected}, "
          f"missing reports {missing})")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs of the service tree")
    parser.add_argument("--kill-window", type=float, nargs=2, default=(0.2, 3.0),
                        metavar=("MIN", "MAX"),
                        help="each kill comes uniformly MIN-MAX seconds after daemon.ready")
    parser.add_argument("--outage-seconds", type=float, default=120,
                        help="how long Orthanc is down in phase 2 (0: no outage phase)")
    parser.add_argument("--outage-lead", type=float, default=3,
                        help="seconds of traffic before the outage and after Orthanc returns")
    parser.add_argument("--images-per-study", type=int, nargs=2, default=(1, 3),
                        metavar=("MIN", "MAX"))
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds between studies (one storescu run per image)")
    parser.add_argument("--retries", type=int, default=3,
                        help="times an image that was not acknowledged is sent again")
    parser.add_argument("--settle-seconds", type=float, default=1.0,
                        help="study.settle_seconds")
    parser.add_argument("--worker-processes", default="auto",
                        help="service.worker_processes (auto: a process tree)")
    parser.add_argument("--keep-spool", default=None,
                        help="storage.keep_spool (YAML value), if this xrvd has that setting")
    parser.add_argument("--retention-wait", type=float, default=30,
                        help="longest wait after the drain for the spool sweep (keep_spool "
                             "none or failed)")
    parser.add_argument("--drain-seconds", type=float, default=300,
                        help="longest wait for a drain")
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="stop after this long (0: 1 minute per kill + outage + 15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.worker_processes != "auto":
        args.worker_processes = int(args.worker_processes)
    if not args.max_minutes:
        args.max_minutes = args.kills + args.outage_seconds / 60 + 15
    if not STORESCU:
        print("DCMTK's storescu is needed (apt-get install dcmtk)", file=sys.stderr)
        return 2
    if not ORTHANC:
        print("Orthanc is needed (apt-get install orthanc)", file=sys.stderr)
        return 2
    if not become_subreaper():
        print("warning: not a child subreaper; orphans of a kill are found via the process "
              "group only", file=sys.stderr)

    def terminated(signum, frame):
        raise Interrupted(f"signal {signum}")

    # Also when started where SIGINT is ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)
    work = Path(tempfile.mkdtemp(prefix="xrvd-faults-"))
    run = Run(args, work)
    started = time.monotonic()
    code = 2
    try:
        print(f"working in {work}; storescu {STORESCU}; Orthanc {ORTHANC}", flush=True)
        try:
            run.setup()
        except RuntimeError as exc:
            print(f"setup failed: {exc}", file=sys.stderr)
            return 2
        print(f"xrvd ready in {run.xrvd.start_seconds[0]:.1f} s; Orthanc DICOM port "
              f"{run.orthanc.dicom_port}, HTTP port {run.orthanc.http_port}", flush=True)
        if args.kills:
            run.kills_phase()
        if args.outage_seconds > 0:
            run.outage_phase()
        run.sender.stop()
        run.wait_purged()
        stop_code = run.xrvd.terminate()
        if stop_code != 0:
            run.failures.append(f"xrvd serve exited with {stop_code} on SIGTERM")
        code = report(run, analyse(run), time.monotonic() - started)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\nstopped: {str(exc) or 'Ctrl-C'}; cleaning up", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            run.cleanup()
        finally:
            if args.keep:
                print(f"kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
