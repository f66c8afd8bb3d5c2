"""The endpoint server, for real on a loopback port: /metrics, /healthz, /readyz, and a taken
address."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from pipeline import endpoints
from pipeline.metrics import Metrics
from pipeline.readiness import AgentHealth, Readiness, readiness


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def state() -> list[Readiness]:
    return [Readiness(True, "ready")]


@pytest.fixture
def server(state: list[Readiness]) -> Iterator[endpoints.Server]:
    metrics = Metrics()
    metrics.records_consumed.labels("agents.metrics", "live").inc(7)
    served = endpoints.serve("127.0.0.1:0", metrics.registry, lambda: state[-1])
    try:
        yield served
    finally:
        served.close()


def test_metrics_are_served(server: endpoints.Server) -> None:
    status, text = get(server.port, "/metrics")
    assert status == 200
    assert 'pipeline_records_consumed_total{mode="live",topic="agents.metrics"} 7.0' in text
    assert "pipeline_build_info{" in text


def test_healthz_answers_while_the_process_lives(
    server: endpoints.Server, state: list[Readiness]
) -> None:
    state.append(Readiness(False, "database unreachable"))
    assert get(server.port, "/healthz") == (200, "ok")


def test_readyz_follows_the_readiness_it_is_given(
    server: endpoints.Server, state: list[Readiness]
) -> None:
    assert get(server.port, "/readyz") == (200, "ready")
    state.append(Readiness(False, "stream metrics stopped: permission denied"))
    assert get(server.port, "/readyz") == (503, "stream metrics stopped: permission denied")


def test_an_unknown_path_is_not_found(server: endpoints.Server) -> None:
    status, text = get(server.port, "/nope")
    assert status == 404
    assert "/metrics" in text


def test_without_readiness_readyz_is_not_found() -> None:
    served = endpoints.serve("127.0.0.1:0", Metrics().registry)
    try:
        assert get(served.port, "/readyz")[0] == 404
        assert get(served.port, "/healthz") == (200, "ok")
    finally:
        served.close()


def test_an_address_in_use_is_an_os_error(server: endpoints.Server) -> None:
    with pytest.raises(OSError, match="in use"):
        endpoints.serve(f"127.0.0.1:{server.port}", Metrics().registry)


# -- what an unauthenticated client may hold ---------------------------------------------------


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed ``sock`` (EOF or reset); False while it is open."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_do_not_make_a_thread_each() -> None:
    before = threading.active_count()
    served = endpoints.serve("127.0.0.1:0", Metrics().registry)
    sockets: list[socket.socket] = []
    try:
        for _ in range(300):
            sockets.append(socket.create_connection(("127.0.0.1", served.port), timeout=5))
        # The server takes every connection: it holds 20 (the default maximum, 4 of them
        # served), and closes the others.
        deadline = time.monotonic() + 20
        closed = threads = 0
        while time.monotonic() < deadline:
            closed = sum(_closed_by_server(s) for s in sockets)
            threads = threading.active_count() - before
            if closed >= 300 - 20 or threads >= 300:
                break
            time.sleep(0.05)
        assert threads <= 4 + 1, f"{threads} threads for 300 idle sockets"
        assert closed == 300 - 20
        assert (endpoints.WORKERS, endpoints.MAX_CONNECTIONS) == (4, 20)
    finally:
        for sock in sockets:
            sock.close()
        served.close()


def test_an_idle_connection_is_closed_after_the_timeout_and_others_are_served() -> None:
    served = endpoints.serve("127.0.0.1:0", Metrics().registry, idle_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""  # blocks until the server closes it
            assert 0.4 <= time.monotonic() - started < 5
        assert get(served.port, "/healthz") == (200, "ok")
    finally:
        served.close()


def test_a_full_server_closes_new_connections_and_serves_again_once_they_go() -> None:
    served = endpoints.serve(
        "127.0.0.1:0", Metrics().registry, workers=1, max_connections=2, idle_timeout_s=30
    )
    try:
        held = [socket.create_connection(("127.0.0.1", served.port), timeout=5) for _ in range(5)]
        # One served (idle, for 30 s), one waiting: the other three are closed at once.
        deadline = time.monotonic() + 10
        while sum(_closed_by_server(s) for s in held) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(_closed_by_server(s) for s in held) == 3
        for sock in held:
            sock.close()  # the worker sees the held connections end, then serves again
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # refused until the held ones are seen to end
                if get(served.port, "/healthz") == (200, "ok"):
                    break
            time.sleep(0.05)
        assert get(served.port, "/healthz") == (200, "ok")
    finally:
        served.close()


def test_the_server_header_names_no_python_version(server: endpoints.Server) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
        assert response.headers["Server"] == "agent-pipeline"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        # Too many headers: an error answer, written by http.server itself.
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X-N: 1\r\n" * 101 + b"\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 431 ")
    assert b"\r\nServer: agent-pipeline\r\n" in answer
    assert b"Python" not in answer


def test_readyz_of_a_stopped_stream_carries_no_driver_error_text(
    server: endpoints.Server, state: list[Readiness]
) -> None:
    error = 'column "labels" of relation "performance_metrics" does not exist'
    state.append(readiness(AgentHealth(stopped_streams=("metrics",))))
    status, text = get(server.port, "/readyz")
    assert (status, text) == (503, "stream metrics stopped: schema or permission error")
    assert error not in text and "labels" not in text
