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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from consumers.agent_db import AgentDatabase, FencedWork, Queued
from consumers.batch_count import BatchCount
from consumers.dlq import DeadLetterOutlet
from consumers.fetcher import Fetcher
from consumers.lag_watch import LagWatch, probe_for
from consumers.membership import OffsetMirror, Rebalance
from consumers.partition_watch import PartitionWatch
from consumers.retries import Retries
from consumers.writer import BatchWriter
from pipeline import db, gaps
from pipeline import kafka as kafka_io
from pipeline.batching import Batch, Limits, OffsetMove, Partition, Plan, backoff, plan
from pipeline.config import Config, default_instance_id, redact_url
from pipeline.control import AgentState
from pipeline.db import Connection
from pipeline.errors import FencedError, SchemaError, TransientError
from pipeline.gaps import Action, Gap
from pipeline.metrics import Metrics
from pipeline.ownership import Actions, Ownership
from pipeline.readiness import Readiness, ReadinessWatch, failure_class
from pipeline.retry import classify, fatal
from pipeline.rows import decoder

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class AgentSnapshot:
    """One instance's state as a heartbeat reports it."""

    state: AgentState
    active_streams: tuple[str, ...]
    owned_partitions: tuple[tuple[str, int], ...]
    lag: int  # records behind the end offsets of owned, positioned partitions
    last_error: str
    lag_seconds: float = 0.0  # the oldest unwritten record's age, the most of owned partitions


