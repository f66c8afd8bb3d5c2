"""Everything that talks to Kafka for the DatabaseAgent: topics, the consumer, dead letters.

Every client here comes from :mod:`pipeline.kafka_clients`, built from ``config.kafka``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import OffsetAndMetadata

from pipeline import kafka_clients
from pipeline.batching import OffsetMove
from pipeline.config import Config
from pipeline.db import DeadLetter
from pipeline.errors import ConfigError, PipelineError, TransientError
from pipeline.kafka_clients import KafkaSettings, kafka_settings
from pipeline.records import DLQ_TOPIC, STREAM_BY_NAME

log = logging.getLogger(__name__)

MIRROR_TIMEOUT_S = 10.0
# Kafka refuses a record over the topic's max.message.bytes (1 MiB by default) and the
# producer one over its max_request_size (1 MiB): a source record near the limit would not
# fit on the DLQ topic with the letter's own headers added, and a refused letter stalls its
# partition. So a dead letter on the topic is at most this, batch overhead included: its
# key, value and headers (all of them as one part) each go whole or not at all, smallest
# first while they fit; one left out is named by a dlq.<part>.omitted.bytes header holding its
# size. dead_letters keeps all of them, and the dlq.source.* headers say where the whole
# record still is.
DLQ_MAX_RECORD_BYTES = 900 * 1024
DLQ_MAX_REASON_BYTES = 4 * 1024  # dead_letters keeps the whole reason
DLQ_HEADERS = (
    "dlq.source.topic",
    "dlq.source.partition",
    "dlq.source.offset",
    "dlq.error.class",
    "dlq.reason",
)
Headers = list[tuple[str, bytes | None]]


def data_topics(config: Config) -> list[str]:
    return [config.topic(STREAM_BY_NAME[name].topic) for name in config.streams]


async def ensure_topics(
    kafka: KafkaSettings | str, topics: Iterable[str], partitions: int
) -> list[str]:
    """Create the topics that do not exist yet; return the ones created.

    ``kafka`` is ``config.kafka``; bootstrap servers alone (a string) still work. Several
    instances may start together: a topic another one created first is fine.
    """
    admin = kafka_clients.admin(kafka_settings(kafka), request_timeout_ms=30_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        created = []
        for topic in missing:
            try:
                await admin.create_topics([NewTopic(topic, partitions, replication_factor=1)])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()


async def partition_count(kafka: KafkaSettings | str, topic: str, *, within_s: float = 30.0) -> int:
    """How many partitions ``topic`` has (``kafka`` as in :func:`ensure_topics`). A topic just
    created may not be in the metadata yet: asked again until ``within_s`` has passed."""
    admin = kafka_clients.admin(kafka_settings(kafka), request_timeout_ms=30_000)
    await admin.start()
    try:
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            (described,) = await admin.describe_topics([topic])
            if described["error_code"] == 0 and described["partitions"]:
                return len(described["partitions"])
            if asyncio.get_running_loop().time() > deadline:
                raise PipelineError(
                    f"Kafka did not describe the topic {topic} within {within_s:g}s "
                    f"(error code {described['error_code']})"
                )
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def make_consumer(config: Config, listener: ConsumerRebalanceListener) -> AIOKafkaConsumer:
    """A group member with the safe settings: no auto-commit, positions from the database.
    Its client id is the instance id."""
    consumer = kafka_clients.consumer(
        config.kafka,
        group_id=config.group_id,
        enable_auto_commit=False,  # the database holds the offsets; Kafka gets a mirror
        auto_offset_reset="earliest",  # only used before a partition is positioned
        isolation_level="read_committed",
        fetch_max_bytes=config.fetch_max_bytes,
        max_partition_fetch_bytes=min(config.fetch_max_bytes, 8 * 1024 * 1024),
        max_poll_records=config.batch_max_records,
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=min(3_000, config.session_timeout_ms // 3),
        max_poll_interval_ms=300_000,
    )
    consumer.subscribe(data_topics(config), listener=listener)
    return consumer


async def start_dead_letter_producer(config: Config) -> AIOKafkaProducer:
    """The DLQ topic's producer (idempotent, acks=all), started; its client id is the
    instance id."""
    producer = kafka_clients.producer(
        config.kafka,
        acks="all",
        enable_idempotence=True,
        request_timeout_ms=30_000,
    )
    await producer.start()
    return producer


async def publish_dead_letters(
    producer: AIOKafkaProducer, topic: str, letters: list[DeadLetter], ack_timeout: float
) -> None:
    """Send every dead letter to the DLQ topic and wait for all acks, within ``ack_timeout`` s.

    The topic is at-least-once: a batch retried after a failure publishes its dead letters
    again. Its ``dlq.source.*`` headers identify a record; ``dead_letters`` holds each once.
    """
    if not letters:
        return
    try:
        async with asyncio.timeout(ack_timeout):
            futures = []
            for letter in letters:
                key, value, headers = dlq_record(letter)
                futures.append(await producer.send(topic, value, key=key, headers=headers))
            await asyncio.gather(*futures)
    except MessageSizeTooLargeError as exc:
        # Retrying cannot make it fit, and a refused batch leaves the idempotent producer's
        # sequence behind: stop, saying what to change.
        raise ConfigError(
            f"dead-letter topic {topic} refused a dead letter as too large ({exc}); a dead "
            f"letter is at most {DLQ_MAX_RECORD_BYTES} bytes: set the topic's "
            "max.message.bytes (and the brokers' message.max.bytes) to at least 1048588, "
            "Kafka's default"
        ) from exc
    except (KafkaError, TimeoutError) as exc:
        raise TransientError(
            f"dead-letter topic {topic} did not acknowledge: {exc!r}", source="kafka"
        ) from exc


def dlq_record(letter: DeadLetter) -> tuple[bytes | None, bytes | None, Headers]:
    """The key, value and headers a dead letter carries on the DLQ topic: the record's own,
    within :data:`DLQ_MAX_RECORD_BYTES`, then the ``dlq.*`` headers; pure."""
    reason = letter.reason.encode()
    if len(reason) > DLQ_MAX_REASON_BYTES:
        reason = reason[:DLQ_MAX_REASON_BYTES].decode(errors="ignore").encode()
    ours: Headers = list(
        zip(
            DLQ_HEADERS,
            (
                letter.topic.encode(),
                str(letter.partition).encode(),
                str(letter.offset).encode(),
                letter.error_class.encode(),
                reason,
            ),
            strict=True,
        )
    )
    # The parts the record has, and their sizes in bytes (a header's: its name and value).
    sizes = {
        name: size
        for name, size in (
            ("key", None if letter.key is None else len(letter.key)),
            ("value", None if letter.value is None else len(letter.value)),
            (
                "headers",
                sum(len(n.encode()) + len(v or b"") for n, v in letter.headers)
                if letter.headers
                else None,
            ),
        )
        if size is not None
    }
    carried: set[str] = set()
    for name in sorted(sizes, key=sizes.__getitem__):
        if _size(*_letter(letter, carried | {name}, sizes, ours)) <= DLQ_MAX_RECORD_BYTES:
            carried.add(name)
    return _letter(letter, carried, sizes, ours)


def _letter(
    letter: DeadLetter, carried: set[str], sizes: dict[str, int], ours: Headers
) -> tuple[bytes | None, bytes | None, Headers]:
    omitted: Headers = [
        (f"dlq.{name}.omitted.bytes", str(size).encode())
        for name, size in sizes.items()
        if name not in carried
    ]
    return (
        letter.key if "key" in carried else None,
        # An empty value, not None: None would be a tombstone on a compacted topic.
        letter.value if "value" in carried or letter.value is None else b"",
        [*omitted, *(letter.headers if "headers" in carried else ()), *ours],
    )


def _size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """A record's size on the wire in a batch of its own: what the producer checks against
    max_request_size, and at least what the broker checks against max.message.bytes."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    return size


