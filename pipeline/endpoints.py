"""The HTTP endpoints of a process, on one address (``PIPELINE_METRICS_ADDRESS`` for a
DatabaseAgent): ``/metrics`` (Prometheus), ``/healthz`` (200 "ok" while the process lives) and
``/readyz`` (200 "ready", or 503 and what is wrong: :mod:`pipeline.readiness`).

One thread of its own runs an asyncio event loop of its own that serves every connection, so
a busy agent loop never delays a scrape or a probe, and no client can take the probes' turn:
an open connection costs a file descriptor, never a thread. Each request has a total
deadline, however slowly its bytes trickle in, and beyond :data:`MAX_CONNECTIONS` the oldest
connection still sending its request is dropped to make room for the new one. ``/readyz``
only reads the readiness the agent last decided (an immutable value), never the agent's state
itself.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from pipeline.readiness import Readiness

log = logging.getLogger(__name__)

# A request's line and headers must arrive within DEADLINE_S in all, and its answer be taken
# within DEADLINE_S more; a scrape or a probe takes milliseconds.
DEADLINE_S = 5.0
# Open connections at most, to bound file descriptors: well below the usual soft limit of
# 1024, so clients cannot starve the agent's own Kafka and PostgreSQL connections.
MAX_CONNECTIONS = 256
# The request line and headers, in bytes (a longer head is closed): a probe's or a scrape's
# take a few hundred.
MAX_HEAD = 16 * 1024
# The Server header: no Python version for a scanner to match against.
SERVER = "agent-pipeline"

_METHODS = ("GET", "HEAD")
_NOT_FOUND = "not found: try /metrics, /healthz or /readyz"

Answer = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body


class Endpoints:
    """What each request is answered, from its head (request line and headers): no IO."""

    def __init__(
        self, registry: CollectorRegistry, readiness: Callable[[], Readiness] | None = None
    ) -> None:
        self._registry = registry
        self._readiness = readiness

    def answer(self, head: bytes) -> bytes:
        """The whole HTTP response to one request head (ending in a blank line)."""
        method = "GET"
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    name, colon, value = line.partition(":")
                    if not colon or not name or name != name.strip():
                        raise ValueError(line)
                    headers[name.lower()] = value.strip()
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
        except ValueError:
            return render(method, _text(400, "bad request"))
        try:
            found = self.route(method, target, headers)
        except Exception:  # a collector failing: say so, keep serving
            log.exception("answering %s %s", method, target)
            found = _text(500, "internal error")
        return render(method, found)

    def route(self, method: str, target: str, headers: dict[str, str]) -> Answer:
        url = urlsplit(target)
        if url.path not in ("/metrics", "/", "/healthz") and (
            url.path != "/readyz" or self._readiness is None
        ):
            return _text(404, _NOT_FOUND)
        if method not in _METHODS:
            status, fields, body = _text(405, "method not allowed: use GET or HEAD")
            return status, [*fields, ("Allow", ", ".join(_METHODS))], body
        if url.path == "/healthz":
            return _text(200, "ok")
        if url.path == "/readyz":
            assert self._readiness is not None
            found = self._readiness()
            return _text(found.status, found.reason)
        return self._metrics(url.query, headers)

    def _metrics(self, query: str, headers: dict[str, str]) -> Answer:
        """As prometheus_client serves them: the format the Accept header asks for,
        ``name[]`` to choose series, gzip when accepted."""
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        source: Collector = self._registry
        if names := parse_qs(query).get("name[]"):
            source = self._registry.restricted_registry(names)
        body = encoder(source)
        fields = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            fields.append(("Content-Encoding", "gzip"))
        return 200, fields, body


def _text(status: int, body: str) -> Answer:
    # Exactly "ok", "ready" or the reasons: probes compare it.
    return status, [("Content-Type", "text/plain; charset=utf-8")], body.encode()


def render(method: str, answer: Answer) -> bytes:
    """An answer as HTTP/1.1 bytes; the connection closes after it. HEAD: no body."""
    status, fields, body = answer
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Server: {SERVER}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        *(f"{name}: {value}" for name, value in fields),
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if method == "HEAD" else head + body


class Server:
    """The endpoints served on a bound socket by a thread running its own event loop;
    :meth:`close` stops it."""

    def __init__(
        self, sock: socket.socket, endpoints: Endpoints, max_connections: int, deadline_s: float
    ) -> None:
        self._sock = sock
        self._endpoints = endpoints
        self._max_connections = max_connections
        self._deadline_s = deadline_s
        self._open: set[asyncio.Task[None]] = set()
        # Connections still sending their request, oldest first: the ones dropped when full.
        self._waiting: dict[asyncio.Task[None], None] = {}
        self._port = int(sock.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline-endpoints", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._port

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._connection, sock=self._sock, limit=MAX_HEAD)
        async with server:
            await self._stop.wait()
        connections = list(self._open)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._open) >= self._max_connections:
            if not self._waiting:  # all of them being answered, for DEADLINE_S at most
                writer.transport.abort()
                return
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.cancel()
        self._open.add(task)
        self._waiting[task] = None
        # drain() returns once the whole answer is with the kernel: closing then loses nothing.
        writer.transport.set_write_buffer_limits(high=0)
        answered = False
        try:
            async with asyncio.timeout(self._deadline_s):
                head = await reader.readuntil(b"\r\n\r\n")
            self._waiting.pop(task, None)
            answer = self._endpoints.answer(head)
            async with asyncio.timeout(self._deadline_s):
                writer.write(answer)
                await writer.drain()
            answered = True
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # too slow (TimeoutError is an OSError), gone, or a head too large: closed
        finally:
            self._waiting.pop(task, None)
            self._open.discard(task)
            if answered:
                writer.close()
            else:  # nothing to flush to a client that may not read
                writer.transport.abort()


def serve(
    address: str,
    registry: CollectorRegistry,
    readiness: Callable[[], Readiness] | None = None,
    *,
    max_connections: int = MAX_CONNECTIONS,
    deadline_s: float = DEADLINE_S,
) -> Server:
    """Serve the endpoints on ``host:port``; ``OSError`` when it cannot be bound (taken).
    Without ``readiness`` (a process that is not a DatabaseAgent), ``/readyz`` is 404.

    A request's line and headers must arrive within ``deadline_s`` in all; beyond
    ``max_connections`` open at once, the oldest one still sending its request is closed."""
    host, _, port = address.rpartition(":")
    sock = socket.create_server((host, int(port)))
    return Server(sock, Endpoints(registry, readiness), max_connections, deadline_s)
