"""The DatabaseAgent's consumer side: the batch being filled (records fetched and decoded into
rows, their Kafka timestamps for the latency count, the time spent fetching), polling while
the agent waits, and :class:`Ownership`'s actions carried out on both. When a batch is due,
and how filling shares the event loop with the batch being written: docs/architecture.md,
"The actors".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.batching import Batch, Limits, Partition
from pipeline.ownership import Actions, Ownership
from pipeline.rows import StreamDecoder

POLL_MS = 200  # how long one fetch waits when nothing arrives: bounds the reaction to a stop
# How long one fetch of a due batch waits while its predecessor is still being written: the
# most the next write can start late, in exchange for the records arriving meanwhile.
DUE_POLL_MS = 10
# Records taken and decoded per fetch: small enough that the batch being written gets the
# event loop back every few milliseconds to send its next statement.
FETCH_CHUNK = 1_000


class Fetcher:
    """Fills one batch at a time from the agent's consumer (``consumer()``, once it runs),
    decoding each topic's records with ``decoders``. ``writing`` says whether a batch is being
    written meanwhile; ``stopping``, whether the agent is stopping."""

    def __init__(
        self,
        consumer: Callable[[], AIOKafkaConsumer],
        decoders: Mapping[str, StreamDecoder],
        ownership: Ownership,
        limits: Limits,
        *,
        writing: Callable[[], bool],
        stopping: Callable[[], bool],
    ) -> None:
        self._consumer = consumer
        self._decoders = decoders
        self._ownership = ownership
        self.limits = limits  # read on every fetch: a change applies from the next one on
        self._writing = writing
        self._stopping = stopping
        self.batch = Batch()  # the batch being filled: Actions.forget trims it
        # Its records' Kafka timestamps per partition, in the same order as its parts'
        # records, for the latency count: taken as they are fetched, while the records are in
        # the CPU's cache, rather than read again at commit.
        self.stamps: dict[Partition, list[int]] = {}
        self.fetch_seconds = 0.0  # fetching and decoding the batch fill() returned

    def clear(self) -> None:
        """Fill nothing until the next :meth:`fill`: the batch filled last is being written
        now, and its parts are planned anew, not trimmed."""
        self.batch = Batch()
        self.stamps = {}

    def apply(self, actions: Actions) -> None:
        """Carry out what :class:`Ownership` decided, on the batch being filled and the
        consumer (for the partitions the consumer still has)."""
        if not actions:
            return
        if actions.forget:
            self.batch.drop(actions.forget)
            for forgotten in actions.forget:
                self.stamps.pop(forgotten, None)
        consumer = self._consumer()
        owned = consumer.assignment()
        for (topic, partition), offset in actions.seek.items():
            tp = TopicPartition(topic, partition)
            if tp in owned:
                consumer.seek(tp, offset)
        if actions.pause:
            consumer.pause(*_owned(actions.pause, owned))
        if actions.resume:
            consumer.resume(*_owned(actions.resume, owned))

    async def idle(self, seconds: float) -> None:
        """Wait without leaving the group: keep polling. Partitions that fetch meanwhile
        (paused ones do not) are rewound: what they return is not written now."""
        consumer = self._consumer()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._stopping():
            fetched = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            if fetched:  # newly assigned partitions fetch before they are paused: not ours yet
                rewound = [(tp.topic, tp.partition) for tp in fetched]
                self.apply(self._ownership.rewound_event(rewound))

    async def fill(self, batch_id: int) -> Batch:
        """Fetch and decode records until the batch is due: full, or as old as
        ``max_wait_s``. A due batch whose predecessor is still being written keeps filling,
        up to the record and byte limits, rather than wait idle: under a backlog batches grow
        to what the database takes in the time one is written. A fetch that comes back empty
        meanwhile does not close it (the next response may be a round trip away); each waits
        at most ``DUE_POLL_MS``, the most the next write starts late."""
        consumer = self._consumer()
        batch = self.batch = Batch(batch_id)
        self.stamps = {}
        self.fetch_seconds = 0.0
        while not self._ownership.holding:  # a batch being retried polls for the group itself
            limits = self.limits
            if batch.is_full(limits):  # the limits went down below what it holds
                break
            now = time.monotonic()
            wait_ms = POLL_MS
            if batch.started_at is not None:
                age_left = limits.max_wait_s - (now - batch.started_at)
                wait_ms = max(int(age_left * 1000), DUE_POLL_MS if self._writing() else 0)
            asked = time.monotonic()
            fetched = await consumer.getmany(
                timeout_ms=wait_ms, max_records=min(batch.room(limits), FETCH_CHUNK)
            )
            now = time.monotonic()
            stamps = self.stamps
            for tp, records in fetched.items():
                if not records:
                    continue
                key = (tp.topic, tp.partition)
                rows = self._decoders[tp.topic].rows(records, tp.partition, batch_id)
                batch.add(key, records, rows, now)
                taken = [r.timestamp for r in records]
                if len(batch.parts[key].records) == len(records):  # a new part, or replaced
                    stamps[key] = taken
                else:  # (a part without its stamps is read again at commit, never miscounted)
                    stamps.setdefault(key, []).extend(taken)
            if fetched:  # a poll that got nothing is idle time, not this batch's fetching
                self.fetch_seconds += time.monotonic() - asked
            if self._stopping() or not batch.count:
                break  # nothing arrived: let the caller check positions, stops and work
            if batch.is_due(limits, now) and (not self._writing() or batch.is_full(limits)):
                break
            await asyncio.sleep(0)  # the batch being written takes its turn
        return batch


def _owned(partitions: Iterable[Partition], owned: set[TopicPartition]) -> list[TopicPartition]:
    return [tp for t, p in partitions if (tp := TopicPartition(t, p)) in owned]
