"""The report as a file: written where the output folder wants it, found again, and read
back for sending.

Writing: a pure job in, an outcome out, never raising: the daemon's worker runs it in its own
thread, a back-fill in its pool of processes while the model classifies the next images. The
file name is fixed by the run (study, model, weights, generation) and written atomically: a
crash and a re-run replace the same file, never add a second one.

Finding again: a report by this model and weights already in the output folder (the journal
was reset, or a crash came between writing it and recording it) is read back, so that the
worker records its scores instead of classifying and writing a second report.

Sending: each destination gets the report in its SR flavour, on every attempt. The file is
read once (EncodedReport, shared through EncodedReports) and each send gets a dataset of its
own made of the file's encoded elements; see EncodedReport for why.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_data_element, write_sequence
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage

from ..fsutil import write_atomically
from ..pipeline.models import ModelIdentity
from ..thresholds import Thresholds
from .build import build_report, label_for_meaning, read_findings, stable_uid

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


HEATMAPS_SUFFIX = "-heatmaps"


def safe_name(uid: str) -> str:
    """A file name for a UID: the UID itself when it is a well-formed one, else a hash."""
    if len(uid) <= 64 and _UID.fullmatch(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode()).hexdigest()[:40]


def report_stem(identity: ModelIdentity, generation: int | str) -> str:
    return f"{identity.name}-{identity.weights_sha256[:12]}-g{generation}"


@dataclass(frozen=True)
class OutputSettings:
    folder: Path
    sr_flavour: str
    series_number: int
    series_description: str
    json_sidecar: bool


@dataclass(frozen=True)
class HeatmapJob:
    """One positive finding of one image, to be shown as a heatmap key image."""
    sop_uid: str
    source_path: str  # the image's file, read again for its pixels
    label: str
    score: float
    map: np.ndarray  # (h, w) class activation map in logits, on the model input's grid


@dataclass(frozen=True)
class ReportJob:
    study_uid: str
    generation: int
    sources: list[Dataset]  # headers of the classified images, in report order
    scores: dict[str, dict[str, float]]  # SOP Instance UID -> label -> score
    identity: ModelIdentity
    thresholds: Thresholds
    output: OutputSettings
    predecessor: str | None = None  # the previous generation's report file
    heatmaps: tuple[HeatmapJob, ...] = ()
    fit: str = "crop"  # how the image was made square for the model (convert.fit)


@dataclass(frozen=True)
class ReportWritten:
    path: str | None = None
    sop_instance_uid: str | None = None
    error: str | None = None
    heatmaps: int = 0  # key images written with it
    # (SOP Instance UID, label, error) of heatmaps that could not be made: the report is
    # written without them (a key image is never worth losing the finding).
    heatmap_errors: tuple[tuple[str, str, str], ...] = ()


def write_report(job: ReportJob) -> ReportWritten:
    try:
        predecessor = None
        if job.predecessor is not None and Path(job.predecessor).is_file():
            predecessor = pydicom.dcmread(job.predecessor, stop_before_pixels=True)
        output = job.output
        folder = Path(output.folder) / safe_name(job.study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        stem = report_stem(job.identity, job.generation)
        target = folder / f"{stem}.dcm"
        # Before the report: a report on disk has every key image it cites.
        heatmaps, heatmap_errors = _write_heatmaps(job, heatmaps_folder(target))
        sr = build_report(
            job.sources, job.scores, job.identity, job.thresholds, generation=job.generation,
            flavour=output.sr_flavour, series_number=output.series_number,
            series_description=output.series_description, predecessor=predecessor,
            heatmaps=heatmaps)
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        write_atomically(target, buffer.getvalue())
        if output.json_sidecar:
            write_atomically(folder / f"{stem}.json",
                             json.dumps(_sidecar(job, str(sr.SOPInstanceUID), heatmaps),
                                        indent=2).encode())
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which retries the study
        return ReportWritten(error=f"{type(exc).__name__}: {exc}")
    return ReportWritten(str(target), str(sr.SOPInstanceUID), heatmaps=len(heatmaps),
                         heatmap_errors=tuple(heatmap_errors))


def _write_heatmaps(job: ReportJob, folder: Path
                    ) -> tuple[dict[tuple[str, str], Dataset], list[tuple[str, str, str]]]:
    """The job's heatmap Secondary Captures, in the report's series, each written atomically
    under its SOP Instance UID; what an earlier attempt at this run left there is removed
    first (its findings may have been called otherwise)."""
    if folder.is_dir():
        for stale in folder.glob("*.dcm"):
            stale.unlink()
    if not job.heatmaps:
        return {}, []
    from ..pipeline.read import read_dicom
    from .heatmap import background_of, heatmap_image  # work only a heatmap needs

    folder.mkdir(parents=True, exist_ok=True)
    identity = job.identity
    # A series of their own beside the report's: Modality (OT, the report's is SR) is a
    # series-level attribute.
    series_uid = stable_uid("heatmap series", job.study_uid, identity.name,
                            identity.weights_sha256, str(job.generation))
    written: dict[tuple[str, str], Dataset] = {}
    errors: list[tuple[str, str, str]] = []
    source, source_path, background = None, None, None
    for number, heatmap in enumerate(job.heatmaps, start=1):
        uid = stable_uid("heatmap", heatmap.sop_uid, heatmap.label, identity.name,
                         identity.weights_sha256, str(job.generation))
        try:
            if heatmap.source_path != source_path:  # a job lists an image's findings together
                # read as it was for classification (no preamble, no file meta: still read)
                source, source_path = read_dicom(heatmap.source_path), heatmap.source_path
                background = background_of(source)
            image = heatmap_image(
                source, heatmap.map, finding=heatmap.label, score=heatmap.score,
                fit=job.fit, identity=identity, series_instance_uid=series_uid,
                sop_instance_uid=uid, instance_number=number,
                series_number=min(job.output.series_number + 1, 2**31 - 1),
                background=background)
            buffer = io.BytesIO()
            image.save_as(buffer, enforce_file_format=True)
            write_atomically(folder / f"{safe_name(uid)}.dcm", buffer.getvalue())
        except Exception as exc:  # noqa: BLE001 - the report goes out without this one
            source, source_path, background = None, None, None
            errors.append((heatmap.sop_uid, heatmap.label, f"{type(exc).__name__}: {exc}"))
            continue
        written[(heatmap.sop_uid, heatmap.label)] = image
    return written, errors


def _sidecar(job: ReportJob, report_uid: str,
             heatmaps: dict[tuple[str, str], Dataset]) -> dict:
    return {
        "study_instance_uid": job.study_uid,
        "generation": job.generation,
        "report_sop_instance_uid": report_uid,
        "model": job.identity.name,
        "weights_sha256": job.identity.weights_sha256,
        "untrained": job.identity.untrained,
        "threshold": job.thresholds.default,
        "thresholds": job.thresholds.overrides,
        "images": [
            {
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
                "view": str(ds.get("ViewPosition", "") or ""),
                "findings": [
                    {"label": label, "score": round(score, 6),
                     "threshold": job.thresholds.of(label),
                     "positive": job.thresholds.positive(label, score),
                     **({"heatmap_sop_instance_uid": str(heatmap.SOPInstanceUID)}
                        if (heatmap := heatmaps.get((str(ds.SOPInstanceUID), label)))
                        is not None else {})}
                    for label, score in sorted(job.scores[str(ds.SOPInstanceUID)].items(),
                                               key=lambda kv: kv[1], reverse=True)],
            }
            for ds in job.sources
        ],
    }


def heatmaps_folder(report_path: str | Path) -> Path:
    """Where a report's heatmap key images are: a folder beside it named after it, holding
    exactly the ones it cites (written before it, so a report on disk has all of its own)."""
    path = Path(report_path)
    return path.with_name(f"{path.stem}{HEATMAPS_SUFFIX}")


def heatmap_files(report_path: str | Path) -> list[Path]:
    return sorted(heatmaps_folder(report_path).glob("*.dcm"))


# --- finding an earlier report ---------------------------------------------------------


class UnreadableReport(Exception):
    """An earlier report by this model and weights is in the output folder but cannot be read
    back (truncated, not DICOM, not a measurement report)."""

    def __init__(self, path: Path, error: str):
        super().__init__(f"{path}: {error}")
        self.path = path
        self.error = error


@dataclass(frozen=True)
class ExistingReport:
    path: Path
    scores: dict[str, dict[str, float]]  # SOP Instance UID -> label -> score in [0, 1]


def find_existing_report(folder: Path, study_uid: str,
                         identity: ModelIdentity) -> ExistingReport | None:
    """The study's report of the latest generation by this model and weights in the output
    folder, with its scores: labels as the registry names them, scores as the report holds
    them (to 1e-6). None when there is none; UnreadableReport for one that cannot be read
    back (the caller classifies as if it were not there)."""
    prefix = report_stem(identity, "")
    found = sorted((Path(folder) / safe_name(study_uid)).glob(f"{prefix}*.dcm"),
                   key=lambda path: _generation(path, prefix))
    if not found:
        return None
    latest = found[-1]
    try:
        findings = read_findings(pydicom.dcmread(latest))
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is unreadable
        raise UnreadableReport(latest, repr(exc)) from exc
    return ExistingReport(latest, {
        uid: {label_for_meaning(meaning): score for meaning, (score, _) in image.items()}
        for uid, image in findings.items()})


def _generation(path: Path, prefix: str) -> int:
    """The generation a report's file name gives; -1 (before any) where it gives none."""
    suffix = path.stem[len(prefix):]
    return int(suffix) if suffix.isdigit() else -1


