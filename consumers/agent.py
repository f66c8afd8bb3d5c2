"""The DatabaseAgent: a consumer-group member that lands the five data streams in PostgreSQL
exactly once, with COPY. docs/exactly-once.md explains the protocol; docs/architecture.md
where this module sits.

The one invariant everything here keeps: the consumer's fetch position of a partition is
never ahead of the database's stored offset except by records that are in the batch being
written or in the next batch, which is fetched and decoded while the one before it is
written. Whenever fetched records are dropped unwritten (a fenced batch, a revoked
partition, a deactivated stream, a retry), the partition is sought back to the stored
offset, and the next batch forgets what it holds of that partition.

Who may fetch and write what is decided by one object, :class:`pipeline.ownership.Ownership`:
the fetch loop, the write task and the rebalance callbacks report events to it and carry out
the actions it returns; none of them keeps partition state of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from consumers.writer import BatchWriter, Written
from pipeline import db
from pipeline import kafka as kafka_io
from pipeline.batching import (
    Batch,
    Limits,
    OffsetMove,
    Partition,
    Plan,
    backoff,
    plan,
)
from pipeline.config import Config, default_instance_id, redact_url
from pipeline.control import AgentState
from pipeline.db import Connection, DeadLetter
from pipeline.errors import (
    ConfigError,
    FencedError,
    PipelineError,
    SchemaError,
    TransientError,
)
from pipeline.lag import OldestRecords, PartitionLag, partition_lag, timestamp_in_hand
from pipeline.lag_probe import LagProbe
from pipeline.metrics import Metrics
from pipeline.ownership import Actions, Ownership, StreamState
from pipeline.readiness import STARTING, AgentHealth, Readiness, failure_class, readiness
from pipeline.records import STREAM_BY_NAME
from pipeline.retry import classify, fatal, retrying
from pipeline.rows import DECODERS, StreamDecoder

log = logging.getLogger(__name__)

_POLL_MS = 200  # how long one fetch waits when nothing arrives: bounds the reaction to a stop
# Records taken and decoded per fetch: small enough that the batch being written gets the
# event loop back every few milliseconds to send its next statement.
_FETCH_CHUNK = 1_000

T = TypeVar("T")
FencedWork = Callable[[Connection], Awaitable[T]]


@dataclass(frozen=True)
class AgentSnapshot:
    """One instance's state as a heartbeat reports it."""

    state: AgentState
    active_streams: tuple[str, ...]
    owned_partitions: tuple[tuple[str, int], ...]
    lag: int  # records behind the end offsets of owned, positioned partitions
    last_error: str
    lag_seconds: float = 0.0  # the oldest unwritten record's age, the most of owned partitions


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass
class _Queued(Generic[T]):
    """Work waiting for the next ingest transaction, and who waits for its result."""

    work: FencedWork[T]
    done: asyncio.Future[T] = field(default_factory=_future)


