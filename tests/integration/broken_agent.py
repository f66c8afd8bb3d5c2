"""A deliberately BROKEN DatabaseAgent, for the negative control only
(tests/integration/test_negative_control.py).

It makes the two classic mistakes the real agent avoids (docs/exactly-once.md):

* offsets are committed to Kafka BEFORE the database transaction: aiokafka's auto-commit,
  every 50 ms, of whatever has been fetched, written or not;
* positions are taken from Kafka's committed offsets, not from ``ingest_offsets``; and since
  the database's offsets no longer decide anything, the compare-and-set is replaced by a
  plain overwrite (otherwise every batch would simply be fenced).

A SIGKILL between the Kafka commit and the database commit then loses the records in
between: the exactly-once oracle must catch it. Run as ``python -m
tests.integration.broken_agent``, with the environment of ``pipeline run``.

The hook that puts the kill in that window every time: with ``BROKEN_AGENT_HOLD_AT_BATCH=N``
and ``BROKEN_AGENT_MARKER=PATH``, the Nth batch holding records is fetched, the batch before it
finishes its write, the Nth batch's offsets are committed to Kafka, PATH is written, and the
agent holds there for good: its records are committed to Kafka and never to the database
until the test kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

import consumers.agent
from pipeline import cli, db, kafka_clients
from pipeline import kafka as kafka_io
from pipeline.batching import Batch
from pipeline.config import Config


def _auto_committing_consumer(
    config: Config, listener: ConsumerRebalanceListener
) -> AIOKafkaConsumer:
    """:func:`pipeline.kafka.make_consumer`, BROKEN: auto-commit of what was fetched."""
    consumer = kafka_clients.consumer(
        config.kafka,
        group_id=config.group_id,
        enable_auto_commit=True,  # BROKEN: Kafka's offset moves before the database's
        auto_commit_interval_ms=50,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=config.batch_max_records,
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=min(3_000, config.session_timeout_ms // 3),
    )
    consumer.subscribe(kafka_io.data_topics(config), listener=listener)
    return consumer


async def _overwrite_offsets(
    conn: Any, group: str, moves: Sequence[tuple[str, int, int, int]]
) -> None:
    """BROKEN: no compare-and-set, the batch's offsets just overwrite the stored ones."""
    await conn.execute(
        """UPDATE ingest_offsets AS o SET next_offset = m.new, updated_at = now()
           FROM unnest($2::text[], $3::int[], $4::bigint[]) AS m(t, p, new)
           WHERE o.group_id = $1 AND o.topic = m.t AND o.partition = m.p""",
        group,
        [m[0] for m in moves],
        [m[1] for m in moves],
        [m[3] for m in moves],
    )


HOLD_AT_BATCH_ENV = "BROKEN_AGENT_HOLD_AT_BATCH"
MARKER_ENV = "BROKEN_AGENT_MARKER"


class BrokenAgent(consumers.agent.DatabaseAgent):
    _filled = 0  # batches holding records, so far

    async def _fill_batch(self) -> Batch:
        """BROKEN: the batch's offsets are committed to Kafka as soon as it is fetched."""
        batch = await super()._fill_batch()
        if batch.count and self._consumer is not None:
            self._filled += 1
            hold = self._filled == int(os.environ.get(HOLD_AT_BATCH_ENV, "0"))
            if hold:
                # The batch before this one lands first, so exactly this batch's records
                # (and whatever else was fetched) are in Kafka's commit and not the database's.
                await self._finish_write()
            with contextlib.suppress(KafkaError):
                await self._consumer.commit()
            if hold:
                marker = Path(os.environ[MARKER_ENV])
                await asyncio.to_thread(marker.write_text, f"{batch.count}\n")
                await asyncio.Event().wait()  # until the test's SIGKILL
        return batch

    def _require_mirror(self) -> Any:
        """No mirror after the database commit: it would move Kafka's offsets back."""
        return _NoMirror()

    async def _position(self) -> None:
        """BROKEN: positions from Kafka's committed offsets (the log start without one)."""
        wanted = [TopicPartition(t, p) for t, p in self.ownership.unpositioned()]
        if not wanted:
            return
        consumer = self._require_consumer()
        starts = await kafka_io.beginning_offsets(consumer, wanted)
        conn = await db.connect(self.config.database_url, self.config.db_session)
        try:  # only so that the offset rows exist for the overwrite
            await db.load_offsets(conn, self.config.group_id, starts)
        finally:
            await conn.close()
        positions = {}
        for tp in wanted:
            committed = await consumer.committed(tp)
            positions[(tp.topic, tp.partition)] = (
                committed if committed is not None else starts[(tp.topic, tp.partition)]
            )
        self._apply(self.ownership.positioned_event(positions))


class _NoMirror:
    def add(self, moves: object) -> None:
        pass


def main() -> int:
    kafka_io.make_consumer = _auto_committing_consumer  # type: ignore[assignment]
    db.advance_offsets = _overwrite_offsets  # type: ignore[assignment]
    consumers.agent.DatabaseAgent = BrokenAgent  # type: ignore[misc]
    return cli.main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
