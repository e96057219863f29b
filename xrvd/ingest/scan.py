"""Find the files of an existing archive, streamed: nothing is listed into memory first, so an
archive of millions of files costs one directory's listing at a time.

Folders are walked in name order (a re-run meets files in the same order). A DICOMDIR is
followed where it is the way in: given as a path, or found in a folder that is not walked
recursively (media: the DICOMDIR lists files in sub-folders). A recursive walk reaches those
files itself, so there the DICOMDIR file is passed over.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom

from ..errors import CrawlError

DICOMDIR = "DICOMDIR"


def crawl(roots: Iterable[Path], *, recursive: bool = False,
          exclude: Iterable[Path] = ()) -> Iterator[Path]:
    """Absolute paths of the candidate files under `roots` (files are yielded as given).
    `exclude`: folders never entered (xrvd's own state and output folders)."""
    excluded = {Path(p).resolve() for p in exclude}
    for root in roots:
        root = Path(root).resolve()
        if root.is_file():
            if root.name.upper() == DICOMDIR:
                yield from dicomdir_files(root)
            else:
                yield root
        elif root.is_dir():
            yield from _walk(root, recursive, excluded)
        else:
            raise CrawlError(f"{root}: no such file or folder; give folders or files to "
                             "back-fill")


def _walk(folder: Path, recursive: bool, excluded: set[Path]) -> Iterator[Path]:
    if folder in excluded:
        return
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return  # unreadable folder: nothing to yield (a vanished sub-folder is not an error)
    files = [Path(e.path) for e in entries if _is_file(e)]
    if not recursive and any(f.name.upper() == DICOMDIR for f in files):
        for path in files:
            if path.name.upper() == DICOMDIR:
                yield from dicomdir_files(path)
        return
    for path in files:
        if path.name.upper() != DICOMDIR:
            yield path
    if recursive:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), recursive, excluded)


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:
        return False


def dicomdir_files(path: Path) -> Iterator[Path]:
    """The files a DICOMDIR (PS3.10 media directory) refers to, relative to its folder."""
    try:
        directory = pydicom.dcmread(path, force=True)
        records = directory.DirectoryRecordSequence
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same to the user
        raise CrawlError(f"{path}: not a readable DICOMDIR ({exc}); back-fill its folder with "
                         "--recursive instead") from exc
    base = path.parent
    for record in records:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        yield (base.joinpath(*[str(part) for part in parts])).resolve()