class DatabaseAgent:
    """One DatabaseAgent process. ``await run()`` until ``stop()``; see :meth:`run`.

    While it runs, :meth:`activate`, :meth:`deactivate` and :meth:`set_limits` steer it, and
    :meth:`in_ingest_transaction` commits extra work atomically with a batch.
    """

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.instance_id = config.instance_id or default_instance_id()
        catalog = config.catalog
        topics = {config.topic(catalog[name].topic): name for name in config.streams}
        self._dlq = DeadLetterOutlet(config)
        self._db = AgentDatabase(config)
        self._batch_writer = BatchWriter(
            config.group_id, topics, catalog, publish=self._dlq.publish
        )
        self._counts = BatchCount(self.metrics, topics, catalog)
        for topic, stream in topics.items():
            self.metrics.stream_topic.labels(stream, topic).set(1)
        self.ownership = Ownership(topics)
        self._stopping = asyncio.Event()
        self._fetcher = Fetcher(
            self._require_consumer,
            {topic: decoder(catalog[name]) for topic, name in topics.items()},
            self.ownership,
            Limits(
                config.batch_max_records, config.batch_max_bytes, config.batch_max_wait_ms / 1000
            ),
            writing=lambda: self._writing,
            stopping=self._stopping.is_set,
        )
        # Set while no ingest transaction is open: deactivate() waits for it, so that once it
        # returns no row of a deactivated stream is written.
        self._no_transaction = asyncio.Event()
        self._no_transaction.set()
        # Gaps (pipeline/gaps.py) under PIPELINE_ON_GAP=stop: partitions whose stream this
        # instance stopped on a gap, and those whose gap activating the stream again accepted.
        self._gaps_stopped: set[Partition] = set()
        self._gaps_accepted: set[Partition] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._mirror: OffsetMirror | None = None
        self._task: asyncio.Task[None] | None = None
        self._write: asyncio.Task[None] | None = None  # the batch being written
        self._writing_batch: Batch | None = None  # the batch self._write is writing
        # Observability (docs/observability.md): readiness, lag.
        self._ready = ReadinessWatch(
            self.ownership,
            self.metrics,
            stopping=self._stopping.is_set,
            retrying=lambda: self._retries.source,
        )
        self._retries = Retries(
            self.metrics,
            config.retry_max_backoff_s,
            sleep=self._fetcher.idle,
            stopping=self._stopping.is_set,
            changed=self._ready.decide,
        )
        self._lag = LagWatch(
            self.ownership,
            self.metrics,
            in_hand=lambda: (self._writing_batch, self._fetcher.batch),
            after_each=self._ready.decide,
        )
        self._partitions = PartitionWatch(config, self.metrics)
        self._ready.show_streams()

    # -- steering -------------------------------------------------------------------------

    async def activate(self, streams: Iterable[str]) -> None:
        """Switch streams on (a failed stream too, once its table is fixed): their partitions
        fetch again from the stored offsets. :class:`UnknownStreamError` for a stream this
        agent does not consume. A stream stopped on a gap (PIPELINE_ON_GAP=stop) goes on
        from the log start: its gaps are recorded as skipped when it is positioned again."""
        chosen = set(streams)
        self._apply(self.ownership.activate_event(chosen))
        accepted = {p for p in self._gaps_stopped if self.ownership.stream_of(p[0]) in chosen}
        if accepted:
            self._gaps_stopped -= accepted
            self._gaps_accepted |= accepted
            self._apply(self.ownership.fenced_event(accepted))  # read the stored offsets again
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
        left of the batch's age) may still add up to ``fetcher.FETCH_CHUNK`` records, and a
        batch already past the limits is then written as it is. :class:`ValueError` for a
        limit that is not above zero."""
        if min(limits.max_records, limits.max_bytes, limits.max_wait_s) <= 0:
            raise ValueError(f"batch limits must be above zero: {limits}")
        self._fetcher.limits = limits

    @property
    def limits(self) -> Limits:
        return self._fetcher.limits

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

    @property
    def last_error(self) -> str:
        """The newest failure, for status reports."""
        return self._retries.last_error

    def readiness(self) -> Readiness:
        """What ``/readyz`` answers (:mod:`pipeline.readiness`), as last decided on the event
        loop; safe to call from any thread."""
        return self._ready.current

    async def in_ingest_transaction(self, work: FencedWork[T]) -> T:
        """Run ``work(conn)`` inside the next ingest transaction, after the batch's fence and
        rows, and return its result: :meth:`AgentDatabase.in_ingest_transaction` says how,
        and what the work must and must not do."""
        return await self._db.in_ingest_transaction(work)

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
        self.metrics.count_tasks(asyncio.get_running_loop())
        try:
            await self._db.prepare()  # the schema, and the tables of its streams claimed
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
            self._partitions.start()
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
                fetch_seconds, stamps = self._fetcher.fetch_seconds, self._fetcher.stamps
                await self._finish_write()
                if (batch.count or self._db.has_work) and not self._stopping.is_set():
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
        if self._task is not None and not self._task.done():
            self._task.cancel()  # run() itself was cancelled
        await self._lag.stop(deadline)
        await self._partitions.stop()
        self._db.close()  # fails the queued work
        if self._mirror is not None:  # the last offsets reach Kafka before we leave
            await self._mirror.close(deadline)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(kafka_io.stop_consumer(self._consumer), deadline)
        await self._dlq.stop(deadline)
        self._db.drop()
        log.info("DatabaseAgent %s stopped", self.instance_id)

    # -- fetching ---------------------------------------------------------------------

    async def _fill_batch(self) -> Batch:
        """The next batch, filled (:meth:`Fetcher.fill`) once it has a batch id; an empty
        one when stopping."""
        self._fetcher.clear()
        batch_id = self._db.batch_id()
        if batch_id is None:  # all used: reserve more (and only then await)
            batch_id = await self._db.reserve_batch_id(self._retries.call)
            if batch_id is None:
                return Batch()  # stopping
        return await self._fetcher.fill(batch_id)

    # -- positioning --------------------------------------------------------------------

    def _apply(self, actions: Actions) -> None:
        """Carry out what :class:`Ownership` decided, on the batch being filled and the
        consumer (for the partitions the consumer still has)."""
        self._fetcher.apply(actions)

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
        stored = await self._db.load_offsets(starts)
        found = [(gap, self._on_gap(gap)) for gap in gaps.find(stored, starts)]
        if found:
            try:
                await self._record_gaps(found)
            except FencedError:  # another member moved one meanwhile: read them all again
                log.info("a stored offset moved on while its gap was recorded: reading again")
                return
            stored.update(gaps.skipped_to(gap for gap, action in found if action != "stopped"))
        self._apply(self.ownership.positioned_event(stored))
        for gap, action in found:
            self._gap_settled(gap, action)
        self._ready.decide()

    async def _record_gaps(self, found: list[tuple[Gap, Action]]) -> None:
        """Record the gaps, and move the stored offsets past the skipped ones, in one
        transaction through the writer's compare-and-set (on a connection of its own: the
        batches' one may be busy writing)."""
        moves = [
            OffsetMove(gap.topic, gap.partition, gap.first, gap.end)
            for gap, action in found
            if action != "stopped"
        ]

        async def record(conn: Connection) -> None:
            await db.record_gaps(conn, self.config.group_id, found, self.instance_id)

        conn = await self._db.connect()
        try:
            await self._batch_writer.write(conn, {}, moves=moves, before=record)
        finally:
            await conn.close()

    def _on_gap(self, gap: Gap) -> Action:
        """What to do about a gap found while positioning (PIPELINE_ON_GAP)."""
        if self.config.on_gap == "record":
            return "skipped"
        return "resumed" if gap.key in self._gaps_accepted else "stopped"

    def _gap_settled(self, gap: Gap, action: Action) -> None:
        """A gap is recorded in ingest_gaps, and the stored offset moved past it unless the
        stream stops on it: count it, say so in one line, stop the stream if it must."""
        stream = self.ownership.stream_of(gap.topic)
        if action == "stopped":
            log.error(
                "records LOST: %s. Stream %s STOPPED (PIPELINE_ON_GAP=stop); recorded in "
                "ingest_gaps: decide, then activate %s to go on from the log start "
                "(docs/operations.md)",
                gap.describe(),
                stream,
                stream,
            )
            self._gaps_stopped.add(gap.key)
            self._retries.last_error = f"stream {stream} stopped: {gap.describe()}"
            self._apply(self.ownership.failed_event(stream, gaps.STOPPED_REASON))
            self._ready.show_streams()
            return
        self._gaps_accepted.discard(gap.key)
        self.metrics.records_lost.labels(stream, str(gap.partition)).inc(gap.lost)
        log.error(
            "records LOST: %s. Recorded in ingest_gaps; stream %s goes on from the log start (%s)",
            gap.describe(),
            stream,
            "activated after it stopped" if action == "resumed" else "PIPELINE_ON_GAP=record",
        )

    async def _check_gaps(self, batch: Batch) -> None:
        """Partitions of ``batch`` whose first record is past their stored offset (the
        consumer may have reset an out-of-range position to the log start): those whose log
        start is now past their stored offset have a gap, and are positioned again, which
        records it. A hole that is not a gap (transaction markers, aborted records) is left
        alone. If the log start cannot be read, they are positioned again too."""
        writable = self.ownership.writable()
        suspects = gaps.suspects(batch.parts, writable)
        if not suspects:
            return
        log.debug("batch starts past the stored offset of %s: reading their log starts", suspects)
        try:
            starts = await kafka_io.beginning_offsets(
                self._require_consumer(), [TopicPartition(t, p) for t, p in suspects]
            )
        except KafkaError:
            lost = suspects
        else:
            lost = [gap.key for gap in gaps.find({p: writable[p] for p in suspects}, starts)]
        if lost:
            self._apply(self.ownership.fenced_event(lost))

    async def _position_pending(self) -> None:
        while self.ownership.unpositioned() and not self._stopping.is_set():
            await self._retries.call(
                "positioning partitions at their stored offsets", self._position
            )

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
        self._retries.last_error = f"stream {stream} stopped: {exc}"
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
            await self._check_gaps(batch)
            while True:
                # No await between the plan and marking a transaction open: a stream switched
                # off before the plan is not in it, and deactivate() waits for this attempt.
                work = plan(batch, self.ownership.writable())
                queued = self._db.take_work()
                if not work.moves and not queued:
                    self._counts.skipped(work)
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
                    self._db.drop()
                    self._apply(self.ownership.fenced_event(batch.parts))
                    return
                if isinstance(failure, SchemaError):
                    if failure.stream is None:  # the pipeline's own tables: nothing to ingest
                        raise fatal("writing a batch", failure) from failure
                    self._db.drop()  # its staging table may have the old shape
                    self._fail_stream(failure.stream, failure)
                    continue
                if self._stopping.is_set():
                    log.warning("stopping; batch abandoned after a transient failure: %s", failure)
                    self._apply(self.ownership.rewound_event(batch.parts))
                    return
                delay = backoff(attempt, self.config.retry_max_backoff_s)
                self._retries.write_failed(failure, delay)
                self._apply(self.ownership.hold_event())
                self._db.drop()
                await self._fetcher.idle(delay)
                attempt += 1
        finally:
            self._apply(self.ownership.release_event())
            self._retries.write_ended()

    async def _ingest(
        self,
        work: Plan,
        queued: list[Queued[Any]],
        fetch_seconds: float = 0.0,
        stamps: dict[Partition, list[int]] | None = None,
    ) -> None:
        """Write one batch exactly once through the writer (:meth:`BatchWriter.write`): in one
        transaction the fence (the compare-and-set of every partition's stored offset), each
        stream's rows, the dead letters sent to the DLQ topic and recorded, the queued work;
        then count it and mirror the offsets to Kafka, in the background."""
        started = time.monotonic()
        written = await self._batch_writer.write(
            await self._db.connection(),
            work.parts,
            lock=bool(queued),
            moves=work.moves,
            work=[item.work for item in queued],
        )
        committed = time.monotonic()
        self.ownership.committed_event(work.moves)
        self._db.settle(queued, written.results)
        if work.moves:
            now = time.time()
            self._counts.committed(
                work,
                written,
                stamps or {},
                fetch_seconds=fetch_seconds,
                started=started,
                committed=committed,
                now=now,
            )
            self._lag.show_moved(work.moves, now)
            self._require_mirror().add(work.moves)
        else:
            self._counts.skipped(work)
        self._ready.decide()

    # -- helpers --------------------------------------------------------------------------

    def _require_consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "the agent is not running"
        return self._consumer

    def _require_mirror(self) -> OffsetMirror:
        assert self._mirror is not None, "the agent is not running"
        return self._mirror
