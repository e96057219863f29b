"""Prometheus metrics and the /healthz endpoint. Counting always happens (it is cheap); the
HTTP endpoint runs only when service.metrics.enabled is true, on loopback by default."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

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
QUEUE = Gauge("xrvd_queue_studies", "Studies by state", ["state"], registry=REGISTRY)
CLASSIFY_SECONDS = Histogram("xrvd_study_classification_seconds",
                             "From claiming a settled study to its result",
                             buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=REGISTRY)
END_TO_END_SECONDS = Histogram("xrvd_study_end_to_end_seconds",
                               "From the study's last instance to its result (includes "
                               "the settle time)",
                               buckets=(1, 5, 10, 15, 30, 60, 120, 300, 900),
                               registry=REGISTRY)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # events, not access logs, are our log
        pass


class MetricsServer:
    """/metrics for Prometheus, /healthz answering 200 or 503 with the reasons."""

    def __init__(self, bind: str, port: int, health: Callable[[], list[str]]):
        metrics_app = make_wsgi_app(REGISTRY)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/healthz":
                problems = health()
                status = "503 Service Unavailable" if problems else "200 OK"
                body = json.dumps({"healthy": not problems, "problems": problems}).encode()
                start_response(status, [("Content-Type", "application/json")])
                return [body]
            return metrics_app(environ, start_response)

        self._server: WSGIServer = make_server(bind, port, app, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="xrvd-metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
