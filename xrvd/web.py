"""DICOMweb peers (sources and destinations): an HTTP session with the configured auth and TLS,
and a dicomweb-client on it. Every request has a timeout; nothing is retried here (the caller
backs off, as it does for DICOM peers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import requests

if TYPE_CHECKING:
    from .sources import HttpAuth, HttpTls


class TimeoutSession(requests.Session):
    """A session with a timeout on every request (requests has none by default, and a silent
    server would hold a thread for ever)."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, **kwargs)


def client(url: str, auth: HttpAuth, tls: HttpTls, timeout: float):
    """A dicomweb_client.DICOMwebClient for `url` (the service root)."""
    from dicomweb_client.api import DICOMwebClient

    session = TimeoutSession(timeout)
    session.verify = str(tls.ca_file) if tls.verify and tls.ca_file else tls.verify
    if auth.type == "basic":
        session.auth = (auth.username, auth.secret(auth.password, auth.password_file))
    elif auth.type == "bearer":
        session.headers["Authorization"] = \
            f"Bearer {auth.secret(auth.token, auth.token_file)}"
    return DICOMwebClient(url=url, session=session)


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
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return "unreachable", True, f"{type(exc).__name__}: {str(exc)[:200]}"
    return "status", False, f"{type(exc).__name__}: {str(exc)[:200]}"
