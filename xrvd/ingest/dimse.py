"""DICOM query/retrieve (Study Root) for `xrvd backfill --source`: C-FIND, then C-GET on
xrvd's own association (its C-STOREs stream to the spool like any received instance, bounded
the same way) or C-MOVE to xrvd's listener.

Every PDU the PACS sends is bounded in size and time as on xrvd's listener (net.py), and a
reply longer than the cap is cut off with a C-CANCEL: a PACS is a peer like any other.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from ..log import get_logger
from ..sources import DimseSource
from ..store import Store
from .incoming import Incoming
from .net import RequestorAE, abandon_partial
from .retrieve import (
    DayQuery,
    FoundSeries,
    FoundStudy,
    Retrieved,
    RetrieveError,
    found_study,
    instance_count,
    split_day,
)
from .scp import TRANSFER_SYNTAXES, Receiver

# What a chest radiograph is stored as; C-GET must offer each class it is to receive.
IMAGE_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                 DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)

_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000
_SUBOPERATIONS_FAILED = 0xB000
_MOVE_DESTINATION_UNKNOWN = 0xA801
_CANCELLED = 0xFE00


class DimseClient:
    """One PACS (a `sources:` entry). Thread-safe: each call opens its own association."""

    def __init__(self, source: DimseSource, store: Store | None = None,
                 incoming: Incoming | None = None, tls_arguments=None):
        self.source = source
        self.store = store
        self.incoming = incoming
        self.tls_arguments = tls_arguments  # (ssl context, host name) for source.tls
        self.log = get_logger(component="retrieve", source=source.name)
        # auto: learnt from the replies; False once the PACS shows it ignores the key.
        self.modalities_in_study = source.modalities_in_study != "no"

    # --- associations ----------------------------------------------------------------------

    @contextmanager
    def _association(self, contexts, *, roles=(), handlers=(), receiving=False):
        source = self.source
        ae = RequestorAE(source.calling_ae, timeout=source.timeout_seconds,
                         peer=f"{source.host}:{source.port}", max_pdu=source.max_pdu,
                         incoming=self.incoming if receiving else None)
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, syntaxes)
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title,
                             max_pdu=source.max_pdu, ext_neg=list(roles),
                             tls_args=self.tls_arguments, evt_handlers=list(handlers))
        if not assoc.is_established:
            if assoc.is_rejected:
                raise RetrieveError("refused", f"{source.name} ({source.ae_title}@"
                                    f"{source.host}:{source.port}) rejected the association; "
                                    f"check that it knows {source.calling_ae}")
            detail = ae.dropped[1] if ae.dropped else "no answer"
            raise RetrieveError("unreachable", f"cannot associate with {source.name} "
                                f"({source.host}:{source.port}): {detail}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
            if ae.dropped and not assoc.is_released:
                self.log.warning("source.connection_dropped", reason=ae.dropped[0],
                                 detail=ae.dropped[1])

    @staticmethod
    def _check_alive(assoc, what: str) -> None:
        if assoc.is_aborted or not assoc.is_established:
            raise RetrieveError("aborted", f"the association ended during {what}")

    # --- C-FIND ------------------------------------------------------------------------------

    def _find(self, assoc, query: Dataset, limit: int) -> tuple[list[Dataset], bool]:
        """Matches (at most `limit`; the reply is cancelled past it) and whether the reply
        was complete. Raises RetrieveError on a failure status."""
        found: list[Dataset] = []
        cancelled = False
        for status, identifier in assoc.send_c_find(query,
                                                    StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                self._check_alive(assoc, "a query")
                raise RetrieveError("aborted", "no reply to the query within "
                                    f"{self.source.timeout_seconds} s")
            code = int(status.Status)
            if code in _PENDING:
                if cancelled:
                    continue  # in flight before the PACS saw the cancel
                if identifier is not None:
                    found.append(identifier)
                if len(found) > limit:
                    # send_c_find's message ID is 1; the PACS ends the reply with 0xFE00.
                    assoc.send_c_cancel(1, query_model=StudyRootQueryRetrieveInformationModelFind)
                    cancelled = True
                continue
            if code == _SUCCESS:
                return found, not cancelled
            if code == _CANCELLED:  # ours, or the PACS's own cap (Orthanc ends a capped
                return found, False  # reply so): either way the reply is cut off
            raise RetrieveError("status", f"the query failed with status 0x{code:04X}"
                                f"{_comment(status)}", retry=_retry_status(code))
        self._check_alive(assoc, "a query")
        return found, not cancelled

    def find_studies(self, day: dt.date, stop: threading.Event | None = None) -> DayQuery:
        """The day's studies with a wanted modality (or all of them, where the PACS ignores
        ModalitiesInStudy: their series decide), splitting windows at the result cap."""
        cap = self.source.result_cap
        with self._association([(StudyRootQueryRetrieveInformationModelFind, None)]) as assoc:
            return split_day(
                day, lambda begin, end, whole_day: self._find(
                    assoc, self._study_query(day, begin, end, whole_day), cap - 1),
                self._study, cap, self.log, stop)

    def _study_query(self, day: dt.date, begin: dt.datetime, end: dt.datetime,
                     whole_day: bool) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.StudyDate = day.strftime("%Y%m%d")
        # A time range leaves out studies with no StudyTime: only split windows use one.
        query.StudyTime = "" if whole_day else \
            f"{begin:%H%M%S}-{(end - dt.timedelta(seconds=1)):%H%M%S}"
        query.ModalitiesInStudy = "\\".join(self.source.modalities) \
            if self.modalities_in_study else ""
        query.NumberOfStudyRelatedInstances = ""
        return query

    def _study(self, identifier: Dataset) -> FoundStudy | None:
        value = identifier.get("ModalitiesInStudy")
        return found_study(identifier.get("StudyInstanceUID", ""),
                           [value] if isinstance(value, str) else list(value or []), self)

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        """The study's series of a wanted modality."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        query.NumberOfSeriesRelatedInstances = ""
        with self._association([(StudyRootQueryRetrieveInformationModelFind, None)]) as assoc:
            # A study has tens of series at most; thousands would be a broken PACS.
            matches, complete = self._find(assoc, query, 10_000)
        if not complete:
            raise RetrieveError("status", f"study {study_uid}: more than 10000 series",
                                retry=False)
        wanted = set(self.source.modalities)
        series = []
        for identifier in matches:
            uid = str(identifier.get("SeriesInstanceUID", "") or "").strip()
            modality = str(identifier.get("Modality", "") or "").strip().upper()
            if uid and modality in wanted:
                series.append(FoundSeries(uid, modality, instance_count(
                    identifier.get("NumberOfSeriesRelatedInstances"))))
        return series

    # --- C-GET and C-MOVE -------------------------------------------------------------------

    def retrieve(self, study_uid: str, series: list[FoundSeries]) -> Retrieved:
        """Bring the series into the store (one request for all of them); the study is held
        unsettled until the request is over."""
        assert self.store is not None
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = [s.series_uid for s in series] if len(series) > 1 \
            else series[0].series_uid
        key = f"retrieve-{id(query):x}-{study_uid}"
        self.store.hold_study(key, study_uid)
        try:
            if self.source.retrieve == "get":
                return self._get(query, key)
            return self._move(query)
        finally:
            self.store.association_closed(key)

    def _get(self, query: Dataset, key: str) -> Retrieved:
        counted = {"instances": 0, "bytes": 0}
        lock = threading.Lock()

        def received(outcome, size: int) -> None:
            with lock:
                counted["instances"] += 1
                counted["bytes"] += size

        receiver = Receiver(self.store, self.incoming, self.log, kind="retrieve",
                            source_of=lambda event: f"retrieve:{self.source.name}",
                            association_key=lambda assoc: key, received=received)
        contexts = [(StudyRootQueryRetrieveInformationModelGet, None)] + \
            [(uid, TRANSFER_SYNTAXES) for uid in IMAGE_CLASSES]
        roles = [build_role(uid, scp_role=True) for uid in IMAGE_CLASSES]
        handlers = [(evt.EVT_C_STORE, receiver.on_store),
                    (evt.EVT_CONN_CLOSE, lambda event: abandon_partial(event.assoc))]
        with self._association(contexts, roles=roles, handlers=handlers,
                               receiving=True) as assoc:
            final = self._last_status(assoc, assoc.send_c_get(
                query, StudyRootQueryRetrieveInformationModelGet), "C-GET")
        return Retrieved(counted["instances"], counted["bytes"], _failed(final))

    def _move(self, query: Dataset) -> Retrieved:
        with self._association([(StudyRootQueryRetrieveInformationModelMove, None)]) as assoc:
            final = self._last_status(assoc, assoc.send_c_move(
                query, self.source.destination_ae, StudyRootQueryRetrieveInformationModelMove),
                "C-MOVE")
        completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0) + \
            int(final.get("NumberOfWarningSuboperations", 0) or 0)
        return Retrieved(completed, 0, _failed(final))

    def _last_status(self, assoc, responses: Iterator, what: str) -> Dataset:
        final = None
        for status, _identifier in responses:
            if status is None or "Status" not in status:
                self._check_alive(assoc, what)
                raise RetrieveError("aborted", f"no {what} response within "
                                    f"{self.source.timeout_seconds} s")
            final = status
            if int(status.Status) not in _PENDING:
                break
        if final is None:
            self._check_alive(assoc, what)
            raise RetrieveError("aborted", f"{what} ended without a final response")
        code = int(final.Status)
        if code in (_SUCCESS, _SUBOPERATIONS_FAILED) or 0xB000 <= code <= 0xBFFF:
            return final
        if code == _MOVE_DESTINATION_UNKNOWN:
            raise RetrieveError("move_destination_unknown", f"the PACS does not know the move "
                                f"destination {self.source.destination_ae}: add xrvd's "
                                "listener (scp.ae_title, host, port) to its DICOM nodes, or "
                                "use retrieve: get", fatal=True)
        raise RetrieveError("status", f"{what} failed with status 0x{code:04X}"
                            f"{_comment(final)}", retry=_retry_status(code))


def _failed(final: Dataset) -> int:
    return int(final.get("NumberOfFailedSuboperations", 0) or 0)


def _retry_status(code: int) -> bool:
    """Out of resources (A7xx) and unable to process (Cxxx) pass; the rest (identifier does
    not match the class, refused for other reasons) will not."""
    return (code & 0xFF00) == 0xA700 or (code & 0xF000) == 0xC000 or code == 0xFE00


def _comment(status: Dataset) -> str:
    comment = str(status.get("ErrorComment", "") or "").strip()
    return f" ({comment[:120]})" if comment else ""
