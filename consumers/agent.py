"""The DatabaseAgent: a consumer-group member that lands the five data streams in PostgreSQL
exactly once, with COPY.

The one invariant everything here keeps: the consumer's fetch position of a partition is
never ahead of the database's stored offset except by records that are in the batch being
written or in the next batch, which is fetched and decoded while the one before it is
written. Whenever fetched records are dropped unwritten (a fenced batch, a revoked
partition, a retry), the partition is re-seeked to the stored offset, and the next batch
forgets what it holds of that partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from pipeline import db
from pipeline import kafka as kafka_io
from pipeline.batching import (
    Batch,
    FetchedRecord,
    Limits,
    OffsetMove,
    Partition,
    Plan,
    Row,
    backoff,
    plan,
)
from pipeline.config import Config, redact_url
from pipeline.db import Connection, DeadLetter, TableWriter
from pipeline.errors import DataError, FencedError, SchemaError, TransientError
from pipeline.metrics import Metrics
from pipeline.records import STREAM_BY_NAME
from pipeline.rows import DECODERS, StreamDecoder, source_of

log = logging.getLogger(__name__)

_POLL_MS = 200  # how long one fetch waits when nothing arrives: bounds the reaction to a stop
# Records taken and decoded per fetch: small enough that the batch being written gets the
# event loop back every few milliseconds to send its next statement.
_FETCH_CHUNK = 1_000


class DatabaseAgent:
    """One DatabaseAgent process. ``await run()`` until ``stop()``; see :meth:`run`."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self._limits = Limits(
            config.batch_max_records, config.batch_max_bytes, config.batch_max_wait_ms / 1000
        )
        self._decoders: dict[str, StreamDecoder] = {
            config.topic(STREAM_BY_NAME[name].topic): DECODERS[name] for name in config.streams
        }
        self._writers = {name: TableWriter(DECODERS[name].tables) for name in config.streams}
        self._dlq_topic = kafka_io.dead_letter_topic(config)
        self._positions: dict[Partition, int] = {}  # the stored next offset of owned partitions
        self._unpositioned: set[TopicPartition] = set()
        self._holding = False  # all partitions paused while a batch is retried
        self._filling = Batch()  # the next batch, which revocations and rewinds trim
        self._stopped_topics: set[str] = set()  # streams stopped on schema errors
        self._stopping = asyncio.Event()
        self._conn: Connection | None = None
        self._batch_ids: deque[int] = deque()  # reserved from the sequence, 1000 at a time
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._write: asyncio.Task[None] | None = None  # the batch being written
        # Offsets committed to the database and not yet mirrored to Kafka, newest per partition;
        # one mirroring task at a time, off the write path, so mirrors land in order.
        self._unmirrored: dict[Partition, OffsetMove] = {}
        self._mirroring: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Ingest until stopped.

        1. Connect to PostgreSQL and apply pending migrations; create missing topics.
        2. Join the consumer group; each assigned partition is positioned at its offset
           stored in PostgreSQL (the database wins over Kafka).
        3. Until stopped: fill a batch, ingest it in one transaction (transient failures
           retried with the partitions paused), mirror the offsets to Kafka.
        4. On stop: the batch in flight finishes, or is aborted once the shutdown deadline
           passes; then the consumer leaves the group.
        """
        config = self.config
        log.info(
            "DatabaseAgent %s starting: group %s, streams %s, database %s",
            self.instance_id,
            config.group_id,
            ",".join(config.streams),
            redact_url(config.database_url),
        )
        conn = await db.connect(config.database_url, config.db_command_timeout_s)
        try:
            applied = await db.migrate(conn, db.read_migrations())
        finally:
            await conn.close()
        if applied:
            log.info("applied migrations %s", ", ".join(applied))
        await kafka_io.ensure_topics(
            config.kafka_bootstrap_servers,
            [*kafka_io.data_topics(config), self._dlq_topic],
            config.topic_partitions,
        )
        self._producer = await kafka_io.start_dead_letter_producer(config)
        self._consumer = kafka_io.make_consumer(config, _Rebalance(self))
        await self._consumer.start()
        self._task = asyncio.ensure_future(self._ingest_until_stopped())
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise  # cancelled from outside, not by the shutdown deadline
        finally:
            await self._close()

    async def _ingest_until_stopped(self) -> None:
        """Write batch N while batch N+1 is fetched and decoded: the agent decodes while
        PostgreSQL inserts. At most one batch is written at a time, in fetch order, so each
        batch's compare-and-set starts where the one before it ended."""
        try:
            while not self._stopping.is_set():
                if self._unpositioned:
                    # Stored offsets read while a batch commits could be stale: finish it first.
                    await self._finish_write()
                    await self._position_pending()
                    if self._stopping.is_set():
                        break
                batch = await self._fill_batch()
                await self._finish_write()
                if batch.count and not self._stopping.is_set():
                    self._write = asyncio.ensure_future(self._ingest_with_retry(batch))
        finally:
            write, self._write = self._write, None
            if write is not None and not write.done():
                write.cancel()  # the shutdown deadline passed, or run() was cancelled
                with contextlib.suppress(asyncio.CancelledError):
                    await write
            elif write is not None and not write.cancelled():
                # It failed while the next batch was filling and a stop came before the main
                # loop looked: the failure must still end the agent, not vanish.
                error = write.exception()
                if error is not None:
                    raise error

    async def _finish_write(self) -> None:
        """Wait for the batch being written; its failures that are not retried surface here."""
        if self._write is not None:
            await self._write
            self._write = None

    @property
    def _writing(self) -> bool:
        return self._write is not None and not self._write.done()

    def stop(self) -> None:
        """Ask the agent to finish the batch it is writing, commit, and leave the group.

        When no batch is being written, it stops at once: fetched records that are not
        written yet are simply read again by the next owner, from the stored offsets (a
        fetch can otherwise sit out a whole rebalance). The next batch, fetched while one is
        written, is never written after a stop. Past ``shutdown_timeout_s`` a batch
        being written is abandoned too: its transaction rolls back, Kafka redelivers it.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._task is None:
            return
        if not self._writing:
            self._task.cancel()
        else:
            asyncio.get_running_loop().call_later(
                self.config.shutdown_timeout_s, self._abandon, self._task
            )

    def _abandon(self, task: asyncio.Task[None]) -> None:
        if not task.done():
            log.warning("shutdown deadline passed: abandoning the batch in flight")
            task.cancel()

    async def _close(self) -> None:
        deadline = 10.0
        if self._task is not None and not self._task.done():
            self._task.cancel()  # run() itself was cancelled
        if self._mirroring is not None:  # the last offsets reach Kafka before we leave
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._mirroring, deadline)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(kafka_io.stop_consumer(self._consumer), deadline)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), deadline)
        await self._drop_connection()
        log.info("DatabaseAgent %s stopped", self.instance_id)

    # -- fetching ---------------------------------------------------------------------

    async def _fill_batch(self) -> Batch:
        """Fetch and decode records until the batch is due: full, or as old as
        ``batch_max_wait_ms``. A due batch whose predecessor is still being written keeps
        filling, up to the record and byte limits, rather than wait idle: under a backlog
        batches grow to what the database takes in the time one is written."""
        consumer = self._require_consumer()
        batch_id = await self._take_batch_id()
        if batch_id is None:
            return Batch()  # stopping
        batch = self._filling = Batch(batch_id)
        limits = self._limits
        while not self._holding:  # a batch being retried polls for the group itself
            now = time.monotonic()
            wait_ms = _POLL_MS
            if batch.started_at is not None:
                age_left = limits.max_wait_s - (now - batch.started_at)
                wait_ms = max(int(age_left * 1000), 0)
            fetched = await consumer.getmany(
                timeout_ms=wait_ms, max_records=min(batch.room(limits), _FETCH_CHUNK)
            )
            now = time.monotonic()
            for tp, records in fetched.items():
                rows = self._decoders[tp.topic].rows(records, tp.partition, batch_id)
                batch.add((tp.topic, tp.partition), records, rows, now)
            if self._stopping.is_set() or not batch.count:
                break  # nothing arrived: let the caller check positions and stops
            if batch.is_due(limits, now) and (
                not self._writing or batch.is_full(limits) or not fetched
            ):
                break
            await asyncio.sleep(0)  # the batch being written takes its turn
        return batch

    # -- positioning --------------------------------------------------------------------

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Hold new partitions until the main loop positions them from the database.

        No IO here: aiokafka runs this with heartbeats stopped, so a slow database would get
        this member evicted; and fetching from Kafka's committed offset would be wrong when
        the database is ahead of it or behind it.
        """
        keys = {(tp.topic, tp.partition) for tp in assigned}
        for key in [k for k in self._positions if k not in keys]:
            del self._positions[key]  # not ours any more, whatever we thought
        self._unpositioned = set(assigned)
        self._require_consumer().pause(*assigned)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in revoked]
        for key in keys:
            self._positions.pop(key, None)
            self._unmirrored.pop(key, None)  # the next owner mirrors its own, newer offsets
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(key[0], str(key[1]))
        self._unpositioned -= revoked
        # Records fetched for these partitions are not ours to write; if a partition comes
        # straight back, it is re-read from its stored offset, so the batch being filled must
        # not keep the old copies.
        self._filling.drop(keys)

    async def _position(self, partitions: Iterable[TopicPartition]) -> None:
        """Seek partitions to their offsets stored in PostgreSQL, then let them fetch."""
        consumer = self._require_consumer()
        wanted = [tp for tp in partitions if tp in consumer.assignment()]
        if not wanted:
            return
        starts = await kafka_io.beginning_offsets(consumer, wanted)
        conn = await db.connect(self.config.database_url, self.config.db_command_timeout_s)
        try:
            stored = await db.load_offsets(conn, self.config.group_id, starts)
        finally:
            await conn.close()
        owned = consumer.assignment()
        for tp in wanted:
            if tp not in owned:  # revoked while we were reading
                continue
            offset = stored[(tp.topic, tp.partition)]
            consumer.seek(tp, offset)
            self._positions[(tp.topic, tp.partition)] = offset
            self._unpositioned.discard(tp)
            if not self._holding and self._may_fetch(tp):
                consumer.resume(tp)

    async def _position_pending(self) -> None:
        attempt = 0
        while self._unpositioned and not self._stopping.is_set():
            try:
                await self._position(list(self._unpositioned))
            except Exception as exc:
                delay = backoff(attempt, self.config.retry_max_backoff_s)
                log.warning("positioning partitions failed, retrying in %.1fs: %r", delay, exc)
                await self._idle(delay)
                attempt += 1

    def _may_fetch(self, tp: TopicPartition) -> bool:
        return tp not in self._unpositioned and tp.topic not in self._stopped_topics

    def _stop_stream(self, stream: str, exc: SchemaError) -> None:
        """Stop one stream on a schema or permission error: its records stay in Kafka, neither
        ingested nor dead-lettered, until the table is fixed and the agent restarted."""
        topic = self.config.topic(STREAM_BY_NAME[stream].topic)
        log.error(
            "stream %s STOPPED: its table rejects every write (%s). The other streams go on; "
            "fix the table or the grants, then restart the agent to resume %s.",
            stream,
            exc,
            topic,
        )
        self._stopped_topics.add(topic)
        self.metrics.stream_stopped.labels(stream).set(1)
        consumer = self._require_consumer()
        stopped = [tp for tp in consumer.assignment() if tp.topic == topic]
        consumer.pause(*stopped)
        self._rewind((tp.topic, tp.partition) for tp in stopped)

    def _rewind(self, partitions: Iterable[Partition]) -> None:
        """Seek partitions back to their stored offsets after dropping fetched records; the
        next batch forgets what it fetched of them before the seek."""
        consumer = self._require_consumer()
        owned = consumer.assignment()
        partitions = list(partitions)
        self._filling.drop(partitions)
        for topic, partition in partitions:
            tp = TopicPartition(topic, partition)
            if tp not in owned:
                continue
            if (topic, partition) in self._positions:
                consumer.seek(tp, self._positions[(topic, partition)])
            else:
                self._unpositioned.add(tp)
                consumer.pause(tp)

    # -- ingesting ----------------------------------------------------------------------

    async def _ingest_with_retry(self, batch: Batch) -> None:
        consumer = self._require_consumer()
        attempt = 0
        try:
            while True:
                batch.drop([p for p in batch.parts if p[0] in self._stopped_topics])
                work = plan(batch, self._positions)
                if not work.moves:
                    self._count_skipped(work)
                    # Records of partitions no longer ours, or all behind the stored offset.
                    self._rewind(list(batch.parts))
                    return
                try:
                    await self._ingest(work)
                    return
                except FencedError as exc:
                    self.metrics.fenced.inc()
                    log.info("batch fenced, re-reading stored offsets: %s", exc)
                    await self._drop_connection()
                    fenced = list(batch.parts)
                    for tp_key in fenced:
                        self._positions.pop(tp_key, None)
                    self._rewind(fenced)
                    return
                except SchemaError as exc:
                    if exc.stream is None:
                        raise  # the pipeline's own tables: nothing can be ingested
                    self._stop_stream(exc.stream, exc)
                    await self._drop_connection()
                except TransientError as exc:
                    if self._stopping.is_set():
                        log.warning("stopping; batch abandoned after a transient failure: %s", exc)
                        self._rewind(list(batch.parts))
                        return
                    delay = backoff(attempt, self.config.retry_max_backoff_s)
                    log.warning(
                        "batch failed (%s), retrying in %.1fs with fetching paused", exc, delay
                    )
                    self.metrics.retries.labels(exc.source).inc()
                    if not self._holding:
                        self._holding = True
                        consumer.pause(*consumer.assignment())
                    await self._drop_connection()
                    await self._idle(delay)
                    attempt += 1
        finally:
            if self._holding:
                self._holding = False
                consumer.resume(*filter(self._may_fetch, consumer.assignment()))

    async def _ingest(self, work: Plan) -> None:
        """Write one batch exactly once.

        1. Gather each stream's rows (decoded when they were fetched); records that did not
           decode become dead letters.
        2. Open one transaction and compare-and-set every partition's stored offset: the
           fence. It locks those offset rows, so a zombie stops here, before it writes or
           publishes anything, and waits here while another member commits.
        3. Write each stream's rows with COPY.
        4. Send every dead letter to the DLQ topic and wait for the acknowledgements.
        5. Record the dead letters in ``dead_letters``.
        6. Commit; then mirror the offsets to Kafka, in the background.

        When the database rejects a row, the transaction rolls back and the batch is written
        again with each stream in savepoints, bisecting to find the rejected rows, which
        become dead letters too. Savepoints cost round trips, so only such batches pay them.
        """
        started = time.monotonic()
        conn = await self._connection()
        rows, letters = self._gather(work)
        try:
            written, rejected = await self._commit(conn, work, rows, letters, bisect=False)
        except _RowRejected:
            written, rejected = await self._commit(conn, work, rows, letters, bisect=True)
        for move in work.moves:
            key = (move.topic, move.partition)
            if self._positions.get(key) == move.expected:
                self._positions[key] = move.new
        self._count(work, rows, written, letters + rejected, time.monotonic() - started)
        self._mirror(work.moves)

    def _mirror(self, moves: Iterable[OffsetMove]) -> None:
        """Mirror committed offsets to Kafka for lag tools, without holding up the next
        batch: a commit to Kafka is a round trip to the group coordinator."""
        for move in moves:
            self._unmirrored[(move.topic, move.partition)] = move
        if self._mirroring is None or self._mirroring.done():
            self._mirroring = asyncio.ensure_future(self._mirror_until_done())

    async def _mirror_until_done(self) -> None:
        while self._unmirrored:
            moves = list(self._unmirrored.values())
            self._unmirrored.clear()
            await kafka_io.mirror_offsets(self._require_consumer(), moves)

    async def _commit(
        self,
        conn: Connection,
        work: Plan,
        rows: dict[str, list[Row]],
        letters: list[DeadLetter],
        *,
        bisect: bool,
    ) -> tuple[dict[str, tuple[int, int]], list[DeadLetter]]:
        """One transaction: the fence, every stream's rows, the dead letters. Returns per
        stream (new rows, rejected rows), and the dead letters of the rejected rows."""
        written: dict[str, tuple[int, int]] = {}
        rejected_letters: list[DeadLetter] = []
        try:
            async with conn.transaction():
                await db.advance_offsets(
                    conn,
                    self.config.group_id,
                    [(m.topic, m.partition, m.expected, m.new) for m in work.moves],
                )
                for stream, stream_rows in rows.items():
                    writer = self._writers[stream]
                    topic = self.config.topic(STREAM_BY_NAME[stream].topic)
                    try:
                        if bisect:
                            new, rejected = await db.write_bisecting(
                                conn, writer.write, stream_rows
                            )
                        else:
                            new, rejected = await writer.write(conn, stream_rows), []
                    except Exception as exc:
                        error = db.classify(exc)
                        if isinstance(error, SchemaError):  # this stream's table is broken
                            raise SchemaError(str(error), stream=stream) from exc
                        if isinstance(error, DataError) and not bisect:
                            raise _RowRejected(str(error)) from exc
                        raise error from exc
                    written[stream] = (new, len(rejected))
                    rejected_letters.extend(
                        _dead_letter(
                            _source(work, topic, stream_rows[r.index]), "DatabaseRejected", r.reason
                        )
                        for r in rejected
                    )
                all_letters = letters + rejected_letters
                await kafka_io.publish_dead_letters(
                    self._require_producer(),
                    self._dlq_topic,
                    all_letters,
                    self.config.db_command_timeout_s,
                )
                if all_letters:
                    await db.insert_dead_letters(conn, self.config.group_id, all_letters)
        except (TransientError, FencedError, SchemaError, _RowRejected):
            raise
        except Exception as exc:
            raise db.classify(exc) from exc
        return written, rejected_letters

    def _gather(self, work: Plan) -> tuple[dict[str, list[Row]], list[DeadLetter]]:
        rows: dict[str, list[Row]] = defaultdict(list)
        letters: list[DeadLetter] = []
        for (topic, _), part in work.parts.items():
            rows[self._decoders[topic].stream.name].extend(part.rows)
            letters.extend(_dead_letter(*r) for r in part.rejected)
        return rows, letters

    # -- helpers --------------------------------------------------------------------------

    async def _connection(self) -> Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await db.connect(self.config.database_url, self.config.db_command_timeout_s)
            for stream, writer in self._writers.items():
                if self.config.topic(STREAM_BY_NAME[stream].topic) in self._stopped_topics:
                    continue
                try:
                    await writer.prepare(conn)
                except Exception as exc:
                    conn.terminate()
                    error = db.classify(exc)
                    if isinstance(error, SchemaError):
                        raise SchemaError(str(error), stream=stream) from exc
                    raise error from exc
            self._conn = conn
        return self._conn

    async def _take_batch_id(self) -> int | None:
        """The next reserved batch id, or None once stopping. Reserving more takes its own
        connection, because the agent's connection may be busy writing the batch before.
        Transient failures are retried; any other (the sequence missing, no privilege) ends
        the agent, as it would in a write."""
        attempt = 0
        while not self._batch_ids:
            if self._stopping.is_set():
                return None
            try:
                conn = await db.connect(self.config.database_url, self.config.db_command_timeout_s)
                try:
                    self._batch_ids.extend(await db.reserve_batch_ids(conn))
                finally:
                    await conn.close()
            except Exception as exc:
                error = db.classify(exc)
                if not isinstance(error, TransientError):
                    raise error from exc
                delay = backoff(attempt, self.config.retry_max_backoff_s)
                log.warning("reserving batch ids failed, retrying in %.1fs: %r", delay, exc)
                self.metrics.retries.labels("postgres").inc()
                await self._idle(delay)
                attempt += 1
        return self._batch_ids.popleft()

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()  # no graceful close: the server may be gone or wedged

    async def _idle(self, seconds: float) -> None:
        """Wait without leaving the group: keep polling (partitions are paused)."""
        consumer = self._require_consumer()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._stopping.is_set():
            fetched = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            if fetched:  # newly assigned partitions fetch before they are paused: not ours yet
                self._rewind((tp.topic, tp.partition) for tp in fetched)

    def _count(
        self,
        work: Plan,
        rows: dict[str, list[Row]],
        written: dict[str, tuple[int, int]],
        letters: list[DeadLetter],
        seconds: float,
    ) -> None:
        m = self.metrics
        for (topic, _), part in work.parts.items():
            m.records_consumed.labels(topic).inc(len(part.records))
        for stream, stream_rows in rows.items():
            new, rejected = written[stream]
            m.rows_ingested.labels(DECODERS[stream].tables.table.name).inc(new)
            topic = self.config.topic(STREAM_BY_NAME[stream].topic)
            m.duplicates_skipped.labels(topic).inc(len(stream_rows) - new - rejected)
        for letter in letters:
            m.dead_lettered.labels(letter.topic, letter.error_class).inc()
        self._count_skipped(work)
        m.batches.inc()
        m.batch_duration.observe(seconds)
        m.batch_records.observe(sum(len(p.records) for p in work.parts.values()))
        m.last_commit.set(time.time())
        consumer = self._require_consumer()
        owned = consumer.assignment()
        for (topic, partition), position in self._positions.items():
            tp = TopicPartition(topic, partition)
            highwater = consumer.highwater(tp) if tp in owned else None
            if highwater is not None:
                m.lag.labels(topic, str(partition)).set(max(highwater - position, 0))

    def _count_skipped(self, work: Plan) -> None:
        for topic, skipped in work.already_ingested.items():
            self.metrics.records_consumed.labels(topic).inc(skipped)
            self.metrics.duplicates_skipped.labels(topic).inc(skipped)

    def _require_consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "the agent is not running"
        return self._consumer

    def _require_producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "the agent is not running"
        return self._producer


class _RowRejected(Exception):
    """The database rejected a row of a batch written without savepoints: write it again,
    bisecting to find the row."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, agent: DatabaseAgent) -> None:
        self._agent = agent

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._agent._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._agent._on_assigned(set(assigned))


def _source(work: Plan, topic: str, row: Row) -> FetchedRecord:
    """The record a row was decoded from."""
    partition, offset = source_of(row)
    return work.parts[(topic, partition)].record_at(offset)


def _dead_letter(record: Any, error_class: str, reason: str) -> DeadLetter:
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=list(record.headers),
        timestamp_ms=record.timestamp,
        error_class=error_class,
        reason=reason,
    )