# --- reading back for sending ----------------------------------------------------------


def as_flavour(report: Dataset, flavour: str) -> Dataset:
    """The report as an SR of the given flavour, changed in place. Our reports hold no 3D
    coordinates, so the same content is a valid Enhanced SR: only the SOP class and (derived,
    stable) instance UID change."""
    if flavour == "enhanced" and report.SOPClassUID == Comprehensive3DSRStorage:
        report.SOPInstanceUID = stable_uid("enhanced", str(report.SOPInstanceUID))
        report.SOPClassUID = EnhancedSRStorage
        report.file_meta.MediaStorageSOPClassUID = EnhancedSRStorage
        report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    return report


class EncodedReport:
    """A report file read for sending, its elements kept encoded as in the file.

    Why: pydicom parses a sequence of undefined length (the content tree, as template.py
    writes it) while reading, and pynetdicom encodes the parsed tree again for every C-STORE:
    about 45 ms for a one-image report and 140 ms for three, on top of reading the file
    (40 and 150 ms); reading, re-flavouring and re-encoding per destination and attempt cost
    150 to 200 ms (one image) and 450 to 600 ms (three). Encoded elements are written as they
    are: a send in the file's own transfer syntax (Explicit VR Little Endian, which xrvd
    proposes first) then takes under 1 ms, encoding only the few elements as_flavour changes;
    one in another transfer syntax is decoded and encoded by pydicom, as a dataset read from
    the file would be.

    The encoded elements are immutable and shared; `dataset` makes each send a dataset of
    its own around them, which as_flavour and pynetdicom may change freely. Tests check that
    it encodes to the same bytes as the report pydicom reads, in each flavour and transfer
    syntax."""

    def __init__(self, path: str | Path):
        report = pydicom.dcmread(path)
        self.size = os.path.getsize(path)
        self._encoding = report.original_encoding
        self._character_set = report.original_character_set
        self._file_meta = report.file_meta
        character_set = report.get("SpecificCharacterSet", default_encoding)
        self._elements = {tag: _encoded(report.get_item(tag), *self._encoding, character_set)
                          for tag in report.keys()}

    def dataset(self, flavour: str) -> Dataset:
        """The report in `flavour`, for one send."""
        report = Dataset(dict(self._elements))
        report.set_original_encoding(*self._encoding, self._character_set)
        report.file_meta = copy.deepcopy(self._file_meta)
        return as_flavour(report, flavour)


