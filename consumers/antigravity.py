"""Antigravity's side of the control plane: it signs commands, publishes them on the control
topic, and reads the fleet's heartbeats and acknowledgements from the status topic.
``pipeline control`` is its command line; docs/control-plane.md the protocol.

What it decides on, it can verify: the next seq comes from the signed envelopes on the
control topic (and the group's applied seq in PostgreSQL, which the caller reads). The status
topic is unsigned, and anyone who may write it can forge a heartbeat or an ack: what it says
is reported by the instances, shown as such, and never feeds the seq (docs/security.md).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.control import (
    Ack,
    Command,
    ControlError,
    Envelope,
    Heartbeat,
    Verifier,
    check_control_partitions,
    control_topics,
    decode_status,
    encode_envelope,
    highest_seq,
    next_seq,
    sign,
)
from pipeline.kafka_clients import KafkaSettings

LIVE_WINDOW_S = 15.0  # an instance whose last heartbeat is older than this is not live
# Reading a topic to its end fails when no record came for this long (not after a fixed
# total: a long control log takes as long as it takes).
_STALLED_S = 30.0


@dataclass
class Delivery:
    """A command sent, and what the fleet answered."""

    envelope: Envelope
    offset: int
    live: list[str]  # the instances expected to answer: live by their heartbeats (a hint)
    acks: dict[str, Ack] = field(default_factory=dict)  # as reported: the first per instance

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
        public_keys: Iterable[Ed25519PublicKey] = (),
        issuer: str = "antigravity",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kafka = kafka
        self.prefix = prefix
        self.control_topic, self.status_topic = control_topics(prefix)
        self.private_key = private_key
        # The keys whose envelopes count for the seq and the status views: the agents' public
        # keys (PIPELINE_CONTROL_PUBLIC_KEYS, every key of a rotation) and this key's own.
        own = [] if private_key is None else [private_key.public_key()]
        self.verifier = Verifier([*public_keys, *own])
        self.issuer = issuer
        self.clock = clock

    async def ensure_topics(self) -> None:
        """Create the control and status topics if missing; :class:`ControlError` when the
        control topic has more than one partition (a command on another would be lost)."""
        await kafka_io.ensure_control_topics(self.kafka, self.prefix)
        partitions = await kafka_io.partition_count(self.kafka, self.control_topic)
        check_control_partitions(self.control_topic, partitions)

    async def send(
        self,
        group: str,
        command: Command,
        *,
        wait_s: float,
        ttl: timedelta = timedelta(hours=1),
        applied_seq: int = 0,
    ) -> Delivery:
        """Sign ``command`` with the next seq for ``group``, publish it, and wait up to
        ``wait_s`` for an ack from every instance of the group that is live now.

        1. Start reading the status topic at its end: no ack is missed.
        2. The live instances: those whose last heartbeat is recent and not "stopping" (as
           the heartbeats say: who is waited for, never what is signed).
        3. The seq: one above the highest of the whole control topic (envelopes signed for
           the group by a key of :attr:`verifier`) and of ``applied_seq`` (the group's, from
           PostgreSQL, when the caller can read it: it outlives the topic's retention).
        4. Sign (``ttl`` at most :data:`~pipeline.control.MAX_COMMAND_LIFETIME`) and publish
           (acknowledged by every in-sync replica).
        5. Collect acks for the command until each live instance answered or time is up;
           an instance's first ack counts.
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
            highest = max(await self.highest_seq(group), applied_seq)
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

    async def highest_seq(self, group: str) -> int:
        """The highest seq on the whole control topic signed for ``group`` by a key of
        :attr:`verifier` (0: none). Every record is read: a flood of garbage cannot push a
        signed command out of view."""
        tp = TopicPartition(self.control_topic, 0)
        consumer = kafka_clients.consumer(self.kafka, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
            highest = 0
            async for records in _read_to(consumer, tp, end):
                highest = max(
                    highest,
                    highest_seq((r.value for r in records), keys=self.verifier, group=group),
                )
            return highest
        finally:
            await kafka_io.stop_consumer(consumer)

    # -- internals ---------------------------------------------------------------------------

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
            return [m async for records in _read_to(consumer, tp, end) for m in _statuses(records)]
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
                    # The first: a later "rejected" ack for this id answers a replayed copy
                    # (a forged one is not acknowledged).
                    delivery.acks.setdefault(message.instance_id, message)


async def _read_to(
    consumer: AIOKafkaConsumer, tp: TopicPartition, end: int
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """The records of ``tp`` from the consumer's position up to ``end``, as fetched."""
    stalled_at = time.monotonic() + _STALLED_S
    while await consumer.position(tp) < end:
        if time.monotonic() > stalled_at:
            raise ControlError(f"{tp.topic} did not deliver its records up to offset {end}")
        fetched = (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
        if fetched:
            stalled_at = time.monotonic() + _STALLED_S
            yield fetched


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
