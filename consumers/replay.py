"""``pipeline replay``: read a range of streams' partitions again and write it exactly once,
beside live ingestion (docs/replay.md).

The replay has its own consumer, in assign mode (no consumer group), the agent's decoders
(``pipeline.rows.decoder``) and its write path (:class:`consumers.writer.BatchWriter`). Its
progress is a row per partition in ``replay_partitions``, moved by compare-and-set in the
same transaction as the rows it covers, before which the range's rows are deleted
(:meth:`_Run._replace`): killed at any point, the replay resumes (``--resume ID``) where its
last transaction committed. The pure part (parsing, ranges, progress, pace) is
:mod:`pipeline.replay`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from consumers.writer import BatchWriter, Written, expired_because
from pipeline import db, kafka_clients, sql_names
from pipeline import kafka as kafka_io
from pipeline.batching import FetchedRecord, Part
from pipeline.config import Config
from pipeline.db import Connection
from pipeline.errors import FencedError, TransientError
from pipeline.metrics import Metrics
from pipeline.replay import (
    AtTime,
    PartitionLog,
    Position,
    Progress,
    Range,
    ReplayError,
    pace,
    range_deletes,
    resolve,
    select_partitions,
)
from pipeline.retry import retrying
from pipeline.rows import decoder

log = logging.getLogger(__name__)

_REPLAY_LOCK = 0x72706C79  # advisory lock space of a replayed partition ("rply")
_FETCH_CHUNK = 1_000
#: A stream's tables have their source indexes summarized after this many of its batches, so
#: a batch's range DELETE reads at most about this many batches' pages besides its own
#: (sql/013_source_index_summaries.sql).
SUMMARIZE_EVERY = 8


@dataclass(frozen=True)
class Request:
    streams: tuple[str, ...]
    start: Position
    end: Position
    partitions: tuple[int, ...] | None = None
    allow_gap: bool = False
    text: dict[str, Any] | None = None  # the flags as given, kept in replays.request


@dataclass
class Summary:
    replay_id: int
    records: int  # written in this run (rows, duplicates, dead letters and expired rows)
    rows: int  # new rows
    dead_letters: int
    seconds: float
    notes: list[str]
    # Per stream with any: rows not written, older than the stream's retention horizon, and
    # why: "its <column> is older than now minus <retention>".
    expired: dict[str, int] = field(default_factory=dict)
    horizon: dict[str, str] = field(default_factory=dict)

    def expired_lines(self) -> list[str]:
        """Why rows of the range were not written, one line per stream with any."""
        return [
            f"{count:,} {stream} row(s) skipped as older than the stream's retention horizon "
            f"({self.horizon[stream]}): live ingestion does not write them either"
            for stream, count in sorted(self.expired.items())
        ]

    def json(self) -> dict[str, Any]:
        return {
            "replay_id": self.replay_id,
            "records": self.records,
            "rows": self.rows,
            "dead_letters": self.dead_letters,
            "seconds": round(self.seconds, 3),
            "expired": {
                stream: {"rows": count, "why": self.horizon[stream]}
                for stream, count in sorted(self.expired.items())
            },
            "notes": self.notes,
        }


Report = Callable[[Progress, bool], None]  # (progress, final)


class Replayer:
    """Creates replays and runs them, on ``config``'s Kafka and database (the live group is
    ``config.group_id``)."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        *,
        batch_records: int | None = None,
        rate: float | None = None,
        report: Report | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.batch_records = batch_records or config.batch_max_records
        self.rate = rate
        self.report = report
        self.catalog = config.catalog
        self._stream_of = self.catalog.topics(config.topic_prefix)
        self._writer = BatchWriter(config.group_id, self._stream_of, self.catalog)

    # -- creating ---------------------------------------------------------------------------

    async def create(self, request: Request) -> tuple[int, list[str]]:
        """Resolve the request into frozen ranges and record the replay; its id and notes."""
        config = self.config
        topics = [config.topic(self.catalog[s].topic) for s in request.streams]
        found = await _partitions(config, topics)
        consumer = self._consumer()
        await consumer.start()
        try:
            wanted = [TopicPartition(t, p) for t, p in select_partitions(found, request.partitions)]
            logs = await _partition_logs(consumer, wanted, request.start, request.end)
        finally:
            await kafka_io.stop_consumer(consumer)
        unclamped = resolve(request.start, request.end, logs, {}, allow_gap=request.allow_gap)
        conn = await self._connect()
        try:
            await db.check_schema(conn)
            await db.check_catalog(conn, config.catalog, request.streams)
            await db.claim_tables(conn, config.group_id, self._tables(request.streams))
            async with db.transaction(conn):
                # Partitions the group has never stored are claimed: live ingestion, if it
                # ever starts on this database, continues after the replay's range.
                await conn.execute(
                    """INSERT INTO ingest_offsets (group_id, topic, partition, next_offset)
                       SELECT $1, t, p, o FROM unnest($2::text[], $3::int[], $4::bigint[])
                           AS u(t, p, o)
                       ON CONFLICT DO NOTHING""",
                    config.group_id,
                    [r.topic for r in unclamped.ranges],
                    [r.partition for r in unclamped.ranges],
                    [r.requested_end for r in unclamped.ranges],
                )
                live = await db.stored_offsets(conn, config.group_id)
                resolved = resolve(
                    request.start, request.end, logs, live, allow_gap=request.allow_gap
                )
                replay_id: int = await conn.fetchval(
                    """INSERT INTO replays (group_id, streams, request, notes)
                       VALUES ($1, $2, $3, $4) RETURNING id""",
                    config.group_id,
                    list(request.streams),
                    request.text or {},
                    resolved.notes,
                )
                await conn.executemany(
                    """INSERT INTO replay_partitions (replay_id, topic, partition, start_offset,
                           end_offset, requested_end, next_offset, gap_start)
                       VALUES ($1, $2, $3, $4, $5, $6, $4, $7)""",
                    [
                        (
                            replay_id,
                            r.topic,
                            r.partition,
                            r.start,
                            r.end,
                            r.requested_end,
                            None if r.gap is None else r.gap[0],
                        )
                        for r in resolved.ranges
                    ],
                )
        finally:
            await conn.close()
        for note in resolved.notes:
            log.warning("replay %d: %s", replay_id, note)
        return replay_id, resolved.notes

    # -- running ----------------------------------------------------------------------------

    async def run(self, replay_id: int) -> Summary:
        """Write what is left of replay ``replay_id``, then mark it finished."""
        started = time.monotonic()
        conn = await self._connect()
        try:
            await db.check_schema(conn)
            header = await conn.fetchrow(
                "SELECT group_id, streams, notes FROM replays WHERE id = $1", replay_id
            )
            if header is None:
                raise ReplayError(f"no replay {replay_id} in this database")
            if header["group_id"] != self.config.group_id:
                raise ReplayError(
                    f"replay {replay_id} belongs to group {header['group_id']}, not "
                    f"{self.config.group_id}: give --group {header['group_id']}"
                )
            await db.check_catalog(conn, self.config.catalog, header["streams"])
            await db.claim_tables(conn, self.config.group_id, self._tables(header["streams"]))
            ranges = [
                (Range(r["topic"], r["partition"], r["start_offset"], r["end_offset"], 0), n)
                for r in await conn.fetch(
                    """SELECT topic, partition, start_offset, end_offset, next_offset AS n
                       FROM replay_partitions WHERE replay_id = $1
                       ORDER BY topic, partition""",
                    replay_id,
                )
                for n in (r["n"],)
            ]
            total = sum(r.size for r, _ in ranges)
            done_before = sum(n - r.start for r, n in ranges)
            run = _Run(
                self,
                conn,
                replay_id=replay_id,
                ranges=ranges,
                total=total,
                done_before=done_before,
                started=started,
            )
            await run.go()
            await conn.execute(
                """UPDATE replays SET state = 'finished', finished_at = now()
                   WHERE id = $1 AND state = 'running' AND NOT EXISTS (
                       SELECT 1 FROM replay_partitions
                       WHERE replay_id = $1 AND next_offset < end_offset)""",
                replay_id,
            )
        finally:
            await conn.close()
        return Summary(
            replay_id,
            run.records,
            run.rows,
            run.dead_letters,
            time.monotonic() - started,
            list(header["notes"]),
            dict(run.expired),
            {s: expired_because(self.catalog[s]) for s in run.expired},
        )

    # -- helpers ----------------------------------------------------------------------------

    def _consumer(self) -> AIOKafkaConsumer:
        config = self.config
        return kafka_clients.consumer(
            config.kafka,
            group_id=None,  # assign mode: no group, no rebalances, no committed offsets
            enable_auto_commit=False,
            auto_offset_reset="none",  # a position out of range is an error, never a skip
            isolation_level="read_committed",
            fetch_max_bytes=config.fetch_max_bytes,
            max_partition_fetch_bytes=min(config.fetch_max_bytes, 8 * 1024 * 1024),
        )

    async def _connect(self) -> Connection:
        return await db.connect(self.config.database_url, self.config.db_session)

    def _tables(self, streams: Sequence[str]) -> dict[str, str]:
        """The data tables of ``streams``, each with its deployed topic."""
        catalog = self.catalog
        return db.stream_tables(catalog, {s: self.config.topic(catalog[s].topic) for s in streams})


