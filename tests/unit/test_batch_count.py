"""BatchCount: what a committed batch (or one with nothing to write) counts into the agent's
metrics, from its Plan and the writer's Written."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from consumers.batch_count import BatchCount
from consumers.writer import Refused, Written
from pipeline.batching import Batch, plan
from pipeline.catalog import load as load_catalog
from pipeline.db import DeadLetter
from pipeline.metrics import Metrics

NOW = 1_790_000_000.0
TOPICS = {"agents.metrics": "metrics", "agents.events": "events"}


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int = int((NOW - 2) * 1000)
    serialized_value_size: int = 1


def batch(parts: dict[tuple[str, int], range]) -> Batch:
    found = Batch(7)
    for (topic, number), offsets in parts.items():
        found.add((topic, number), [Rec(topic, number, o) for o in offsets], ([], []), 0.0)
    return found


def letter(topic: str, offset: int, error_class: str) -> DeadLetter:
    return DeadLetter(topic, 0, offset, None, b"x", [], None, error_class, "why")


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_committed_batch_counts_records_rows_duplicates_letters_and_phases() -> None:
    metrics = Metrics()
    # metrics 0: offsets 3..9 behind the stored 5 → 2 already ingested; events 1: 0..3.
    work = plan(
        batch({("agents.metrics", 0): range(3, 10), ("agents.events", 1): range(0, 4)}),
        {("agents.metrics", 0): 5, ("agents.events", 1): 0},
    )
    written = Written(
        rows={"metrics": [()] * 5, "events": [()] * 4},
        new={"metrics": 5, "events": 1},  # 3 events found their key stored
        refused={"events": [Refused(0, "22P02", "bad")]},
        letters=[letter("agents.events", 0, "DatabaseRejected")],
        results=[],
        written_at=10.25,
    )
    count = BatchCount(metrics, TOPICS, load_catalog())
    count.committed(work, written, {}, fetch_seconds=0.5, started=10.0, committed=10.75, now=NOW)

    assert (
        value(metrics, "pipeline_records_consumed_total", topic="agents.metrics", mode="live") == 7
    )
    assert (
        value(metrics, "pipeline_records_consumed_total", topic="agents.events", mode="live") == 4
    )
    assert (
        value(metrics, "pipeline_rows_ingested_total", table="performance_metrics", mode="live")
        == 5
    )
    assert value(metrics, "pipeline_rows_ingested_total", table="system_events", mode="live") == 1
    # metrics: the 2 behind the stored offset; events: 4 rows - 1 new - 1 refused.
    assert value(metrics, "pipeline_duplicates_skipped_total", topic="agents.metrics") == 2
    assert value(metrics, "pipeline_duplicates_skipped_total", topic="agents.events") == 2
    assert (
        value(
            metrics,
            "pipeline_dead_letters_total",
            topic="agents.events",
            error_class="DatabaseRejected",
        )
        == 1
    )
    assert value(metrics, "pipeline_batches_total") == 1
    assert value(metrics, "pipeline_batch_duration_seconds_sum") == pytest.approx(0.75)
    assert value(metrics, "pipeline_batch_records_sum") == 9  # the records planned to write
    assert value(metrics, "pipeline_last_commit_timestamp_seconds") == NOW
    for phase, seconds in (("fetch_decode", 0.5), ("write", 0.25), ("commit", 0.5)):
        assert value(metrics, "pipeline_batch_phase_seconds_sum", phase=phase) == pytest.approx(
            seconds
        )
        assert value(metrics, "pipeline_batch_phase_seconds_count", phase=phase) == 1
    # Latency, one observation per record written, each 2 s old.
    assert metrics.latency.samples("metrics")[1] == pytest.approx(5 * 2.0)
    assert metrics.latency.samples("events")[1] == pytest.approx(4 * 2.0)


def test_a_batch_with_nothing_to_write_counts_only_what_was_already_ingested() -> None:
    metrics = Metrics()
    work = plan(batch({("agents.metrics", 0): range(0, 3)}), {("agents.metrics", 0): 3})
    assert not work.moves
    BatchCount(metrics, TOPICS, load_catalog()).skipped(work)
    assert (
        value(metrics, "pipeline_records_consumed_total", topic="agents.metrics", mode="live") == 3
    )
    assert value(metrics, "pipeline_duplicates_skipped_total", topic="agents.metrics") == 3
    assert value(metrics, "pipeline_batches_total") == 0
    assert value(metrics, "pipeline_batch_phase_seconds_count", phase="write") is None


def test_rows_older_than_the_retention_horizon_are_counted_as_expired_not_duplicates() -> None:
    metrics = Metrics()
    work = plan(batch({("agents.metrics", 0): range(0, 6)}), {("agents.metrics", 0): 0})
    written = Written(
        rows={"metrics": [()] * 6},
        new={"metrics": 2},  # of the 4 written, 2 found their key stored
        refused={},
        letters=[],
        results=[],
        expired={"metrics": [0, 3]},
    )
    BatchCount(metrics, TOPICS, load_catalog()).committed(
        work, written, {}, fetch_seconds=0.0, started=0.0, committed=0.0, now=NOW
    )
    assert value(metrics, "pipeline_rows_expired_total", stream="metrics") == 2
    assert value(metrics, "pipeline_duplicates_skipped_total", topic="agents.metrics") == 2
    assert value(metrics, "pipeline_rows_expired_total", stream="events") is None
