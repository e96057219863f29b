"""DICOMweb peers (sources and destinations): an HTTP session with the configured auth and TLS,
and a dicomweb-client on it. Every request has a timeout, and every response body is read
through a bound (bytes in all, bytes per multipart part, seconds per 256 KiB) before it is
held in memory; nothing is retried here (the caller backs off, as it does for DICOM peers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import requests

if TYPE_CHECKING:
    from .sources import HttpAuth, HttpTls

# A JSON reply (QIDO-RS, a STOW-RS receipt) larger than this is not a reply worth reading.
MAX_REPLY_BYTES = 64 << 20
# The body is read in windows of this size; each must arrive within the timeout.
WINDOW_BYTES = 256 << 10


class ResponseTooLarge(requests.RequestException):
    """The server sent more than the bound allows (in all, or in one part)."""


class ResponseTooSlow(requests.Timeout):
    """The server kept the connection alive but sent too slowly (a drip-feed)."""


@dataclass(frozen=True)
class Bounds:
    total_bytes: int = MAX_REPLY_BYTES
    part_bytes: int | None = None  # multipart/related: each part (a DICOM instance), at most


class _BoundedBody:
    """A response's urllib3 body, read as requests reads it (`stream`, `read`) but never past
    the bounds: the bytes in all, the bytes of one multipart part (found by its boundary, so
    one instance is never held whole when it is too large), and `window_seconds` for every
    WINDOW_BYTES. Reads go one socket read at a time (read1), so a drip-feed is noticed
    within one socket timeout of its deadline, not after a whole window has trickled in."""

    def __init__(self, raw, bounds: Bounds, window_seconds: float, url: str, delimiter: bytes):
        self._raw = raw
        self._bounds = bounds
        self._window_seconds = window_seconds
        self._url = url
        self._delimiter = delimiter  # b"" unless the body is multipart with a boundary
        self._tail = b""
        self._total = 0
        self._in_part = 0
        # The current window: bytes in it, and seconds spent waiting for them (only inside
        # reads: the time the reader takes between reads is not the server's).
        self._window_got = 0
        self._window_waited = 0.0

    def __getattr__(self, name):  # release_conn, close, headers, ...: the body's own
        return getattr(self._raw, name)

    def stream(self, amt: int | None = 1 << 16, decode_content: bool | None = None
               ) -> Iterator[bytes]:
        while True:
            data = self.read(amt or WINDOW_BYTES, decode_content=decode_content)
            if not data:
                return
            yield data

    def read(self, amt: int | None = None, decode_content: bool | None = None,
             **_ignored) -> bytes:
        wanted = amt if amt is not None and amt >= 0 else self._bounds.total_bytes + 1
        pieces: list[bytes] = []
        got = 0
        while got < wanted:
            started = time.monotonic()
            piece = self._raw.read1(min(wanted - got, WINDOW_BYTES),
                                    decode_content=decode_content)
            self._window_waited += time.monotonic() - started
            if not piece:
                break
            self._count(piece)
            pieces.append(piece)
            got += len(piece)
            self._window_got += len(piece)
            if self._window_waited > self._window_seconds:
                raise ResponseTooSlow(f"{self._url}: {self._window_got} bytes in "
                                      f"{self._window_waited:.0f} s (at most "
                                      f"{self._window_seconds:g} s per {WINDOW_BYTES} bytes)")
            if self._window_got >= WINDOW_BYTES:
                self._window_got, self._window_waited = 0, 0.0
        return b"".join(pieces)

    def _count(self, piece: bytes) -> None:
        self._total += len(piece)
        if self._total > self._bounds.total_bytes:
            raise ResponseTooLarge(f"{self._url}: the reply is larger than "
                                   f"{self._bounds.total_bytes} bytes")
        limit = self._bounds.part_bytes
        if limit is None:
            return
        if not self._delimiter:  # no boundary: the body is read as one part
            if self._total > limit:
                raise ResponseTooLarge(f"{self._url}: the reply, sent without a multipart "
                                       f"boundary, is larger than {limit} bytes "
                                       "(scp.max_instance_bytes)")
            return
        seen = self._tail + piece
        last = seen.rfind(self._delimiter)
        if last >= 0:
            self._in_part = len(seen) - last - len(self._delimiter)
        else:
            self._in_part += len(piece)
        self._tail = seen[-(len(self._delimiter) - 1):]
        if self._in_part > limit:
            raise ResponseTooLarge(f"{self._url}: a part of the reply is larger than {limit} "
                                   "bytes (scp.max_instance_bytes)")


def _boundary(content_type: str) -> bytes:
    media_type, *parameters = [p.strip() for p in content_type.split(";")]
    if media_type.lower() != "multipart/related":
        return b""
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "boundary" and value.strip('" '):
            return b"\r\n--" + value.strip('" ').encode("latin-1")
    return b""


class BoundedSession(requests.Session):
    """A session with a timeout on every request (requests has none by default, and a silent
    server would hold a thread for ever) and bounds on every response body (`bounded`
    narrows them for the requests a block makes, in this thread)."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout
        self._local = threading.local()
        self.hooks["response"].append(self._bound)

    @contextmanager
    def bounded(self, bounds: Bounds):
        before = getattr(self._local, "bounds", None)
        self._local.bounds = bounds
        try:
            yield
        finally:
            self._local.bounds = before

    def request(self, method, url, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().request(method, url, **kwargs)

    def _bound(self, response: requests.Response, **_kwargs) -> requests.Response:
        # Response hooks run before requests reads the body, streamed or not.
        bounds = getattr(self._local, "bounds", None) or Bounds()
        response.raw = _BoundedBody(response.raw, bounds, self.timeout, response.url,
                                    _boundary(response.headers.get("content-type", "")))
        return response


def session(auth: HttpAuth, tls: HttpTls, timeout: float) -> BoundedSession:
    """A BoundedSession with the peer's auth and TLS settings."""
    bounded = BoundedSession(timeout)
    bounded.verify = str(tls.ca_file) if tls.verify and tls.ca_file else tls.verify
    if auth.type == "basic":
        bounded.auth = (auth.username, auth.secret(auth.password, auth.password_file))
    elif auth.type == "bearer":
        bounded.headers["Authorization"] = \
            f"Bearer {auth.secret(auth.token, auth.token_file)}"
    return bounded


def client(url: str, on: BoundedSession):
    """A dicomweb_client.DICOMwebClient for `url` (the service root)."""
    from dicomweb_client.api import DICOMwebClient

    # dicomweb-client passes its own timeout (20 s) on every request and retries 429/503/...
    # up to 5 times by itself: the configured timeout holds, and retries are the caller's.
    web = DICOMwebClient(url=url, session=on, timeout=on.timeout)
    web.set_http_retry_params(retry=False)
    return web


def describe_http_error(exc: Exception) -> tuple[str, bool, str]:
    """(reason, worth a retry, detail) for what a DICOMweb request raised: the server down or
    overloaded (connection errors, timeouts, 408/429/5xx) passes; refused credentials
    (401/403) and other client errors will not."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        detail = f"HTTP {code} {exc.response.reason or ''}".strip()
        if code in (401, 403):
            return "unauthorized", False, f"{detail}: check the auth settings"
        return "status", code in (408, 429) or code >= 500, detail
    if isinstance(exc, ResponseTooLarge):
        return "too_large", False, str(exc)[:300]
    if isinstance(exc, (requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError)):  # cut off midway
        return "unreachable", True, f"{type(exc).__name__}: {str(exc)[:200]}"
    return "status", False, f"{type(exc).__name__}: {str(exc)[:200]}"
