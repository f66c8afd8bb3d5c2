"""Readiness, a pure function of the agent's state: each reason, and their combinations; and
``ReadinessWatch``, which decides it from an agent's ownership and keeps the gauges with it."""

from __future__ import annotations

from pipeline.errors import SchemaError
from pipeline.metrics import Metrics
from pipeline.ownership import Ownership
from pipeline.readiness import (
    STARTING,
    AgentHealth,
    Readiness,
    ReadinessWatch,
    failure_class,
    readiness,
)


def test_a_positioned_agent_whose_writes_succeed_is_ready() -> None:
    assert readiness(AgentHealth()) == Readiness(True, "ready")
    assert readiness(AgentHealth()).status == 200


def test_an_agent_with_no_partitions_in_its_group_is_ready() -> None:
    # More instances than partitions: the spare one has nothing to position or write.
    assert readiness(AgentHealth(joined=True, unpositioned=0)).ready


def test_before_the_group_assigns_anything_it_is_starting() -> None:
    found = readiness(AgentHealth(joined=False))
    assert found == STARTING
    assert found.status == 503
    assert found.reason == "starting: not in the consumer group yet"


def test_unpositioned_partitions_are_counted() -> None:
    assert readiness(AgentHealth(unpositioned=3)) == Readiness(
        False, "starting: 3 partitions not positioned"
    )


def test_a_stream_stopped_on_an_error_is_named_with_its_failure_class() -> None:
    found = readiness(AgentHealth(stopped_streams=(("metrics", "SchemaError (SQLSTATE 42501)"),)))
    assert found == Readiness(False, "stream metrics stopped: SchemaError (SQLSTATE 42501)")


def test_a_failure_class_is_the_error_class_and_sqlstate_never_its_text() -> None:
    denied = SchemaError("42501 permission denied for table secret_table", sqlstate="42501")
    assert failure_class(denied) == "SchemaError (SQLSTATE 42501)"
    assert failure_class(SchemaError("secret_table: no such migration")) == "SchemaError"
    # Whatever is not a five-character SQLSTATE is left out.
    assert failure_class(SchemaError("x", sqlstate="secret_table")) == "SchemaError"


def test_a_database_being_retried_is_unreachable() -> None:
    assert readiness(AgentHealth(retrying="postgres")) == Readiness(False, "database unreachable")


def test_kafka_being_retried_is_named() -> None:
    assert readiness(AgentHealth(retrying="kafka")) == Readiness(
        False, "kafka unreachable: retrying writes"
    )


def test_any_other_retry_says_writes_are_retried() -> None:
    assert readiness(AgentHealth(retrying="other")) == Readiness(False, "retrying writes")


def test_every_reason_is_given_at_once_most_fundamental_first() -> None:
    found = readiness(
        AgentHealth(
            unpositioned=2,
            stopped_streams=(
                ("events", "SchemaError (SQLSTATE 42703)"),
                ("config", "SchemaError (SQLSTATE 42501)"),
            ),
            retrying="postgres",
        )
    )
    assert found.reason == (
        "starting: 2 partitions not positioned; "
        "stream events stopped: SchemaError (SQLSTATE 42703); "
        "stream config stopped: SchemaError (SQLSTATE 42501); database unreachable"
    )


def test_a_stopping_agent_says_only_that() -> None:
    assert readiness(AgentHealth(stopping=True, retrying="postgres")) == Readiness(
        False, "stopping"
    )


class Agent:
    """What a ReadinessWatch reads of an agent: its ownership and two flags."""

    def __init__(self) -> None:
        self.ownership = Ownership({"agents.metrics": "metrics", "agents.events": "events"})
        self.metrics = Metrics()
        self.stopping = False
        self.retrying: str | None = None
        self.watch = ReadinessWatch(
            self.ownership,
            self.metrics,
            stopping=lambda: self.stopping,
            retrying=lambda: self.retrying,
        )

    def gauge(self, name: str, stream: str | None = None) -> float | None:
        labels = {} if stream is None else {"stream": stream}
        return self.metrics.registry.get_sample_value(name, labels)


def test_the_watch_starts_unready_and_is_ready_once_joined_and_positioned() -> None:
    agent = Agent()
    assert agent.watch.current == STARTING
    agent.ownership.assigned_event([("agents.metrics", 0), ("agents.events", 0)])
    agent.watch.joined()
    assert agent.watch.current == Readiness(False, "starting: 2 partitions not positioned")
    assert agent.gauge("pipeline_ready") == 0
    agent.ownership.positioned_event({("agents.metrics", 0): 0, ("agents.events", 0): 5})
    agent.watch.decide()
    assert agent.watch.current == Readiness(True, "ready")
    assert agent.gauge("pipeline_ready") == 1


def test_the_watch_reads_stopping_and_retrying_from_the_agent_when_it_decides() -> None:
    agent = Agent()
    agent.watch.joined()
    agent.retrying = "kafka"
    assert agent.watch.current.ready  # decided before the flag changed
    agent.watch.decide()
    assert agent.watch.current == Readiness(False, "kafka unreachable: retrying writes")
    agent.stopping = True
    agent.watch.decide()
    assert agent.watch.current == Readiness(False, "stopping")
    assert agent.gauge("pipeline_ready") == 0


def test_stream_gauges_follow_switched_off_and_stopped_streams() -> None:
    agent = Agent()
    agent.watch.joined()
    agent.watch.show_streams()
    assert [agent.gauge("pipeline_stream_active", s) for s in ("metrics", "events")] == [1, 1]
    agent.ownership.deactivate_event(["events"])
    agent.ownership.failed_event("metrics", "SchemaError (SQLSTATE 42501)")
    agent.watch.show_streams()
    assert [agent.gauge("pipeline_stream_active", s) for s in ("metrics", "events")] == [0, 0]
    assert [agent.gauge("pipeline_stream_stopped", s) for s in ("metrics", "events")] == [1, 0]
    # A stream switched off on purpose leaves the agent ready; a stopped one does not.
    assert agent.watch.current == Readiness(
        False, "stream metrics stopped: SchemaError (SQLSTATE 42501)"
    )
    agent.ownership.activate_event(["metrics", "events"])
    agent.watch.show_streams()
    assert agent.watch.current == Readiness(True, "ready")
    assert [agent.gauge("pipeline_stream_stopped", s) for s in ("metrics", "events")] == [0, 0]
