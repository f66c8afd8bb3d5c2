"""Retries: the agent's retries after transient failures, logged, counted, the newest kept for
status reports and the source being retried shown to readiness."""

from __future__ import annotations

import pytest

from consumers.retries import Retries
from pipeline.errors import TransientError
from pipeline.metrics import Metrics


class Agent:
    """What Retries is given: its sleeps are recorded, its changes counted."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.slept: list[float] = []
        self.changes = 0
        self.stopping = False
        self.retries = Retries(
            self.metrics,
            2.0,
            sleep=self.sleep,
            stopping=lambda: self.stopping,
            changed=self.changed,
        )
        self.sources: list[str | None] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.sources.append(self.retries.source)

    def changed(self) -> None:
        self.changes += 1

    def retried(self, kind: str) -> float | None:
        return self.metrics.registry.get_sample_value("pipeline_retries_total", {"kind": kind})


async def test_a_call_is_retried_until_it_succeeds_showing_its_source_meanwhile() -> None:
    agent = Agent()
    failures = [
        TransientError("db away", source="postgres"),
        TransientError("broker away", source="kafka"),
    ]
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)

    await agent.retries.call("reserving batch ids", call)
    assert calls == 3
    assert agent.slept == [0.1, 0.2]
    assert agent.sources == ["postgres", "kafka"]
    assert agent.retries.source is None  # done: readiness no longer shows it
    assert agent.changes == 3  # each retry, and the end
    assert (agent.retried("postgres"), agent.retried("kafka")) == (1, 1)
    assert "broker away" in agent.retries.last_error


async def test_a_call_gives_up_when_the_agent_stops() -> None:
    agent = Agent()

    async def call() -> None:
        agent.stopping = True
        raise TransientError("db away", source="postgres")

    await agent.retries.call("positioning partitions at their stored offsets", call)
    assert agent.retries.source is None
    assert agent.retried("postgres") == 1


def test_a_write_retried_shows_its_source_until_it_ends() -> None:
    agent = Agent()
    agent.retries.write_failed(TransientError("db away", source="postgres"), 0.4)
    assert agent.retries.source == "postgres"
    assert agent.retries.last_error == str(TransientError("db away", source="postgres"))
    assert agent.changes == 1
    agent.retries.write_ended()
    assert agent.retries.source is None
    assert agent.changes == 2
    agent.retries.write_ended()  # nothing was being retried: readiness need not be decided
    assert agent.changes == 2
    assert agent.retried("postgres") == 1


def test_the_retry_is_logged_as_the_agents(caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent()
    with caplog.at_level("WARNING", logger="consumers.agent"):
        agent.retries.write_failed(TransientError("db away", source="postgres"), 0.4)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("consumers.agent", f"{TransientError('db away', source='postgres')}; retrying in 0.4s")
    ]
