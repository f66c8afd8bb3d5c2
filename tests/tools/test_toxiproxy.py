"""tests/toxiproxy.py against a real toxiproxy-server (built once per machine): a proxy
passes bytes both ways, and its toxics act on connections already open and are gone once
removed."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.toxiproxy import Proxy, Toxiproxy, ToxiproxyError


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _exchange(conn: socket.socket, data: bytes) -> bytes:
    """Send ``data`` and read until as many bytes came back or the connection closed."""
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _connect(proxy: Proxy) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=5)


def test_a_proxy_passes_bytes_and_a_toxic_cuts_an_open_connection(
    toxiproxy: Toxiproxy, echo: str
) -> None:
    proxy = toxiproxy.proxy("echo", echo)
    try:
        with _connect(proxy) as conn:
            assert _exchange(conn, b"x" * 1000) == b"x" * 1000
            with proxy.toxic("limit_data", "downstream", bytes=100) as name:
                assert [t["name"] for t in proxy.toxics()] == [name]
                assert _exchange(conn, b"y" * 1000) == b"y" * 100  # then closed
        assert proxy.toxics() == []
        with _connect(proxy) as conn:  # the next connection passes whole again
            assert _exchange(conn, b"z" * 1000) == b"z" * 1000
        with pytest.raises(ToxiproxyError, match="toxic not found"):
            proxy.remove("no-such-toxic")
    finally:
        proxy.delete()
