"""Bounded DICOM receive for xrvd's own AE: what a peer can make the listener spend is
bounded before it is spent. Installed per server through pynetdicom's hooks (a server class,
a request handler, a socket and a DIMSE provider of our own for each association), never by
replacing anything in pynetdicom or pydicom for the whole process.

- Connections: a connection is 'pending' from accept until its whole A-ASSOCIATE-RQ is in.
  At most `max_pending` are; a new one evicts the one that has waited longest, so silent or
  slow peers cannot starve senders that talk. Only then is it an association, counted by
  pynetdicom against `max_associations`.
- Time: the association request must arrive within `network_timeout` of the connection, and
  each PDU within `network_timeout` of its first byte (pynetdicom's idle timer covers the
  time between PDUs).
- Memory: a PDU longer than the negotiated maximum (`max_pdu`; 1 MiB for the association
  request) is refused from its header, and a PDU is read in bounded chunks as its bytes
  arrive, never allocated from the length a peer announces. Command sets and data sets other
  than C-STORE's are held in memory only up to a small limit; C-STORE data sets stream to a
  bounded file (incoming.py).
"""

from __future__ import annotations

import copy
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from .incoming import Incoming, IncomingFile

A_ASSOCIATE_RQ = 0x01
# The association request has no negotiated maximum: 128 presentation contexts with a dozen
# transfer syntaxes each take under 200 KB.
MAX_ASSOCIATE_RQ = 1 << 20
# Command sets are a few hundred bytes; data sets of the non-storage messages we answer
# (none today) are identifiers of a few KB.
MAX_COMMAND_SET = 64 << 10
MAX_OTHER_DATA_SET = 1 << 20
_CHUNK = 256 << 10
# What xrvd's own associations announce as their maximum PDU (where a source sets none).
REQUESTOR_MAX_PDU = 64 << 10


@dataclass(frozen=True)
class NetLimits:
    max_pdu: int
    network_timeout: float
    max_pending: int


# Called as on_drop(peer address, reason code, detail) for every connection the bounds end.
DropHandler = Callable[[str, str, str], None]


class PeerDropped(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


def _read_exactly(sock: socket.socket, count: int, deadline: float, reason: str) -> bytearray:
    """count bytes, read in bounded chunks as they arrive, all by the deadline (a peer that
    trickles a byte now and then is dropped as surely as a silent one)."""
    buffer = bytearray(min(count, _CHUNK))
    view = memoryview(buffer)
    received = 0
    while received < count:
        if received == len(buffer):
            buffer.extend(bytes(min(count - received, _CHUNK)))
            view = memoryview(buffer)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerDropped("timeout", f"{reason}: {received} of {count} bytes arrived "
                              "within scp.network_timeout")
        sock.settimeout(remaining)
        try:
            got = sock.recv_into(view[received:], len(buffer) - received)
        except TimeoutError:
            continue  # the loop's deadline check says so
        if not got:
            raise PeerDropped("closed", f"{reason}: the peer closed the connection after "
                              f"{received} of {count} bytes")
        received += got
    return buffer


def read_associate_request(sock: socket.socket, deadline: float) -> bytes:
    """The whole first PDU of a connection, which must be an A-ASSOCIATE-RQ of bounded size."""
    header = _read_exactly(sock, 6, deadline, "association request header")
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != A_ASSOCIATE_RQ:
        raise PeerDropped("not_association_request",
                          f"the first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ")
    if length > MAX_ASSOCIATE_RQ:
        raise PeerDropped("pdu_too_large", f"association request of {length} bytes announced; "
                          f"at most {MAX_ASSOCIATE_RQ} are accepted")
    return bytes(header) + bytes(_read_exactly(sock, length, deadline, "association request"))


def tls_handshake(sock: socket.socket, context: ssl.SSLContext, deadline: float,
                  started: Callable[[ssl.SSLSocket], None] = lambda _secure: None
                  ) -> ssl.SSLSocket:
    """The server side of the TLS handshake, done in the connection's own thread within the
    deadline (pynetdicom's server does it in the thread that accepts every connection, where
    one silent peer would hold up all others). `started` learns the TLS socket, which
    replaces `sock` (then detached) and is the caller's to close, before the handshake."""
    secure = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    started(secure)
    secure.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        secure.do_handshake()
    except BaseException as exc:
        raise _handshake_failure(exc) from None
    return secure


def _handshake_failure(exc: BaseException) -> BaseException:
    if isinstance(exc, TimeoutError):
        return PeerDropped("timeout", "the TLS handshake did not finish within "
                           "scp.network_timeout")
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = "tls_certificate_expired" if exc.verify_code == _X509_CERT_HAS_EXPIRED \
            else "tls_certificate_untrusted"
        return PeerDropped(reason, f"client certificate refused: {exc.verify_message} (its "
                           "issuer must be in scp.tls.ca_file, and it must be valid now)")
    if isinstance(exc, ssl.SSLError):
        return PeerDropped(*_tls_failure(exc))
    if isinstance(exc, OSError):
        return PeerDropped("tls_handshake_failed", f"the peer left during the TLS handshake "
                           f"({exc.strerror or exc}); it may not trust xrvd's certificate")
    return exc


_X509_CERT_HAS_EXPIRED = 10
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "HTTPS_PROXY_REQUEST",
            "UNEXPECTED_RECORD", "RECORD_LAYER_FAILURE"}


