"""Prometheus metrics of a DatabaseAgent: base units, ``_total`` counters, small label sets.

Labels come only from fixed, small sets (topic, table, partition, error class, mode, stream,
phase), never from keys, ids or error text, so the series count does not grow with the data.
docs/observability.md lists every series and when it moves.

Per-record measurements (the end-to-end latency) are taken per batch, in bulk: a Python call
per record would cost several percent of the throughput. :class:`BulkHistogram` takes a batch's
record timestamps at once and counts them into its buckets with a sort and a bisection per
bucket.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import importlib.metadata
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline import endpoints, heap
from pipeline.readiness import Readiness

#: Bounds of pipeline_end_to_end_latency_seconds: from a batch's age at low rates (tens of
#: milliseconds) to a backlog of an hour.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_PARTITION_GAUGES = ("lag", "lag_seconds", "stored_offset", "end_offset")


def ages_at_most(now_ms: int, ascending_ms: Sequence[int], bounds: Sequence[float]) -> list[int]:
    """Per bound in seconds (ascending), how many of the timestamps (ms, ascending) are at
    most that old at ``now_ms``: ``now - t <= bound`` is ``t >= now - bound``."""
    n = len(ascending_ms)
    return [n - bisect.bisect_left(ascending_ms, now_ms - bound * 1000) for bound in bounds]


class BulkHistogram(Collector):
    """A histogram with one label, observed a batch at a time.

    Thread-safe: batches are added on the event loop while the HTTP server's thread collects.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._lock = threading.Lock()
        # Per label value: cumulative counts per bound, then the total; and the sum.
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        registry.register(self)

    def observe_ages(self, value: str, now_s: float, runs: Iterable[list[int]]) -> int | None:
        """One observation per timestamp (ms) of ``runs``: its age at ``now_s``. Returns the
        newest timestamp, None when there was none.

        Each run (a partition's timestamps in offset order, nearly sorted) is sorted in place
        on its own: timsort is about linear on it, where sorting the runs together would
        merge them. Then each bucket's count is one bisection per run."""
        now_ms = round(now_s * 1000)
        bounds = self.bounds
        counts = [0] * (len(bounds) + 1)
        total_ms = 0
        newest: int | None = None
        for run in runs:
            if not run:
                continue
            run.sort()
            for i, n in enumerate(ages_at_most(now_ms, run, bounds)):
                counts[i] += n
            counts[-1] += len(run)
            total_ms += sum(run)
            if newest is None or run[-1] > newest:
                newest = run[-1]
        if counts[-1]:
            self._add(value, counts, (now_ms * counts[-1] - total_ms) / 1000)
        return newest

    def _add(self, value: str, counts: list[int], total: float) -> None:
        with self._lock:
            known = self._counts.get(value)
            if known is None:
                self._counts[value] = counts
                self._sums[value] = total
            else:
                self._counts[value] = [a + b for a, b in zip(known, counts, strict=True)]
                self._sums[value] += total

    def samples(self, value: str) -> tuple[list[int], float]:
        """The cumulative counts (one per bound, then +Inf) and the sum of one label value."""
        with self._lock:
            return list(self._counts.get(value, [0] * (len(self.bounds) + 1))), self._sums.get(
                value, 0.0
            )

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            found = {v: (list(c), self._sums[v]) for v, c in self._counts.items()}
        for value, (counts, total) in sorted(found.items()):
            buckets = [(_bound(b), c) for b, c in zip(self.bounds, counts, strict=False)]
            buckets.append(("+Inf", counts[-1]))
            family.add_metric([value], buckets, total)
        yield family


@dataclass
class _PartitionSeries:
    lag: Gauge
    stored_offset: Gauge
    end_offset: Gauge
    lag_seconds: Gauge | None = None


def _bound(bound: float) -> str:
    return str(int(bound)) + ".0" if bound == int(bound) else repr(bound)


