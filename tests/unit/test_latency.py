"""LatencyCount: a committed batch's records counted into the end-to-end latency histogram and
the freshness gauge, per stream, from the timestamps taken at fetch time."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.batching import Batch, plan
from pipeline.latency import LatencyCount
from pipeline.metrics import LATENCY_BUCKETS, Metrics

NOW = 1_790_000_000.0
TOPICS = {"agents.metrics": "metrics", "agents.events": "events"}


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int
    serialized_value_size: int = 1


def batch(parts: dict[tuple[str, int], list[tuple[int, float]]]) -> Batch:
    """Records per partition as (offset, age in seconds at NOW)."""
    found = Batch(1)
    for (topic, number), records in parts.items():
        recs = [Rec(topic, number, o, int((NOW - age) * 1000)) for o, age in records]
        found.add((topic, number), recs, ([], []), 0.0)
    return found


def at_most(metrics: Metrics, stream: str, bound: float) -> int:
    counts, _ = metrics.latency.samples(stream)
    return counts[LATENCY_BUCKETS.index(bound)]


def test_each_record_is_one_observation_of_its_stream() -> None:
    metrics = Metrics()
    fetched = batch(
        {
            ("agents.metrics", 0): [(0, 0.02), (1, 0.2)],
            ("agents.metrics", 1): [(0, 3.0)],
            ("agents.events", 0): [(7, 40.0)],
        }
    )
    stamps = {key: [r.timestamp for r in part.records] for key, part in fetched.parts.items()}
    work = plan(
        fetched, {("agents.metrics", 0): 0, ("agents.metrics", 1): 0, ("agents.events", 0): 7}
    )
    LatencyCount(metrics, TOPICS).count(work, stamps, NOW)
    counts, total = metrics.latency.samples("metrics")
    assert counts[-1] == 3
    assert total == pytest.approx(3.22)
    assert [at_most(metrics, "metrics", b) for b in (0.025, 0.25, 2.5, 5)] == [1, 2, 2, 3]
    assert metrics.latency.samples("events")[0][-1] == 1
    newest = metrics.registry.get_sample_value(
        "pipeline_newest_record_timestamp_seconds", {"stream": "metrics"}
    )
    assert newest == pytest.approx(NOW - 0.02)


def test_a_part_trimmed_by_the_plan_counts_the_tail_of_its_stamps() -> None:
    metrics = Metrics()
    fetched = batch({("agents.metrics", 0): [(0, 100.0), (1, 100.0), (2, 0.1), (3, 0.1)]})
    stamps = {
        ("agents.metrics", 0): [r.timestamp for r in fetched.parts[("agents.metrics", 0)].records]
    }
    work = plan(fetched, {("agents.metrics", 0): 2})  # 0 and 1 were ingested already
    LatencyCount(metrics, TOPICS).count(work, stamps, NOW)
    counts, total = metrics.latency.samples("metrics")
    assert counts[-1] == 2
    assert total == pytest.approx(0.2)


def test_a_part_without_its_stamps_reads_its_records() -> None:
    metrics = Metrics()
    fetched = batch({("agents.events", 1): [(5, 1.0), (6, 2.0)]})
    LatencyCount(metrics, TOPICS).count(plan(fetched, {("agents.events", 1): 5}), {}, NOW)
    counts, total = metrics.latency.samples("events")
    assert [at_most(metrics, "events", b) for b in (0.5, 1, 2.5)] == [0, 1, 2]
    assert (counts[-1], total) == (2, pytest.approx(3.0))


def test_freshness_never_goes_back() -> None:
    metrics = Metrics()
    count = LatencyCount(metrics, TOPICS)
    newer = batch({("agents.metrics", 0): [(0, 1.0)]})
    older = batch({("agents.metrics", 0): [(1, 50.0)]})
    count.count(plan(newer, {("agents.metrics", 0): 0}), {}, NOW)
    count.count(plan(older, {("agents.metrics", 0): 1}), {}, NOW)
    newest = metrics.registry.get_sample_value(
        "pipeline_newest_record_timestamp_seconds", {"stream": "metrics"}
    )
    assert newest == pytest.approx(NOW - 1.0)
    assert metrics.latency.samples("metrics")[0][-1] == 2
