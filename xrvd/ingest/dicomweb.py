"""Query and retrieve from a DICOMweb archive (QIDO-RS, WADO-RS) for `xrvd backfill --source`,
with the same interface and the same care as retrieve.DimseClient: one day at a time, windows
split at the result cap (a reply of `result_cap` matches or more is taken as cut off: Orthanc,
for one, returns one match more than its limit and says nothing), only the wanted series
retrieved, and every instance stored and journaled like one received by C-STORE."""

from __future__ import annotations

import datetime as dt
import tempfile
import threading
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from .. import metrics
from ..log import get_logger
from ..sources import DicomwebSource
from ..store import Store, StoreError
from ..web import Bounds, client, describe_http_error, session
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

# A series whose instance count the archive did not give is read up to this many instances.
MAX_UNCOUNTED_INSTANCES = 100
# A part's own headers (Content-Type, Content-Location) before the instance's bytes.
PART_HEADER_BYTES = 64 << 10

STUDY_UID, SERIES_UID, MODALITY = "0020000D", "0020000E", "00080060"
MODALITIES_IN_STUDY, SERIES_INSTANCES = "00080061", "00201209"


def _values(item, tag: str) -> list:
    """A DICOM JSON attribute's values; [] for whatever a broken reply has instead."""
    attribute = item.get(tag) if isinstance(item, dict) else None
    values = attribute.get("Value") if isinstance(attribute, dict) else None
    return list(values) if isinstance(values, list) else []


def _first(item: dict, tag: str) -> str:
    values = _values(item, tag)
    return str(values[0]).strip() if values else ""


class DicomwebClient:
    def __init__(self, source: DicomwebSource, store: Store | None = None,
                 max_instance_bytes: int = 512 << 20):
        self.source = source
        self.store = store
        self.max_instance_bytes = max_instance_bytes
        self.log = get_logger(component="retrieve", source=source.name)
        self.modalities_in_study = source.modalities_in_study != "no"
        self._session = session(source.auth, source.tls, source.timeout_seconds)
        self._client = client(source.url, self._session)

    def _call(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - typed for the back-off below
            reason, retry, detail = describe_http_error(exc)
            raise RetrieveError(reason, f"{what} at {self.source.url}: {detail}", retry=retry,
                                fatal=reason == "unauthorized") from exc

    # --- QIDO-RS -----------------------------------------------------------------------------

    def find_studies(self, day: dt.date, stop: threading.Event | None = None) -> DayQuery:
        def query(begin: dt.datetime, end: dt.datetime, whole_day: bool) -> tuple[list, bool]:
            filters = {"StudyDate": day.strftime("%Y%m%d")}
            if not whole_day:
                filters["StudyTime"] = f"{begin:%H%M%S}-{(end - dt.timedelta(seconds=1)):%H%M%S}"
            if self.modalities_in_study:
                filters["ModalitiesInStudy"] = ",".join(self.source.modalities)
            found = self._call("QIDO-RS", self._client.search_for_studies,
                               search_filters=filters, limit=self.source.result_cap,
                               fields=["ModalitiesInStudy"])
            return found, len(found) < self.source.result_cap

        def study(item: dict) -> FoundStudy | None:
            return found_study(_first(item, STUDY_UID), _values(item, MODALITIES_IN_STUDY), self)

        return split_day(day, query, study, self.source.result_cap, self.log, stop)

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        found = self._call("QIDO-RS", self._client.search_for_series,
                           study_instance_uid=study_uid,
                           fields=["Modality", "NumberOfSeriesRelatedInstances"])
        wanted = set(self.source.modalities)
        series = []
        for item in found:
            uid, modality = _first(item, SERIES_UID), _first(item, MODALITY).upper()
            if uid and modality in wanted:
                series.append(FoundSeries(uid, modality,
                                          instance_count(_first(item, SERIES_INSTANCES))))
        return series

    # --- WADO-RS -----------------------------------------------------------------------------

    def retrieve(self, study_uid: str, series: list[FoundSeries]) -> Retrieved:
        """Each series' instances, as the archive stores them (transfer syntax '*'), written
        to the spool and journaled one by one; the study is held unsettled meanwhile."""
        assert self.store is not None
        key = f"retrieve-web-{id(series):x}-{study_uid}"
        self.store.hold_study(key, study_uid)
        counted = {"instances": 0, "bytes": 0, "failed": 0}
        try:
            for one in series:
                # A part is an instance: none is held whole past max_instance_bytes, and the
                # series' reply is no longer than the instances the query announced.
                expected = one.instances or MAX_UNCOUNTED_INSTANCES
                bounds = Bounds(total_bytes=(expected + 1) * self.max_instance_bytes,
                                part_bytes=self.max_instance_bytes + PART_HEADER_BYTES)
                with self._session.bounded(bounds):
                    self._retrieve_series(study_uid, one.series_uid, key, counted)
        finally:
            self.store.association_closed(key)
        return Retrieved(counted["instances"], counted["bytes"], counted["failed"])

    def _retrieve_series(self, study_uid: str, series_uid: str, key: str,
                         counted: dict[str, int]) -> None:
        datasets = self._call("WADO-RS", self._client.iter_series,
                              study_instance_uid=study_uid, series_instance_uid=series_uid,
                              media_types=(("application/dicom", "*"),))
        while (ds := self._call("WADO-RS", next, datasets, None)) is not None:
            written = self._store(ds, key)
            if written is None:
                counted["failed"] += 1
            else:
                counted["instances"] += 1
                counted["bytes"] += written

    def _store(self, ds: Dataset, key: str) -> int | None:
        """Journal one retrieved instance; its size, or None when it was refused (logged)."""
        sop_uid = str(ds.get("SOPInstanceUID", ""))[:64]
        with tempfile.NamedTemporaryFile(dir=self.store.incoming, prefix="web-",
                                         suffix=".dcm", delete=False) as tmp:
            path = Path(tmp.name)
        try:
            if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
                meta = FileMetaDataset()
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta = meta
            ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID")
            ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID")
            ds.save_as(path, enforce_file_format=True)
            written = path.stat().st_size
            if written > self.max_instance_bytes:
                raise StoreError(f"the instance is larger than scp.max_instance_bytes "
                                 f"({self.max_instance_bytes} bytes)", "too_large")
            outcome = self.store.store_file(path, source=f"retrieve:{self.source.name}",
                                            move=True, association=key)
        except Exception as exc:  # noqa: BLE001 - whatever the archive sent: this instance
            reason = getattr(exc, "reason", None) or "store_failed"
            metrics.REFUSED.labels(reason).inc()
            self.log.warning("instance.refused", reason=reason, detail=str(exc)[:300],
                             sop_instance_uid=sop_uid)
            return None
        finally:
            path.unlink(missing_ok=True)
        (metrics.DUPLICATES if outcome.status == "duplicate"
         else metrics.RECEIVED.labels("retrieve")).inc()
        self.log.info("instance.duplicate" if outcome.status == "duplicate"
                      else "instance.stored", sop_instance_uid=sop_uid,
                      study_instance_uid=outcome.study_uid, status=outcome.status,
                      size=written)
        return written
