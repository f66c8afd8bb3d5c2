"""The endpoint server, for real on a loopback port: /metrics, /healthz, /readyz, and a taken
address."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import asyncpg
import pytest

from consumers.agent import DatabaseAgent
from pipeline import endpoints
from pipeline.config import Config
from pipeline.db import classify
from pipeline.errors import SchemaError
from pipeline.kafka_settings import KafkaSettings
from pipeline.metrics import Metrics
from pipeline.readiness import Readiness


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


def _wait_closed(sockets: list[socket.socket], count: int, within: float) -> int:
    """How many of ``sockets`` the server closed, once ``count`` are or ``within`` s passed."""
    deadline = time.monotonic() + within
    while (closed := sum(_closed_by_server(s) for s in sockets)) < count:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return closed


def _trickle(sock: socket.socket, every: float, until: float) -> float | None:
    """Send a request head a byte every ``every`` s, never ending it, until the server closes
    the connection (then: how long after the first byte) or ``until`` s passed (None)."""
    started = time.monotonic()
    sock.settimeout(every)
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    while time.monotonic() - started < until:
        try:
            if sock.recv(1) == b"":
                return time.monotonic() - started
        except TimeoutError:  # still open: one more byte of a header that never ends
            try:
                sock.sendall(b"x")
            except OSError:
                return time.monotonic() - started
        except OSError:
            return time.monotonic() - started
    return None


def test_idle_connections_do_not_make_a_thread_each_and_the_oldest_make_room() -> None:
    served = endpoints.serve("127.0.0.1:0", Metrics().registry)
    threads = threading.active_count()
    sockets: list[socket.socket] = []
    try:
        for _ in range(300):
            sockets.append(socket.create_connection(("127.0.0.1", served.port), timeout=5))
        # The server holds 256 at most (endpoints.MAX_CONNECTIONS): the 44 oldest make room.
        assert endpoints.MAX_CONNECTIONS == 256
        assert _wait_closed(sockets, 44, within=20) == 44
        assert [_closed_by_server(s) for s in sockets] == [True] * 44 + [False] * 256
        assert threading.active_count() == threads
        # A probe is answered all the same, and the oldest idle connection made room for it.
        assert get(served.port, "/healthz") == (200, "ok")
        assert _wait_closed(sockets, 45, within=5) == 45
        assert [_closed_by_server(s) for s in sockets] == [True] * 45 + [False] * 255
        assert threading.active_count() == threads
    finally:
        for sock in sockets:
            sock.close()
        served.close()


def test_a_request_trickled_a_byte_a_second_is_cut_at_the_total_deadline() -> None:
    served = endpoints.serve("127.0.0.1:0", Metrics().registry)
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as slow:
            cut = _trickle(slow, every=1.0, until=endpoints.DEADLINE_S + 3)
        assert endpoints.DEADLINE_S == 5.0
        assert cut is not None, "still open 3 s past the deadline"
        assert endpoints.DEADLINE_S - 0.5 <= cut <= endpoints.DEADLINE_S + 1.5
        assert get(served.port, "/healthz") == (200, "ok")
    finally:
        served.close()


def test_idle_and_slow_clients_do_not_delay_the_probes(
    server: endpoints.Server, state: list[Readiness]
) -> None:
    address = ("127.0.0.1", server.port)
    idle = [socket.create_connection(address, timeout=5) for _ in range(30)]
    slow = [socket.create_connection(address, timeout=5) for _ in range(4)]
    trickling = [
        threading.Thread(target=_trickle, args=(sock, 1.0, endpoints.DEADLINE_S + 1))
        for sock in slow
    ]
    try:
        for thread in trickling:
            thread.start()
        for path, expected in [("/healthz", "ok"), ("/readyz", "ready"), ("/metrics", None)]:
            started = time.monotonic()
            status, text = get(server.port, path)
            took = time.monotonic() - started
            assert status == 200, (path, text)
            assert expected is None or text == expected
            assert took < 1.0, f"{path} took {took:.2f} s"
        assert "pipeline_records_consumed_total" in text
        assert not any(_closed_by_server(s) for s in idle)  # nobody was dropped meanwhile
    finally:
        for sock in idle + slow:
            sock.close()
        for thread in trickling:
            thread.join(10)


# -- HTTP -------------------------------------------------------------------------------------


def exchange(port: int, request: bytes) -> bytes:
    """Send a raw request, read the whole answer (the server closes after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_the_server_header_names_no_python_version(server: endpoints.Server) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
        assert response.headers["Server"] == "agent-pipeline"
    for request in [b"GET /nope HTTP/1.1\r\n\r\n", b"nonsense\r\n\r\n"]:
        answer = exchange(server.port, request)
        assert answer.startswith((b"HTTP/1.1 404 Not Found\r\n", b"HTTP/1.1 400 Bad Request\r\n"))
        assert b"\r\nServer: agent-pipeline\r\n" in answer
        assert b"Python" not in answer


def test_metrics_are_gzipped_when_accepted_and_head_has_no_body(server: endpoints.Server) -> None:
    plain = exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
    head, _, body = plain.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in head
    assert f"\r\nContent-Length: {len(body)}\r\n".encode() in head
    assert b'pipeline_records_consumed_total{mode="live",topic="agents.metrics"} 7.0' in body

    zipped = exchange(server.port, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n")
    zhead, _, zbody = zipped.partition(b"\r\n\r\n")
    assert b"\r\nContent-Encoding: gzip\r\n" in zhead
    assert b"pipeline_records_consumed_total" in gzip.decompress(zbody)

    for path in [b"/metrics", b"/readyz"]:
        answer = exchange(server.port, b"HEAD " + path + b" HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.partition(b"\r\n\r\n")[2] == b""
    answer = exchange(server.port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n")


def test_other_methods_are_not_allowed(server: endpoints.Server) -> None:
    answer = exchange(server.port, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: GET, HEAD\r\n" in answer


def test_readyz_of_a_stopped_stream_names_the_class_and_sqlstate_not_the_error_text() -> None:
    """The agent's own path: the driver's error, classified, stops the stream."""
    text = 'column "labels" of relation "performance_metrics" does not exist'
    driver_error = asyncpg.exceptions.UndefinedColumnError(text)
    error = classify(driver_error)
    assert isinstance(error, SchemaError)
    agent = DatabaseAgent(
        Config(kafka=KafkaSettings(bootstrap_servers="k:9092"), database_url="postgresql://x/y")
    )
    agent._fail_stream("metrics", error.for_stream("metrics"))
    assert text in agent.last_error  # the log and the status have the text; /readyz does not
    served = endpoints.serve("127.0.0.1:0", agent.metrics.registry, agent.readiness)
    try:
        status, answer = get(served.port, "/readyz")
    finally:
        served.close()
    assert (status, answer) == (
        503,
        "starting: not in the consumer group yet; "  # it never joined: no Kafka here
        "stream metrics stopped: SchemaError (SQLSTATE 42703)",
    )
    assert "labels" not in answer and "performance_metrics" not in answer
