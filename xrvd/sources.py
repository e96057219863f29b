"""Where a back-fill can find an archive besides folders: a PACS or VNA that answers DICOM
query/retrieve (C-FIND, then C-GET or C-MOVE) or DICOMweb (QIDO-RS, then WADO-RS); and
DICOMweb peers reports go to (STOW-RS). The config models, and the time window in which a
source may be asked to send (a PACS administrator's "nights only")."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Discriminator, Field, Tag, field_validator, model_validator

from .config_base import AETitle, Section, TlsConfig


def _schedule(value: str | None) -> str | None:
    if value is None:
        return None
    Schedule.parse(value)
    return value.strip()


class SourceBase(Section):
    """What every kind of source shares: which series to take, and how politely."""

    name: str = Field(min_length=1, max_length=64)
    # Series of these modalities are retrieved; the rest of a study never is.
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"], min_length=1)
    # A reply with this many studies may have been cut by the PACS: the window is split.
    result_cap: int = Field(default=500, ge=2)
    # "auto": ModalitiesInStudy in the study query, and series queries for every study
    # found when the PACS turns out to ignore it.
    modalities_in_study: Literal["auto", "yes", "no"] = "auto"
    max_concurrent_retrieves: int = Field(default=1, ge=1, le=16)
    max_studies_per_hour: float | None = Field(default=None, gt=0)
    schedule: Annotated[str | None, AfterValidator(_schedule)] = None
    timeout_seconds: float = Field(default=60.0, gt=0)
    # A refused association, an abort or a PACS out of resources (A7xx, C0xx, HTTP 5xx, ...)
    # is retried with a doubling back-off; after max_attempts the study is failed (or, in a
    # row, the run stops).
    max_attempts: int = Field(default=5, ge=1)
    retry_seconds: float = Field(default=30.0, ge=0)
    max_retry_seconds: float = Field(default=900.0, ge=0)

    @field_validator("modalities", mode="after")
    @classmethod
    def _upper_case_modalities(cls, value: list[str]) -> list[str]:
        names = [m.strip().upper() for m in value if m.strip()]
        if not names or not all(m.isalnum() and len(m) <= 16 for m in names):
            raise ValueError(f"must be modality codes such as CR and DX, got {value!r}")
        return names


class DimseSource(SourceBase):
    """A PACS reached by DICOM query/retrieve. C-GET needs nothing configured on the PACS
    beyond xrvd's AE title; C-MOVE needs the PACS to know `move_destination` (xrvd's own
    listener: scp.ae_title, host and port) as a DICOM node."""

    type: Literal["dimse"] = "dimse"
    ae_title: AETitle  # the PACS's (called) AE title
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae: AETitle = "XRVD"
    tls: TlsConfig | None = None
    retrieve: Literal["get", "move"] = "get"
    # C-MOVE's destination: xrvd's own listener (scp.ae_title), as the PACS knows it.
    move_destination: AETitle | None = None
    max_pdu: int = Field(default=131072, ge=4096, le=2**26)

    @property
    def destination_ae(self) -> str:
        return self.move_destination or self.calling_ae


class HttpAuth(Section):
    """How xrvd authenticates to a DICOMweb server. Secrets are best kept in files readable
    by the service alone (password_file, token_file) rather than in the config."""

    type: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    token: str | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> HttpAuth:
        if self.type == "basic" and (not self.username or
                                     (self.password is None) == (self.password_file is None)):
            raise ValueError("basic auth needs username and one of password, password_file")
        if self.type == "bearer" and (self.token is None) == (self.token_file is None):
            raise ValueError("bearer auth needs one of token, token_file")
        return self

    def secret(self, value: str | None, path: Path | None) -> str:
        return value if value is not None else Path(path).read_text(encoding="utf-8").strip()


class HttpTls(Section):
    """The server's certificate is checked against ca_file (default: the system's CAs)."""

    ca_file: Path | None = None
    verify: bool = True


def _http_url(value: str) -> str:
    text = value.strip().rstrip("/")
    if not text.startswith(("http://", "https://")) or len(text) < 10:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return text


HttpUrl = Annotated[str, AfterValidator(_http_url)]


class DicomwebSource(SourceBase):
    """A PACS or cloud archive reached by DICOMweb: QIDO-RS to find, WADO-RS to retrieve."""

    type: Literal["dicomweb"]
    url: HttpUrl  # the service root, e.g. https://pacs/dicom-web
    auth: HttpAuth = Field(default_factory=HttpAuth)
    tls: HttpTls = Field(default_factory=HttpTls)


class DicomwebDestination(Section):
    """A DICOMweb peer that receives the reports by STOW-RS."""

    name: str = Field(min_length=1, max_length=64)
    type: Literal["dicomweb"]
    url: HttpUrl
    auth: HttpAuth = Field(default_factory=HttpAuth)
    tls: HttpTls = Field(default_factory=HttpTls)
    sr_flavour: Literal["comprehensive3d", "enhanced"] = "comprehensive3d"


def kind_of(value: Any) -> str:
    """The `type:` of a source or destination; DICOM (dimse) when not given."""
    if isinstance(value, dict):
        return str(value.get("type", "dimse"))
    return str(getattr(value, "type", "dimse"))


Source = Annotated[Annotated[DimseSource, Tag("dimse")] | Annotated[DicomwebSource,
                                                                      Tag("dicomweb")],
                   Discriminator(kind_of)]


class Schedule:
    """A daily window such as "19:00-07:00" (across midnight) or "08:00-18:00", local time."""

    _PATTERN = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")

    def __init__(self, start: dt.time, end: dt.time):
        self.start, self.end = start, end

    @classmethod
    def parse(cls, text: str) -> Schedule:
        match = cls._PATTERN.match(text or "")
        if not match:
            raise ValueError(f"schedule {text!r} is not a window like '19:00-07:00'")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if not (h1 < 24 and h2 < 24 and m1 < 60 and m2 < 60) or (h1, m1) == (h2, m2):
            raise ValueError(f"schedule {text!r} is not a window like '19:00-07:00'")
        return cls(dt.time(h1, m1), dt.time(h2, m2))

    def open_at(self, when: dt.datetime) -> bool:
        now = when.time()
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def seconds_until_open(self, when: dt.datetime) -> float:
        if self.open_at(when):
            return 0.0
        opens = when.replace(hour=self.start.hour, minute=self.start.minute, second=0,
                             microsecond=0)
        if opens <= when:
            opens += dt.timedelta(days=1)
        return (opens - when).total_seconds()
