"""Antigravity, the orchestrator's side of the control plane: it signs commands, publishes
them on the control topic, and reads the fleet's heartbeats and acknowledgements from the
status topic. ``pipeline control`` is its command line; docs/control-plane.md the protocol.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.control import (
    Ack,
    Command,
    ControlError,
    Envelope,
    Heartbeat,
    Verifier,
    control_topics,
    decode_status,
    encode_envelope,
    highest_seq,
    next_seq,
    sign,
)
from pipeline.kafka_clients import KafkaSettings

LIVE_WINDOW_S = 15.0  # an instance whose last heartbeat is older than this is not live
_SEQ_SCAN = 1000  # how many of the control topic's last records are read for the seq


@dataclass
class Delivery:
    """A command sent, and what the fleet answered."""

    envelope: Envelope
    offset: int
    live: list[str]  # the instances expected to answer: live when it was sent
    acks: dict[str, Ack] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [i for i in self.live if i not in self.acks]

    @property
    def rejected(self) -> list[Ack]:
        return [a for a in self.acks.values() if a.outcome == "rejected"]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.rejected


class Antigravity:
    """Steers DatabaseAgent groups whose topics carry ``prefix``."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        prefix: str = "",
        private_key: Ed25519PrivateKey | None = None,
        issuer: str = "antigravity",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kafka = kafka
        self.control_topic, self.status_topic = control_topics(prefix)
        self.private_key = private_key
        self.issuer = issuer
        self.clock = clock

    async def ensure_topics(self) -> None:
        await kafka_io.ensure_topics(self.kafka, [self.control_topic, self.status_topic], 1)

    async def send(
        self, group: str, command: Command, *, wait_s: float, ttl: timedelta = timedelta(hours=1)
    ) -> Delivery:
        """Sign ``command`` with the next seq for ``group``, publish it, and wait up to
        ``wait_s`` for an ack from every instance of the group that is live now.

        1. Start reading the status topic at its end: no ack is missed.
        2. The live instances: those whose last heartbeat is recent and not "stopping".
        3. The seq: one above the highest of the control topic (envelopes this key signed for
           the group) and of every live instance's applied seq.
        4. Sign and publish (acknowledged by every in-sync replica).
        5. Collect acks for the command until each live instance answered or time is up.
        """
        if self.private_key is None:
            raise ControlError(
                "no private key: set PIPELINE_CONTROL_PRIVATE_KEY_FILE (make one with "
                "`pipeline control keygen DIR`)"
            )
        await self.ensure_topics()
        status = await self._status_consumer()
        try:
            fleet = await self.fleet(group)
            live = [h.instance_id for h in fleet if h.state != "stopping"]
            verifier = Verifier([self.private_key.public_key()])
            highest = max(
                [await self._highest_seq(group, verifier), *(h.applied_seq for h in fleet)]
            )
            now = self.clock()
            envelope = sign(
                command=command,
                command_id=uuid.uuid4(),
                seq=next_seq(highest),
                target=group,
                issuer=self.issuer,
                issued_at=now,
                expires_at=now + ttl,
                private_key=self.private_key,
            )
            producer = kafka_clients.producer(
                self.kafka, acks="all", enable_idempotence=True, request_timeout_ms=30_000
            )
            await producer.start()
            try:
                meta = await asyncio.wait_for(
                    producer.send_and_wait(
                        self.control_topic, encode_envelope(envelope), key=group.encode()
                    ),
                    60,
                )
            finally:
                await producer.stop()
            delivery = Delivery(envelope, meta.offset, live)
            await self._collect_acks(status, delivery, group, wait_s)
            return delivery
        finally:
            await kafka_io.stop_consumer(status)

    async def fleet(self, group: str, *, window_s: float = LIVE_WINDOW_S) -> list[Heartbeat]:
        """The newest heartbeat of every instance of ``group`` heard within ``window_s``."""
        since = self.clock() - timedelta(seconds=window_s)
        newest: dict[str, Heartbeat] = {}
        for message in await self._read_status_since(since):
            if isinstance(message, Heartbeat) and message.group == group and message.at >= since:
                newest[message.instance_id] = message
        return sorted(newest.values(), key=lambda h: h.instance_id)

    async def latest_seq(self, group: str) -> int:
        """The highest seq on the control topic for ``group`` (any key; for status views)."""
        seqs = [_peek_seq(raw, group) for raw in await self._control_tail()]
        return max([0, *(s for s in seqs if s is not None)])

    # -- internals ---------------------------------------------------------------------------

    async def _highest_seq(self, group: str, verifier: Verifier) -> int:
        return highest_seq(await self._control_tail(), keys=verifier, group=group)

    async def _control_tail(self) -> list[bytes | None]:
        tp = TopicPartition(self.control_topic, 0)
        consumer = kafka_clients.consumer(self.kafka, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            start = (await consumer.beginning_offsets([tp]))[tp]
            consumer.seek(tp, max(start, end - _SEQ_SCAN))
            return [r.value for r in await _read_to(consumer, tp, end)]
        finally:
            await kafka_io.stop_consumer(consumer)

    async def _status_consumer(self) -> AIOKafkaConsumer:
        tp = TopicPartition(self.status_topic, 0)
        consumer = kafka_clients.consumer(self.kafka, enable_auto_commit=False)
        await consumer.start()
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, end)
        return consumer

    async def _read_status_since(self, since: datetime) -> list[Heartbeat | Ack]:
        tp = TopicPartition(self.status_topic, 0)
        consumer = kafka_clients.consumer(self.kafka, enable_auto_commit=False)
        await consumer.start()
        try:
            if self.status_topic not in await consumer.topics():
                return []  # no agent has started yet: it creates the topic (else a 40 s wait)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000)})
            start = found[tp].offset if found.get(tp) is not None else end
            consumer.seek(tp, start)
            return _statuses(await _read_to(consumer, tp, end))
        finally:
            await kafka_io.stop_consumer(consumer)

    async def _collect_acks(
        self, status: AIOKafkaConsumer, delivery: Delivery, group: str, wait_s: float
    ) -> None:
        tp = TopicPartition(self.status_topic, 0)
        deadline = time.monotonic() + wait_s
        command_id = delivery.envelope.command_id
        while delivery.missing and (left := deadline - time.monotonic()) > 0:
            fetched = await status.getmany(tp, timeout_ms=int(min(left, 0.5) * 1000))
            for message in _statuses(fetched.get(tp, [])):
                if (
                    isinstance(message, Ack)
                    and message.command_id == command_id
                    and message.group == group
                ):
                    delivery.acks[message.instance_id] = message


async def _read_to(
    consumer: AIOKafkaConsumer, tp: TopicPartition, end: int
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``tp`` from the consumer's position up to ``end``."""
    records: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + 30
    while await consumer.position(tp) < end:
        if time.monotonic() > deadline:
            raise ControlError(f"{tp.topic} did not deliver its records up to offset {end}")
        fetched = await consumer.getmany(tp, timeout_ms=500)
        records.extend(fetched.get(tp, []))
    return records


def _statuses(records: list[ConsumerRecord[bytes, bytes]]) -> list[Heartbeat | Ack]:
    found: list[Heartbeat | Ack] = []
    for record in records:
        value = record.value
        if not value:
            continue
        try:
            found.append(decode_status(value))
        except ControlError:
            continue  # not ours to judge: an unreadable status message is skipped
    return found


class _Peek(msgspec.Struct):
    seq: int
    target: str


def _peek_seq(raw: bytes | None, group: str) -> int | None:
    """An envelope's seq for ``group``, without checking its signature (status views only)."""
    if not raw:
        return None
    try:
        peek = msgspec.msgpack.decode(raw, type=_Peek)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return peek.seq if peek.target == group else None
