"""Sending a report to a destination (xrvd/deliver.py): by C-STORE over TLS to a peer with a
certificate for 127.0.0.1, trusted or not; a destination whose reply announces a PDU longer
than xrvd offered is dropped before a byte of it is read. Delivery by the running daemon (retries, several
destinations, SR flavours) is tested in tests/commands/test_serve_delivery.py."""

from __future__ import annotations

import subprocess

import pydicom
from pynetdicom import AE, evt

from xrvd.config import Destination
from xrvd.deliver import send_report
from xrvd.ingest.net import RequestorAE
from xrvd.report.build import build_report

from .harness import NIH_SC, report_identity, require_tool, scores_for


def written_report(tmp_path):
    """A report on the NIH image, and the file it was saved to."""
    source = pydicom.dcmread(NIH_SC, stop_before_pixels=True)
    report = build_report([source], scores_for([source], "densenet121-res224-nih"),
                          report_identity("densenet121-res224-nih"), 0.5)
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    return report, path


def test_delivery_over_tls(tmp_path):
    """A TLS peer with a certificate for 127.0.0.1: the report is sent when the CA is
    trusted, and refused when it is not."""
    import ssl

    openssl = require_tool("openssl", "openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(cert), str(key))
    received = []
    ae = AE(ae_title="PACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.34")
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_context,
                             evt_handlers=[(evt.EVT_C_STORE,
                                            lambda e: received.append(e.dataset) or 0)])
    try:
        report, path = written_report(tmp_path)
        peer = {"name": "tls", "ae_title": "PACS", "host": "127.0.0.1",
                "port": server.server_address[1]}
        stored, detail = send_report(str(path), Destination(**peer, tls={"ca_file": cert}), 10,
                                     requestor=RequestorAE)
        assert stored, detail
        assert [ds.SOPInstanceUID for ds in received] == [report.SOPInstanceUID]
        other_ca = tmp_path / "other.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=other", "-keyout", str(tmp_path / "k2.pem"),
                        "-out", str(other_ca)], check=True, capture_output=True)
        stored, detail = send_report(str(path), Destination(**peer, tls={"ca_file": other_ca}),
                                     10, requestor=RequestorAE)
        assert not stored and len(received) == 1
    finally:
        server.shutdown()


def test_a_destination_announcing_an_endless_reply_is_dropped_before_reading_it(tmp_path):
    """A peer that answers the association request with a PDU announcing 1 GiB: xrvd's
    requestor refuses it from its header (stock pynetdicom would read towards it)."""
    import socket
    import struct
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    closed = threading.Event()

    def peer():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)  # the A-ASSOCIATE-RQ
            connection.sendall(b"\x02\x00" + struct.pack(">I", 1 << 30) + b"\x00" * 4096)
            connection.settimeout(30)
            while connection.recv(65536):  # until xrvd closes its end
                pass
        closed.set()

    thread = threading.Thread(target=peer)
    thread.start()
    made = []

    def requestor(*args, **kwargs):
        made.append(RequestorAE(*args, **kwargs))
        return made[-1]

    try:
        _, path = written_report(tmp_path)
        destination = Destination(name="liar", ae_title="PACS", host="127.0.0.1",
                                  port=listener.getsockname()[1])
        stored, detail = send_report(str(path), destination, 10, requestor=requestor)
        assert not stored and "no association" in detail
        assert made[0].dropped[0] == "pdu_too_large"
        assert closed.wait(30)
    finally:
        thread.join(30)
        listener.close()
