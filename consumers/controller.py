"""The DatabaseAgent's side of the control plane: it reads the control topic, decides each
command once per group, steers its agent, and reports on the status topic.
docs/control-plane.md ("Deciding a record once per group") describes the protocol.

Each instance reads the control topic's one partition outside the consumer group, from the
group's position in PostgreSQL (``control_state.next_offset``); it decides a record at or past
that position inside its ingest transaction, and follows the decision another instance
recorded for one below it. Then it makes its agent match the group's state and acknowledges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from consumers.agent import DatabaseAgent
from pipeline import control_store as store
from pipeline import db, kafka_clients
from pipeline import kafka as kafka_io
from pipeline.batching import Limits
from pipeline.control import (
    KIND_UNKNOWN,
    UNAUTHENTICATED,
    Ack,
    Activate,
    Apply,
    Assign,
    Checkpoint,
    ControlError,
    Deactivate,
    Envelope,
    GroupState,
    Heartbeat,
    Reject,
    RejectionTally,
    RollbackCheckpoint,
    Verifier,
    apply_failed,
    check_control_partitions,
    control_topics,
    decide,
    encode_status,
    metrics_scrape_address,
    next_state,
    verify,
)
from pipeline.db import Connection
from pipeline.errors import OwnershipError
from pipeline.records import header_names_not_utf8

log = logging.getLogger(__name__)

HEARTBEAT_S = 3.0
# How often an instance without keys asks whether the record it waits at has been decided.
UNDECIDED_POLL_S = 1.0
_SEND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class _Run:
    """What a run of control records came to for this instance, once its transaction
    committed: the group's state, how many records it handled, and the decisions on those
    that were for this group (offset, decision)."""

    state: GroupState
    consumed: int
    decisions: list[tuple[int, store.Decision]]
    activated: tuple[str, ...] = ()  # streams a command switched on by name
    rolled_back: bool = False  # a data rollback moved stored offsets


@dataclass(frozen=True)
class _Outcome:
    """What one control record came to for this instance, once its transaction committed."""

    state: GroupState
    decision: store.Decision | None  # None: not for this group (nothing to ack)
    activated: tuple[str, ...] = ()  # streams a command switched on by name (clears failures)
    rolled_back: bool = False  # a data rollback moved stored offsets


class Controller:
    """Steers one :class:`DatabaseAgent` from the control topic. ``await prepare()`` before
    the agent runs (it starts in the group's state), then ``await run()`` beside it."""

    def __init__(
        self,
        agent: DatabaseAgent,
        verifier: Verifier | None,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.agent = agent
        self.config = agent.config
        self.group = agent.config.group_id
        self.verifier = verifier
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.control_topic, self.status_topic = control_topics(agent.config.topic_prefix)
        self.state = GroupState()
        self._seen_seq = 0  # the seq of the last command this instance applied or followed
        self.catalog = agent.config.catalog
        self._streams = self.catalog.names
        self._stream_topics = {s.name: agent.config.topic(s.topic) for s in self.catalog}
        # Heartbeats say where `pipeline top` finds this instance's /metrics.
        self._metrics_address = metrics_scrape_address(
            agent.config.metrics_address, socket.gethostname()
        )
        self.undecided_poll_s = UNDECIDED_POLL_S
        self._waiting_at = -1  # the offset an instance without keys last said it waits at
        self._rejections = RejectionTally()
        # A lasting error of an instance without keys, asking again every second: one line
        # per interval, as rejections.
        self._errors = RejectionTally(what="failed attempt(s) to follow a control record")
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def prepare(self) -> None:
        """Create the control and status topics, read the group's state, and put the agent
        in it before it ingests anything."""
        await kafka_io.ensure_control_topics(self.config.kafka, self.config.topic_prefix)
        partitions = await kafka_io.partition_count(self.config.kafka, self.control_topic)
        check_control_partitions(self.control_topic, partitions)
        if self.verifier is None:
            log.warning(
                "no control public keys (PIPELINE_CONTROL_PUBLIC_KEYS): this instance decides "
                "no control command; it waits for instances that have keys to decide each one, "
                "and follows their decisions"
            )
        conn = await db.connect(self.config.database_url, self.config.db_session)
        try:
            await db.check_schema(conn)
            self.state = await store.load_state(conn, self.group)
        finally:
            await conn.close()
        self._seen_seq = self.state.applied_seq
        await self._converge(self.state, activated=())
        self._show_state()

    async def run(self) -> None:
        """Read and apply commands and send heartbeats until cancelled."""
        self._producer = kafka_clients.producer(
            self.config.kafka, acks="all", request_timeout_ms=30_000
        )
        await self._producer.start()
        self._consumer = kafka_clients.consumer(
            self.config.kafka,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await self._consumer.start()
        partition = TopicPartition(self.control_topic, 0)
        self._consumer.assign([partition])
        self._consumer.seek(partition, self.state.next_offset)
        heartbeats = asyncio.create_task(self._heartbeat_until_cancelled())
        try:
            while True:
                fetched = await self._consumer.getmany(partition, timeout_ms=500)
                await self._handle_fetched(fetched.get(partition, []))
                self._log_rejections()
        finally:
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats
            await self._send_heartbeat(stopping=True)
            await self._close()

    async def _close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(kafka_io.stop_consumer(self._consumer), 10)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 10)

    # -- a run of records --------------------------------------------------------------------

    async def _handle_fetched(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Handle fetched control records in order, a run at a time (:meth:`_handle`).

        A run of several records that fails is handled again one record at a time, once
        (the rest of the fetch too): a record that fails alone is the one given up
        (:meth:`_give_up`), and the others are decided or followed as they would have been.
        So each record costs at most two attempts, whatever the error."""
        one_by_one = False
        while records:
            run = records[:1] if one_by_one else records
            try:
                done = await self._handle(run)
            except Exception as exc:
                if self.agent.stopping:
                    raise
                if self.verifier is None:
                    # Not ours to decide, even as a rejection: ask again shortly.
                    line = self._errors.add(
                        1, f"control record at offset {run[0].offset}: {exc!r}", time.monotonic()
                    )
                    if line is not None:
                        log.error("%s", line)
                    done = 0
                elif len(run) > 1:
                    one_by_one = True  # which record fails?
                    continue
                else:
                    await self._give_up(run[0], exc)
                    done = 1
            if not done:
                # No keys, and nobody has decided the first record yet: ask again
                # shortly, never moving past it (docs/control-plane.md).
                await asyncio.sleep(self.undecided_poll_s)
            records = records[done:]

    async def _handle(self, records: list[ConsumerRecord[bytes, bytes]]) -> int:
        """Decide or follow the first records of ``records`` in one transaction; how many
        were handled (0: an instance without keys waits for the first one's decision)."""
        run = await self.agent.in_ingest_transaction(lambda conn: self._decide(conn, records))
        self.state = run.state
        if not run.consumed:
            if self._waiting_at != records[0].offset:
                self._waiting_at = records[0].offset
                log.warning(
                    "control record at offset %d: waiting for an instance with control public "
                    "keys to decide it (this one has none); it is not skipped",
                    records[0].offset,
                )
            return 0
        await self._converge(run.state, activated=run.activated)
        if run.rolled_back:
            self.agent.reposition()
        applied = False
        for offset, decision in run.decisions:
            self._count(decision.kind, decision.outcome)
            if decision.outcome == "applied":
                applied = True
                if decision.seq is not None:
                    self._seen_seq = max(self._seen_seq, decision.seq)
                log.info(
                    "control command %s (seq %s, offset %d): applied",
                    decision.kind,
                    decision.seq,
                    offset,
                )
            else:
                self._rejections.add(
                    1, f"{decision.kind} at offset {offset}: {decision.reason}", time.monotonic()
                )
        self._log_rejections()
        self._show_state()
        await self._ack_all([d for _, d in run.decisions])
        if applied:
            await self._send_heartbeat(stopping=False)  # the fleet's view follows at once
        return run.consumed

    async def _give_up(self, record: ConsumerRecord[bytes, bytes], error: Exception) -> None:
        """Handling ``record`` alone failed in a way no retry fixes (its work rolled back
        alone): unless the group has decided it already, the group records it as rejected
        (``apply_failed``, naming its command if it is one signed for the group) and moves
        past it, so one poison record cannot stall control. A record decided already (by
        another instance, or by this one before what followed its decision failed) keeps its
        decision, and is neither counted nor acknowledged again. If even that fails, the
        error ends the controller."""
        offset = record.offset
        log.error("control record at offset %d could not be handled: %r", offset, error)
        assert self.verifier is not None  # an instance without keys gives nothing up
        envelope = verify(record.value, keys=self.verifier)
        if isinstance(envelope, Envelope) and envelope.target == self.group:
            decision = _rejected(apply_failed(envelope, repr(error)))
        else:
            decision = store.Decision(
                None, None, KIND_UNKNOWN, "rejected", "apply_failed", repr(error)
            )

        async def record_it(conn: Connection) -> GroupState | None:
            state = await store.lock_state(conn, self.group)
            if offset < state.next_offset:
                return None  # decided already
            moved = msgspec.structs.replace(state, next_offset=offset + 1)
            await store.save_state(conn, self.group, moved)
            await store.record_decision(
                conn,
                group=self.group,
                offset=offset,
                decision=decision,
                instance_id=self.agent.instance_id,
            )
            await store.record_acks(
                conn,
                group=self.group,
                instance_id=self.agent.instance_id,
                decisions=[d for d in [decision] if _acknowledged(d)],
            )
            return moved

        moved = await self.agent.in_ingest_transaction(record_it)
        if moved is None:
            return
        self.state = moved
        self._count(decision.kind, decision.outcome)
        await self._ack_all([decision])

    async def _decide(self, conn: Connection, records: list[ConsumerRecord[bytes, bytes]]) -> _Run:
        """The group's decisions on the first records of ``records``, made here or followed.

        A run of records that are not applied here (rejected, for another group, or decided
        by another instance) is handled in this one transaction: their decisions are written
        together and ``next_offset`` moves once. A command to apply is applied alone, in its
        own transaction, so the run stops before it (or after it, when it is the first).
        An instance without keys decides nothing: the run stops at the first record nobody
        has decided yet."""
        state = await store.lock_state(conn, self.group)
        # Read under the lock, on every attempt: a command that expired while this
        # transaction waited (for the lock, or for a database that did not answer) is expired.
        now = self.clock()
        below = [r.offset for r in records if r.offset < state.next_offset]
        followed = (
            await store.decisions_from(conn, self.group, below[0], below[-1]) if below else {}
        )
        decisions: list[tuple[int, store.Decision]] = []
        rejected: list[tuple[int, store.Decision]] = []
        activated: list[str] = []
        rolled_back = False
        consumed = 0
        moved = state
        for record in records:
            offset, raw = record.offset, record.value
            if offset < state.next_offset:
                consumed += 1
                decision = followed.get(offset)
                if decision is None:
                    continue  # another group's command
                decisions.append((offset, decision))
                if decision.outcome == "applied":
                    activated += self._activated_by(raw)
                    rolled_back = rolled_back or decision.kind == "rollback_checkpoint"
                continue
            if self.verifier is None:
                break  # not ours to decide: an instance with keys will, and this one follows
            bad_names = header_names_not_utf8(record.headers)  # Kafka's protocol: UTF-8
            verdict = (
                Reject("undecodable", f"header name {bad_names[0]!r} is not UTF-8")
                if bad_names
                else decide(
                    raw,
                    keys=self.verifier,
                    group=self.group,
                    applied_seq=state.applied_seq,
                    now=now,
                )
            )
            if isinstance(verdict, Apply):
                if consumed:
                    break  # applied in a transaction of its own, next
                outcome = await self._apply(
                    conn, msgspec.structs.replace(state, next_offset=offset + 1), verdict.envelope
                )
                assert outcome.decision is not None
                await store.save_state(conn, self.group, outcome.state)
                await store.record_decision(
                    conn,
                    group=self.group,
                    offset=offset,
                    decision=outcome.decision,
                    instance_id=self.agent.instance_id,
                    issuer=verdict.envelope.issuer,
                    version=outcome.state.assignment_version,
                    body=_body(verdict.envelope),
                    issued_at=verdict.envelope.issued_at,
                )
                await store.record_acks(
                    conn,
                    group=self.group,
                    instance_id=self.agent.instance_id,
                    decisions=[d for d in [outcome.decision] if _acknowledged(d)],
                )
                return _Run(
                    outcome.state,
                    1,
                    [(offset, outcome.decision)],
                    outcome.activated,
                    outcome.rolled_back,
                )
            consumed += 1
            moved = msgspec.structs.replace(moved, next_offset=offset + 1)
            if isinstance(verdict, Reject):
                decision = _rejected(verdict)
                rejected.append((offset, decision))
                decisions.append((offset, decision))
        if moved is not state:
            await store.save_state(conn, self.group, moved)
        await store.record_rejections(
            conn, group=self.group, instance_id=self.agent.instance_id, rejected=rejected
        )
        # The instance's own row for what could be shown to be a command; garbage has its
        # decision row alone.
        await store.record_acks(
            conn,
            group=self.group,
            instance_id=self.agent.instance_id,
            decisions=[d for _, d in decisions if _acknowledged(d)],
        )
        return _Run(moved, consumed, decisions, tuple(dict.fromkeys(activated)), rolled_back)

    def _activated_by(self, raw: bytes | None) -> tuple[str, ...]:
        """The streams an applied command (decided by another instance) switched on by name."""
        if self.verifier is None:
            return ()
        envelope = verify(raw, keys=self.verifier)
        if isinstance(envelope, Envelope) and isinstance(envelope.command, Activate | Assign):
            return envelope.command.streams
        return ()

    async def _apply(self, conn: Connection, state: GroupState, envelope: Envelope) -> _Outcome:
        """Apply a verified command to the group, in the caller's transaction; a command that
        cannot be applied to this state is rejected (``apply_failed``) and changes nothing."""
        command = envelope.command
        applied = _applied(envelope)
        try:
            history = {}
            to_version = getattr(command, "to_version", None)
            if to_version is not None:
                found = await store.assignment(conn, self.group, to_version)
                if found is not None:
                    history[to_version] = found
            new, assign = next_state(state, command, history=history, catalog=self._streams)
        except ControlError as exc:
            return _Outcome(state, _rejected(apply_failed(envelope, str(exc))))
        new = msgspec.structs.replace(new, applied_seq=envelope.seq)
        if assign is not None:
            await store.record_assignment(conn, self.group, assign, str(envelope.command_id))
        activated = assign.streams if assign else getattr(command, "streams", ())
        if isinstance(command, Deactivate):
            activated = ()
        if isinstance(command, Checkpoint):
            taken = await store.take_checkpoint(
                conn, self.group, command.name, str(envelope.command_id)
            )
            if not taken:
                detail = f"a checkpoint named {command.name!r} exists already"
                return _Outcome(state, _rejected(apply_failed(envelope, detail)))
        if isinstance(command, RollbackCheckpoint):
            offsets = await store.checkpoint_offsets(conn, self.group, command.to_checkpoint)
            if offsets is None:
                detail = f"no checkpoint named {command.to_checkpoint!r}"
                return _Outcome(state, _rejected(apply_failed(envelope, detail)))
            started = time.monotonic()
            try:
                done = await store.roll_back_data(
                    conn, self.group, offsets, self._stream_topics, self.catalog
                )
            # A table is another group's now, or a stream cannot be restored: nothing changed.
            except (OwnershipError, store.RollbackRefused) as exc:
                return _Outcome(state, _rejected(apply_failed(envelope, str(exc))))
            log.warning(
                "rolled the data back to checkpoint %s in %.2fs (to commit with the batch): "
                "deleted %s and %d dead letters; topics moved back: %s",
                command.to_checkpoint,
                time.monotonic() - started,
                done.rows,
                done.dead_letters,
                ", ".join(done.topics) or "none",
            )
            if command.then == "hold":
                held = {s for s, t in self._stream_topics.items() if t in done.topics}
                new = msgspec.structs.replace(
                    new,
                    active_streams=tuple(s for s in new.active(self._streams) if s not in held),
                )
            return _Outcome(new, applied, rolled_back=bool(done.topics))
        return _Outcome(new, applied, activated=activated)

    # -- the agent -------------------------------------------------------------------------

    async def _converge(self, state: GroupState, *, activated: tuple[str, ...]) -> None:
        """Make the agent ingest what the group was told: the active streams it consumes,
        and the batch limits (the configured ones where the assignment sets none). A stream
        stopped on an error stays stopped unless a command switched it on by name."""
        agent, config = self.agent, self.config
        consumed = set(config.streams)
        wanted = {s for s in state.active(self._streams) if s in consumed}
        current = set(agent.ownership.active_streams())
        failed = {s for s in consumed if agent.ownership.failure(s) is not None}
        switch_on = (wanted - current - failed) | (wanted & set(activated))
        switch_off = (current | failed) & (consumed - wanted)
        if switch_off:
            await agent.deactivate(sorted(switch_off))
        if switch_on:
            await agent.activate(sorted(switch_on))
        limits = state.limits
        agent.set_limits(
            Limits(
                limits.batch_max_records or config.batch_max_records,
                limits.batch_max_bytes or config.batch_max_bytes,
                (limits.batch_max_wait_ms or config.batch_max_wait_ms) / 1000,
            )
        )

    # -- the status topic ------------------------------------------------------------------

    async def _ack_all(self, decisions: list[store.Decision]) -> None:
        """Acknowledge those of ``decisions`` that are acknowledged (:func:`_acknowledged`) on
        the status topic, sent together (one wait, not one per ack)."""
        await self._publish_all(
            [encode_status(self._to_ack(d)) for d in decisions if _acknowledged(d)]
        )

    def _to_ack(self, decision: store.Decision) -> Ack:
        return Ack(
            command_id=None if decision.command_id is None else uuid.UUID(decision.command_id),
            seq=decision.seq,
            kind=decision.kind,
            instance_id=self.agent.instance_id,
            group=self.group,
            outcome="applied" if decision.outcome == "applied" else "rejected",
            reason=decision.code,
            detail=decision.reason,
            at=self.clock(),
        )

    def _log_rejections(self) -> None:
        now = time.monotonic()
        line = self._rejections.due(now)
        if line is not None:
            log.warning("%s", line)
        line = self._errors.due(now)
        if line is not None:
            log.error("%s", line)

    async def _heartbeat_until_cancelled(self) -> None:
        while True:
            await self._send_heartbeat(stopping=False)
            self._log_rejections()  # the count of a flood that has stopped
            await asyncio.sleep(self.heartbeat_s)

    async def _send_heartbeat(self, *, stopping: bool) -> None:
        snapshot = self.agent.snapshot()
        heartbeat = Heartbeat(
            instance_id=self.agent.instance_id,
            group=self.group,
            state="stopping" if stopping else snapshot.state,
            applied_seq=self._seen_seq,
            assignment_version=self.state.assignment_version,
            active_streams=snapshot.active_streams,
            owned_partitions=snapshot.owned_partitions,
            lag=snapshot.lag,
            last_error=snapshot.last_error,
            metrics_address=self._metrics_address,
            at=self.clock(),
        )
        await self._publish_all([encode_status(heartbeat)])

    async def _publish_all(self, values: list[bytes]) -> None:
        """Publish ``values`` on the status topic, keyed by this instance: sent at once, their
        delivery awaited together. Best effort, bounded: a status topic that does not answer
        must not stop control."""
        if self._producer is None or not values:
            return
        producer, key = self._producer, self.agent.instance_id.encode()

        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result of a send
        # that completes as its caller is cancelled, and the cancel is lost: the heartbeat
        # loop and the control loop would go on for ever, and the instance never exit.
        try:
            async with asyncio.timeout(_SEND_TIMEOUT_S):
                sent = [await producer.send(self.status_topic, v, key=key) for v in values]
                await asyncio.gather(*sent)
        except Exception as exc:
            log.warning(
                "status topic %s did not take %d message(s): %r",
                self.status_topic,
                len(values),
                exc,
            )

    # -- metrics -----------------------------------------------------------------------------

    def _count(self, kind: str, outcome: str) -> None:
        self.agent.metrics.control_commands.labels(kind, outcome).inc()

    def _show_state(self) -> None:
        m = self.agent.metrics
        m.control_applied_seq.set(self._seen_seq)
        m.assignment_version.set(self.state.assignment_version)


def _applied(envelope: Envelope) -> store.Decision:
    return store.Decision(str(envelope.command_id), envelope.seq, envelope.kind, "applied", "")


def _rejected(reject: Reject) -> store.Decision:
    return store.Decision(
        None if reject.command_id is None else str(reject.command_id),
        reject.seq,
        reject.kind,
        "rejected",
        reject.reason,
        reject.detail,
    )


def _acknowledged(decision: store.Decision) -> bool:
    """Whether an instance acknowledges ``decision`` (on the status topic, and in
    ``control_log`` as a ``status`` row): only a record shown to be signed by a trusted key,
    which names its command. What anyone who may write the control topic can produce
    (:data:`~pipeline.control.UNAUTHENTICATED`: undecodable, of an unknown kind, an unknown
    key or a bad signature) names a command id of its writer's choosing, or none: an ack for
    it would answer nobody, or a forger."""
    return decision.command_id is not None and decision.code not in UNAUTHENTICATED


def _body(envelope: Envelope | None) -> bytes:
    return b"{}" if envelope is None else msgspec.json.encode(envelope.command)


async def run_controlled(agent: DatabaseAgent, controller: Controller) -> None:
    """Run ``agent`` steered by ``controller`` until the agent stops. The controller starts
    first, so the agent ingests in the group's state from its first batch; if the
    controller fails, the agent is stopped and the failure raised."""
    await controller.prepare()
    control = asyncio.create_task(controller.run())

    def stop_agent_if_failed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the control loop failed: %r; stopping the agent", task.exception())
            agent.stop()

    control.add_done_callback(stop_agent_if_failed)
    try:
        await agent.run()
    finally:
        control.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await control
