"""web.py: a DICOMweb peer's replies are read through bounds (bytes in all, bytes per part,
seconds per window), and what passes the bounds reads exactly as through a plain session."""

from __future__ import annotations

import http.server
import io
import threading
import time

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from xrvd.web import (
    WINDOW_BYTES,
    Bounds,
    BoundedSession,
    ResponseTooLarge,
    ResponseTooSlow,
    describe_http_error,
)

from .harness import NIH_SC, RSNA_JPEG, TINY_CR

BOUNDARY = "xrvd-test-boundary"
INSTANCES = [path.read_bytes() for path in (TINY_CR, NIH_SC, RSNA_JPEG)]


def multipart(parts: list[bytes]) -> bytes:
    body = b""
    for part in parts:
        body += (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                 + part + b"\r\n")
    return body + f"--{BOUNDARY}--\r\n".encode()


class Peer(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server that behaves as the path says."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    hits: dict[str, int] = {}

    def do_GET(self):
        Peer.hits[self.path] = Peer.hits.get(self.path, 0) + 1
        if "/busy" in self.path:  # 503, as an overloaded archive answers
            self._head("text/plain", 0)
            return
        if "/noboundary" in self.path:  # multipart, but no boundary to find the parts by
            body = multipart(INSTANCES)
            self._head('multipart/related; type="application/dicom"', len(body))
            self.wfile.write(body)
            return
        if "/huge" in self.path:  # announces and sends far more than any bound
            self._head("application/json", 1 << 40)
            chunk = b" " * (1 << 20)
            try:
                while True:
                    self.wfile.write(chunk)
            except OSError:
                return
        if "/drip" in self.path:  # alive, but one byte at a time
            self._head("application/json", 1 << 20)
            try:
                while True:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                return
        body = multipart(INSTANCES)
        if "/chunked" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", f'multipart/related; type="application/dicom"; '
                             f'boundary="{BOUNDARY}"')
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 100_000):
                piece = body[start:start + 100_000]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self._head(f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
                   len(body))
        self.wfile.write(body)

    def _head(self, content_type: str, length: int) -> None:
        self.send_response(503 if "/busy" in self.path else 200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()


@pytest.fixture
def peer():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Peer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def series(session: requests.Session, url: str) -> list[str]:
    client = DICOMwebClient(url=url, session=session)
    return [str(ds.SOPInstanceUID) for ds in client.iter_series(
        study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
        media_types=(("application/dicom", "*"),))]


@pytest.mark.parametrize("path", ["", "/chunked"])
def test_a_reply_within_the_bounds_reads_as_through_a_plain_session(peer, path):
    expected = [str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID) for data in INSTANCES]
    with requests.Session() as plain:
        assert series(plain, peer + path) == expected
    bounded = BoundedSession(timeout=10)
    largest = max(len(data) for data in INSTANCES)
    with bounded.bounded(Bounds(total_bytes=len(multipart(INSTANCES)),
                                part_bytes=largest + 1024)):
        assert series(bounded, peer + path) == expected
    bounded.close()


@pytest.mark.parametrize("path", ["", "/chunked"])
def test_a_part_larger_than_an_instance_may_be_is_cut_off_before_it_is_whole(peer, path):
    session = BoundedSession(timeout=10)
    small = len(INSTANCES[0]) + 1024  # the first instance fits, the second does not
    with session.bounded(Bounds(total_bytes=1 << 30, part_bytes=small)), \
            pytest.raises(ResponseTooLarge, match="a part of the reply is larger"):
        series(session, peer + path)
    session.close()


def test_a_reply_larger_than_its_bound_is_cut_off_as_it_arrives(peer):
    session = BoundedSession(timeout=10)
    with session.bounded(Bounds(total_bytes=4 << 20)), \
            pytest.raises(ResponseTooLarge, match="larger than 4194304 bytes") as raised:
        session.get(peer + "/huge")  # not streamed: requests would read it all at once
    assert describe_http_error(raised.value)[:2] == ("too_large", False)
    session.close()


def test_a_json_reply_is_bounded_by_default(peer):
    session = BoundedSession(timeout=10)
    with pytest.raises(ResponseTooLarge, match="larger than"):
        session.get(peer + "/huge")
    session.close()


def test_a_drip_fed_reply_read_in_small_pieces_is_dropped_within_its_window(peer):
    """The window spans reads: requests reads a body 10 KiB at a time, and a server sending
    just under 10 KiB per timeout would otherwise never be too slow."""
    session = BoundedSession(timeout=0.5)
    response = session.get(peer + "/drip", stream=True)
    with pytest.raises(ResponseTooSlow):
        for _ in response.iter_content(chunk_size=2):  # a byte or two per read
            pass
    session.close()


def test_a_drip_fed_reply_is_dropped_within_its_window(peer):
    session = BoundedSession(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ResponseTooSlow, match=f"per {WINDOW_BYTES} bytes") as raised:
        session.get(peer + "/drip")
    assert time.monotonic() - started < 30  # a window and a socket read, not 1 MiB (14 h)
    assert describe_http_error(raised.value)[:2] == ("unreachable", True)
    session.close()


def test_a_multipart_reply_without_a_boundary_is_bounded_as_one_part(peer):
    session = BoundedSession(timeout=10)
    with session.bounded(Bounds(total_bytes=1 << 30, part_bytes=len(INSTANCES[0]) + 1024)), \
            pytest.raises(ResponseTooLarge, match="without a multipart boundary"):
        series(session, peer + "/noboundary")
    session.close()


def test_the_client_keeps_the_sessions_timeout_and_never_retries_by_itself(peer):
    from xrvd.web import client

    session = BoundedSession(timeout=7)
    web = client(peer + "/busy", session)
    with pytest.raises(requests.HTTPError) as raised:
        web.search_for_studies()
    assert describe_http_error(raised.value)[:2] == ("status", True)  # the caller backs off
    assert sum(n for path, n in Peer.hits.items() if path.startswith("/busy")) == 1
    assert web._timeout == 7  # noqa: SLF001 - dicomweb-client's own default is 20 s
    session.close()


def test_a_reply_cut_off_midway_is_worth_a_retry():
    assert describe_http_error(requests.exceptions.ChunkedEncodingError("cut"))[:2] == \
        ("unreachable", True)
