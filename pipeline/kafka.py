"""Everything that talks to Kafka for the DatabaseAgent: topics, the consumer, dead letters.

Every client here comes from :mod:`pipeline.kafka_clients`, built from ``config.kafka``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.structs import OffsetAndMetadata

from pipeline import kafka_clients
from pipeline.batching import OffsetMove
from pipeline.config import Config
from pipeline.db import DeadLetter
from pipeline.errors import PipelineError, TransientError
from pipeline.kafka_clients import KafkaSettings, kafka_settings
from pipeline.records import DLQ_TOPIC, STREAM_BY_NAME

log = logging.getLogger(__name__)

MIRROR_TIMEOUT_S = 10.0
# Kafka's default limit on a record is 1 MiB; a dead letter's value above this is replaced by
# an empty value on the DLQ topic (with its size in a header). dead_letters keeps it whole.
DLQ_MAX_VALUE_BYTES = 900 * 1024
DLQ_HEADERS = (
    "dlq.source.topic",
    "dlq.source.partition",
    "dlq.source.offset",
    "dlq.error.class",
    "dlq.reason",
)


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
            futures = [
                await producer.send(
                    topic,
                    value=_dlq_value(letter),
                    key=letter.key,
                    headers=[
                        *_dlq_size_header(letter),
                        *letter.headers,
                        *zip(
                            DLQ_HEADERS,
                            (
                                letter.topic.encode(),
                                str(letter.partition).encode(),
                                str(letter.offset).encode(),
                                letter.error_class.encode(),
                                letter.reason.encode(),
                            ),
                            strict=True,
                        ),
                    ],
                )
                for letter in letters
            ]
            await asyncio.gather(*futures)
    except (KafkaError, TimeoutError) as exc:
        raise TransientError(
            f"dead-letter topic {topic} did not acknowledge: {exc!r}", source="kafka"
        ) from exc


def _dlq_value(letter: DeadLetter) -> bytes | None:
    if letter.value is not None and len(letter.value) > DLQ_MAX_VALUE_BYTES:
        return b""
    return letter.value


def _dlq_size_header(letter: DeadLetter) -> list[tuple[str, bytes]]:
    if letter.value is not None and len(letter.value) > DLQ_MAX_VALUE_BYTES:
        return [("dlq.value.omitted.bytes", str(len(letter.value)).encode())]
    return []


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
