"""The DatabaseAgent's lag watch: each owned partition's lag in records and in seconds, measured
every ``lag_refresh_s`` and after each commit, and its gauges. The arithmetic is
:mod:`pipeline.lag`'s; docs/observability.md says what each gauge means.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.batching import Batch, OffsetMove, Partition
from pipeline.kafka_clients import KafkaSettings
from pipeline.lag import LagBook, timestamp_in_hand
from pipeline.lag_probe import LagProbe
from pipeline.metrics import Metrics
from pipeline.ownership import Ownership

log = logging.getLogger(__name__)


def probe_for(kafka: KafkaSettings, interval_s: float) -> LagProbe:
    """A probe whose lookups give up well before the next refresh is due."""
    return LagProbe(kafka, timeout_s=max(min(interval_s * 2, 10.0), 1.0))


class LagWatch:
    """``start()`` once the agent's consumer runs, ``stop()`` when the agent closes.

    ``in_hand`` returns the batches fetched and not written yet (the one being written, the
    one filling): the timestamp of a record they hold is not asked of Kafka. ``after_each``
    runs after every refresh, failed or not (the agent decides its readiness then).
    """

    def __init__(
        self,
        ownership: Ownership,
        metrics: Metrics,
        in_hand: Callable[[], Iterable[Batch | None]],
        after_each: Callable[[], object],
    ) -> None:
        self._ownership = ownership
        self._metrics = metrics
        self._in_hand = in_hand
        self._after_each = after_each
        self._book = LagBook()
        self._consumer: AIOKafkaConsumer | None = None
        self._probe: LagProbe | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, consumer: AIOKafkaConsumer, probe: LagProbe, interval_s: float) -> None:
        """Refresh every ``interval_s`` through ``probe`` (:func:`probe_for`), which
        :meth:`stop` stops."""
        self._consumer = consumer
        self._probe = probe
        self._task = asyncio.ensure_future(self._watch(probe, interval_s))

    async def stop(self, deadline: float) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._probe is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._probe.stop(), deadline)

    def records_behind(self) -> int:
        """Records behind the end offsets of the owned, positioned partitions."""
        if self._consumer is None:
            return 0
        lag = 0
        for partition, position in self._ownership.positions().items():
            end = self._end_of(partition)
            if end is not None:
                lag += max(end - position, 0)
        return lag

    def seconds_behind(self) -> float:
        """The oldest unwritten record's age, the most of the owned partitions."""
        return self._book.seconds_behind()

    def show(self, partition: Partition, stored: int, now: float) -> None:
        """Set one partition's lag gauges from what is known without asking Kafka."""
        end = self._end_of(partition)
        if end is None:
            return
        in_hand = self._in_hand_ms(partition, stored) if end > stored else None
        lag = self._book.measure(partition, stored, end, now, in_hand)
        self._metrics.show_partition(
            *partition, records=lag.records, seconds=lag.seconds, stored=stored, end=lag.end
        )

    def show_moved(self, moves: Iterable[OffsetMove], now: float) -> None:
        """Set the lag gauges of the partitions a commit moved, those still positioned."""
        positions = self._ownership.positions()
        for move in moves:
            partition = (move.topic, move.partition)
            stored = positions.get(partition)
            if stored is not None:
                self.show(partition, stored, now)

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Drop what is known of partitions this instance does not own any more, and their
        series."""
        partitions = list(partitions)
        self._book.forget(partitions)
        for partition in partitions:
            self._metrics.forget_partition(*partition)

    async def _watch(self, probe: LagProbe, interval_s: float) -> None:
        """Refresh whatever the agent is doing (idle, paused, retrying). Failures (Kafka away)
        are logged once each, and the first refresh that works again once; the next refresh
        tries again, and lag in seconds keeps growing meanwhile from the timestamps already
        known."""
        failing, failures = "", 0
        while True:
            try:
                await self.refresh(probe)
                if failures:  # said once, as the failure was: the lag gauges are fresh again
                    log.info("measuring lag works again after %d failed refreshes", failures)
                failing, failures = "", 0
            except Exception as exc:  # measuring must never stop ingesting
                if repr(exc) != failing:
                    log.warning("measuring lag failed (retried every %ss): %r", interval_s, exc)
                failing, failures = repr(exc), failures + 1
            self._after_each()
            await asyncio.sleep(interval_s)

    async def refresh(self, probe: LagProbe) -> None:
        """Ask Kafka for the end offsets of the owned partitions and the timestamps of the
        oldest unwritten records the agent does not hold, then set every gauge."""
        own = self._ownership
        owned = set(own.assigned())
        self.forget([p for p in self._book.measured() if p not in owned])
        asked = await probe.end_offsets(list(own.positions()))
        still_owned = set(own.assigned())  # a rebalance may have come meanwhile
        for partition, offset in asked.items():
            if partition in still_owned:
                self._book.note_end(partition, offset)
        missing = {
            partition: stored
            for partition, stored in own.positions().items()
            if self._book.needs_lookup(partition, stored, self._end_of(partition))
            and self._in_hand_ms(partition, stored) is None
        }
        if missing:
            found = await probe.oldest_timestamps(missing, self._book.ends)
            still_owned = set(own.assigned())
            for partition, timestamp in found.items():
                if partition in still_owned:
                    self._book.found(partition, missing[partition], timestamp)
        now = time.time()
        for partition, stored in own.positions().items():
            self.show(partition, stored, now)

    def _in_hand_ms(self, partition: Partition, stored: int) -> int | None:
        return timestamp_in_hand(self._in_hand(), partition, stored)

    def _end_of(self, partition: Partition) -> int | None:
        """The newest end offset known: asked of Kafka by the last refresh, or seen in the
        consumer's fetch responses since (fresher while the partition fetches)."""
        end = self._book.ends.get(partition)
        consumer = self._consumer
        tp = TopicPartition(*partition)
        if consumer is not None and tp in consumer.assignment():
            seen = consumer.last_stable_offset(tp)
            if seen is None or seen < 0:
                seen = consumer.highwater(tp)
            if seen is not None and seen >= 0 and (end is None or seen > end):
                end = self._book.note_end(partition, seen)
        return end
