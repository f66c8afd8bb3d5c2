"""The HTTP endpoints of a process, on one address (``PIPELINE_METRICS_ADDRESS`` for a
DatabaseAgent): ``/metrics`` (Prometheus), ``/healthz`` (200 "ok" while the process lives) and
``/readyz`` (200 "ready", or 503 and what is wrong: :mod:`pipeline.readiness`).

The server runs in threads of its own, so a busy event loop never delays a scrape or a
probe: one accepts, a fixed few serve (:data:`WORKERS`), whatever clients do. ``/readyz``
only reads the readiness the agent last decided (an immutable value), never the agent's state
itself.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from pipeline.readiness import Readiness

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


# Bounds on what an unauthenticated client may hold: at most MAX_CONNECTIONS open at once,
# served by WORKERS threads one connection each (the others wait their turn); a connection
# beyond the maximum is closed at once. A connection that sends nothing for IDLE_TIMEOUT_S is
# closed, so an idle socket holds a worker that long at most. A scrape or a probe takes
# milliseconds.
WORKERS = 4
MAX_CONNECTIONS = 20
IDLE_TIMEOUT_S = 5.0
# What the Server header says: no Python version for a scanner to match against.
SERVER_SOFTWARE = "agent-pipeline"


class Server:
    """A running endpoint server; :meth:`close` stops it."""

    def __init__(self, server: _PooledServer) -> None:
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
        self._server.stop_workers()
        self._server.server_close()
        self._thread.join(5)


def serve(
    address: str,
    registry: CollectorRegistry,
    readiness: Callable[[], Readiness] | None = None,
    *,
    workers: int = WORKERS,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> Server:
    """Serve the endpoints on ``host:port``; ``OSError`` when it cannot be bound (taken).
    Without ``readiness`` (a process that is not a DatabaseAgent), ``/readyz`` is 404.

    At most ``max_connections`` are open at once, ``workers`` of them served, the others
    waiting; any other is closed at once. A connection idle for ``idle_timeout_s`` is closed."""
    host, _, port = address.rpartition(":")
    app = application(registry, readiness)

    server = _PooledServer(
        (host, int(port)),
        _QuietHandler,
        workers=workers,
        max_connections=max_connections,
        idle_timeout_s=idle_timeout_s,
    )
    server.set_app(app)
    return Server(server)


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


class _PooledServer(WSGIServer):
    """A WSGI server whose connections are served by a fixed pool of threads (see
    :data:`WORKERS`): the accept loop hands each connection to them, up to
    :data:`MAX_CONNECTIONS` open at once, and closes the others, so no client can make the
    process start a thread or hold more than that many sockets."""

    request_queue_size = 64  # the listen backlog: accepted (and queued or closed) at once

    def __init__(
        self,
        server_address: tuple[str, int],
        handler: type[WSGIRequestHandler],
        *,
        workers: int,
        max_connections: int,
        idle_timeout_s: float,
    ) -> None:
        super().__init__(server_address, handler)
        self.idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._open = 0  # connections waiting or being served
        self._lock = threading.Lock()
        self._waiting: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue()
        self._workers = [
            threading.Thread(target=self._work, name=f"pipeline-endpoints-{n}", daemon=True)
            for n in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._open >= self._max_connections
            if not full:
                self._open += 1
        if full:
            self.shutdown_request(request)  # too many connections: this one is closed
        else:
            self._waiting.put((request, client_address))

    def _work(self) -> None:
        while (item := self._waiting.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                with self._lock:
                    self._open -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or sent garbage is not worth a traceback on stderr."""

    def stop_workers(self) -> None:
        """Close what waits, and end the workers (each once its connection ends)."""
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in self._workers:
            self._waiting.put(None)


class _QuietHandler(WSGIRequestHandler):
    server: _PooledServer
    server_version = SERVER_SOFTWARE
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout_s)  # idle clients go

    def version_string(self) -> str:
        return SERVER_SOFTWARE

    def handle(self) -> None:
        """One request, as WSGIRequestHandler serves it, but with the Server header above,
        and a client idle past the timeout (or gone) closed quietly."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except OSError:  # TimeoutError included: idle too long
            return
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():  # an error was sent
            return
        handler = _ServerHandler(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # a BufferedIOBase, as wsgiref passes it
            self.get_stderr(),
            self.get_environ(),
            multithread=True,
        )
        handler.request_handler = self  # type: ignore[attr-defined]
        app = self.server.get_app()
        assert app is not None  # set by serve()
        handler.run(app)

    def log_message(self, format: str, *args: Any) -> None:
        """Every scrape and probe would otherwise be a line on stderr."""


class _ServerHandler(ServerHandler):
    server_software = SERVER_SOFTWARE