async def _partitions(config: Config, topics: list[str]) -> dict[str, list[int]]:
    """Each topic's partition numbers; :class:`ReplayError` naming the topics that do not
    exist."""
    admin = kafka_clients.admin(config.kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            raise ReplayError(f"topic(s) {', '.join(missing)} do not exist")
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described}


async def _partition_logs(
    consumer: AIOKafkaConsumer,
    partitions: Sequence[TopicPartition],
    start: Position,
    end: Position,
) -> dict[tuple[str, int], PartitionLog]:
    firsts = await consumer.beginning_offsets(list(partitions))
    ends = await consumer.end_offsets(list(partitions))

    async def at(position: Position) -> dict[TopicPartition, int | None]:
        if not isinstance(position, AtTime):
            return {}
        found = await consumer.offsets_for_times({tp: position.millis for tp in partitions})
        return {tp: None if o is None else o.offset for tp, o in found.items()}

    from_times, to_times = await at(start), await at(end)
    return {
        (tp.topic, tp.partition): PartitionLog(
            firsts[tp], ends[tp], from_times.get(tp), to_times.get(tp)
        )
        for tp in partitions
    }


class _Run:
    """One run of a replay: fetch what is left, write it a partition's batch at a time."""

    def __init__(
        self,
        replayer: Replayer,
        conn: Connection,
        *,
        replay_id: int,
        ranges: list[tuple[Range, int]],
        total: int,
        done_before: int,
        started: float,
    ) -> None:
        self.r = replayer
        self.conn = conn
        self.replay_id = replay_id
        self.ends = {rng.key: rng.end for rng, _ in ranges}
        self.next = {rng.key: n for rng, n in ranges}
        self.total = total
        self.done = done_before
        self.done_before = done_before
        self.started = started
        self.records = self.rows = self.dead_letters = 0
        self.expired: Counter[str] = Counter()
        self._batch_ids: list[int] = []
        self._last_report = 0.0
        self._unsummarized: Counter[str] = Counter()  # a stream's batches since its summary
        self._unsummarizable: set[str] = set()  # tables whose summarizing failed for good

    def progress(self) -> Progress:
        return Progress(self.done, self.total, time.monotonic() - self.started, self.done_before)

    def _show(self, final: bool = False) -> None:
        self.r.metrics.replay_records_left.set(self.total - self.done)
        now = time.monotonic()
        if self.r.report is not None and (final or now - self._last_report >= 0.5):
            self._last_report = now
            self.r.report(self.progress(), final)

    async def go(self) -> None:
        left = [tp for tp, n in self.next.items() if n < self.ends[tp]]
        self._show()
        if not left:
            self._show(final=True)
            return
        consumer = self.r._consumer()
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t, p in left]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, self.next[(tp.topic, tp.partition)])
            await self._drain(consumer, set(left))
        finally:
            await kafka_io.stop_consumer(consumer)
        self._show(final=True)

    async def _drain(self, consumer: AIOKafkaConsumer, left: set[tuple[str, int]]) -> None:
        buffers: dict[tuple[str, int], list[FetchedRecord]] = {tp: [] for tp in left}
        limit = self.r.batch_records
        while left:
            try:
                fetched = await consumer.getmany(
                    timeout_ms=500, max_records=min(limit, _FETCH_CHUNK)
                )
            except OffsetOutOfRangeError as exc:
                raise ReplayError(
                    f"replay {self.replay_id}: a position is no longer in the log (retention "
                    f"deleted records while the replay was stopped?): {exc}"
                ) from None
            for tp, records in fetched.items():
                key = (tp.topic, tp.partition)
                if key not in left:
                    continue
                end = self.ends[key]
                buffers[key].extend(r for r in records if r.offset < end)
            for key in sorted(left):
                tp = TopicPartition(*key)
                complete = await consumer.position(tp) >= self.ends[key]
                buffer = buffers[key]
                if complete or len(buffer) >= limit:
                    while buffer or complete:
                        chunk, buffer = buffer[:limit], buffer[limit:]
                        last = complete and not buffer
                        await self._write(key, chunk, last)
                        if last:
                            break
                    buffers[key] = buffer
                    if complete:
                        left.discard(key)
                        consumer.pause(tp)

    async def _write(self, key: tuple[str, int], records: list[FetchedRecord], last: bool) -> None:
        topic, partition = key
        expected = self.next[key]
        new = self.ends[key] if last else records[-1].offset + 1
        if new == expected:
            return
        stream = self.r._stream_of[topic]
        batch_id = await self._batch_id()
        spec = self.r.catalog[stream]
        part = Part(records, *decoder(spec).rows(records, partition, batch_id))

        async def write() -> Written:
            if self.conn.is_closed():
                self.conn = await self.r._connect()
            try:
                return await self.r._writer.write(
                    self.conn, {key: part}, before=self._replace(key, stream, expected, new)
                )
            except FencedError as exc:
                raise ReplayError(str(exc)) from None

        written = await retrying(
            None,
            write,
            max_backoff_s=self.r.config.retry_max_backoff_s,
            sleep=asyncio.sleep,
            stopping=lambda: False,
            on_retry=self._note_retry,
        )
        assert written is not None
        self.next[key] = new
        count = len(records)
        new_rows = written.new.get(stream, 0)
        self.done += new - expected
        self.records += count
        self.rows += new_rows
        self.dead_letters += len(written.letters)
        expired = len(written.expired.get(stream, ()))
        m = self.r.metrics
        m.records_consumed.labels(topic, "replay").inc(count)
        m.rows_ingested.labels(spec.table, "replay").inc(new_rows)
        if expired:
            self.expired[stream] += expired
            m.rows_expired.labels(stream).inc(expired)
        self._unsummarized[stream] += 1
        if self._unsummarized[stream] >= SUMMARIZE_EVERY:
            self._unsummarized[stream] = 0
            await self._summarize(spec.row_per_record)
        self._show()
        wait = pace(self.done - self.done_before, self.r.rate, time.monotonic() - self.started)
        if wait:
            await asyncio.sleep(wait)

    async def _summarize(self, tables: Sequence[str]) -> None:
        """Summarize the source indexes of ``tables``, so the next batches' range DELETEs skip
        the pages written so far. Only a shortcut: the function skips an index whose lock is
        held (its own lock_timeout); when the call cannot be made now (the connection is gone,
        a timeout), the next time will; a table it fails for for good (its EXECUTE revoked) is
        said once and left."""
        for table in tables:
            if table in self._unsummarizable:
                continue
            try:
                await self.conn.execute(
                    "SELECT pipeline_summarize_source_indexes($1::regclass)", sql_names.table(table)
                )
            except Exception as exc:
                error = db.classify(exc)
                if isinstance(error, TransientError):
                    log.info("replay %d: summarizing left for now: %s", self.replay_id, error)
                    return  # the next write reconnects, when it is the connection
                self._unsummarizable.add(table)
                log.warning(
                    "replay %d: %s: its source index cannot be summarized (%s): each batch's "
                    "range DELETE reads what was written since its last VACUUM",
                    self.replay_id,
                    table,
                    error,
                )

    def _note_retry(self, error: TransientError, delay: float) -> None:
        log.warning("replay %d: %s; retrying in %.1fs", self.replay_id, error, delay)
        self.r.metrics.retries.labels(error.source).inc()

    def _replace(
        self, key: tuple[str, int], stream: str, expected: int, new: int
    ) -> Callable[[Connection], Awaitable[None]]:
        """What the batch's transaction runs before its rows: the replay's own compare-and-set
        of ``[expected, new)``, the check that live ingestion is still past it, and the
        range's rows deleted."""
        topic, partition = key
        group = self.r.config.group_id

        async def replace(conn: Connection) -> None:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                _REPLAY_LOCK,
                f"{topic}/{partition}",
            )
            moved = await conn.execute(
                """UPDATE replay_partitions SET next_offset = $5
                   WHERE replay_id = $1 AND topic = $2 AND partition = $3
                     AND next_offset = $4""",
                self.replay_id,
                topic,
                partition,
                expected,
                new,
            )
            if db.row_count(moved) != 1:
                raise FencedError(
                    f"replay {self.replay_id}: {topic}[{partition}] moved on: is another "
                    "process running this replay?"
                )
            live = await conn.fetchval(
                """SELECT next_offset FROM ingest_offsets
                   WHERE group_id = $1 AND topic = $2 AND partition = $3 FOR SHARE""",
                group,
                topic,
                partition,
            )
            if live is not None and live < new:
                raise ReplayError(
                    f"replay {self.replay_id}: {topic}[{partition}]: the live group's stored "
                    f"offset went back to {live}, below the replay's {new} (a rollback?): "
                    "that range is live ingestion's now; the replay stops"
                )
            # The range's rows are replaced in every table with a row per record; the
            # "latest" tables are not emptied: the writer's version or offset guard keeps
            # them at the newest row, and tombstones delete again. Only in the group's own
            # tables: another group's rows share partitions and offsets.
            await db.claim_tables(conn, group, self.r._tables([stream]))
            # Through the source index, summarized as the replay goes (:meth:`_summarize`):
            # the planner would scan a table it has no statistics for yet, such as one
            # being backfilled, whole for every batch.
            await conn.execute("SET LOCAL enable_seqscan = off")
            for statement in range_deletes(self.r.catalog[stream]):
                await conn.execute(statement, partition, expected, new)
            await conn.execute("SET LOCAL enable_seqscan TO DEFAULT")

        return replace

    async def _batch_id(self) -> int:
        if not self._batch_ids:
            if self.conn.is_closed():  # as a write finds it, after a failure
                self.conn = await self.r._connect()
            self._batch_ids = list(await db.reserve_batch_ids(self.conn))
        return self._batch_ids.pop(0)


async def list_replays(conn: Connection) -> list[dict[str, Any]]:
    """Every replay, newest first, with its progress."""
    rows = await conn.fetch(
        """SELECT r.id, r.group_id, r.streams, r.state, r.created_at, r.finished_at, r.notes,
                  r.request,
                  coalesce(sum(p.next_offset - p.start_offset), 0)::bigint AS done,
                  coalesce(sum(p.end_offset - p.start_offset), 0)::bigint AS total,
                  count(p.*) AS partitions
           FROM replays r LEFT JOIN replay_partitions p ON p.replay_id = r.id
           GROUP BY r.id ORDER BY r.id DESC"""
    )
    return [dict(r) for r in rows]


def request_text(**flags: object) -> dict[str, Any]:
    """The flags as given, for ``replays.request``."""
    found: dict[str, Any] = msgspec.to_builtins({k: v for k, v in flags.items() if v is not None})
    return found