def _tls_failure(exc: ssl.SSLError) -> tuple[str, str]:
    if exc.reason in _NOT_TLS:
        return "tls_not_tls", ("the peer did not start a TLS handshake: a plain DICOM client "
                               "on the TLS port? Give it TLS, or use the plain port")
    if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "tls_no_client_certificate", ("the peer sent no client certificate, and "
                                             "scp.tls requires one")
    if exc.reason and "ALERT" in exc.reason:
        return "tls_handshake_failed", (f"the peer ended the TLS handshake ({exc.reason}); it "
                                        "may not trust xrvd's certificate or its CA")
    return "tls_handshake_failed", f"TLS handshake failed: {exc.reason or exc}"


class BoundedSocket(AssociationSocket):
    """An acceptor's socket that starts with the association request already read (as the
    server's gate checked it), or a requestor's (client_socket None: it connects to
    `address`), that bounds every PDU the peer sends in size and time."""

    def __init__(self, assoc, client_socket: socket.socket | None, first_pdu: bytes,
                 limits: NetLimits, on_drop: DropHandler, peer: str, address=None):
        if client_socket is None:
            super().__init__(assoc, address=address)
        else:
            super().__init__(assoc, client_socket=client_socket)
        self._first = memoryview(first_pdu)
        self._limits = limits
        self._on_drop = on_drop
        self._peer = peer

    def _create_socket(self, address):
        sock = super()._create_socket(address)
        # A request goes out as a command PDU and then a data set PDU; with Nagle's algorithm
        # the second waits for the peer's delayed ACK of the first (40 ms on Linux): half of
        # every C-FIND's time against Orthanc on loopback.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    @property
    def ready(self) -> bool:
        return bool(self._first) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        if self._first:
            served, self._first = self._first[:nr_bytes], self._first[nr_bytes:]
            return bytearray(served)
        try:
            # The DUL reads a 6-byte header, then the length it announces: refusing that
            # length here refuses the PDU before any of it is read or allocated.
            if nr_bytes > max(self._limits.max_pdu, 6):
                raise PeerDropped("pdu_too_large", f"a PDU of {nr_bytes} bytes announced; the "
                                  f"negotiated maximum is {self._limits.max_pdu} (scp.max_pdu)")
            deadline = time.monotonic() + self._limits.network_timeout
            return _read_exactly(self.socket, nr_bytes, deadline, "PDU")
        except PeerDropped as exc:
            if exc.reason == "closed":
                return bytearray()  # as stock recv: fewer bytes when the peer has closed
            self._on_drop(self._peer, exc.reason, str(exc))
            # pynetdicom takes an OSError from recv as the connection closing (Evt17).
            raise OSError(str(exc)) from None


class _CappedBuffer(BytesIO):
    def __init__(self, limit: int, what: str):
        super().__init__()
        self._limit = limit
        self._what = what

    def write(self, data) -> int:
        if self.tell() + len(data) > self._limit:
            # Raised inside pynetdicom's reactor, which aborts the association.
            raise OSError(f"the peer's {self._what} is longer than {self._limit} bytes")
        return super().write(data)


