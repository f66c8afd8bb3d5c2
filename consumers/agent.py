"""The DatabaseAgent: a consumer-group member that lands the five data streams in PostgreSQL
exactly once, with COPY. docs/exactly-once.md states the invariant every method here keeps (a
partition's fetch position is never ahead of its stored offset except by the records of the
batch being written and of the next one) and the protocol; docs/architecture.md, "The actors",
how the fetch loop, the write task and the rebalance callbacks share one
:class:`pipeline.ownership.Ownership`, and which collaborator does what.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumers.dlq import DeadLetterOutlet
from consumers.lag_watch import LagWatch, probe_for
from consumers.membership import OffsetMirror, Rebalance, claim_tables
from consumers.writer import BatchWriter, Written
from pipeline import db
from pipeline import kafka as kafka_io
from pipeline.batching import Batch, Limits, Partition, Plan, backoff, plan
from pipeline.config import Config, default_instance_id, redact_url
from pipeline.control import AgentState
from pipeline.db import Connection, DeadLetter
from pipeline.errors import FencedError, PipelineError, SchemaError, TransientError
from pipeline.latency import LatencyCount
from pipeline.metrics import Metrics
from pipeline.ownership import Actions, Ownership
from pipeline.readiness import Readiness, ReadinessWatch, failure_class
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
        self._decoders: dict[str, StreamDecoder] = {
            topic: DECODERS[name] for topic, name in topics.items()
        }
        self._dlq = DeadLetterOutlet(config)
        self._batch_writer = BatchWriter(config.group_id, topics, publish=self._publish_letters)
        self.ownership = Ownership(topics)
        self._filling = Batch()  # the next batch: Actions.forget trims it
        # Its records' Kafka timestamps per partition, in the same order as its parts'
        # records, for the latency count: taken as they are fetched, while the records are in
        # the CPU's cache, rather than read again at commit.
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
        self._mirror: OffsetMirror | None = None
        self._task: asyncio.Task[None] | None = None
        self._write: asyncio.Task[None] | None = None  # the batch being written
        self.last_error = ""  # the newest failure, for status reports
        self._writing_batch: Batch | None = None  # the batch self._write is writing
        self._fetch_seconds = 0.0  # fetching and decoding the batch _fill_batch returned
        # The source ("postgres", "kafka") of the transient failure a batch write, or a
        # positioning or batch-id reservation, is being retried after; None when none is.
        self._write_retrying: str | None = None
        self._call_retrying: str | None = None
        # Observability (docs/observability.md): readiness, lag, latency.
        self._ready = ReadinessWatch(
            self.ownership,
            self.metrics,
            stopping=self._stopping.is_set,
            retrying=lambda: self._write_retrying or self._call_retrying,
        )
        self._lag = LagWatch(
            self.ownership,
            self.metrics,
            in_hand=lambda: (self._writing_batch, self._filling),
            after_each=self._ready.decide,
        )
        self._latency = LatencyCount(self.metrics, topics)
        self._ready.show_streams()

    # -- steering -------------------------------------------------------------------------

    async def activate(self, streams: Iterable[str]) -> None:
        """Switch streams on (a failed stream too, once its table is fixed): their partitions
        fetch again from the stored offsets. :class:`UnknownStreamError` for a stream this
        agent does not consume."""
        self._apply(self.ownership.activate_event(streams))
        self._ready.show_streams()

    async def deactivate(self, streams: Iterable[str]) -> None:
        """Switch streams off: their partitions stay assigned and paused, their fetched
        records are dropped and re-read from the stored offsets once they are switched on.
        When this returns, no row of theirs is written until then (an ingest transaction that
        was already open has committed or rolled back)."""
        self._apply(self.ownership.deactivate_event(streams))
        self._ready.show_streams()
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
        return AgentSnapshot(
            state=state,
            active_streams=tuple(self.ownership.active_streams()),
            owned_partitions=tuple(sorted(self.ownership.assigned())),
            lag=self._lag.records_behind(),
            last_error=self.last_error,
            lag_seconds=self._lag.seconds_behind(),
        )

    def readiness(self) -> Readiness:
        """What ``/readyz`` answers (:mod:`pipeline.readiness`), as last decided on the event
        loop; safe to call from any thread."""
        return self._ready.current

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
           every ``lag_refresh_s``, measure the lag and decide readiness (:class:`LagWatch`).
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
                await claim_tables(conn, config)
            finally:
                await conn.close()
            await kafka_io.ensure_topics(
                config.kafka,
                [*kafka_io.data_topics(config), self._dlq.topic],
                config.topic_partitions,
            )
            await self._dlq.start()  # after the topic exists: this agent may just have made it
            rebalance = Rebalance(self._on_assigned, self._on_revoked)
            self._consumer = kafka_io.make_consumer(config, rebalance)
            self._mirror = OffsetMirror(self._consumer)
            await self._consumer.start()
            probe = probe_for(config.kafka, config.lag_refresh_s)
            self._lag.start(self._consumer, probe, config.lag_refresh_s)
            self._task = asyncio.ensure_future(self._ingest_until_stopped())
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
        self._ready.decide()
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
        await self._lag.stop(deadline)
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
        await self._dlq.stop(deadline)
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
        self._ready.joined()

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in revoked]
        self._apply(self.ownership.revoked_event(keys))
        if self._mirror is not None:
            self._mirror.forget(keys)  # the next owner mirrors its own, newer offsets
        self._lag.forget(keys)

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
        self._ready.decide()

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
        self._ready.show_streams()

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
                    await self._dlq.before_attempt()
                    await self._ingest(work, queued, fetch_seconds, stamps)
                    self._dlq.delivered()
                    return
                except (FencedError, SchemaError, TransientError) as exc:
                    failure = exc
                    if isinstance(exc, kafka_io.DeadLetterRefused):
                        self._dlq.refused(exc)
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
                self._ready.decide()

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
            self._latency.count(work, stamps or {}, time.time())
            self._require_mirror().add(work.moves)
        else:
            self._count_skipped(work)
        self._ready.decide()

    async def _publish_letters(self, letters: list[DeadLetter]) -> None:
        """Send a batch's dead letters to the DLQ topic and wait for every acknowledgement."""
        await self._dlq.publish(letters, self.config.db_command_timeout_s)

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
                self._ready.decide()

    def _note_retry(self, error: TransientError, delay: float) -> None:
        self.last_error = str(error)
        log.warning("%s; retrying in %.1fs", error, delay)
        self.metrics.retries.labels(error.source).inc()
        self._ready.decide()

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
                self._lag.show(partition, stored, now)

    def _count_skipped(self, work: Plan) -> None:
        for topic, skipped in work.already_ingested.items():
            self.metrics.records_consumed.labels(topic, "live").inc(skipped)
            self.metrics.duplicates_skipped.labels(topic).inc(skipped)

    def _require_consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "the agent is not running"
        return self._consumer

    def _require_mirror(self) -> OffsetMirror:
        assert self._mirror is not None, "the agent is not running"
        return self._mirror


def _owned(partitions: Iterable[Partition], owned: set[TopicPartition]) -> list[TopicPartition]:
    return [tp for t, p in partitions if (tp := TopicPartition(t, p)) in owned]
