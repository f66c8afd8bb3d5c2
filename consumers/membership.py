"""The DatabaseAgent's place in its group, outside the batches: the tables its group claims at
start-up, the rebalance listener, and the mirror of committed offsets to Kafka.
docs/exactly-once.md says why the database's offsets are the truth and Kafka's a mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from pipeline import db
from pipeline import kafka as kafka_io
from pipeline.batching import OffsetMove, Partition
from pipeline.config import Config
from pipeline.db import Connection
from pipeline.errors import PipelineError, TransientError
from pipeline.retry import classify, fatal


async def claim_tables(conn: Connection, config: Config) -> None:
    """Claim the tables of the agent's streams for its group (docs/exactly-once.md, "One group
    per table"): :class:`OwnershipError` when another group owns one; a login that may not
    read or claim them ends the agent saying so."""
    catalog = config.catalog
    topics = {name: config.topic(catalog[name].topic) for name in config.streams}
    try:
        await db.claim_tables(conn, config.group_id, db.stream_tables(catalog, topics))
    except PipelineError:
        raise
    except Exception as exc:
        error = classify(exc)
        if isinstance(error, TransientError):
            raise error from exc
        raise fatal("claiming the tables of its streams (table_owners)", error) from exc


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands the group's rebalance callbacks to the agent, as sets of partitions."""

    def __init__(
        self,
        on_assigned: Callable[[set[TopicPartition]], None],
        on_revoked: Callable[[set[TopicPartition]], None],
    ) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._on_assigned(set(assigned))


class OffsetMirror:
    """Offsets committed to the database, mirrored to Kafka for lag tools without holding up
    the next batch (a commit to Kafka is a round trip to the group coordinator): newest per
    partition, one commit at a time, so mirrors land in order."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._pending: dict[Partition, OffsetMove] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, moves: Iterable[OffsetMove]) -> None:
        for move in moves:
            self._pending[(move.topic, move.partition)] = move
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._until_done())

    def forget(self, partitions: Iterable[Partition]) -> None:
        for partition in partitions:
            self._pending.pop(partition, None)

    async def close(self, deadline: float) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, deadline)

    async def _until_done(self) -> None:
        while self._pending:
            moves = list(self._pending.values())
            self._pending.clear()
            await kafka_io.mirror_offsets(self._consumer, moves)
