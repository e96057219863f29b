"""The record of installed weights: `<state_dir>/trusted-weights.json` holds the sha256 of each
weights file as `xrvd models import|fetch` installed it and of each ONNX graph as exported.
It lives in the state directory, not beside the weights, so that whoever can write the
weights folder cannot vouch for what they put there. A file that no longer matches its record
is refused; a file with no record (a folder prepared before xrvd kept one, or weights put in
place by hand) is trusted on first use, with a `weights.recorded` warning that says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrustRecordError, WeightsChangedError
from ..fsutil import write_atomically_readable
from ..log import get_logger
from .registry import ModelSpec

TRUST_FILE = "trusted-weights.json"
TRUST_FORMAT = 1

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TrustedHashes:
    """`<state_dir>/trusted-weights.json`: the sha256 of each weights file as installed and of
    each ONNX graph as exported, keyed by the file's absolute path (as configured: a symlink
    swapped in keeps the key, so its different content is seen).

    It lives in the state directory, not beside the weights, so that whoever can write the
    weights folder cannot vouch for what they put there."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / TRUST_FILE

    @staticmethod
    def key(file: Path) -> str:
        return os.path.abspath(file)

    def entry(self, file: Path) -> dict | None:
        return self._files().get(self.key(file))

    def record(self, file: Path, digest: str, source: str, **details: Any) -> None:
        """Raises OSError when the state directory cannot be written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            files = self._files()
            files[self.key(file)] = {
                "sha256": digest, "source": source,
                "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}
            document = {"format": TRUST_FORMAT, "files": dict(sorted(files.items()))}
            write_atomically_readable(self.path, json.dumps(document, indent=2).encode())

    @contextlib.contextmanager
    def _locked(self):
        # Read-only is enough for flock, and works where root created the lock file.
        fd = os.open(self.path.with_name(f".{TRUST_FILE}.lock"), os.O_RDONLY | os.O_CREAT,
                     0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _files(self) -> dict[str, dict]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustRecordError(self._unreadable(getattr(exc, "strerror", None) or exc)) from exc
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise TrustRecordError(self._unreadable("not valid JSON")) from exc
        if not isinstance(document, dict):
            raise TrustRecordError(self._unreadable("not a record xrvd wrote"))
        files = document.get("files")
        if (document.get("format") != TRUST_FORMAT or not isinstance(files, dict)
                or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                           for e in files.values())):
            raise TrustRecordError(self._unreadable("not a record xrvd wrote"))
        return files

    def _unreadable(self, why: object) -> str:
        return (f"cannot read the record of installed weights {self.path} ({why}). Make it "
                "readable by xrvd's user, restore it from a backup, or delete it: each weights "
                "file is then trusted as it is now (recorded at its next use) and the ONNX "
                "graphs are exported again")


@dataclass(frozen=True)
class Checked:
    """A weights file compared with its record: `recorded` is False when there is none yet."""

    path: Path
    sha256: str
    recorded: bool


def check_recorded(spec: ModelSpec, path: Path, trusted: TrustedHashes | None) -> Checked:
    """The file's sha256, refused (WeightsChangedError) if it differs from the record."""
    digest = sha256(path)
    if trusted is None:
        return Checked(Path(path), digest, True)
    entry = trusted.entry(path)
    if entry is None:
        return Checked(Path(path), digest, False)
    if entry["sha256"] != digest:
        raise WeightsChangedError(changed_message(spec, path, digest, entry["sha256"],
                                                  trusted.path))
    return Checked(Path(path), digest, True)


def changed_message(spec: ModelSpec, path: Path, digest: str, recorded: str,
                    record: Path) -> str:
    return (f"{path} is not the file that was installed for {spec.name}: its sha256 is "
            f"{digest[:16]}..., the record in {record} says {recorded[:16]}.... xrvd refuses "
            "weights nobody installed. If you replaced the file on purpose, re-import it with "
            f"`xrvd models import {spec.name} {path}`; otherwise restore the published file "
            f"with `xrvd models fetch {spec.name}`")


def record_first_use(spec: ModelSpec, checked: Checked, trusted: TrustedHashes | None) -> None:
    """Trust on first use: a file with no record is recorded once it has loaded."""
    if trusted is None or checked.recorded:
        return
    log = get_logger(model=spec.name)
    try:
        trusted.record(checked.path, checked.sha256, "first use")
    except OSError as exc:
        log.warning("weights.not_recorded", path=str(checked.path), record=str(trusted.path),
                    error=exc.strerror or str(exc),
                    detail="the state directory is not writable here; the file is checked "
                    "against nothing until `xrvd models import` records it")
        return
    log.warning("weights.recorded", path=str(checked.path), sha256=checked.sha256,
                source="first use", record=str(trusted.path),
                detail="no record of this weights file (installed before xrvd kept one, or "
                "put in place by hand): it is trusted as it is now, and refused if it changes. "
                f"If you did not put it there, replace it: `xrvd models fetch {spec.name}`")
