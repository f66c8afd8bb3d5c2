"""Kafka lookups for lag, off the DatabaseAgent's hot path: end offsets, and the timestamp of
the record at a stored offset (docs/observability.md, "Lag: records and seconds").

One consumer of its own, without a group, reading committed records only (as the agent
does), so the end offsets are last stable offsets and aborted records are skipped. It asks
even for partitions the agent has paused (a switched-off stream, a batch being retried): the
agent's own consumer learns end offsets only from fetch responses, which paused partitions do
not get.

Each lookup is bounded by ``asyncio.timeout``, never ``wait_for``: lookups run in the agent's
lag task, which the agent cancels as it stops, and Python 3.11's ``wait_for`` loses a cancel
that comes as the lookup completes (the task would go on, and the agent never stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline import kafka, kafka_clients
from pipeline.batching import Partition
from pipeline.kafka_clients import KafkaSettings

# The first record at an offset is all a lookup needs: fetch little.
_FETCH_BYTES = 64 * 1024


class LagProbe:
    """``start()``, then :meth:`end_offsets` and :meth:`oldest_timestamps`; ``stop()``."""

    def __init__(self, settings: KafkaSettings, *, timeout_s: float) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None

    async def end_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        """Each partition's end offset (its last stable offset), asked of the brokers now."""
        if not partitions:
            return {}
        consumer = await self._started()
        tps = [TopicPartition(t, p) for t, p in partitions]
        async with asyncio.timeout(self._timeout_s):  # not wait_for: the module says why
            found = await consumer.end_offsets(tps)
        return {(tp.topic, tp.partition): offset for tp, offset in found.items()}

    async def oldest_timestamps(
        self, stored: Mapping[Partition, int], ends: Mapping[Partition, int]
    ) -> dict[Partition, int | None]:
        """Per partition, the timestamp (ms) of the first committed record at or past its
        stored offset, or None when there is none before its end offset (only transaction
        markers or aborted records). Partitions not read within the timeout are left out."""
        if not stored:
            return {}
        found: dict[Partition, int | None] = {}
        # Bounded as a whole: a position being reset would otherwise be waited for.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout_s + 1):
                await self._first_records(stored, ends, found)
        return found

    async def _first_records(
        self,
        stored: Mapping[Partition, int],
        ends: Mapping[Partition, int],
        found: dict[Partition, int | None],
    ) -> None:
        consumer = await self._started()
        wanted = {TopicPartition(t, p): offset for (t, p), offset in stored.items()}
        consumer.assign(list(wanted))
        for tp, offset in wanted.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + self._timeout_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                pending = [tp for tp in wanted if (tp.topic, tp.partition) not in found]
                if not pending:
                    break
                # One record per call: aiokafka builds a Python record for each one returned.
                fetched = await consumer.getmany(
                    *pending, timeout_ms=int(min(left, 0.5) * 1000), max_records=1
                )
                for tp, records in fetched.items():
                    if records:
                        found[(tp.topic, tp.partition)] = records[0].timestamp
                        consumer.pause(tp)  # no prefetching past what was asked
                for tp in pending:
                    key = (tp.topic, tp.partition)
                    if key not in found and key in ends:
                        position = await consumer.position(tp)
                        if position >= ends[key]:  # read to the end: only markers were there
                            found[key] = None
        finally:
            consumer.pause(*wanted)

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = kafka_clients.consumer(
                self._settings,
                group_id=None,
                enable_auto_commit=False,
                # A stored offset that retention deleted: the oldest record kept waits.
                auto_offset_reset="earliest",
                isolation_level="read_committed",
                max_partition_fetch_bytes=_FETCH_BYTES,
                fetch_max_bytes=_FETCH_BYTES * 8,
                fetch_max_wait_ms=100,
                request_timeout_ms=max(int(self._timeout_s * 1000), 1000),
            )
            try:
                async with asyncio.timeout(self._timeout_s):
                    await consumer.start()
            except BaseException:
                await kafka.stop_consumer(consumer)  # the next lookup starts a new one
                raise
            self._consumer = consumer
        return self._consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await kafka.stop_consumer(consumer)
