"""The bounded DICOM receive (xrvd/ingest/net.py) against attackers and careless peers, and
against stock pynetdicom: the same associations and the same bytes, with nothing in pynetdicom
or pydicom replaced for the whole process."""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
import threading
import time
from io import BytesIO

import pydicom
from pydicom.filewriter import dcmwrite
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from xrvd.store.records import content_digest

from ..harness import WG04_CR, reasons, require_tool

A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _closed_by_peer(sock: socket.socket, timeout: float = 30) -> bool:
    """True once xrvd closes the connection (bounded wait: a failure, not a sync)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass  # an A-ASSOCIATE-RJ or A-ABORT may come first
        return True
    except (TimeoutError, ConnectionResetError) as exc:
        return isinstance(exc, ConnectionResetError)


def test_announced_association_requests_allocate_nothing(listener, events):
    """10 peers announce 1 GiB association requests: each is refused from its header, and
    the process's memory stays where it was (a reader that allocates the announced length
    takes ~1 GB per peer)."""
    server = listener()
    idle = _rss_bytes()
    peers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    for peer in peers:
        peer.sendall(struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 1 << 30))
    try:
        assert all(_closed_by_peer(peer) for peer in peers)
        assert _rss_bytes() - idle < 50 * 2**20
    finally:
        for peer in peers:
            peer.close()
    assert reasons(events, "connection.dropped") == ["pdu_too_large"] * 10


def test_a_pdu_longer_than_the_negotiated_maximum_ends_the_association(listener, events):
    server = listener(max_pdu=16384)
    ae = AE(ae_title="TEST")
    ae.add_requested_context(Verification)
    idle = _rss_bytes()
    assoc = ae.associate("127.0.0.1", server.port, ae_title="XRVD")
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", P_DATA_TF, 0, 1 << 30))
    assoc.join(30)  # xrvd closes the connection: the requestor's association ends
    assert not assoc.is_established
    assert _rss_bytes() - idle < 50 * 2**20
    assert reasons(events, "connection.dropped") == ["pdu_too_large"]


def test_a_silent_peer_is_dropped_after_the_network_timeout(listener, events):
    server = listener(network_timeout=0.5)
    peer = socket.create_connection(("127.0.0.1", server.port))
    peer.sendall(b"\x01\x00\x00")  # the start of a PDU header, then nothing
    try:
        assert _closed_by_peer(peer)
    finally:
        peer.close()
    assert reasons(events, "connection.dropped") == ["timeout"]


def test_a_trickling_pdu_is_dropped_after_the_network_timeout(listener, events):
    """An established association whose next PDU arrives a byte at a time: the whole PDU
    must arrive within scp.network_timeout of its first byte."""
    server = listener(network_timeout=0.5)
    ae = AE(ae_title="TEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="XRVD")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", P_DATA_TF, 0, 100))
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.1):
            try:
                raw.send(b"\x00")
            except OSError:
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        assoc.join(30)
        assert not assoc.is_established
    finally:
        stop.set()
        sender.join()
    assert reasons(events, "connection.dropped") == ["timeout"]


def test_stalled_peers_do_not_lock_out_a_sender(listener, events):
    """20 peers that send the first bytes of a PDU header and stop (twice
    scp.max_associations): DCMTK's echoscu still gets through."""
    echoscu = require_tool("echoscu", "dcmtk")
    server = listener(max_associations=10)
    stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    try:
        for peer in stalled:
            peer.sendall(b"\x01\x00\x00")
        done = subprocess.run([echoscu, "-aec", "XRVD", "127.0.0.1", str(server.port)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    finally:
        for peer in stalled:
            peer.close()
    assert "evicted" in reasons(events, "connection.dropped")


def test_an_abandoned_data_set_leaves_no_file(listener):
    """A sender that goes away in the middle of an instance: its partial file is removed
    when the association ends, not at the next start."""
    server = listener()
    ds = pydicom.dcmread(WG04_CR)
    ae = AE(ae_title="TEST")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="XRVD")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, \
        ds.SOPInstanceUID
    encoded = BytesIO()
    dcmwrite(encoded, ds, enforce_file_format=False)
    request.DataSet = BytesIO(encoded.getvalue()[ds.file_meta.FileMetaInformationGroupLength
                                                 + 144:])
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = message.encode_msg(assoc.accepted_contexts[0].context_id,
                                   assoc.acceptor.maximum_length)
    for _ in range(4):  # the command and some of the data set
        assoc.dul.send_pdu(next(fragments))
    incoming = server.store.incoming
    deadline = time.monotonic() + 30
    while not list(incoming.iterdir()):  # bounded wait for the server to start the file
        assert time.monotonic() < deadline, "the partial instance never reached the SCP"
        threading.Event().wait(0.01)
    assoc.abort()
    for acceptor in server.ae.active_associations:
        acceptor.join(30)
    assert list(incoming.iterdir()) == []


def test_same_associations_and_bytes_as_stock_pynetdicom(listener, tmp_path):
    """The same AE served by pynetdicom's own server: the same contexts are accepted for
    the same proposal, and the data set stored is byte for byte the one received."""
    server = listener()
    received = {}

    def keep(event):
        received["digest"] = hashlib.sha256(event.request.DataSet.getvalue()).hexdigest()
        return 0x0000

    stock = server.ae.start_server(("127.0.0.1", 0), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, keep)])
    ds = pydicom.dcmread(WG04_CR)
    proposal = AE(ae_title="TEST")
    proposal.add_requested_context(ComputedRadiographyImageStorage,
                                   [pydicom.uid.JPEG2000, ds.file_meta.TransferSyntaxUID])
    proposal.add_requested_context(Verification)
    proposal.add_requested_context("1.2.3.4.5.6")  # nobody's SOP class: rejected
    accepted = {}
    try:
        for name, port in (("stock", stock.server_address[1]), ("xrvd", server.port)):
            assoc = proposal.associate("127.0.0.1", port, ae_title="XRVD")
            assert assoc.is_established
            accepted[name] = sorted((cx.abstract_syntax, cx.transfer_syntax[0], cx.result)
                                    for cx in assoc.accepted_contexts)
            assert assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
    finally:
        stock.shutdown()
    assert accepted["stock"] == accepted["xrvd"]
    [spooled] = server.store.spool.glob("??/*.dcm")
    assert content_digest(spooled) == received["digest"]


def test_no_library_is_patched_for_the_process(listener):
    import tempfile

    from pydicom.uid import UID
    from pynetdicom import _config, dimse_messages
    from pynetdicom.transport import AssociationSocket

    listener()  # an SCP made and running changes nothing outside its own objects
    assert AssociationSocket.recv.__module__ == "pynetdicom.transport"
    assert "__deepcopy__" not in vars(UID)
    assert dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile
    assert _config.STORE_RECV_CHUNKED_DATASET is False
