"""C-STORE SCP: receives instances and hands each one to the store.

Received data sets are written by pynetdicom straight to a temporary file in the spool's
`.incoming` folder (never held whole in memory); the store fsyncs, renames and journals it,
and only then does the C-STORE response say 0x0000. Callers are checked at association time
against an allow-list of calling AE titles and, optionally, peer networks.
"""

from __future__ import annotations

import ipaddress
import tempfile
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from ..config import ScpConfig
from ..fsutil import start_writeback
from .. import metrics
from ..log import get_logger
from ..store import NotStorableError, Store, StoreError

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
    JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ (result, source, reason): rejected permanent, service user, ...
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
REJECT_NO_REASON = (0x01, 0x01, 0x01)


def _recv_whole(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv reads whole: pynetdicom reads PDUs 4 KiB per call, which caps a
    pynetdicom SCP near 34 images/s of 10 MB here; reading straight into one buffer gives
    ~46. Same contract: returns fewer bytes only when the peer closed the connection."""
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = self.socket.recv_into(view[received:], nr_bytes - received)
        if not count:
            return buffer[:received]
        received += count
    return buffer


AssociationSocket.recv = _recv_whole  # type: ignore[method-assign]


def _same_uid(self: UID, memo: dict) -> UID:
    return self


# pynetdicom deep-copies the supported presentation contexts for every association, and a
# UID's deepcopy validates it again with a regular expression: 13 ms per association for the
# ~170 storage contexts. A UID is an immutable string; its copy can be itself.
UID.__deepcopy__ = _same_uid  # type: ignore[attr-defined]

_WRITEBACK_EVERY = 4 << 20


class _IncomingFile:
    """The file pynetdicom streams a received data set into (it calls write, file.flush,
    close and name). Every few MB it asks the kernel to start writing back what arrived, so
    the fsync before the acknowledgement finds most of the data already on disk; the pages
    stay cached for the worker, which reads the file next.

    A write that fails (the spool's disk is full) does not raise into pynetdicom, which would
    abort the association: the rest of the data set is read and dropped, and the C-STORE
    handler answers 'out of resources' for it (`failure`), as DCMTK's storescp does."""

    failures: dict[str, OSError] = {}  # name -> why; the C-STORE handler takes its entry

    def __init__(self, folder: Path):
        self._unsynced = 0
        self._tmp = None
        try:
            self._tmp = tempfile.NamedTemporaryFile(dir=folder, prefix="rx-", suffix=".dcm",
                                                    delete=False, mode="wb")
            self.name = self._tmp.name
        except OSError as exc:
            self.name = str(folder / f"rx-unwritable-{id(self):x}.dcm")
            self.failures[self.name] = exc

    @property
    def file(self) -> "_IncomingFile":
        return self  # pynetdicom flushes `file` after every fragment

    def write(self, data) -> int:
        if self.name in self.failures:
            return len(data)
        try:
            self._unsynced += self._tmp.file.write(data)
            if self._unsynced >= _WRITEBACK_EVERY:
                self._tmp.file.flush()
                start_writeback(self._tmp.file.fileno())
                self._unsynced = 0
        except OSError as exc:
            self.failures[self.name] = exc
        return len(data)

    def flush(self) -> None:
        if self.name not in self.failures:
            try:
                self._tmp.file.flush()
            except OSError as exc:
                self.failures[self.name] = exc

    def close(self) -> None:
        if self._tmp is not None:
            try:
                self._tmp.close()
            except OSError as exc:
                self.failures.setdefault(self.name, exc)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class StorageSCP:
    def __init__(self, config: ScpConfig, store: Store):
        self.store = store
        self.log = get_logger(component="scp")
        self._policy_lock = threading.Lock()
        self.apply_policy(config)
        self.config = config
        # Received data sets stream into the spool's incoming folder, so that accepting an
        # instance is an fsync and a rename, never a copy.
        _config.STORE_RECV_CHUNKED_DATASET = True
        incoming = store.incoming
        dimse_messages.NamedTemporaryFile = lambda **_kwargs: _IncomingFile(incoming)
        ae = AE(ae_title=config.ae_title)
        ae.maximum_associations = config.max_associations
        ae.maximum_pdu_size = config.max_pdu
        ae.acse_timeout = config.acse_timeout
        ae.dimse_timeout = config.dimse_timeout
        ae.network_timeout = config.network_timeout
        # The acceptor may support any number of contexts (the 128 limit is per request):
        # accept every storage class, and let selection skip what is not a chest X-ray.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.ae = ae
        self.server = None
        self.port: int | None = None

    def apply_policy(self, config: ScpConfig) -> None:
        """Allow-lists can change while running (SIGHUP); associations in flight keep going."""
        networks = [ipaddress.ip_network(peer, strict=False) for peer in config.allowed_peers]
        with self._policy_lock:
            self._any_aet = "*" in config.allowed_calling_aets
            self._aets = {aet for aet in config.allowed_calling_aets if aet != "*"}
            self._networks = networks
            self.max_instance_bytes = config.max_instance_bytes

    def start(self) -> int:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # As AE.start_server(block=False) does, but keeping the thread so health checks can
        # see whether the listener is really serving.
        self.server = self.ae.make_server((self.config.bind, self.config.port),
                                          evt_handlers=handlers,
                                          server_class=ThreadedAssociationServer)
        self.ae._servers.append(self.server)  # noqa: SLF001 - server.shutdown() expects it
        self._thread = threading.Thread(target=self.server.serve_forever, name="xrvd-scp",
                                        daemon=True)
        self._thread.start()
        self.port = self.server.server_address[1]
        if not self._any_aet and not self._aets:
            self.log.warning("scp.no_callers_allowed",
                             detail="scp.allowed_calling_aets is empty: every association "
                             "will be rejected until you list the modalities and PACS")
        self.log.info("scp.listening", ae_title=self.config.ae_title, bind=self.config.bind,
                      port=self.port)
        return self.port

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop accepting, let associations in flight finish for a while, then abort them."""
        if self.server is None:
            return
        self.server.shutdown()
        self._thread.join(timeout=10)
        deadline = time.monotonic() + drain_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            for assoc in self.ae.active_associations:
                assoc.join(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
        for assoc in self.ae.active_associations:
            self.log.warning("association.aborted", reason="shutdown",
                             calling_aet=assoc.requestor.ae_title)
            assoc.abort()
        self.server = None
        self.log.info("scp.stopped")

    def alive(self) -> bool:
        return self.server is not None and self._thread.is_alive()

    # --- handlers -----------------------------------------------------------------------

    @staticmethod
    def _key(assoc) -> str:
        return f"assoc-{id(assoc)}"

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        address = assoc.requestor.address
        with self._policy_lock:
            aet_ok = self._any_aet or calling in self._aets
            try:
                peer_ok = not self._networks or any(
                    ipaddress.ip_address(address) in net for net in self._networks)
            except ValueError:
                peer_ok = False
        if not aet_ok:
            self.log.warning("association.rejected", calling_aet=calling, peer=address,
                             reason="calling_aet_not_allowed")
            self._reject(assoc, REJECT_CALLING_AET)
        elif not peer_ok:
            self.log.warning("association.rejected", calling_aet=calling, peer=address,
                             reason="peer_not_allowed")
            self._reject(assoc, REJECT_NO_REASON)

    @staticmethod
    def _reject(assoc, result_source_reason: tuple[int, int, int]) -> None:
        # As pynetdicom's own rejection does: the kill waits until the A-ASSOCIATE-RJ is
        # sent, or the socket would close first and the peer would see an abort.
        assoc.acse.send_reject(*result_source_reason)
        assoc.kill()

    def _on_established(self, event) -> None:
        self.store.association_opened(self._key(event.assoc))
        self.log.info("association.accepted", calling_aet=event.assoc.requestor.ae_title,
                      peer=event.assoc.requestor.address)

    def _on_closed(self, event) -> None:
        self.store.association_closed(self._key(event.assoc))

    def _on_store(self, event) -> Dataset | int:
        started = time.perf_counter()
        path = Path(event.dataset_path)
        calling = event.assoc.requestor.ae_title
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        failure = _IncomingFile.failures.pop(str(path), None)
        if failure is not None:
            path.unlink(missing_ok=True)
            metrics.REFUSED.labels(StoreError.reason).inc()
            self.log.error("instance.refused", reason=StoreError.reason,
                           detail=f"cannot write to {self.store.incoming}: "
                           f"{failure.strerror or failure}; free space there",
                           sop_instance_uid=sop_uid, calling_aet=calling)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot store the instance now")
        size = path.stat().st_size
        if size > self.max_instance_bytes:
            metrics.REFUSED.labels("too_large").inc()
            self.log.warning("instance.refused", reason="too_large", size=size,
                             limit=self.max_instance_bytes, sop_instance_uid=sop_uid,
                             calling_aet=calling)
            return _status(STATUS_OUT_OF_RESOURCES,
                           f"instance of {size} bytes exceeds the limit")
        source = f"scp:{calling}@{event.assoc.requestor.address}"
        try:
            outcome = self.store.store_file(path, source=source, move=True,
                                            association=self._key(event.assoc))
        except NotStorableError as exc:
            metrics.REFUSED.labels(exc.reason).inc()
            self.log.warning("instance.refused", reason=exc.reason, detail=str(exc),
                             sop_instance_uid=sop_uid, calling_aet=calling)
            return _status(STATUS_CANNOT_UNDERSTAND, str(exc))
        except StoreError as exc:
            metrics.REFUSED.labels(exc.reason).inc()
            self.log.error("instance.refused", reason=exc.reason, detail=str(exc),
                           sop_instance_uid=sop_uid, calling_aet=calling)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot store the instance now")
        name = "instance.duplicate" if outcome.status == "duplicate" else "instance.stored"
        (metrics.DUPLICATES if outcome.status == "duplicate"
         else metrics.RECEIVED.labels("scp")).inc()
        self.log.info(name, sop_instance_uid=sop_uid, study_instance_uid=outcome.study_uid,
                      status=outcome.status, size=size, calling_aet=calling,
                      duration_s=round(time.perf_counter() - started, 4))
        if outcome.skipped:
            self.log.info("instance.skipped", sop_instance_uid=sop_uid,
                          study_instance_uid=outcome.study_uid, reason=outcome.skipped,
                          detail="arrived after the study was reported; no re-run")
        return STATUS_SUCCESS