def dead_letter_topic(config: Config) -> str:
    return config.topic(DLQ_TOPIC)


async def mirror_offsets(consumer: AIOKafkaConsumer, moves: Iterable[OffsetMove]) -> None:
    """Commit the database's offsets to Kafka too, for lag tools; best effort.

    A commit can fail mid-rebalance (CommitFailedError); the database's offsets are the truth
    and the next batch mirrors again, so a failure here is only logged.
    """
    offsets = {TopicPartition(m.topic, m.partition): OffsetAndMetadata(m.new, "") for m in moves}
    owned = consumer.assignment()
    offsets = {tp: o for tp, o in offsets.items() if tp in owned}
    if not offsets:
        return
    try:
        # Bounded: the commit waits for a coordinator for as long as the broker is away.
        await asyncio.wait_for(consumer.commit(offsets), MIRROR_TIMEOUT_S)
    except (KafkaError, TimeoutError) as exc:
        log.debug("mirroring offsets to Kafka failed (the database has them): %r", exc)


async def end_offsets(
    kafka: KafkaSettings | str, topics: Iterable[str]
) -> dict[tuple[str, int], int]:
    """The end offset of every partition of ``topics`` (``kafka`` as in :func:`ensure_topics`)."""
    settings = kafka_settings(kafka)
    admin = kafka_clients.admin(settings)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    partitions = [
        TopicPartition(topic["topic"], p["partition"])
        for topic in described
        for p in topic["partitions"]
    ]
    consumer = kafka_clients.consumer(settings)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await stop_consumer(consumer)
    return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, minus aiokafka's spurious CancelledError when a consumer without a
    group stops soon after it started (aio-libs/aiokafka#647, open)."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def beginning_offsets(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]
) -> dict[tuple[str, int], int]:
    found = await consumer.beginning_offsets(list(partitions))
    return {(tp.topic, tp.partition): offset for tp, offset in found.items()}
