"""Prometheus metrics and the /healthz endpoint. Counting always happens (it is cheap); the
HTTP endpoint runs only when service.metrics.enabled is true, on loopback by default."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

REGISTRY = CollectorRegistry()
RECEIVED = Counter("xrvd_instances_received", "Instances stored in the spool",
                   ["source"], registry=REGISTRY)
DUPLICATES = Counter("xrvd_instances_duplicate", "Instances received again unchanged",
                     registry=REGISTRY)
REFUSED = Counter("xrvd_instances_refused", "Instances refused or rejected", ["reason"],
                  registry=REGISTRY)
SKIPPED = Counter("xrvd_instances_skipped", "Instances not classified", ["reason"],
                  registry=REGISTRY)
CLASSIFIED = Counter("xrvd_images_classified", "Images scored by the model", registry=REGISTRY)
REPORTED = Counter("xrvd_results_written", "Study results written", registry=REGISTRY)
SENT = Counter("xrvd_reports_sent", "Results delivered to destinations (with the report "
               "issue)", ["destination"], registry=REGISTRY)
FAILED = Counter("xrvd_studies_failed", "Study processing attempts that failed",
                 registry=REGISTRY)
CONNECTIONS_DROPPED = Counter("xrvd_connections_dropped", "DICOM connections ended by a "
                              "bound (timeout, PDU too large, evicted while pending)",
                              ["reason"], registry=REGISTRY)
DISK_LOW = Gauge("xrvd_disk_low", "1 while free space on the state directory's file system "
                 "is below storage.min_free_mb (nothing new is accepted)", registry=REGISTRY)
DISK_FREE = Gauge("xrvd_disk_free_bytes", "Free space on the state directory's file system",
                  registry=REGISTRY)
SPOOL_BYTES = Gauge("xrvd_spool_bytes", "Bytes of received instances held in the spool",
                    registry=REGISTRY)
QUEUE = Gauge("xrvd_queue_studies", "Studies by state", ["state"], registry=REGISTRY)
CLASSIFY_SECONDS = Histogram("xrvd_study_classification_seconds",
                             "From claiming a settled study to its result",
                             buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=REGISTRY)
END_TO_END_SECONDS = Histogram("xrvd_study_end_to_end_seconds",
                               "From the study's last instance to its result (includes "
                               "the settle time)",
                               buckets=(1, 5, 10, 15, 30, 60, 120, 300, 900),
                               registry=REGISTRY)


class _DeadlineReader(io.RawIOBase):
    """Reads a socket until a deadline: every read waits only for the time left, so a peer
    that sends a byte now and then cannot keep its connection for longer than the timeout."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not complete before the connection's deadline")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(WSGIRequestHandler):
    """One connection, one request (wsgiref answers HTTP/1.0 style and closes). The request
    must arrive within the server's connection timeout, counted from the accept; writing
    the answer is bounded by the socket timeout left from the last read."""

    server: _ThreadingServer

    def setup(self) -> None:
        self.timeout = self.server.connection_timeout  # StreamRequestHandler sets it on the socket
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(
            self.connection, time.monotonic() + self.server.connection_timeout))

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ConnectionError):
            pass  # a slow, silent or vanished peer: the connection is closed, nothing to say

    def log_message(self, *args) -> None:  # events, not access logs, are our log
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most max_connections at once: one more is closed as soon
    as it is accepted, never queued. close_connections() ends those open and joins them."""

    daemon_threads = True  # never holds up interpreter exit; close_connections() joins them

    def __init__(self, address: tuple[str, int], *, timeout: float, max_connections: int):
        self.connection_timeout = timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._open: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            full = len(self._open) >= self.max_connections
            if not full:
                thread = threading.Thread(target=self.process_request_thread,
                                          args=(request, client_address),
                                          name="xrvd-metrics-connection", daemon=True)
                self._open[request] = thread
        if full:
            self.shutdown_request(request)
            return
        thread.start()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(request, None)

    def close_connections(self) -> None:
        """Called once serve_forever has returned, so that no connection is added meanwhile."""
        with self._lock:
            open_now = list(self._open.items())
        for request, _ in open_now:
            try:
                request.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once
            except OSError:
                pass  # its thread closed it meanwhile
        for _, thread in open_now:
            thread.join()


class MetricsServer:
    """/metrics for Prometheus, /healthz answering 200 or 503 with the reasons.

    Each connection is served in its own thread, so an idle or slow peer never holds up the
    health probe; it must send its request within `timeout` seconds of connecting, and at most
    `max_connections` are served at once (more are closed straight away)."""

    def __init__(self, bind: str, port: int, health: Callable[[], list[str]], *,
                 timeout: float = 10.0, max_connections: int = 16):
        metrics_app = make_wsgi_app(REGISTRY)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/healthz":
                problems = health()
                status = "503 Service Unavailable" if problems else "200 OK"
                body = json.dumps({"healthy": not problems, "problems": problems}).encode()
                start_response(status, [("Content-Type", "application/json")])
                return [body]
            return metrics_app(environ, start_response)

        self._server = _ThreadingServer((bind, port), timeout=timeout,
                                        max_connections=max_connections)
        self._server.set_app(app)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="xrvd-metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.close_connections()
        self._server.server_close()
