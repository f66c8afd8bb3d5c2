"""Fetcher.fill against a stand-in consumer whose fetches come back empty now and then, as
they do when each fetch takes a round trip to a distant broker: when a batch is due, and how
it keeps filling while the batch before it is being written."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from consumers.fetcher import Fetcher
from pipeline.batching import Batch, Limits
from pipeline.ownership import Ownership
from tests.unit.test_batching import Rec

TOPIC = "agents.metrics"
TP = TopicPartition(TOPIC, 0)


class Consumer:
    """Gives ``per_fetch`` records on every other fetch, nothing in between (the next
    response still on its way), without waiting."""

    def __init__(self, per_fetch: int) -> None:
        self.per_fetch = per_fetch
        self.fetches = 0
        self.offset = 0

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, Any]:
        self.fetches += 1
        await asyncio.sleep(0)
        if self.fetches % 2 == 0:
            return {}
        count = min(self.per_fetch, max_records)
        records = [Rec(TOPIC, 0, self.offset + i) for i in range(count)]
        self.offset += count
        return {TP: records}


class Decoder:
    def rows(
        self, records: list[Rec], partition: int, batch_id: int
    ) -> tuple[list[Any], list[Any]]:
        return [(r.offset,) for r in records], []


def _fetcher(consumer: Consumer, limits: Limits, *, writing: Callable[[], bool]) -> Fetcher:
    ownership = Ownership({TOPIC: "metrics"})
    ownership.assigned_event([(TOPIC, 0)])
    ownership.positioned_event({(TOPIC, 0): 0})
    return Fetcher(
        lambda: consumer,  # type: ignore[arg-type,return-value]
        {TOPIC: Decoder()},  # type: ignore[dict-item]
        ownership,
        limits,
        writing=writing,
        stopping=lambda: False,
    )


def _fill(fetcher: Fetcher) -> Batch:
    return asyncio.run(asyncio.wait_for(fetcher.fill(1), 10))


def test_a_due_batch_keeps_filling_past_an_empty_fetch_while_the_one_before_is_written() -> None:
    # Due at once (max_wait 0): only the record limit, or the write ending, closes it.
    consumer = Consumer(per_fetch=100)
    batch = _fill(_fetcher(consumer, Limits(1000, 10**9, 0.0), writing=lambda: True))
    assert batch.count == 1000  # not the 100 of the first fetch
    assert consumer.fetches == 19  # ten with records, nine empty between them


def test_a_due_batch_stops_filling_once_the_one_before_is_written() -> None:
    consumer = Consumer(per_fetch=100)
    batch = _fill(
        _fetcher(consumer, Limits(1000, 10**9, 0.0), writing=lambda: consumer.fetches < 5)
    )
    assert (batch.count, consumer.fetches) == (300, 5)  # fetches 1, 3 and 5 had records


def test_a_due_batch_is_written_at_once_when_nothing_else_is_being_written() -> None:
    consumer = Consumer(per_fetch=100)
    batch = _fill(_fetcher(consumer, Limits(1000, 10**9, 0.0), writing=lambda: False))
    assert batch.count == 100
    assert consumer.fetches == 1