def build_version() -> str:
    try:
        return importlib.metadata.version("agent-pipeline")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records_consumed = Counter(
            "pipeline_records_consumed_total",
            "Records of committed batches (written, dead-lettered or already stored); mode is "
            "live (a DatabaseAgent) or replay (pipeline replay)",
            ["topic", "mode"],
            registry=r,
        )
        self.rows_ingested = Counter(
            "pipeline_rows_ingested_total",
            "New rows written (for states and config: new versions in the history table); mode "
            "is live or replay",
            ["table", "mode"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "pipeline_dead_letters_total",
            "Records sent to the dead-letter store",
            ["topic", "error_class"],
            registry=r,
        )
        self.duplicates_skipped = Counter(
            "pipeline_duplicates_skipped_total",
            "Records already ingested (redelivered, or a natural key already present)",
            ["topic"],
            registry=r,
        )
        # Late records: not written, their offsets committed (docs/streams.md, "Late records").
        self.rows_expired = Counter(
            "pipeline_rows_expired_total",
            "Rows not written: older than their stream's retention horizon",
            ["stream"],
            registry=r,
        )
        self.batches = Counter(
            "pipeline_batches_total", "Ingest transactions committed", registry=r
        )
        self.batch_duration = Histogram(
            "pipeline_batch_duration_seconds",
            "Time to write and commit one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_records = Histogram(
            "pipeline_batch_records",
            "Records per batch",
            buckets=(1, 10, 100, 1000, 5000, 10000, 25000, 50000, 100000),
            registry=r,
        )
        self.retries = Counter(
            "pipeline_retries_total",
            "Retries after a transient failure (batch writes, positioning, batch ids), by source",
            ["kind"],
            registry=r,
        )
        self.fenced = Counter(
            "pipeline_fenced_batches_total",
            "Batches dropped because another consumer owns a partition now",
            registry=r,
        )
        self.records_lost = Counter(
            "pipeline_records_lost_total",
            "Records Kafka deleted (retention) before they were ingested: a stored offset "
            "below the log start, recorded in ingest_gaps",
            ["stream", "partition"],
            registry=r,
        )
        self.lag = Gauge(
            "pipeline_consumer_lag_records",
            "Records behind the end of the partition",
            ["topic", "partition"],
            registry=r,
        )
        self.stream_stopped = Gauge(
            "pipeline_stream_stopped",
            "1 when a stream stopped on a schema or permission error, or on a gap with "
            "PIPELINE_ON_GAP=stop (fix or decide, then activate)",
            ["stream"],
            registry=r,
        )
        self.stream_active = Gauge(
            "pipeline_stream_active",
            "1 when a stream is ingested: switched on and not stopped on an error",
            ["stream"],
            registry=r,
        )
        # Which stream a topic's partition series belong to: the alert rules join on it, so
        # no stream name is written in them (a catalog's stream is named freely).
        self.stream_topic = Gauge(
            "pipeline_stream_topic",
            "The stream of each topic this instance consumes (always 1)",
            ["stream", "topic"],
            registry=r,
        )
        self.control_commands = Counter(
            "pipeline_control_commands_total",
            "Control commands this instance applied, followed or rejected",
            ["kind", "outcome"],
            registry=r,
        )
        self.control_applied_seq = Gauge(
            "pipeline_control_applied_seq",
            "The sequence number of the last control command this instance applied",
            registry=r,
        )
        self.assignment_version = Gauge(
            "pipeline_assignment_version",
            "The assignment version in force (0: none assigned, the configuration rules)",
            registry=r,
        )
        self.replay_records_left = Gauge(
            "pipeline_replay_records_left",
            "Records a running pipeline replay has still to write",
            registry=r,
        )
        self.last_commit = Gauge(
            "pipeline_last_commit_timestamp_seconds",
            "When the last batch committed; before the first commit, when the process started",
            registry=r,
        )
        # Not zero before the first commit: "no commit for 5 minutes" then means since start,
        # not since 1970 (the PipelineNoCommit alert).
        self.last_commit.set(time.time())
        self.lag_seconds = Gauge(
            "pipeline_consumer_lag_seconds",
            "Age of the oldest record not yet written (now minus its Kafka timestamp); 0 when "
            "caught up",
            ["topic", "partition"],
            registry=r,
        )
        self.stored_offset = Gauge(
            "pipeline_partition_stored_offset",
            "The next offset to write, as stored in PostgreSQL",
            ["topic", "partition"],
            registry=r,
        )
        self.end_offset = Gauge(
            "pipeline_partition_end_offset",
            "The partition's end offset (last stable offset: the agent reads committed records)",
            ["topic", "partition"],
            registry=r,
        )
        self.newest_record = Gauge(
            "pipeline_newest_record_timestamp_seconds",
            "Kafka timestamp of the newest committed record of the stream (only moves forward)",
            ["stream"],
            registry=r,
        )
        self._newest: dict[str, float] = {}
        self._partitions: dict[tuple[str, int], _PartitionSeries] = {}
        self.latency = BulkHistogram(
            "pipeline_end_to_end_latency_seconds",
            "Commit time minus the Kafka record timestamp, one observation per record",
            "stream",
            LATENCY_BUCKETS,
            r,
        )
        self.batch_phase = Histogram(
            "pipeline_batch_phase_seconds",
            "Time per committed batch in each phase: fetch_decode (fetching and decoding its "
            "records), write (the transaction's statements), commit (COMMIT)",
            ["phase"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        # Partitioned tables (consumers/partition_watch.py): read from the database every 30 s
        # for the tables of this instance's streams, so they exist however maintenance runs.
        partitioned = ["stream", "table"]
        self.partitions = Gauge(
            "pipeline_partitions",
            "Partitions of a partitioned table, its DEFAULT partition aside",
            partitioned,
            registry=r,
        )
        self.partitions_premade = Gauge(
            "pipeline_partitions_premade",
            "Partitions made ahead: starting at or after the end of the current interval",
            partitioned,
            registry=r,
        )
        self.partition_newest_end = Gauge(
            "pipeline_partition_newest_end_seconds",
            "Seconds from now to the end of the newest partition (negative: in the past)",
            partitioned,
            registry=r,
        )
        self.partition_default_rows = Gauge(
            "pipeline_partition_default_rows",
            "Rows in the DEFAULT partition, counted up to 10,000: rows whose range has no "
            "partition yet, which the next maintenance pass moves",
            partitioned,
            registry=r,
        )
        self.partition_interval = Gauge(
            "pipeline_partition_interval_seconds",
            "The table's partition interval, at most (a month counts 31 days)",
            partitioned,
            registry=r,
        )
        self.partition_maintained = Gauge(
            "pipeline_partition_maintenance_last_success_timestamp_seconds",
            "When the last maintenance pass over the table succeeded (0: never)",
            partitioned,
            registry=r,
        )
        self.build_info = Gauge(
            "pipeline_build_info",
            "Build information (always 1)",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(build_version(), platform.python_version()).set(1)
        self.ready = Gauge(
            "pipeline_ready", "1 when /readyz answers 200 (ready), else 0", registry=r
        )
        # Read by the soak run (docs/testing.md): a task leak shows as this growing.
        self.asyncio_tasks = Gauge(
            "pipeline_asyncio_tasks",
            "Unfinished asyncio tasks on the process's event loop, counted at each scrape",
            registry=r,
        )
        # Read by the soak run too: what the process holds in use. RSS also counts what the
        # allocators keep mapped after a burst, which does not grow with a leak.
        Gauge(
            "pipeline_python_allocated_blocks",
            "Memory blocks the Python interpreter holds allocated (one per live object or "
            "buffer), counted at each scrape",
            registry=r,
        ).set_function(heap.allocated_blocks)
        if heap.malloc_in_use_bytes() is not None:
            Gauge(
                "pipeline_malloc_in_use_bytes",
                "Bytes C's malloc has handed out and not had back (large objects and buffers, "
                "C libraries), counted at each scrape; only where the C library is glibc",
                registry=r,
            ).set_function(lambda: float(heap.malloc_in_use_bytes() or 0))

    def count_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``pipeline_asyncio_tasks`` count ``loop``'s tasks. ``asyncio.all_tasks`` may be
        called from the HTTP server's thread: it copies the task set, retrying on a change."""
        self.asyncio_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))

    def total(self, name: str) -> float:
        """The sum of every sample of the metric ``name`` (all label values)."""
        return sum(
            sample.value
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == name
        )

    def note_newest(self, stream: str, timestamp_s: float) -> None:
        """Freshness: the stream's newest committed record timestamp, forward only (a replay
        of old records never lowers it)."""
        if timestamp_s > self._newest.get(stream, float("-inf")):
            self._newest[stream] = timestamp_s
            self.newest_record.labels(stream).set(timestamp_s)

    def show_partition(
        self,
        topic: str,
        partition: int,
        *,
        records: int,
        seconds: float | None,
        stored: int,
        end: int,
    ) -> None:
        """Set a partition's lag (records, and seconds when known), stored and end offsets.
        Called after every commit for the partitions it moved: the labelled children are
        kept, not looked up each time."""
        key = (topic, partition)
        series = self._partitions.get(key)
        if series is None:
            number = str(partition)
            series = self._partitions[key] = _PartitionSeries(
                self.lag.labels(topic, number),
                self.stored_offset.labels(topic, number),
                self.end_offset.labels(topic, number),
            )
        series.lag.set(records)
        series.stored_offset.set(stored)
        series.end_offset.set(end)
        if seconds is not None:
            if series.lag_seconds is None:  # no series until the age is known
                series.lag_seconds = self.lag_seconds.labels(topic, str(partition))
            series.lag_seconds.set(seconds)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a partition's series: this instance does not own it any more."""
        self._partitions.pop((topic, partition), None)
        for name in _PARTITION_GAUGES:
            gauge: Gauge = getattr(self, name)
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))

    def serve(self, address: str, readiness: Callable[[], Readiness] | None = None) -> None:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (loopback by
        default) until :meth:`close` (:mod:`pipeline.endpoints`). ``OSError`` when the address
        cannot be bound."""
        self._server = endpoints.serve(address, self.registry, readiness)

    def close(self) -> None:
        if (server := getattr(self, "_server", None)) is not None:
            server.close()
