"""Sending a report to a destination (xrvd/deliver.py): by C-STORE over TLS to a peer with a
certificate for 127.0.0.1, trusted or not. Delivery by the running daemon (retries, several
destinations, SR flavours) is tested in tests/commands/test_serve_delivery.py."""

from __future__ import annotations

import subprocess

import pydicom
from pynetdicom import AE, evt

from xrvd.config import Destination
from xrvd.deliver import send_report
from xrvd.report.build import build_report

from .harness import NIH_SC, report_identity, require_tool, scores_for


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
        source = pydicom.dcmread(NIH_SC, stop_before_pixels=True)
        report = build_report([source], scores_for([source], "densenet121-res224-nih"),
                              report_identity("densenet121-res224-nih"), 0.5)
        path = tmp_path / "sr.dcm"
        report.save_as(path, enforce_file_format=True)
        peer = {"name": "tls", "ae_title": "PACS", "host": "127.0.0.1",
                "port": server.server_address[1]}
        stored, detail = send_report(str(path), Destination(**peer, tls={"ca_file": cert}), 10)
        assert stored, detail
        assert [ds.SOPInstanceUID for ds in received] == [report.SOPInstanceUID]
        other_ca = tmp_path / "other.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=other", "-keyout", str(tmp_path / "k2.pem"),
                        "-out", str(other_ca)], check=True, capture_output=True)
        stored, detail = send_report(str(path), Destination(**peer, tls={"ca_file": other_ca}),
                                     10)
        assert not stored and len(received) == 1
    finally:
        server.shutdown()
