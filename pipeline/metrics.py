"""Prometheus metrics of a DatabaseAgent: base units, ``_total`` counters, small label sets.

Labels come only from fixed, small sets (topic, table, partition, error class, mode), never from
keys, ids or error text, so the series count does not grow with the data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


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
        self.lag = Gauge(
            "pipeline_consumer_lag_records",
            "Records behind the end of the partition",
            ["topic", "partition"],
            registry=r,
        )
        self.stream_stopped = Gauge(
            "pipeline_stream_stopped",
            "1 when a stream stopped on a schema or permission error (fix, then activate)",
            ["stream"],
            registry=r,
        )
        self.stream_active = Gauge(
            "pipeline_stream_active",
            "1 when a stream is ingested: switched on and not stopped on an error",
            ["stream"],
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
            "pipeline_last_commit_timestamp_seconds", "When the last batch committed", registry=r
        )

    def total(self, name: str) -> float:
        """The sum of every sample of the metric ``name`` (all label values)."""
        return sum(
            sample.value
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == name
        )

    def serve(self, address: str) -> None:
        """Serve ``/metrics`` on ``host:port`` (loopback by default) until :meth:`close`."""
        host, _, port = address.rpartition(":")
        self._server, _ = start_http_server(int(port), addr=host, registry=self.registry)

    def close(self) -> None:
        if (server := getattr(self, "_server", None)) is not None:
            server.shutdown()
            server.server_close()