class DatabaseAgent:
    """One DatabaseAgent process. ``await run()`` until ``stop()``; see :meth:`run`.

    While it runs, :meth:`activate`, :meth:`deactivate` and :meth:`set_limits` steer it, and
    :meth:`in_ingest_transaction` commits extra work atomically with a batch.
    """

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.instance_id = config.instance_id or default_instance_id()
        self._limits = Limits(
            config.batch_max_records, config.batch_max_bytes, config.batch_max_wait_ms / 1000
        )
        topics = {config.topic(STREAM_BY_NAME[name].topic): name for name in config.streams}
        self._stream_of_topic = topics
        self._decoders: dict[str, StreamDecoder] = {
            topic: DECODERS[name] for topic, name in topics.items()
        }
        self._batch_writer = BatchWriter(config.group_id, topics, publish=self._publish_letters)
        self._dlq_topic = kafka_io.dead_letter_topic(config)
        self._dlq_limit = kafka_io.PRODUCER_MAX_REQUEST_SIZE  # the topic's, read in run()
        # Set when the DLQ topic refused a letter: the next attempt reads its limit again and
        # renews the producer; bare while that batch's letters go bare (_after_refused_letter).
        self._dlq_refused: kafka_io.DeadLetterRefused | None = None
        self._dlq_bare = False
        self.ownership = Ownership(topics)
        self._filling = Batch()  # the next batch: Actions.forget trims it
        # Its records' Kafka timestamps per partition, in the same order as its parts'
        # records: taken as they are fetched, while they are in the CPU's cache (at commit
        # they are not, and reading them again cost twice as much).
        self._filling_stamps: dict[Partition, list[int]] = {}
        self._stopping = asyncio.Event()
        # Set while no ingest transaction is open: deactivate() waits for it, so that once it
        # returns no row of a deactivated stream is written.
        self._no_transaction = asyncio.Event()
        self._no_transaction.set()
        self._queued: list[_Queued[Any]] = []  # work for the next ingest transaction
        self._closed = False  # run() has ended: no more work is taken
        self._conn: Connection | None = None
        self._batch_ids: deque[int] = deque()  # reserved from the sequence, 1000 at a time
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._mirror: _OffsetMirror | None = None
        self._task: asyncio.Task[None] | None = None
        self._write: asyncio.Task[None] | None = None  # the batch being written
        self.last_error = ""  # the newest failure, for status reports
        # Observability (docs/observability.md): lag per owned partition as last measured,
        # end offsets as last learnt, timestamps of records at stored offsets looked up.
        self._lag: dict[Partition, PartitionLag] = {}
        self._ends: dict[Partition, int] = {}
        self._oldest = OldestRecords()
        self._writing_batch: Batch | None = None  # the batch self._write is writing
        self._fetch_seconds = 0.0  # fetching and decoding the batch _fill_batch returned
        self._lag_task: asyncio.Task[None] | None = None
        self._probe: LagProbe | None = None
        self._joined = False  # the group gave this instance an assignment (maybe empty)
        # The source ("postgres", "kafka") of the transient failure a batch write, or a
        # positioning or batch-id reservation, is being retried after; None when none is.
        self._write_retrying: str | None = None
        self._call_retrying: str | None = None
        self._readiness = STARTING
        self._show_streams()

    # -- steering -------------------------------------------------------------------------

    async def activate(self, streams: Iterable[str]) -> None:
        """Switch streams on (a failed stream too, once its table is fixed): their partitions
        fetch again from the stored offsets. :class:`UnknownStreamError` for a stream this
        agent does not consume."""
        self._apply(self.ownership.activate_event(streams))
        self._show_streams()

    async def deactivate(self, streams: Iterable[str]) -> None:
        """Switch streams off: their partitions stay assigned and paused, their fetched
        records are dropped and re-read from the stored offsets once they are switched on.
        When this returns, no row of theirs is written until then (an ingest transaction that
        was already open has committed or rolled back)."""
        self._apply(self.ownership.deactivate_event(streams))
        self._show_streams()
        await self._no_transaction.wait()

    def set_limits(self, limits: Limits) -> None:
        """Batch limits, from the next fetch on: a fetch under way (it waits at most what is
        left of the batch's age) may still add up to ``_FETCH_CHUNK`` records, and a batch
        already past the limits is then written as it is. :class:`ValueError` for a limit
        that is not above zero."""
        if min(limits.max_records, limits.max_bytes, limits.max_wait_s) <= 0:
            raise ValueError(f"batch limits must be above zero: {limits}")
        self._limits = limits

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def reposition(self) -> None:
        """Re-read every owned partition's stored offset before it fetches or writes again:
        after something outside the batches moved them (a data rollback). A batch already
        planned from the old offsets misses its compare-and-set and is dropped."""
        self._apply(self.ownership.fenced_event(self.ownership.assigned()))

    def snapshot(self) -> AgentSnapshot:
        """What this instance is doing, for heartbeats and status views."""
        state: AgentState
        if self._stopping.is_set():
            state = "stopping"
        elif self.ownership.holding:
            state = "holding"
        elif self._consumer is None or self.ownership.unpositioned():
            state = "starting"
        else:
            state = "running"
        lag = 0
        if self._consumer is not None:
            for partition, position in self.ownership.positions().items():
                end = self._end_of(partition)
                if end is not None:
                    lag += max(end - position, 0)
        return AgentSnapshot(
            state=state,
            active_streams=tuple(self.ownership.active_streams()),
            owned_partitions=tuple(sorted(self.ownership.assigned())),
            lag=lag,
            last_error=self.last_error,
            lag_seconds=max((x.seconds or 0.0 for x in self._lag.values()), default=0.0),
        )

    def readiness(self) -> Readiness:
        """What ``/readyz`` answers (:mod:`pipeline.readiness`), as last decided on the event
        loop; safe to call from any thread."""
        return self._readiness

    async def in_ingest_transaction(self, work: FencedWork[T]) -> T:
        """Run ``work(conn)`` inside the next ingest transaction and return its result.

        It runs after the batch's compare-and-set (the fence) and rows, and commits or rolls
        back with them: a fenced or retried batch runs it again in the next transaction, so
        it must not depend on anything outside the transaction. When nothing arrives, a
        transaction with this work alone runs within about ``_POLL_MS``. If ``work`` raises,
        only its own statements roll back (it runs in a savepoint), the batch commits, and
        the error is raised here; a transient database error is retried with the batch.
        Raises :class:`PipelineError` if the agent has stopped, or stops before it ran.

        A transaction that carries work and no records has no compare-and-set: work that
        must be fenced has to lock what it depends on itself. A commit whose answer is lost
        (the connection dropped during COMMIT) is retried, so work may run twice: make it
        idempotent, as the control plane's is (it checks what it decided before). Work must
        not call this method or :meth:`deactivate`: both wait for its own transaction. If the
        caller is cancelled before the work was picked up, it does not run; after, its
        outcome is unknown.
        """
        if self._closed:
            raise PipelineError("the DatabaseAgent has stopped: no work can be committed")
        queued: _Queued[T] = _Queued(work)
        self._queued.append(queued)
        return await queued.done

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Ingest until stopped.

        1. Connect to PostgreSQL and check the schema is new enough; create missing topics.
        2. Join the consumer group; each assigned partition is positioned at its offset
           stored in PostgreSQL (the database wins over Kafka).
        3. Until stopped: fill a batch, ingest it in one transaction (transient failures
           retried with the partitions paused), mirror the offsets to Kafka. Meanwhile,
           every ``lag_refresh_s``, measure the lag and decide readiness (``_watch_lag``).
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
        try:
            conn = await self._connect()
            try:
                await db.check_schema(conn)  # `pipeline migrate` changes it, not the agents
                # Before anything is written: the tables of its streams are this group's.
                await self._claim_tables(conn)
            finally:
                await conn.close()
            await kafka_io.ensure_topics(
                config.kafka,
                [*kafka_io.data_topics(config), self._dlq_topic],
                config.topic_partitions,
            )
            # Read once, after the topic exists (this agent may just have created it): every
            # letter is sized to it, and a limit too small for any letter stops the agent
            # here, before it ingests anything.
            self._dlq_limit = await self._read_dlq_limit()
            self._producer = await kafka_io.start_dead_letter_producer(config, self._dlq_limit)
            self._consumer = kafka_io.make_consumer(config, _Rebalance(self))
            self._mirror = _OffsetMirror(self._consumer)
            await self._consumer.start()
            self._probe = LagProbe(
                config.kafka, timeout_s=max(min(config.lag_refresh_s * 2, 10.0), 1.0)
            )
            self._lag_task = asyncio.ensure_future(self._watch_lag(self._probe))
            self._task = asyncio.ensure_future(self._ingest_until_stopped())
            await self._task
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise  # cancelled from outside, not by the shutdown deadline
        finally:
            await self._close()

    async def _read_dlq_limit(self) -> int:
        """The DLQ topic's limit (:func:`pipeline.kafka.dead_letter_limit`), read from Kafka:
        a :class:`ConfigError` naming ``max.message.bytes`` when no letter can fit it."""
        return kafka_io.dead_letter_limit(
            self._dlq_topic,
            await kafka_io.read_max_message_bytes(self.config.kafka, self._dlq_topic),
            kafka_io.PRODUCER_MAX_REQUEST_SIZE,
            kafka_io.data_topics(self.config),
        )

    async def _after_refused_letter(self) -> None:
        """Before the batch's next attempt, once the DLQ topic refused one of its letters as too
        large: read the topic's limit again (a limit lowered below any letter stops the agent
        naming ``max.message.bytes``) and replace the producer (the refused batch left its
        sequence behind). A lowered limit sizes the letters from now on; an unchanged one
        means a broker enforces less than the cluster reports, so this batch's letters go
        bare. A bare letter refused too means the topic takes no letter at all: stop, naming
        the setting, rather than retry for ever. The record itself is never the reason to
        stop: on the next start its letter is sized to the limit read then."""
        refused, self._dlq_refused = self._dlq_refused, None
        if refused is None:
            return
        if self._dlq_bare:
            raise ConfigError(
                f"{refused}, even with its key, value, headers and reason omitted: set the "
                f"max.message.bytes of {self._dlq_topic} (and the brokers' message.max.bytes) "
                f"to at least {self._dlq_limit}, the limit it reported"
            ) from refused
        before = self._dlq_limit
        try:
            self._dlq_limit = await self._read_dlq_limit()
            old, self._producer = self._producer, None
            if old is not None:
                with contextlib.suppress(KafkaError):
                    await old.stop()
            self._producer = await kafka_io.start_dead_letter_producer(self.config, self._dlq_limit)
        except KafkaError as exc:  # the broker away: the next attempt tries again
            self._dlq_refused = refused
            raise TransientError(
                f"renewing the dead-letter producer: {exc!r}", source="kafka"
            ) from exc
        self._dlq_bare = self._dlq_limit >= before
        log.warning(
            "%s; the topic's limit is now %d bytes: %s (dead_letters keeps the records whole)",
            refused,
            self._dlq_limit,
            "this batch's dead letters go bare" if self._dlq_bare else "letters sized to it",
        )

    async def _claim_tables(self, conn: Connection) -> None:
        """Claim the tables of its streams for its group (docs/exactly-once.md, "One group per
        table"): :class:`OwnershipError` when another group owns one; a login that may not
        read or claim them ends the agent saying so."""
        tables = db.stream_tables({n: t for t, n in self._stream_of_topic.items()})
        try:
            await db.claim_tables(conn, self.config.group_id, tables)
        except PipelineError:
            raise
        except Exception as exc:
            error = classify(exc)
            if isinstance(error, TransientError):
                raise error from exc
            raise fatal("claiming the tables of its streams (table_owners)", error) from exc

    async def _ingest_until_stopped(self) -> None:
        """Write batch N while batch N+1 is fetched and decoded: the agent decodes while
        PostgreSQL inserts. At most one batch is written at a time, in fetch order, so each
        batch's compare-and-set starts where the one before it ended."""
        try:
            while not self._stopping.is_set():
                if self.ownership.unpositioned():
                    # Stored offsets read while a batch commits could be stale: finish it first.
                    await self._finish_write()
                    await self._position_pending()
                    if self._stopping.is_set():
                        break
                batch = await self._fill_batch()
                fetch_seconds, stamps = self._fetch_seconds, self._filling_stamps
                await self._finish_write()
                if (batch.count or self._queued) and not self._stopping.is_set():
                    self._writing_batch = batch
                    self._write = asyncio.ensure_future(
                        self._ingest_with_retry(batch, fetch_seconds, stamps)
                    )
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
            self._writing_batch = None

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
        self._decide_readiness()
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
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()  # run() itself was cancelled
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        if self._probe is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._probe.stop(), deadline)
        for queued in self._queued:
            if not queued.done.done():
                queued.done.set_exception(
                    PipelineError("the DatabaseAgent stopped before the work was committed")
                )
        self._queued.clear()
        if self._mirror is not None:  # the last offsets reach Kafka before we leave
            await self._mirror.close(deadline)
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
        self._filling = Batch()  # not the batch being written: its parts are planned anew
        self._filling_stamps = {}
        batch_id = await self._take_batch_id()
        if batch_id is None:
            return Batch()  # stopping
        batch = self._filling = Batch(batch_id)
        self._fetch_seconds = 0.0
        while not self.ownership.holding:  # a batch being retried polls for the group itself
            limits = self._limits
            if batch.is_full(limits):  # the limits went down below what it holds
                break
            now = time.monotonic()
            wait_ms = _POLL_MS
            if batch.started_at is not None:
                age_left = limits.max_wait_s - (now - batch.started_at)
                wait_ms = max(int(age_left * 1000), 0)
            asked = time.monotonic()
            fetched = await consumer.getmany(
                timeout_ms=wait_ms, max_records=min(batch.room(limits), _FETCH_CHUNK)
            )
            now = time.monotonic()
            stamps = self._filling_stamps
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
                self._fetch_seconds += time.monotonic() - asked
            if self._stopping.is_set() or not batch.count:
                break  # nothing arrived: let the caller check positions, stops and work
            if batch.is_due(limits, now) and (
                not self._writing or batch.is_full(limits) or not fetched
            ):
                break
            await asyncio.sleep(0)  # the batch being written takes its turn
        return batch

    # -- positioning --------------------------------------------------------------------

    def _apply(self, actions: Actions) -> None:
        """Carry out what :class:`Ownership` decided, on the batch being filled and the
        consumer (for the partitions the consumer still has)."""
        if not actions:
            return
        if actions.forget:
            self._filling.drop(actions.forget)
            for forgotten in actions.forget:
                self._filling_stamps.pop(forgotten, None)
        consumer = self._require_consumer()
        owned = consumer.assignment()
        for (topic, partition), offset in actions.seek.items():
            tp = TopicPartition(topic, partition)
            if tp in owned:
                consumer.seek(tp, offset)
        if actions.pause:
            consumer.pause(*_owned(actions.pause, owned))
        if actions.resume:
            consumer.resume(*_owned(actions.resume, owned))

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Hold new partitions until the main loop positions them from the database.

        No IO here: aiokafka runs this with heartbeats stopped, so a slow database would get
        this member evicted; and fetching from Kafka's committed offset would be wrong when
        the database is ahead of it or behind it.
        """
        self._apply(self.ownership.assigned_event((tp.topic, tp.partition) for tp in assigned))
        self._joined = True
        self._decide_readiness()

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in revoked]
        self._apply(self.ownership.revoked_event(keys))
        if self._mirror is not None:
            self._mirror.forget(keys)  # the next owner mirrors its own, newer offsets
        self._forget_lag(keys)

    async def _position(self) -> None:
        """Read the stored offsets of the partitions awaiting them, then let them fetch."""
        wanted = [TopicPartition(t, p) for t, p in self.ownership.unpositioned()]
        if not wanted:
            return
        starts = await kafka_io.beginning_offsets(self._require_consumer(), wanted)
        conn = await self._connect()
        try:
            stored = await db.load_offsets(conn, self.config.group_id, starts)
        finally:
            await conn.close()
        self._apply(self.ownership.positioned_event(stored))
        self._decide_readiness()

    async def _position_pending(self) -> None:
        while self.ownership.unpositioned() and not self._stopping.is_set():
            await self._retrying("positioning partitions at their stored offsets", self._position)

    def _fail_stream(self, stream: str, exc: SchemaError) -> None:
        """Stop one stream on a schema or permission error: its records stay in Kafka, neither
        ingested nor dead-lettered, until the table is fixed and the stream activated."""
        log.error(
            "stream %s STOPPED: its table rejects every write (%s). The other streams go on; "
            "fix the table or the grants, then activate %s again (or restart the agent).",
            stream,
            exc,
            stream,
        )
        self.last_error = f"stream {stream} stopped: {exc}"
        # The failure's class, not its text: /readyz shows it to whoever reaches the port.
        self._apply(self.ownership.failed_event(stream, failure_class(exc)))
        self._show_streams()

    def _show_streams(self) -> None:
        for stream, state in self.ownership.streams().items():
            self.metrics.stream_active.labels(stream).set(state is StreamState.ACTIVE)
            self.metrics.stream_stopped.labels(stream).set(state is StreamState.FAILED)
        self._decide_readiness()

    # -- observing ----------------------------------------------------------------------

    def _decide_readiness(self) -> None:
        """Decide what ``/readyz`` answers, and ``pipeline_ready``; called on the event loop
        whenever an input changes, and on every lag refresh."""
        own = self.ownership
        health = AgentHealth(
            stopping=self._stopping.is_set(),
            joined=self._joined,
            unpositioned=len(own.unpositioned()),
            stopped_streams=tuple(
                (stream, own.failure(stream) or "")
                for stream, state in own.streams().items()
                if state is StreamState.FAILED
            ),
            retrying=self._write_retrying or self._call_retrying,
        )
        self._readiness = readiness(health)
        self.metrics.ready.set(1 if self._readiness.ready else 0)

    async def _watch_lag(self, probe: LagProbe) -> None:
        """Every ``lag_refresh_s``, whatever the agent is doing (idle, paused, retrying):
        ask Kafka for the end offsets of the owned partitions, look up the timestamps of the
        oldest unwritten records the agent does not hold, and set the lag gauges. Failures
        (Kafka away) are logged; the next refresh tries again, and lag in seconds keeps
        growing meanwhile from the timestamps already known."""
        interval = self.config.lag_refresh_s
        failing = ""
        while True:
            try:
                await self._refresh_lag(probe)
                failing = ""
            except Exception as exc:  # measuring must never stop ingesting
                if repr(exc) != failing:
                    log.warning("measuring lag failed (retried every %ss): %r", interval, exc)
                failing = repr(exc)
            self._decide_readiness()
            await asyncio.sleep(interval)

    async def _refresh_lag(self, probe: LagProbe) -> None:
        owned = set(self.ownership.assigned())
        self._forget_lag([p for p in self._lag if p not in owned])
        asked = await probe.end_offsets(list(self.ownership.positions()))
        still_owned = set(self.ownership.assigned())  # a rebalance may have come meanwhile
        for partition, offset in asked.items():
            if partition in still_owned:
                self._ends[partition] = max(offset, self._ends.get(partition, 0))
        missing: dict[Partition, int] = {}
        for partition, stored in self.ownership.positions().items():
            end = self._end_of(partition)
            if end is not None and end > stored and self._oldest_ms(partition, stored) is None:
                known, _ = self._oldest.get(partition, stored)
                if not known:
                    missing[partition] = stored
        if missing:
            found = await probe.oldest_timestamps(missing, self._ends)
            still_owned = set(self.ownership.assigned())
            for partition, timestamp in found.items():
                if partition in still_owned:
                    self._oldest.put(partition, missing[partition], timestamp)
        now = time.time()
        for partition, stored in self.ownership.positions().items():
            self._show_lag(partition, stored, now)

    def _show_lag(self, partition: Partition, stored: int, now: float) -> None:
        """Set one partition's lag gauges from what is known without asking Kafka."""
        end = self._end_of(partition)
        if end is None:
            return
        oldest = None
        markers_only = False
        if end > stored:
            oldest = self._oldest_ms(partition, stored)
            if oldest is None:
                known, oldest = self._oldest.get(partition, stored)
                markers_only = known and oldest is None
        lag = partition_lag(now, stored, end, oldest, markers_only=markers_only)
        if lag.seconds is None:  # not looked up yet: the last value stands
            previous = self._lag.get(partition)
            lag = PartitionLag(stored, lag.end, lag.records, previous.seconds if previous else None)
        self._lag[partition] = lag
        self.metrics.show_partition(
            *partition, records=lag.records, seconds=lag.seconds, stored=stored, end=lag.end
        )

    def _oldest_ms(self, partition: Partition, stored: int) -> int | None:
        """The timestamp of the record at the stored offset, when the agent holds it."""
        return timestamp_in_hand((self._writing_batch, self._filling), partition, stored)

    def _end_of(self, partition: Partition) -> int | None:
        """The newest end offset known: asked of Kafka by the last refresh, or seen in the
        consumer's fetch responses since (fresher while the partition fetches)."""
        end = self._ends.get(partition)
        consumer = self._consumer
        tp = TopicPartition(*partition)
        if consumer is not None and tp in consumer.assignment():
            seen = consumer.last_stable_offset(tp)
            if seen is None or seen < 0:
                seen = consumer.highwater(tp)
            if seen is not None and seen >= 0 and (end is None or seen > end):
                end = self._ends[partition] = seen
        return end

    def _forget_lag(self, partitions: Iterable[Partition]) -> None:
        """Drop what is known of partitions this instance does not own any more, and their
        series."""
        partitions = list(partitions)
        self._oldest.forget(partitions)
        for partition in partitions:
            self._lag.pop(partition, None)
            self._ends.pop(partition, None)
            self.metrics.forget_partition(*partition)

    def _count_latency(self, work: Plan, stamps: dict[Partition, list[int]]) -> None:
        """Per stream of a committed batch: end-to-end latency, one observation per record,
        counted in bulk; and freshness, the newest record timestamp. ``stamps`` are the
        timestamps taken when the batch was fetched, per partition in record order; a part
        the plan trimmed (records behind the stored offset) is their tail."""
        now = time.time()
        by_stream: dict[str, list[list[int]]] = defaultdict(list)
        for partition, part in work.parts.items():
            taken = stamps.get(partition)
            count = len(part.records)
            if taken is not None and len(taken) >= count:
                run = taken[len(taken) - count :] if len(taken) > count else taken
            else:  # not taken at fetch time (cannot happen; but never count wrong)
                run = [r.timestamp for r in part.records]
            by_stream[self._decoders[partition[0]].stream.name].append(run)
        for stream, runs in by_stream.items():
            newest = self.metrics.latency.observe_ages(stream, now, runs)
            if newest is not None:
                self.metrics.note_newest(stream, newest / 1000)

    # -- ingesting ----------------------------------------------------------------------

    async def _ingest_with_retry(
        self,
        batch: Batch,
        fetch_seconds: float = 0.0,
        stamps: dict[Partition, list[int]] | None = None,
    ) -> None:
        attempt = 0
        try:
            while True:
                # No await between the plan and marking a transaction open: a stream switched
                # off before the plan is not in it, and deactivate() waits for this attempt.
                work = plan(batch, self.ownership.writable())
                self._queued = [q for q in self._queued if not q.done.cancelled()]
                queued = list(self._queued)
                if not work.moves and not queued:
                    self._count_skipped(work)
                    # Records of partitions no longer ours, or all behind the stored offset.
                    self._apply(self.ownership.rewound_event(batch.parts))
                    return
                self._no_transaction.clear()
                try:
                    await self._after_refused_letter()
                    await self._ingest(work, queued, fetch_seconds, stamps)
                    self._dlq_bare = False
                    return
                except (FencedError, SchemaError, TransientError) as exc:
                    failure = exc
                    if isinstance(exc, kafka_io.DeadLetterRefused):
                        self._dlq_refused = exc
                except Exception as exc:  # retrying cannot fix it: say so, and stop
                    raise fatal("writing a batch", classify(exc)) from exc
                finally:
                    self._no_transaction.set()
                if isinstance(failure, FencedError):
                    self.metrics.fenced.inc()
                    log.info("batch fenced, re-reading stored offsets: %s", failure)
                    await self._drop_connection()
                    self._apply(self.ownership.fenced_event(batch.parts))
                    return
                if isinstance(failure, SchemaError):
                    if failure.stream is None:  # the pipeline's own tables: nothing to ingest
                        raise fatal("writing a batch", failure) from failure
                    await self._drop_connection()  # its staging table may have the old shape
                    self._fail_stream(failure.stream, failure)
                    continue
                if self._stopping.is_set():
                    log.warning("stopping; batch abandoned after a transient failure: %s", failure)
                    self._apply(self.ownership.rewound_event(batch.parts))
                    return
                delay = backoff(attempt, self.config.retry_max_backoff_s)
                self._write_retrying = failure.source
                self._note_retry(failure, delay)
                self._apply(self.ownership.hold_event())
                await self._drop_connection()
                await self._idle(delay)
                attempt += 1
        finally:
            self._apply(self.ownership.release_event())
            if self._write_retrying is not None:
                self._write_retrying = None
                self._decide_readiness()

    async def _ingest(
        self,
        work: Plan,
        queued: list[_Queued[Any]],
        fetch_seconds: float = 0.0,
        stamps: dict[Partition, list[int]] | None = None,
    ) -> None:
        """Write one batch exactly once through the writer (:meth:`BatchWriter.write`): in one
        transaction the fence (the compare-and-set of every partition's stored offset), each
        stream's rows, the dead letters sent to the DLQ topic and recorded, the queued work;
        then count it and mirror the offsets to Kafka, in the background."""
        started = time.monotonic()
        written = await self._batch_writer.write(
            await self._connection(),
            work.parts,
            lock=bool(queued),
            moves=work.moves,
            work=[item.work for item in queued],
        )
        committed = time.monotonic()
        self.ownership.committed_event(work.moves)
        for item, (result, error) in zip(queued, written.results, strict=True):
            self._queued.remove(item)
            if not item.done.done():
                if error is None:
                    item.done.set_result(result)
                else:
                    item.done.set_exception(error)
        if work.moves:
            self._count(work, written, committed - started)
            m = self.metrics
            m.batch_phase.labels("fetch_decode").observe(fetch_seconds)
            m.batch_phase.labels("write").observe(written.written_at - started)
            m.batch_phase.labels("commit").observe(committed - written.written_at)
            self._count_latency(work, stamps or {})
            self._require_mirror().add(work.moves)
        else:
            self._count_skipped(work)
        self._decide_readiness()

    async def _publish_letters(self, letters: list[DeadLetter]) -> None:
        """Send a batch's dead letters to the DLQ topic and wait for every acknowledgement."""
        await kafka_io.publish_dead_letters(
            self._require_producer(),
            self._dlq_topic,
            letters,
            self.config.db_command_timeout_s,
            kafka_io.BARE if self._dlq_bare else self._dlq_limit,
        )

    # -- helpers --------------------------------------------------------------------------

    async def _connection(self) -> Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
        return self._conn

    async def _connect(self) -> Connection:
        """A new connection whose transactions the server ends after sitting idle past
        ``db_idle_in_transaction_timeout_s``: an instance stopped inside its ingest
        transaction does not keep its offset rows locked from their new owner."""
        return await db.connect(self.config.database_url, self.config.db_session)

    async def _take_batch_id(self) -> int | None:
        """The next reserved batch id, or None once stopping. Reserving more takes its own
        connection, because the agent's connection may be busy writing the batch before."""

        async def reserve() -> None:
            conn = await self._connect()
            try:
                self._batch_ids.extend(await db.reserve_batch_ids(conn))
            finally:
                await conn.close()

        if not self._batch_ids:
            await self._retrying("reserving batch ids", reserve)
        return self._batch_ids.popleft() if self._batch_ids else None

    async def _retrying(self, what: str, call: Callable[[], Awaitable[None]]) -> None:
        def note(error: TransientError, delay: float) -> None:
            self._call_retrying = error.source
            self._note_retry(error, delay)

        try:
            await retrying(
                what,
                call,
                max_backoff_s=self.config.retry_max_backoff_s,
                sleep=self._idle,
                stopping=self._stopping.is_set,
                on_retry=note,
            )
        finally:
            if self._call_retrying is not None:
                self._call_retrying = None
                self._decide_readiness()

    def _note_retry(self, error: TransientError, delay: float) -> None:
        self.last_error = str(error)
        log.warning("%s; retrying in %.1fs", error, delay)
        self.metrics.retries.labels(error.source).inc()
        self._decide_readiness()

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()  # no graceful close: the server may be gone or wedged

    async def _idle(self, seconds: float) -> None:
        """Wait without leaving the group: keep polling. Partitions that fetch meanwhile
        (paused ones do not) are rewound: what they return is not written now."""
        consumer = self._require_consumer()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._stopping.is_set():
            fetched = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            if fetched:  # newly assigned partitions fetch before they are paused: not ours yet
                self._apply(
                    self.ownership.rewound_event((tp.topic, tp.partition) for tp in fetched)
                )

    def _count(self, work: Plan, written: Written, seconds: float) -> None:
        m = self.metrics
        for (topic, _), part in work.parts.items():
            m.records_consumed.labels(topic, "live").inc(len(part.records))
        for stream, stream_rows in written.rows.items():
            new, refused = written.new[stream], len(written.refused.get(stream, ()))
            m.rows_ingested.labels(DECODERS[stream].tables.table.name, "live").inc(new)
            topic = self.config.topic(STREAM_BY_NAME[stream].topic)
            m.duplicates_skipped.labels(topic).inc(len(stream_rows) - new - refused)
        for letter in written.letters:
            m.dead_lettered.labels(letter.topic, letter.error_class).inc()
        self._count_skipped(work)
        m.batches.inc()
        m.batch_duration.observe(seconds)
        m.batch_records.observe(sum(len(p.records) for p in work.parts.values()))
        now = time.time()
        m.last_commit.set(now)
        positions = self.ownership.positions()
        for move in work.moves:
            partition = (move.topic, move.partition)
            stored = positions.get(partition)
            if stored is not None:
                self._show_lag(partition, stored, now)

    def _count_skipped(self, work: Plan) -> None:
        for topic, skipped in work.already_ingested.items():
            self.metrics.records_consumed.labels(topic, "live").inc(skipped)
            self.metrics.duplicates_skipped.labels(topic).inc(skipped)

    def _require_consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "the agent is not running"
        return self._consumer

    def _require_producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "the agent is not running"
        return self._producer

    def _require_mirror(self) -> _OffsetMirror:
        assert self._mirror is not None, "the agent is not running"
        return self._mirror


class _OffsetMirror:
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


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, agent: DatabaseAgent) -> None:
        self._agent = agent

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._agent._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._agent._on_assigned(set(assigned))


def _owned(partitions: Iterable[Partition], owned: set[TopicPartition]) -> list[TopicPartition]:
    return [tp for t, p in partitions if (tp := TopicPartition(t, p)) in owned]