def _encoded(element: DataElement | RawDataElement, implicit: bool, little_endian: bool,
             character_set: str | list[str]) -> RawDataElement:
    """An element as the file holds it, encoded: pydicom keeps most elements so when reading,
    but parses a sequence of undefined length and decodes the character set."""
    if element.is_raw:
        return element
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little_endian
    if element.VR == "SQ":
        write_sequence(buffer, element, character_set)
        length = 0xFFFFFFFF if element.is_undefined_length else buffer.tell()
        return RawDataElement(element.tag, "SQ", length, buffer.getvalue(), 0, implicit,
                              little_endian)
    write_data_element(buffer, element, character_set)
    [raw] = data_element_generator(io.BytesIO(buffer.getvalue()), implicit, little_endian)
    return raw


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    report: EncodedReport | None = None


class EncodedReports:
    """Reports (and their heatmap key images) read for sending, each file once: a new report is due at every destination at
    about the same time, and retried at one that is down. The least recently used are dropped
    beyond max_bytes (of files); a file replaced under its name (a re-run) is read anew."""

    def __init__(self, max_bytes: int = 32 * 2**20):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def get(self, path: str | Path) -> EncodedReport:
        stat = os.stat(path)
        key = (os.fspath(path), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            self._entries.move_to_end(key)
        with entry.lock:  # one thread reads a file, the others wait for it, not for all files
            if entry.report is None:
                try:
                    entry.report = EncodedReport(path)
                except BaseException:
                    with self._lock:
                        self._entries.pop(key, None)
                    raise
        with self._lock:
            held = sum(e.report.size for e in self._entries.values() if e.report is not None)
            while held > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                held -= dropped.report.size if dropped.report is not None else 0
        return entry.report
