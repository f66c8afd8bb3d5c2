"""End-to-end latency and freshness of committed records, counted once per batch: pure, ``now``
passed in. docs/observability.md, "Freshness, latency and phases", says what they measure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from pipeline.batching import Partition, Plan
from pipeline.metrics import Metrics


class LatencyCount:
    """Counts a committed batch's records into ``pipeline_end_to_end_latency_seconds`` and
    ``pipeline_newest_record_timestamp_seconds``, per stream (``stream_of_topic``: deployed
    topic to stream name)."""

    def __init__(self, metrics: Metrics, stream_of_topic: Mapping[str, str]) -> None:
        self._metrics = metrics
        self._stream_of_topic = stream_of_topic

    def count(self, work: Plan, stamps: Mapping[Partition, list[int]], now: float) -> None:
        """One latency observation per record, counted in bulk, and the newest record
        timestamp, per stream of ``work``. ``stamps`` are the Kafka timestamps taken when the
        batch was fetched, per partition in record order; a part the plan trimmed (records
        behind the stored offset) is their tail."""
        by_stream: dict[str, list[list[int]]] = defaultdict(list)
        for partition, part in work.parts.items():
            taken = stamps.get(partition)
            count = len(part.records)
            if taken is not None and len(taken) >= count:
                run = taken[len(taken) - count :] if len(taken) > count else taken
            else:  # not taken at fetch time (cannot happen; but never count wrong)
                run = [r.timestamp for r in part.records]
            by_stream[self._stream_of_topic[partition[0]]].append(run)
        for stream, runs in by_stream.items():
            newest = self._metrics.latency.observe_ages(stream, now, runs)
            if newest is not None:
                self._metrics.note_newest(stream, newest / 1000)
