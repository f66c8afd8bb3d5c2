"""The endpoint server, for real on a loopback port: /metrics, /healthz, /readyz, and a taken
address."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from pipeline import endpoints
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
