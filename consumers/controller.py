"""The DatabaseAgent's side of the control plane: it reads the control topic, decides each
command once per group, steers its agent, and reports on the status topic.
docs/control-plane.md describes the protocol.

Every instance reads the control topic's one partition outside the consumer group, from the
group's position stored in PostgreSQL (``control_state.next_offset``), so a command sent
while an instance was down is seen when it starts. Each record is decided in a transaction
that locks the group's ``control_state`` row and runs inside the instance's ingest
transaction (:meth:`DatabaseAgent.in_ingest_transaction`):

* a record at or past ``next_offset`` is decided here: checked (:func:`pipeline.control.decide`),
  applied (the group's state, an assignment, a checkpoint, a data rollback) or rejected,
  recorded in ``control_log`` with its offset, and ``next_offset`` moves past it;
* a record below ``next_offset`` was decided by another instance: this one follows the
  decision recorded for that offset.

Then each instance makes its agent match the group's state (streams, batch limits; after a
data rollback, every partition is re-read from its stored offset) and acknowledges on the
status topic. So a group-scoped effect happens once, and every instance ends in the same
state whichever decided.
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
    Ignore,
    Reject,
    RollbackCheckpoint,
    Verifier,
    apply_failed,
    control_topics,
    decide,
    encode_status,
    metrics_scrape_address,
    next_state,
    verify,
)
from pipeline.db import Connection
from pipeline.errors import OwnershipError
from pipeline.records import STREAMS

log = logging.getLogger(__name__)

HEARTBEAT_S = 3.0
_SEND_TIMEOUT_S = 10.0


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
        self._stream_topics = {s.name: agent.config.topic(s.topic) for s in STREAMS}
        # Heartbeats say where `pipeline top` finds this instance's /metrics.
        self._metrics_address = metrics_scrape_address(
            agent.config.metrics_address, socket.gethostname()
        )
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def prepare(self) -> None:
        """Create the control and status topics, read the group's state, and put the agent
        in it before it ingests anything."""
        await kafka_io.ensure_topics(self.config.kafka, [self.control_topic, self.status_topic], 1)
        if self.verifier is None:
            log.warning(
                "no control public keys (PIPELINE_CONTROL_PUBLIC_KEYS): this instance refuses "
                "every control command it would have to decide; it follows the decisions of "
                "instances that have keys"
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
                for record in fetched.get(partition, []):
                    try:
                        await self._handle(record)
                    except Exception as exc:
                        if self.agent.stopping:
                            raise
                        await self._give_up(record.offset, exc)
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

    # -- one record ------------------------------------------------------------------------

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        offset, raw = record.offset, record.value
        if self.verifier is None and offset >= self.state.next_offset:
            # Not ours to decide without keys; another instance may, and we will follow.
            undecided = await self.agent.in_ingest_transaction(
                lambda conn: self._decided_by_others(conn, offset)
            )
            if undecided is None:
                reject = Reject("unknown_key", "this instance has no control public keys")
                await self._ack(_rejected(reject))
                self._count(reject.kind, "rejected")
                return
            outcome = undecided
        else:
            now = self.clock()
            outcome = await self.agent.in_ingest_transaction(
                lambda conn: self._decide(conn, offset, raw, now)
            )
        self.state = outcome.state
        await self._converge(outcome.state, activated=outcome.activated)
        if outcome.rolled_back:
            self.agent.reposition()
        decision = outcome.decision
        if decision is None:
            self._show_state()
            return
        if decision.outcome == "applied" and decision.seq is not None:
            self._seen_seq = max(self._seen_seq, decision.seq)
        self._count(decision.kind, decision.outcome)
        self._show_state()
        (log.info if decision.outcome == "applied" else log.warning)(
            "control command %s (seq %s, offset %d): %s%s",
            decision.kind,
            decision.seq,
            offset,
            decision.outcome,
            f" ({decision.reason})" if decision.reason else "",
        )
        await self._ack(decision)
        await self._send_heartbeat(stopping=False)  # the fleet's view follows at once

    async def _give_up(self, offset: int, error: Exception) -> None:
        """Applying the record at ``offset`` failed in a way no retry fixes (its work rolled
        back alone): the group records it as rejected and moves past it, so one poison
        command cannot stall control. If even that fails, the error ends the controller."""
        log.error("control record at offset %d could not be applied: %r", offset, error)
        decision = store.Decision(None, None, "unknown", "rejected", f"apply_failed: {error!r}")

        async def record(conn: Connection) -> None:
            state = await store.lock_state(conn, self.group)
            if offset < state.next_offset:
                return  # decided meanwhile
            moved = msgspec.structs.replace(state, next_offset=offset + 1)
            await store.save_state(conn, self.group, moved)
            await store.record_decision(
                conn,
                group=self.group,
                offset=offset,
                decision=decision,
                instance_id=self.agent.instance_id,
            )

        await self.agent.in_ingest_transaction(record)
        self._count("unknown", "rejected")
        await self._ack(decision)

    async def _decided_by_others(self, conn: Connection, offset: int) -> _Outcome | None:
        state = await store.load_state(conn, self.group)
        if offset >= state.next_offset:
            return None
        return await self._follow(conn, state, offset, None)

    async def _decide(
        self, conn: Connection, offset: int, raw: bytes | None, now: datetime
    ) -> _Outcome:
        """The group's decision on the record at ``offset``: made now, or followed."""
        state = await store.lock_state(conn, self.group)
        if offset < state.next_offset:
            return await self._follow(conn, state, offset, raw)
        assert self.verifier is not None
        verdict = decide(
            raw, keys=self.verifier, group=self.group, applied_seq=state.applied_seq, now=now
        )
        moved = msgspec.structs.replace(state, next_offset=offset + 1)
        if isinstance(verdict, Ignore):
            await store.save_state(conn, self.group, moved)
            return _Outcome(moved, None)
        outcome = _Outcome(moved, _rejected(verdict) if isinstance(verdict, Reject) else None)
        if isinstance(verdict, Apply):
            outcome = await self._apply(conn, moved, verdict.envelope)
        assert outcome.decision is not None
        await store.save_state(conn, self.group, outcome.state)
        envelope = verdict.envelope if isinstance(verdict, Apply) else None
        await store.record_decision(
            conn,
            group=self.group,
            offset=offset,
            decision=outcome.decision,
            instance_id=self.agent.instance_id,
            issuer=envelope.issuer if envelope else "",
            version=outcome.state.assignment_version if envelope else None,
            body=_body(envelope),
            issued_at=envelope.issued_at if envelope else None,
        )
        await store.record_ack(
            conn, group=self.group, instance_id=self.agent.instance_id, decision=outcome.decision
        )
        return outcome

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
            new, assign = next_state(state, command, history=history)
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
                done = await store.roll_back_data(conn, self.group, offsets, self._stream_topics)
            except OwnershipError as exc:  # a table is another group's now: nothing deleted
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
                    new, active_streams=tuple(s for s in new.active() if s not in held)
                )
            return _Outcome(new, applied, rolled_back=bool(done.topics))
        return _Outcome(new, applied, activated=activated)

    async def _follow(
        self, conn: Connection, state: GroupState, offset: int, raw: bytes | None
    ) -> _Outcome:
        """Another instance decided this record: take the group's state and its decision."""
        decision = await store.decision_at(conn, self.group, offset)
        if decision is None:
            return _Outcome(state, None)  # another group's command
        await store.record_ack(
            conn, group=self.group, instance_id=self.agent.instance_id, decision=decision
        )
        activated: tuple[str, ...] = ()
        if decision.outcome == "applied" and self.verifier is not None:
            envelope = verify(raw, keys=self.verifier)
            if isinstance(envelope, Envelope) and isinstance(envelope.command, Activate | Assign):
                activated = envelope.command.streams
        return _Outcome(
            state,
            decision,
            activated=activated,
            rolled_back=decision.outcome == "applied" and decision.kind == "rollback_checkpoint",
        )

    # -- the agent -------------------------------------------------------------------------

    async def _converge(self, state: GroupState, *, activated: tuple[str, ...]) -> None:
        """Make the agent ingest what the group was told: the active streams it consumes,
        and the batch limits (the configured ones where the assignment sets none). A stream
        stopped on an error stays stopped unless a command switched it on by name."""
        agent, config = self.agent, self.config
        consumed = set(config.streams)
        wanted = {s for s in state.active() if s in consumed}
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

    async def _ack(self, decision: store.Decision) -> None:
        ack = Ack(
            command_id=None if decision.command_id is None else uuid.UUID(decision.command_id),
            seq=decision.seq,
            kind=decision.kind,
            instance_id=self.agent.instance_id,
            group=self.group,
            outcome="applied" if decision.outcome == "applied" else "rejected",
            reason=decision.reason.split(":", 1)[0] if decision.outcome != "applied" else "",
            detail=decision.reason,
            at=self.clock(),
        )
        await self._publish(encode_status(ack))

    async def _heartbeat_until_cancelled(self) -> None:
        while True:
            await self._send_heartbeat(stopping=False)
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
        await self._publish(encode_status(heartbeat))

    async def _publish(self, value: bytes) -> None:
        """Best effort, bounded: a status topic that does not answer must not stop control."""
        if self._producer is None:
            return
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self.status_topic, value, key=self.agent.instance_id.encode()
                ),
                _SEND_TIMEOUT_S,
            )
        except Exception as exc:
            log.warning("status topic %s did not take a message: %r", self.status_topic, exc)

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
        f"{reject.reason}: {reject.detail}",
    )


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
