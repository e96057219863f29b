"""C-STORE SCP: receives instances and hands each one to the store.

Received data sets are written by pynetdicom straight to a temporary file in the spool's
`.incoming` folder (never held whole in memory); the store fsyncs, renames and journals it,
and only then does the C-STORE response say 0x0000. Callers are checked at association time
against an allow-list of calling AE titles and, optionally, peer networks.
"""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
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
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from ..config import ScpConfig
from ..fsutil import DiskReserve
from .. import metrics
from . import note_skipped
from ..log import get_logger
from ..store import NotStorableError, Store, StoreError
from .incoming import Incoming
from .net import BoundedAssociationServer, NetLimits, abandon_partial
from .policy import PeerPolicy, tls_context

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
    JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0xC211

# What the sender's log shows (64 characters at most); the event has the whole detail.
_REFUSAL_COMMENTS = {
    "disk_low": "receiver low on disk space; send again later",
    "too_large": "instance larger than the receiver accepts",
    "store_failed": "cannot store the instance now",
}


def _client_certificate(assoc) -> dict:
    """Who the TLS client certificate says the sender is, for the accepted event."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return {}
    subject = dict(item for part in (sock.getpeercert() or {}).get("subject", ())
                   for item in part)
    return {"tls": True, "client_certificate": subject.get("commonName")}


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class StorageSCP:
    def __init__(self, config: ScpConfig, store: Store, reserve: DiskReserve | None = None):
        self.store = store
        self.log = get_logger(component="scp")
        # Received data sets stream into the spool's incoming folder, so that accepting an
        # instance is an fsync and a rename, never a copy.
        self.incoming = Incoming(store.incoming, config.max_instance_bytes, reserve)
        self.receiver = Receiver(
            store, self.incoming, self.log, kind="scp", association_key=self._key,
            source_of=lambda event: f"scp:{event.assoc.requestor.ae_title}@"
                                    f"{event.assoc.requestor.address}")
        self.apply_policy(config)
        self.config = config
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
        self._listeners: list[tuple[BoundedAssociationServer, threading.Thread]] = []
        self.port: int | None = None
        self.tls_port: int | None = None  # a second, TLS listener (scp.tls_port)

    def apply_policy(self, config: ScpConfig) -> None:
        """Allow-lists can change while running (SIGHUP); associations in flight keep going."""
        self.policy = PeerPolicy(config)
        self.incoming.max_bytes = config.max_instance_bytes

    def start(self) -> int:
        config = self.config
        secure = tls_context(config.tls) if config.tls is not None else None
        if secure is not None and config.tls_port is not None:
            self.port = self._listen(config.port, None)
            self.tls_port = self._listen(config.tls_port, secure)
        else:
            self.port = self._listen(config.port, secure)
        if self.policy.nobody_allowed:
            self.log.warning("scp.no_callers_allowed",
                             detail="scp.allowed_calling_aets and scp.peers are empty: every "
                             "association will be rejected until you list the modalities "
                             "and PACS")
        return self.port

    def _listen(self, port: int, secure: ssl.SSLContext | None) -> int:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # As AE.start_server(block=False) does, but keeping the thread so health checks can
        # see whether the listener is really serving, and with the bounded receive.
        limits = NetLimits(max_pdu=self.config.max_pdu,
                           network_timeout=self.config.network_timeout,
                           max_pending=self.config.max_pending)
        server = BoundedAssociationServer(
            self.ae, (self.config.bind, port), self.config.ae_title,
            self.ae.supported_contexts, evt_handlers=handlers, limits=limits,
            incoming=self.incoming, on_drop=self._on_dropped, tls=secure)
        self.ae._servers.append(server)  # noqa: SLF001 - server.shutdown() expects it
        thread = threading.Thread(target=server.serve_forever, name="xrvd-scp", daemon=True)
        thread.start()
        self._listeners.append((server, thread))
        bound = server.server_address[1]
        self.log.info("scp.listening", ae_title=self.config.ae_title, bind=self.config.bind,
                      port=bound, tls=secure is not None)
        return bound

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop accepting, let associations in flight finish for a while, then abort them."""
        if not self._listeners:
            return
        deadline = time.monotonic() + drain_seconds
        for server, thread in self._listeners:
            server.shutdown()
            thread.join(timeout=10)
        for server, _ in self._listeners:
            server.wait_for_gate(max(0.0, deadline - time.monotonic()))
        while self.ae.active_associations and time.monotonic() < deadline:
            for assoc in self.ae.active_associations:
                assoc.join(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
        for assoc in self.ae.active_associations:
            self.log.warning("association.aborted", reason="shutdown",
                             calling_aet=assoc.requestor.ae_title)
            assoc.abort()
        self._listeners = []
        self.log.info("scp.stopped")

    def alive(self) -> bool:
        return bool(self._listeners) and all(t.is_alive() for _, t in self._listeners)

    # --- handlers -----------------------------------------------------------------------

    @staticmethod
    def _key(assoc) -> str:
        return f"assoc-{id(assoc)}"

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        requested = assoc.requestor.primitive
        calling = requested.calling_ae_title.strip()
        verdict = self.policy.check(calling, requested.called_ae_title.strip(),
                                    assoc.requestor.address)
        if verdict.reason is not None:
            self.log.warning("association.rejected", calling_aet=calling,
                             called_aet=requested.called_ae_title.strip(),
                             peer=assoc.requestor.address, reason=verdict.reason,
                             detail=verdict.detail)
            self._reject(assoc, verdict.reject)

    @staticmethod
    def _reject(assoc, result_source_reason: tuple[int, int, int]) -> None:
        # As pynetdicom's own rejection does: the kill waits until the A-ASSOCIATE-RJ is
        # sent, or the socket would close first and the peer would see an abort.
        assoc.acse.send_reject(*result_source_reason)
        assoc.kill()

    def _on_established(self, event) -> None:
        self.store.association_opened(self._key(event.assoc))
        self.log.info("association.accepted", calling_aet=event.assoc.requestor.ae_title,
                      peer=event.assoc.requestor.address,
                      **_client_certificate(event.assoc))

    def _on_closed(self, event) -> None:
        abandon_partial(event.assoc)
        self.store.association_closed(self._key(event.assoc))

    def _on_dropped(self, peer: str, reason: str, detail: str) -> None:
        metrics.CONNECTIONS_DROPPED.labels(reason).inc()
        # A peer TLS did not let in is a rejected sender; the other bounds end connections.
        name = "association.rejected" if reason.startswith("tls_") else "connection.dropped"
        self.log.warning(name, peer=peer, reason=reason, detail=detail)

    def _on_store(self, event) -> Dataset | int:
        return self.receiver.on_store(event)


class Receiver:
    """What becomes of a data set a peer sends by C-STORE, to xrvd's listener or on a C-GET
    association of xrvd's: stored and journaled (or refused with a status saying why) before
    the response. `received(outcome, size)` is told of every instance stored."""

    def __init__(self, store: Store, incoming: Incoming, log, *, kind: str,
                 source_of, association_key, received=lambda outcome, size: None):
        self.store = store
        self.incoming = incoming
        self.log = log
        self.kind = kind  # the metrics' label: scp, retrieve
        self.source_of = source_of  # event -> the journal's source
        self.association_key = association_key
        self.received = received

    def on_store(self, event) -> Dataset | int:
        path = Path(event.dataset_path)
        try:
            return self._store(event, path)
        except Exception as exc:  # noqa: BLE001 - a handler error must not leak the file
            metrics.REFUSED.labels("internal_error").inc()
            self.log.error("instance.refused", reason="internal_error", error=repr(exc),
                           sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
                           calling_aet=event.assoc.requestor.ae_title)
            return _status(STATUS_PROCESSING_FAILURE, "internal error; see xrvd's log")
        finally:
            if path.parent == self.store.incoming:  # not moved into the spool
                path.unlink(missing_ok=True)

    def _store(self, event, path: Path) -> Dataset | int:
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        refusal = self.incoming.take_refusal(path)
        if refusal is not None:
            metrics.REFUSED.labels(refusal.reason).inc()
            self.log.error("instance.refused", reason=refusal.reason, detail=refusal.detail,
                           sop_instance_uid=sop_uid, calling_aet=calling)
            return _status(STATUS_OUT_OF_RESOURCES, _REFUSAL_COMMENTS[refusal.reason])
        size = path.stat().st_size
        source = self.source_of(event)
        try:
            outcome = self.store.store_file(path, source=source, move=True,
                                            association=self.association_key(event.assoc))
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
         else metrics.RECEIVED.labels(self.kind)).inc()
        self.log.info(name, sop_instance_uid=sop_uid, study_instance_uid=outcome.study_uid,
                      status=outcome.status, size=size, calling_aet=calling,
                      duration_s=round(time.perf_counter() - started, 4))
        note_skipped(self.log, outcome)
        self.received(outcome, size)
        return STATUS_SUCCESS
