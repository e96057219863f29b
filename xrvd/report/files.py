"""Write one study's Structured Report (and optional JSON sidecar) where the output folder
wants it. A pure job in, an outcome out, never raising: the daemon's worker runs it in its own
thread, a back-fill in its pool of processes while the model classifies the next images.

The file name is fixed by the run (study, model, weights, generation) and written atomically:
a crash and a re-run replace the same file, never add a second one.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from ..fsutil import write_atomically
from ..pipeline.models import ModelIdentity
from .build import build_report

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


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
class ReportJob:
    study_uid: str
    generation: int
    sources: list[Dataset]  # headers of the classified images, in report order
    scores: dict[str, dict[str, float]]  # SOP Instance UID -> label -> score
    identity: ModelIdentity
    threshold: float
    output: OutputSettings
    predecessor: str | None = None  # the previous generation's report file


@dataclass(frozen=True)
class ReportWritten:
    path: str | None = None
    sop_instance_uid: str | None = None
    error: str | None = None


def write_report(job: ReportJob) -> ReportWritten:
    try:
        predecessor = None
        if job.predecessor is not None and Path(job.predecessor).is_file():
            predecessor = pydicom.dcmread(job.predecessor, stop_before_pixels=True)
        output = job.output
        sr = build_report(
            job.sources, job.scores, job.identity, job.threshold, generation=job.generation,
            flavour=output.sr_flavour, series_number=output.series_number,
            series_description=output.series_description, predecessor=predecessor)
        folder = Path(output.folder) / safe_name(job.study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        stem = report_stem(job.identity, job.generation)
        target = folder / f"{stem}.dcm"
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        write_atomically(target, buffer.getvalue())
        if output.json_sidecar:
            write_atomically(folder / f"{stem}.json",
                             json.dumps(_sidecar(job, str(sr.SOPInstanceUID)),
                                        indent=2).encode())
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which retries the study
        return ReportWritten(error=f"{type(exc).__name__}: {exc}")
    return ReportWritten(str(target), str(sr.SOPInstanceUID))


def _sidecar(job: ReportJob, report_uid: str) -> dict:
    return {
        "study_instance_uid": job.study_uid,
        "generation": job.generation,
        "report_sop_instance_uid": report_uid,
        "model": job.identity.name,
        "weights_sha256": job.identity.weights_sha256,
        "untrained": job.identity.untrained,
        "threshold": job.threshold,
        "images": [
            {
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
                "view": str(ds.get("ViewPosition", "") or ""),
                "findings": [
                    {"label": label, "score": round(score, 6),
                     "positive": score >= job.threshold}
                    for label, score in sorted(job.scores[str(ds.SOPInstanceUID)].items(),
                                               key=lambda kv: kv[1], reverse=True)],
            }
            for ds in job.sources
        ],
    }
