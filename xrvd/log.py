"""Structured events with structlog: JSON lines by default (journald keeps them), a readable
console format for people.

Identifying values are pseudonymised in every event unless `log.include_patient_identifiers`
is true: the value of each key in IDENTIFYING_KEYS (at any depth: dicts and lists in an event
are walked) becomes "id:" and 16 hex digits of an HMAC-SHA256 under a per-installation secret
salt, so the same patient or file still reads the same across lines and restarts, and nothing
else can be learnt from it. The same values are replaced wherever they also appear inside
other strings of the event (an error message that quotes the file), and so is any path under
a folder registered with `private_folder` (drop folders, archive roots), whichever key holds
it. Emitting code still keeps paths out of free text where it can: this is the safety net.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
from pathlib import Path
from typing import IO, Any

import structlog

from .fsutil import fsync_path

# Keys whose values identify a patient, or name a file from a drop folder or an archive
# (such names often carry the patient's name or ID). Compared without case and underscores,
# so DICOM keywords (PatientName) match too. xrvd's own paths (reports named by Study
# Instance UID, the spool's random names, models, config) use other keys: path, result,
# report, folder.
IDENTIFYING_KEYS = frozenset({
    "patient_name", "patient_id", "patient_birth_date", "patient_birth_name",
    "patient_address", "patient_telephone_numbers", "patient_mother_birth_name",
    "other_patient_ids", "other_patient_names", "issuer_of_patient_id",
    "accession_number", "institution_name", "institution_address",
    "referring_physician_name", "referring_physician", "requesting_physician",
    "performing_physician_name", "operators_name",
    "file", "file_name", "moved_to", "roots",
})
SALT_FILE = "log-salt"

_PSEUDONYM = re.compile(r"id:[0-9a-f]{16}")
_MIN_SECRET = 4  # shorter values are not searched for inside free text (too many false hits)
_NOT_SCANNED = frozenset({"event", "level", "timestamp", "logger", "component"})


def _normal(key: str) -> str:
    return key.replace("_", "").lower()


_KEYS = frozenset(_normal(key) for key in IDENTIFYING_KEYS)


def is_identifying(key: object) -> bool:
    return isinstance(key, str) and _normal(key) in _KEYS


# --- salts ----------------------------------------------------------------------------------

_PROCESS_SALT = secrets.token_bytes(32)


def process_salt() -> bytes:
    """A random salt for this process only: for commands with no state directory to keep one
    in, or one they must not write. Its pseudonyms match nothing outside this process."""
    return _PROCESS_SALT


def load_salt(state_dir: str | os.PathLike | None, *, create: bool = True) -> bytes:
    """The installation's salt, kept in <state_dir>/log-salt (mode 0600). create: made at the
    first call (written atomically; never replaced once there); without it, or when the state
    directory cannot be written, a command gets the process salt instead."""
    if state_dir is None:
        return _PROCESS_SALT
    path = Path(state_dir) / SALT_FILE
    salt = _read_salt(path)
    if salt is not None or not create:
        return salt or _PROCESS_SALT
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # serve and backfill would make it
        return _write_salt(path)
    except OSError:
        return _PROCESS_SALT


def _read_salt(path: Path) -> bytes | None:
    try:
        text = path.read_text(encoding="ascii").strip()
        salt = bytes.fromhex(text)
    except (OSError, ValueError):
        return None
    return salt if len(salt) >= 16 else None


def _write_salt(path: Path) -> bytes:
    """Written to a private temporary, fsync'd, then linked into place: a reader sees all of
    it or nothing, and of two processes racing, both end up with the first one's salt."""
    salt = secrets.token_bytes(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(salt.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = _read_salt(path)
            if existing is None:
                raise
            return existing
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return salt


def pseudonym(value: object, salt: bytes) -> str:
    """"id:" and the first 16 hex digits of HMAC-SHA256(salt, value)."""
    digest = hmac.new(salt, str(value).encode("utf-8", "surrogateescape"), hashlib.sha256)
    return "id:" + digest.hexdigest()[:16]


# --- folders whose files' paths are private -------------------------------------------------

_folders_lock = threading.Lock()
_folders: dict[str, bool] = {}  # folder -> the folder's own path is private too
_folders_pattern: re.Pattern[str] | None = None

# Where a path inside free text ends: a quote, a line end, the end, or the punctuation that
# follows a path in messages ("<path>: reason", "<path> (reason)", "<path>; ...").
_PATH_END = r"(?=['\"\n]|: |; | \(|\)|$)"


def private_folder(folder: str | os.PathLike, *, itself: bool = False) -> None:
    """Paths of files under `folder` are identifying wherever they appear in an event (drop
    folders, archives being back-filled). itself: the folder's own path is too (a back-fill
    root may be one patient's folder)."""
    global _folders_pattern
    names = {str(folder)}
    try:
        names.add(str(Path(folder).resolve()))
    except OSError:
        pass
    with _folders_lock:
        for name in names:
            name = name.rstrip("/") or "/"
            if _folders.get(name) is None or itself:
                _folders[name] = itself
        _folders_pattern = None


def _folder_pattern() -> re.Pattern[str] | None:
    global _folders_pattern
    with _folders_lock:
        if _folders_pattern is None and _folders:
            parts = []
            for name, itself in sorted(_folders.items(), key=lambda kv: -len(kv[0])):
                below = r"/[^'\"\n]+?" if name != "/" else r"[^'\"\n]+?"
                stem = re.escape(name if name != "/" else "")
                parts.append(stem + (f"(?:{below})?" if itself else below) + _PATH_END)
            _folders_pattern = re.compile("|".join(f"(?:{p})" for p in parts))
        return _folders_pattern


# --- the processor ---------------------------------------------------------------------------


class Redactor:
    """The structlog processor: every event goes through it (see configure)."""

    def __init__(self, include_patient_identifiers: bool, salt: bytes):
        self.include = include_patient_identifiers
        self.salt = salt

    def __call__(self, _logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if self.include:
            return event
        found: dict[str, str] = {}  # raw value -> its pseudonym
        event = self._walk(event, False, found)
        secrets_ = sorted((raw for raw in found if len(raw) >= _MIN_SECRET), key=len,
                          reverse=True)
        pattern = _folder_pattern()
        if secrets_ or pattern is not None:
            event = {key: value if key in _NOT_SCANNED or key.endswith("uid")
                     else self._scrub(value, secrets_, found, pattern)
                     for key, value in event.items()}
        return event

    def conceal(self, value: object, found: dict[str, str] | None = None) -> object:
        if value is None or isinstance(value, bool):
            return value
        text = str(value)
        if _PSEUDONYM.fullmatch(text):
            return text
        hashed = pseudonym(text, self.salt)
        if found is not None:
            found[text] = hashed
            if "/" in text.rstrip("/"):  # a path: its file name alone is searched for too
                name = text.rstrip("/").rsplit("/", 1)[1]
                found.setdefault(name, pseudonym(name, self.salt))
        return hashed

    def _walk(self, value: Any, identifying: bool, found: dict[str, str]) -> Any:
        if isinstance(value, dict):
            return {key: self._walk(item, identifying or is_identifying(key), found)
                    for key, item in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._walk(item, identifying, found) for item in value]
        return self.conceal(value, found) if identifying else value

    def _scrub(self, value: Any, secrets_: list[str], found: dict[str, str],
               pattern: re.Pattern[str] | None) -> Any:
        if isinstance(value, str):
            return self.text(value, secrets_, found, pattern)
        if isinstance(value, dict):
            return {key: self._scrub(item, secrets_, found, pattern)
                    for key, item in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._scrub(item, secrets_, found, pattern) for item in value]
        if isinstance(value, os.PathLike):
            return self.text(os.fspath(value), secrets_, found, pattern)
        return value

    def text(self, text: str, secrets_: list[str], found: dict[str, str],
             pattern: re.Pattern[str] | None) -> str:
        for raw in secrets_:
            if raw in text:
                text = text.replace(raw, found[raw])
        if pattern is not None:
            text = pattern.sub(lambda match: pseudonym(match.group(0), self.salt), text)
        return text


_DEFAULT = Redactor(False, _PROCESS_SALT)


def _configured() -> Redactor:
    """The processor structlog is configured with now (the default when it is not)."""
    for processor in structlog.get_config().get("processors", ()):
        if isinstance(processor, Redactor):
            return processor
    return _DEFAULT


def redact_text(text: str, *values: object) -> str:
    """Free text for an event or the journal with `values` (paths, names) and paths under
    private folders replaced by their pseudonyms, as the configured processor would; unchanged
    when patient identifiers are to be logged."""
    redactor = _configured()
    if redactor.include:
        return text
    found: dict[str, str] = {}
    for value in values:
        if value is not None:
            redactor.conceal(os.fspath(value) if isinstance(value, os.PathLike) else value,
                          found)
    secrets_ = sorted((raw for raw in found if len(raw) >= _MIN_SECRET), key=len,
                      reverse=True)
    return redactor.text(text, secrets_, found, _folder_pattern())


def error_text(exc: BaseException) -> str:
    """An exception for an event, without the file names an OSError carries."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


# --- configuration ---------------------------------------------------------------------------


class _StandardStreamLoggerFactory:
    """Prints to sys.stdout or sys.stderr as they are at each call, not as they were when
    logging was configured (a replaced stream, as under test runners, stays usable)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        return structlog.PrintLogger(getattr(sys, self.name))


def configure(level: str = "info", fmt: str = "json", *, stream: IO[str] | str = "stdout",
              include_patient_identifiers: bool = False, salt: bytes | None = None) -> None:
    """stream: "stdout", "stderr", or a file object. salt: the installation's
    (load_salt(config.state_dir)); None: a salt for this process only."""
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # before redacting: tracebacks quote paths
            Redactor(include_patient_identifiers, salt or _PROCESS_SALT),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=(_StandardStreamLoggerFactory(stream) if isinstance(stream, str)
                        else structlog.PrintLoggerFactory(stream)),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("xrvd", **context)
