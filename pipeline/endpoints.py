"""The HTTP endpoints of a process, on one address (``PIPELINE_METRICS_ADDRESS`` for a
DatabaseAgent): ``/metrics`` (Prometheus), ``/healthz`` (200 "ok" while the process lives) and
``/readyz`` (200 "ready", or 503 and what is wrong: :mod:`pipeline.readiness`).

The server runs in a thread of its own, so a busy event loop never delays a scrape or a
probe. ``/readyz`` only reads the readiness the agent last decided (an immutable value), never
the agent's state itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from pipeline.readiness import Readiness

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Server:
    """A running endpoint server; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="pipeline-endpoints", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(
    address: str,
    registry: CollectorRegistry,
    readiness: Callable[[], Readiness] | None = None,
) -> Server:
    """Serve the endpoints on ``host:port``; ``OSError`` when it cannot be bound (taken).
    Without ``readiness`` (a process that is not a DatabaseAgent), ``/readyz`` is 404."""
    host, _, port = address.rpartition(":")
    app = application(registry, readiness)
    return Server(make_server(host, int(port), app, _ThreadingServer, handler_class=_QuietHandler))


def application(
    registry: CollectorRegistry, readiness: Callable[[], Readiness] | None = None
) -> WsgiApp:
    """The WSGI application behind :func:`serve`."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/metrics", "/"):
            served: Iterable[bytes] = metrics(environ, start_response)
            return served
        if path == "/healthz":
            return _text(start_response, 200, "ok")
        if path == "/readyz" and readiness is not None:
            found = readiness()
            return _text(start_response, found.status, found.reason)
        return _text(start_response, 404, "not found: try /metrics, /healthz or /readyz")

    return app


def _text(start_response: StartResponse, status: int, body: str) -> list[bytes]:
    data = body.encode()  # exactly "ok", "ready" or the reasons: probes compare it
    phrase = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
    start_response(
        f"{status} {phrase}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))],
    )
    return [data]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scrape never holds up the process's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Every scrape and probe would otherwise be a line on stderr."""
