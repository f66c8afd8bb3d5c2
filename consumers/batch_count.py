"""A batch's accounting: what the DatabaseAgent counts into its metrics once a batch committed
(or turned out to have nothing to write), from the batch's :class:`Plan` and the writer's
:class:`Written`, with its records' latency (:class:`pipeline.latency.LatencyCount`). No IO;
times are passed in. docs/observability.md says what each series means.
"""

from __future__ import annotations

from collections.abc import Mapping

from consumers.writer import Written
from pipeline.batching import Partition, Plan
from pipeline.catalog import Catalog
from pipeline.latency import LatencyCount
from pipeline.metrics import Metrics


class BatchCount:
    """Counts the batches of the streams of ``topics`` (deployed topic -> stream name), streams
    of ``catalog``."""

    def __init__(self, metrics: Metrics, topics: Mapping[str, str], catalog: Catalog) -> None:
        self._metrics = metrics
        self._topic_of = {stream: topic for topic, stream in topics.items()}
        self._table_of = {stream: catalog[stream].table for stream in self._topic_of}
        self._latency = LatencyCount(metrics, topics)

    def committed(
        self,
        work: Plan,
        written: Written,
        stamps: Mapping[Partition, list[int]],
        *,
        fetch_seconds: float,
        started: float,
        committed: float,
        now: float,
    ) -> None:
        """A committed batch: its records, rows new to their tables, rows whose key was stored
        already, rows older than their stream's retention horizon, dead letters, its size and
        duration, its phases, and its records' latency (from ``stamps``, their Kafka
        timestamps taken at fetch time: :meth:`LatencyCount.count`). ``started`` and
        ``committed`` are ``time.monotonic()`` when the write began and once COMMIT returned;
        ``now`` is the wall clock of the commit."""
        m = self._metrics
        for (topic, _), part in work.parts.items():
            m.records_consumed.labels(topic, "live").inc(len(part.records))
        for stream, stream_rows in written.rows.items():
            new, refused = written.new[stream], len(written.refused.get(stream, ()))
            m.rows_ingested.labels(self._table_of[stream], "live").inc(new)
            expired = len(written.expired.get(stream, ()))
            duplicates = len(stream_rows) - new - refused - expired
            m.duplicates_skipped.labels(self._topic_of[stream]).inc(duplicates)
            if expired:
                m.rows_expired.labels(stream).inc(expired)
        for letter in written.letters:
            m.dead_lettered.labels(letter.topic, letter.error_class).inc()
        self.skipped(work)
        m.batches.inc()
        m.batch_duration.observe(committed - started)
        m.batch_records.observe(sum(len(p.records) for p in work.parts.values()))
        m.last_commit.set(now)
        m.batch_phase.labels("fetch_decode").observe(fetch_seconds)
        m.batch_phase.labels("write").observe(written.written_at - started)
        m.batch_phase.labels("commit").observe(committed - written.written_at)
        self._latency.count(work, stamps, now)

    def skipped(self, work: Plan) -> None:
        """The records of ``work`` behind their partition's stored offset: consumed, and
        skipped as already ingested."""
        for topic, skipped in work.already_ingested.items():
            self._metrics.records_consumed.labels(topic, "live").inc(skipped)
            self._metrics.duplicates_skipped.labels(topic).inc(skipped)