class BoundedDimse(DIMSEServiceProvider):
    """A DIMSE provider whose messages are bounded while they arrive: a C-STORE data set
    streams to a file from `incoming`, anything else is held in memory up to a small limit.

    pynetdicom decodes a message's command set and then turns the message object into the
    message's own class (C_STORE_RQ, ...), whose decode_msg appends the data set fragments to
    `_data_set_file` or `data_set`; so the bounded sinks are put in place the moment the
    command set is decoded, handing pynetdicom one PDV at a time."""

    def __init__(self, assoc, incoming: Incoming | None):
        super().__init__(assoc)
        self._incoming = incoming  # None: this association takes no C-STORE

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            if self.message is None:
                self.message = DIMSEMessage()
                self.message.encoded_command_set = _CappedBuffer(MAX_COMMAND_SET, "command set")
            message = self.message
            decoding_command = type(message) is DIMSEMessage
            single = P_DATA()
            single.presentation_data_value_list = [[context_id, data]]
            super().receive_primitive(single)  # resets self.message once it is complete
            if decoding_command and self.message is message \
                    and type(message) is not DIMSEMessage:
                self._open_data_set(message, context_id)

    def _open_data_set(self, message: DIMSEMessage, context_id: int) -> None:
        if message._data_set_file is not None:  # noqa: SLF001 - pynetdicom's own chunked mode
            message._data_set_file.close()  # noqa: SLF001
            Path(message._data_set_file.name).unlink(missing_ok=True)  # noqa: SLF001
        if not isinstance(message, C_STORE_RQ) or self._incoming is None:
            message.data_set = _CappedBuffer(MAX_OTHER_DATA_SET, "data set")
            return
        incoming = self._incoming.open()
        message._data_set_file = incoming  # noqa: SLF001 - where decode_msg streams to
        message._data_set_path = Path(incoming.name)  # noqa: SLF001
        # As pynetdicom's chunked receive writes it: preamble and file meta, then the data.
        command = message.command_set
        head = BytesIO()
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, create_file_meta(
            sop_class_uid=command.AffectedSOPClassUID,
            sop_instance_uid=command.AffectedSOPInstanceUID,
            transfer_syntax=self.assoc._accepted_cx[context_id].transfer_syntax[0]))  # noqa: SLF001
        incoming.write(head.getvalue())

    def abandon(self) -> None:
        """The association ended before the data set was complete: nobody will take it."""
        partial = getattr(self.message, "_data_set_file", None)
        if isinstance(partial, IncomingFile):
            partial.abandon()


class RequestorAE(AE):
    """xrvd's AE for the associations it opens (a PACS it queries and retrieves from, a
    destination, a C-ECHO): what the peer sends is bounded as on xrvd's listener (each PDU in
    size and time, command sets and data sets in memory; C-STORE data sets of a C-GET stream
    to bounded spool files from `incoming`, and without it a C-STORE is refused like any
    over-long data set), through pynetdicom's socket hook for this AE's associations only.
    `max_pdu` is what it announces, and so the longest PDU the peer may send."""

    def __init__(self, ae_title: str, *, timeout: float, peer: str,
                 max_pdu: int = REQUESTOR_MAX_PDU, incoming: Incoming | None = None):
        super().__init__(ae_title=ae_title)
        self.acse_timeout = self.dimse_timeout = self.network_timeout = timeout
        self.connection_timeout = timeout
        self._max_pdu = max_pdu
        self._limits = NetLimits(max_pdu=max_pdu, network_timeout=timeout, max_pending=1)
        self._incoming = incoming
        self._peer = peer
        self.dropped: tuple[str, str] | None = None  # (reason, detail) when a bound ended it

    def associate(self, addr, port, **kwargs):
        kwargs["max_pdu"] = self._max_pdu  # the bound is the maximum announced
        return super().associate(addr, port, **kwargs)

    def _create_socket(self, assoc, address, tls_args):
        assoc.dimse = BoundedDimse(assoc, self._incoming)
        sock = BoundedSocket(assoc, None, b"", self._limits, self._on_drop, self._peer,
                             address=address)
        sock.tls_args = tls_args
        return sock

    def _on_drop(self, peer: str, reason: str, detail: str) -> None:
        self.dropped = (reason, detail)


def abandon_partial(assoc) -> None:
    """Remove the incoming file of a data set the peer never finished (EVT_CONN_CLOSE)."""
    dimse = getattr(assoc, "dimse", None)
    if isinstance(dimse, BoundedDimse):
        dimse.abandon()


def _contexts_copy(contexts):
    """What pynetdicom's deepcopy of the supported contexts is for (negotiation sets each
    copy's id, result and roles), without its cost: deepcopy validates every UID again with a
    regular expression, 13 ms per association for ~170 storage contexts. UIDs are immutable
    strings and are shared; the lists that negotiation may change are copied."""
    copies = []
    for context in contexts:
        clone = copy.copy(context)
        for name, value in vars(context).items():
            if isinstance(value, list):
                setattr(clone, name, list(value))
        copies.append(clone)
    return copies


