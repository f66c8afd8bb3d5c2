"""The bulk latency histogram against a naive per-record computation, freshness, per-partition
series and build information."""

from __future__ import annotations

import platform
import random
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import (
    LATENCY_BUCKETS,
    BulkHistogram,
    Metrics,
    ages_at_most,
    build_version,
)


def naive_counts(values: list[float], bounds: tuple[float, ...]) -> list[int]:
    return [sum(1 for v in values if v <= bound) for bound in bounds]


def exposed(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every sample of metric family ``name``: (sample name, label values) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(v for k, v in sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for s in family.samples
    }


@pytest.mark.parametrize("seed", range(20))
def test_ages_at_most_matches_counting_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    now_ms = 1_790_000_000_000 + rng.randrange(10**6)
    # Ages in ms, on and around the bounds (le is inclusive), and far off either way.
    on_bounds = [round(b * 1000) + rng.choice((-1, 0, 0, 1)) for b in LATENCY_BUCKETS]
    ages = [rng.choice([*on_bounds, rng.randrange(-50, 5_000_000)]) for _ in range(500)]
    timestamps = sorted(now_ms - a for a in ages)
    expected = naive_counts([(now_ms - t) / 1000 for t in timestamps], LATENCY_BUCKETS)
    assert ages_at_most(now_ms, timestamps, LATENCY_BUCKETS) == expected


@pytest.mark.parametrize("seed", range(10))
def test_the_bulk_histogram_exposes_what_per_record_observations_would(seed: int) -> None:
    rng = random.Random(seed)
    registry = CollectorRegistry()
    histogram = BulkHistogram("x_latency_seconds", "doc", "stream", LATENCY_BUCKETS, registry)
    ages: dict[str, list[float]] = {"metrics": [], "events": []}
    for _ in range(rng.randint(1, 8)):  # batches
        stream = rng.choice(list(ages))
        now = 1_790_000_000 + rng.random() * 1000
        now_ms = round(now * 1000)
        # Nearly sorted timestamps of a few partitions, as a batch holds them.
        runs = []
        for _ in range(rng.randrange(4)):
            start = now_ms - rng.randrange(0, 4_000_000)
            runs.append([start + i * rng.randrange(-1, 3) for i in range(rng.randrange(50))])
        timestamps = [t for run in runs for t in run]
        newest = histogram.observe_ages(stream, now, [list(run) for run in runs])
        assert newest == (max(timestamps) if timestamps else None)
        ages[stream] += [(now_ms - t) / 1000 for t in timestamps]
    samples = exposed(registry, "x_latency_seconds")
    for stream, found in ages.items():
        if not found:
            assert ("x_latency_seconds_count", (stream,)) not in samples
            continue
        for bound, count in zip(LATENCY_BUCKETS, naive_counts(found, LATENCY_BUCKETS), strict=True):
            assert samples[("x_latency_seconds_bucket", (str(float(bound)), stream))] == count
        assert samples[("x_latency_seconds_bucket", ("+Inf", stream))] == len(found)
        assert samples[("x_latency_seconds_count", (stream,))] == len(found)
        assert samples[("x_latency_seconds_sum", (stream,))] == pytest.approx(sum(found))


def test_freshness_only_moves_forward() -> None:
    metrics = Metrics()
    metrics.note_newest("metrics", 1_790_000_100.5)
    metrics.note_newest("metrics", 1_790_000_000.0)  # a replay of old records
    assert metrics.total("pipeline_newest_record_timestamp_seconds") == 1_790_000_100.5
    metrics.note_newest("metrics", 1_790_000_200.0)
    assert metrics.total("pipeline_newest_record_timestamp_seconds") == 1_790_000_200.0


PARTITION_SERIES = (
    "pipeline_consumer_lag_records",
    "pipeline_consumer_lag_seconds",
    "pipeline_partition_stored_offset",
    "pipeline_partition_end_offset",
)


def partition_series(metrics: Metrics) -> dict[str, dict[tuple[str, ...], float]]:
    return {
        name: {labels: v for (_, labels), v in exposed(metrics.registry, name).items()}
        for name in PARTITION_SERIES
    }


def test_a_partitions_lag_in_seconds_has_no_series_until_it_is_known() -> None:
    metrics = Metrics()
    metrics.show_partition("agents.metrics", 0, records=5, seconds=None, stored=10, end=15)
    assert partition_series(metrics) == {
        "pipeline_consumer_lag_records": {("0", "agents.metrics"): 5},
        "pipeline_consumer_lag_seconds": {},
        "pipeline_partition_stored_offset": {("0", "agents.metrics"): 10},
        "pipeline_partition_end_offset": {("0", "agents.metrics"): 15},
    }
    metrics.show_partition("agents.metrics", 0, records=0, seconds=0.0, stored=15, end=15)
    assert partition_series(metrics)["pipeline_consumer_lag_seconds"] == {
        ("0", "agents.metrics"): 0
    }


def test_a_partition_no_longer_owned_loses_every_series() -> None:
    metrics = Metrics()
    for partition in (0, 1):
        metrics.show_partition("agents.metrics", partition, records=7, seconds=7, stored=1, end=8)
    metrics.forget_partition("agents.metrics", 0)
    metrics.forget_partition("agents.metrics", 0)  # twice: nothing left to remove is fine
    found = partition_series(metrics)
    assert all(list(series) == [("1", "agents.metrics")] for series in found.values())
    # Owned again later (a rebalance gave it back): its series come back.
    metrics.show_partition("agents.metrics", 0, records=2, seconds=3, stored=6, end=8)
    assert partition_series(metrics)["pipeline_consumer_lag_seconds"] == {
        ("0", "agents.metrics"): 3,
        ("1", "agents.metrics"): 7,
    }


def test_build_info_names_the_version_and_python() -> None:
    metrics = Metrics()
    assert exposed(metrics.registry, "pipeline_build_info") == {
        ("pipeline_build_info", (platform.python_version(), build_version())): 1
    }
    assert build_version() != "unknown"  # the package is installed in the test environment


def test_last_commit_reads_the_start_time_before_the_first_commit() -> None:
    # PipelineNoCommit compares it with time(): zero would fire it at once, "56 years ago".
    before = time.time()
    metrics = Metrics()
    after = time.time()
    assert before <= metrics.total("pipeline_last_commit_timestamp_seconds") <= after
