"""The labels `xrvd evaluate` scores against: a site's generic labels table, or a public
dataset's own label file read as its published tables were made.

The generic table (CSV) names each image by a `path` column (an image file, relative to the
CSV's folder or absolute), a `sop_instance_uid` column (its SOP Instance UID: the scores then
come from the journal, `--from-journal`), or both, and has one column per finding, named as
the model names it (`xrvd models list`), holding 1 (present), 0 (absent) or nothing (not
labelled: the image is left out for that finding).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import XrvdError

# Labels files are small tables; a larger one is not a labels file.
MAX_LABELS_BYTES = 64 << 20
# Column names for the image, compared without case, spaces or underscores: `SOPInstanceUID`,
# `sop_instance_uid` (as `xrvd export` writes it) and `SOP Instance UID` alike.
PATH_COLUMN = "path"
UID_COLUMN = "sopinstanceuid"


class LabelsError(XrvdError):
    """The labels table cannot be used as it is: the message says what to change."""

    reason = "labels_invalid"


@dataclass(frozen=True)
class Labels:
    files: list[Path | None]  # per image: its file (None: known by its UID alone)
    findings: dict[str, list[int | None]]  # per finding, per image: 1, 0 or None
    sop_uids: list[str | None] | None = None  # per image, where the table gives them

    def uid(self, index: int) -> str | None:
        return self.sop_uids[index] if self.sop_uids else None


def _plain(column: str) -> str:
    return re.sub(r"[\s_-]", "", column).lower()


def read_labels(path: Path, known: tuple[str, ...], *, from_journal: bool = False) -> Labels:
    """The labels table; findings matched to the model's names without regard to case.
    from_journal: images may be named by their SOP Instance UID alone."""
    check_size(path)
    try:
        # Read no more than the bound whatever the size said: a pipe or a file still being
        # written says nothing true about what comes.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read(MAX_LABELS_BYTES + 1)
        if len(text) > MAX_LABELS_BYTES:
            raise LabelsError(f"{path} is larger than {MAX_LABELS_BYTES} bytes: not a labels "
                              "table")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"cannot read the labels table {path}: {exc}") from exc
    columns = list(rows[0].keys()) if rows else []
    plain = {_plain(column or ""): column for column in columns}
    path_column, uid_column = plain.get(PATH_COLUMN), plain.get(UID_COLUMN)
    if path_column is None and uid_column is None:
        raise LabelsError(f"{path}: the labels table needs a `path` column (the image files) "
                          "or a `sop_instance_uid` column (with --from-journal), and one "
                          f"column per finding; it has {columns[:10]}")
    by_name = {name.lower(): name for name in known}
    findings: dict[str, list[int | None]] = {}
    unknown = []
    for column in columns:
        if column in (path_column, uid_column):
            continue
        name = by_name.get((column or "").strip().lower())
        if name is None:
            unknown.append(column)
            continue
        values = []
        for number, row in enumerate(rows, start=2):
            text = (row.get(column) or "").strip()
            if text not in ("", "0", "1", "0.0", "1.0"):
                raise LabelsError(f"{path}, line {number}, column {column}: {text!r} is not "
                                  "1, 0 or empty")
            values.append(None if text == "" else int(float(text)))
        findings[name] = values
    if unknown:
        raise LabelsError(f"{path}: the model does not report {unknown}; its findings are "
                          f"{list(known)}")
    if not findings:
        raise LabelsError(f"{path}: no finding columns; name them as the model does: "
                          f"{list(known)}")
    files: list[Path | None] = []
    uids: list[str | None] = []
    for number, row in enumerate(rows, start=2):
        file = (row.get(path_column) or "").strip() if path_column else ""
        uid = (row.get(uid_column) or "").strip() if uid_column else ""
        if not file and not uid:
            raise LabelsError(f"{path}, line {number}: no image (give its path or its SOP "
                              "Instance UID)")
        if not file and not from_journal:
            raise LabelsError(f"{path}, line {number}: the image has a SOP Instance UID but "
                              "no path; add --from-journal to take its scores from the "
                              "journal, or give its file in a `path` column")
        files.append(None if not file else Path(file) if Path(file).is_absolute()
                     else path.parent / file)
        uids.append(uid or None)
    return Labels(files, findings, uids if uid_column else None)


def check_size(path: Path) -> None:
    """Before a labels table is read whole (by csv here, or by pandas in TorchXRayVision)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LabelsError(f"cannot read the labels table {path}: {exc}") from exc
    if size > MAX_LABELS_BYTES:
        raise LabelsError(f"{path} is larger than {MAX_LABELS_BYTES} bytes: not a labels table "
                          "(NIH's Data_Entry_2017.csv is 8 MB, CheXpert's train.csv 26 MB)")


def read_dataset_labels(kind: str, csv_path: Path, images: Path,
                        known: tuple[str, ...]) -> Labels:
    """A public dataset's own label file, read by TorchXRayVision's dataset class as its
    published tables were made (NIH ChestX-ray14's Data_Entry_2017.csv; CheXpert's
    train.csv/valid.csv, whose -1 "uncertain" labels the library leaves out, and whose "No
    Finding" rows it takes as negative for every finding): frontal views (PA and AP), every
    image (not one per patient). Needs the full install."""
    try:
        import torchxrayvision as xrv
    except ImportError as exc:
        raise LabelsError(f"--format {kind} reads the label file with TorchXRayVision, which "
                          "this service install does not have: run it on a full install, or "
                          "write a generic labels table (--format csv)") from exc
    if not csv_path.is_file() or not images.is_dir():
        raise LabelsError(f"--format {kind} needs the label file ({csv_path}) and the folder "
                          f"of its images (--images {images})")
    check_size(csv_path)
    try:
        if kind == "nih":
            dataset = xrv.datasets.NIH_Dataset(imgpath=str(images), csvpath=str(csv_path),
                                               views=["PA", "AP"], unique_patients=False)
            files = [images / name for name in dataset.csv["Image Index"]]
        else:
            dataset = xrv.datasets.CheX_Dataset(imgpath=str(images), csvpath=str(csv_path),
                                                views=["PA", "AP"], unique_patients=False)
            files = [images / str(name).replace("CheXpert-v1.0-small/", "")
                     .replace("CheXpert-v1.0/", "") for name in dataset.csv["Path"]]
    except (KeyError, ValueError, OSError) as exc:
        raise LabelsError(f"{csv_path} is not a {kind} label file as TorchXRayVision reads it "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    findings = {}
    for column, pathology in enumerate(dataset.pathologies):
        if pathology in known:
            findings[pathology] = [None if math.isnan(value) else int(value)
                                   for value in dataset.labels[:, column]]
    if not findings:
        raise LabelsError(f"{csv_path}: none of the model's findings {list(known)} is labelled "
                          f"in it ({list(dataset.pathologies)})")
    return Labels(list(files), findings)
