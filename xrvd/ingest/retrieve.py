"""Query and retrieve from a PACS for `xrvd backfill --source`: what DICOM Q/R (dimse.py) and
DICOMweb (dicomweb.py) share.

Like a careful human at a PACS console: studies are found one day at a time (by StudyDate,
with ModalitiesInStudy), and a reply as long as the PACS's result cap is taken as cut off, so
the window is split by StudyTime and asked again, until every reply is under the cap. Each
study's series are then listed and only series of the wanted modalities are retrieved:
nothing else of a study (its CT, its MR) is ever asked for. Retrievals are paced (Pacer).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import XrvdError
from ..sources import DimseSource, Schedule
from ..store import Store
from .incoming import Incoming

# A study window is not split below this: a PACS with more studies in one minute than its
# cap is not answerable by date and time (logged, never silently short).
SMALLEST_WINDOW = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class FoundStudy:
    study_uid: str
    modalities: tuple[str, ...]  # as the PACS answered ModalitiesInStudy (may be empty)


def found_study(uid: str, modalities, client) -> FoundStudy | None:
    """A study from a query's match, or None for a match without a usable UID. A study listed
    without any wanted modality shows that the PACS ignores ModalitiesInStudy: with
    `modalities_in_study: auto`, the client stops sending it and every study's series decide.
    client: a DimseClient or DicomwebClient (source, log, modalities_in_study)."""
    uid = str(uid or "").strip()
    if not uid or len(uid) > 64:
        return None
    names = tuple(str(m).strip().upper() for m in modalities if str(m).strip())
    source = client.source
    if (source.modalities_in_study == "auto" and client.modalities_in_study and names
            and not set(names) & set(source.modalities)):
        client.modalities_in_study = False
        client.log.info("source.modalities_in_study_ignored",
                        detail="the PACS does not match on ModalitiesInStudy; every study's "
                        "series are checked instead")
    return FoundStudy(uid, names)


def instance_count(value) -> int | None:
    """NumberOfSeriesRelatedInstances as the PACS gave it; None where it is not a count."""
    text = str(value if value is not None else "").strip()
    return int(text) if text.isdigit() and len(text) <= 9 else None


@dataclass(frozen=True)
class FoundSeries:
    series_uid: str
    modality: str
    instances: int | None


@dataclass(frozen=True)
class DayQuery:
    studies: list[FoundStudy]
    windows: int  # queries it took
    capped_windows: int  # windows that still hit the cap at the smallest size


@dataclass(frozen=True)
class Retrieved:
    instances: int  # instances the PACS sent
    bytes: int
    failed: int  # sub-operations the PACS reported failed (e.g. a class not offered)


class RetrieveError(XrvdError):
    """reason: refused, aborted, unreachable, status (the PACS answered a failure),
    move_destination_unknown, unauthorized. `retry`: whether a later attempt may succeed;
    `fatal`: no study can succeed until the configuration changes (the run stops)."""

    def __init__(self, reason: str, detail: str, *, retry: bool = True, fatal: bool = False):
        self.reason = reason  # an XrvdError's reason code, per error here
        self.retry = retry and not fatal
        self.fatal = fatal
        super().__init__(detail)


def split_day(day: dt.date, query: Callable, study: Callable, cap: int, log,
              stop: threading.Event | None = None) -> DayQuery:
    """A day's studies, asked for in windows: query(begin, end, whole_day) -> (matches,
    complete); a reply of `cap` matches or more, or cut off, is split in two by time and each
    half asked again (down to SMALLEST_WINDOW). study(match) -> FoundStudy or None."""
    studies: dict[str, FoundStudy] = {}
    windows = capped = 0
    start = dt.datetime.combine(day, dt.time.min)
    pending = [(start, start + dt.timedelta(days=1), True)]  # the whole day: no time key
    while pending:
        if stop is not None and stop.is_set():
            raise InterruptedError
        begin, end, whole_day = pending.pop()
        matches, complete = query(begin, end, whole_day)
        windows += 1
        if len(matches) >= cap or not complete:
            if end - begin > SMALLEST_WINDOW:
                middle = (begin + (end - begin) / 2).replace(second=0, microsecond=0)
                middle = max(middle, begin + SMALLEST_WINDOW)
                log.info("source.window_split", day=day.isoformat(),
                         window=_window_text(begin, end), studies=len(matches), cap=cap)
                pending += [(middle, end, False), (begin, middle, False)]
                continue
            capped += 1
            log.warning("source.window_capped", day=day.isoformat(),
                        window=_window_text(begin, end), cap=cap,
                        detail="more studies in one minute than the PACS returns: some may "
                        "be missed; raise result_cap if the PACS allows more")
        for match in matches:
            found = study(match)
            if found is not None:
                studies.setdefault(found.study_uid, found)
            else:
                log.warning("source.bad_match", detail="a study match without a valid "
                            "StudyInstanceUID")
    return DayQuery(list(studies.values()), windows, capped)


def _window_text(begin: dt.datetime, end: dt.datetime) -> str:
    return f"{begin:%H:%M}-{end:%H:%M}" if end.date() == begin.date() else f"{begin:%H:%M}-24:00"


def make_client(source, store: Store | None = None, *, max_instance_bytes: int = 512 << 20,
                reserve=None):
    """The client for a `sources:` entry: DICOM Q/R or DICOMweb."""
    if source.type == "dicomweb":
        from .dicomweb import DicomwebClient

        return DicomwebClient(source, store, max_instance_bytes)
    from ..deliver import tls_arguments
    from .dimse import DimseClient

    incoming = Incoming(store.incoming, max_instance_bytes, reserve) if store else None
    return DimseClient(source, store, incoming, tls_arguments(source))


class Pacer:
    """When the next retrieval may start: inside the source's schedule, no more than
    max_studies_per_hour (evenly spaced), and never sooner than the back-off after a failure
    that is not a study's own fault (the PACS refusing or out of resources)."""

    def __init__(self, source: DimseSource, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], dt.datetime] = dt.datetime.now):
        self.schedule = Schedule.parse(source.schedule) if source.schedule else None
        self.interval = 3600.0 / source.max_studies_per_hour \
            if source.max_studies_per_hour else 0.0
        self.source = source
        self._clock = clock
        self._now = now
        self._next_start = 0.0
        self._backoff_until = 0.0
        self._failures = 0
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event, on_pause: Callable[[float], None]) -> bool:
        """Block until a retrieval may start (True) or `stop` is set (False)."""
        while not stop.is_set():
            with self._lock:
                now = self._clock()
                delay = max(self._next_start, self._backoff_until) - now
                closed = self.schedule.seconds_until_open(self._now()) if self.schedule else 0
                if delay <= 0 and closed <= 0:
                    self._next_start = now + self.interval
                    return True
            if closed > 0:
                on_pause(closed)
            stop.wait(min(max(delay, closed), 60.0))
        return False

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0

    def failed(self) -> float:
        """A retrieval failed for a reason of the PACS's: every retrieval waits. Returns the
        back-off in seconds (doubling, up to max_retry_seconds)."""
        with self._lock:
            self._failures += 1
            delay = min(self.source.retry_seconds * 2 ** (self._failures - 1),
                        self.source.max_retry_seconds)
            self._backoff_until = self._clock() + delay
            return delay