class BoundedRequestHandler(RequestHandler):
    server: BoundedAssociationServer

    def handle(self) -> None:
        server = self.server
        peer = str(self.client_address[0])
        deadline = time.monotonic() + server.limits.network_timeout
        sock = self.request

        def handshake_started(secure: ssl.SSLSocket) -> None:
            nonlocal sock
            sock = secure
            server.replace_pending(self.request, secure)

        try:
            if server.tls is not None:
                tls_handshake(sock, server.tls, deadline, handshake_started)
            first_pdu = read_associate_request(sock, deadline)
        except (PeerDropped, OSError) as exc:
            reason = exc.reason if isinstance(exc, PeerDropped) else "closed"
            if not server.forget_pending(self.request):
                reason = "evicted"  # the gate closed it to make room for a newer connection
            server.on_drop(peer, reason, str(exc))  # logged before the peer sees the close
            server.shutdown_request(sock)
            return
        finally:
            server.left_gate()
        server.forget_pending(self.request)
        sock.settimeout(None)
        assoc = self._create_association_with(sock, first_pdu, peer)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()

    def _create_association_with(self, sock: socket.socket, first_pdu: bytes, peer: str):
        """As pynetdicom's RequestHandler._create_association, with our socket, DIMSE
        provider and contexts copy."""
        from pynetdicom.association import Association

        server = self.server
        assoc = Association(self.ae, "acceptor")
        assoc._server = server  # noqa: SLF001 - pynetdicom finds a server's associations by it
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.dimse = BoundedDimse(assoc, server.incoming)
        assoc.set_socket(BoundedSocket(assoc, sock, first_pdu, server.limits, server.on_drop,
                                       peer))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = _contexts_copy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event in server._handlers:  # noqa: SLF001 - as pynetdicom binds them
            if event.is_intervention and server._handlers[event]:  # noqa: SLF001
                assoc.bind(event, *server._handlers[event])  # noqa: SLF001
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in server._handlers[event]:  # noqa: SLF001
                    assoc.bind(event, handler, args)
        return assoc


class BoundedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a gate in front of association negotiation."""

    daemon_threads = True

    def __init__(self, ae, address, ae_title, contexts, evt_handlers=None, *,
                 limits: NetLimits, incoming: Incoming, on_drop: DropHandler,
                 tls: ssl.SSLContext | None = None):
        self.tls = tls  # handshakes happen in the connections' threads, not at accept
        self.limits = limits
        self.incoming = incoming
        self.on_drop = on_drop
        # accepted socket -> the socket to close to evict it (its TLS socket once wrapped)
        self._pending: OrderedDict[socket.socket, socket.socket] = OrderedDict()
        self._pending_lock = threading.Lock()
        # Connections whose thread is still at the gate (handshake, association request),
        # until their outcome is logged: stop() waits for them, so that a stop after a peer
        # was turned away finds its event logged (the peer may see a TLS alert before that).
        self._at_gate = 0
        self._gate_done = threading.Condition()
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers,
                         request_handler=BoundedRequestHandler)

    def process_request(self, request, client_address) -> None:
        evicted = None
        with self._pending_lock:
            if len(self._pending) >= self.limits.max_pending:
                _, evicted = self._pending.popitem(last=False)
            self._pending[request] = request
        with self._gate_done:
            self._at_gate += 1
        if evicted is not None:
            try:
                evicted.shutdown(socket.SHUT_RDWR)  # its reader wakes up and drops it
            except OSError:
                pass
        super().process_request(request, client_address)

    def replace_pending(self, request, current: socket.socket) -> None:
        with self._pending_lock:
            if request in self._pending:
                self._pending[request] = current

    def forget_pending(self, request) -> bool:
        """False when the connection was no longer pending (the gate evicted it)."""
        with self._pending_lock:
            return self._pending.pop(request, None) is not None

    def left_gate(self) -> None:
        with self._gate_done:
            self._at_gate -= 1
            self._gate_done.notify_all()

    def wait_for_gate(self, timeout: float) -> bool:
        """Wait until no connection is at the gate; False if some still are at `timeout`."""
        with self._gate_done:
            return self._gate_done.wait_for(lambda: self._at_gate <= 0, timeout)

    def pending_count(self) -> int:
        with self._pending_lock:
            return len(self._pending)
