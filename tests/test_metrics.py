"""The metrics and health endpoint: served from one thread per connection, so that idle or slow
peers never hold up /healthz; each connection has a deadline; at most max_connections are
served at once; stop() ends them all."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from xrvd.metrics import MetricsServer

# Bounds a failure only: every wait below ends as soon as the server acts.
WAIT = 10


def metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("xrvd-metrics")]


@pytest.fixture
def serve():
    """Starts MetricsServers on 127.0.0.1, port 0; opens raw client connections to them.
    Teardown closes the clients first, then stops the servers still running."""
    servers: list[MetricsServer] = []
    clients: list[socket.socket] = []

    def start(health=list, **options) -> MetricsServer:
        server = MetricsServer("127.0.0.1", 0, health, **options)
        server.start()
        servers.append(server)
        return server

    def connect(server: MetricsServer, send: bytes = b"") -> socket.socket:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        clients.append(client)
        if send:
            client.sendall(send)
        return client

    start.connect = connect
    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop()
    assert metrics_threads() == []


def get(server: MetricsServer, path: str):
    return urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=WAIT)


def test_healthz_answers_while_other_connections_sit_idle(serve):
    problems: list[str] = []
    server = serve(lambda: list(problems))
    idle = [serve.connect(server), serve.connect(server, b"GET /hea"),
            serve.connect(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")]

    with get(server, "/healthz") as answer:
        assert answer.status == 200
        assert json.load(answer) == {"healthy": True, "problems": []}
    problems.append("worker stuck for 99 s")
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(server, "/healthz")
    assert refused.value.code == 503
    assert json.load(refused.value) == {"healthy": False, "problems": ["worker stuck for 99 s"]}
    with get(server, "/metrics") as answer:
        assert answer.status == 200
        assert b"xrvd_instances_received" in answer.read()

    # stop() ends the connections still open and joins their threads.
    server.stop()
    assert metrics_threads() == []
    for client in idle:
        assert client.recv(1) == b""


def test_idle_connection_is_closed_after_the_timeout(serve):
    server = serve(timeout=0.5)
    silent = serve.connect(server)
    partial = serve.connect(server, b"GET /healthz HT")
    for client in (silent, partial):
        assert client.recv(1) == b""  # blocks until the server closes it (WAIT bounds a bug)
    with get(server, "/healthz") as answer:
        assert answer.status == 200


def test_slow_client_is_closed_at_the_deadline_not_after_each_byte(serve):
    """A byte every 0.1 s would reset a plain per-read timeout of 0.5 s forever; the deadline
    counts from the connection's start."""
    server = serve(timeout=0.5)
    client = serve.connect(server)
    client.settimeout(0.1)
    closed = False
    for _ in range(int(WAIT / 0.1)):
        try:
            client.sendall(b"G")
            closed = client.recv(1) == b""
        except TimeoutError:
            continue  # still open: send the next byte
        except ConnectionError:
            closed = True
        if closed:
            break
    assert closed


def test_connections_beyond_the_bound_are_closed_at_once(serve):
    server = serve(timeout=60, max_connections=2)
    serve.connect(server)
    serve.connect(server)
    # The server accepts in order, so both idle connections hold their slots by now.
    extra = serve.connect(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    try:
        assert extra.recv(1) == b""  # closed without an answer, long before the 60 s timeout
    except ConnectionResetError:
        pass  # closed with our request unread: also at once
