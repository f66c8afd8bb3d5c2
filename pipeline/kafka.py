"""Everything that talks to Kafka for the DatabaseAgent: topics, the consumer, dead letters.

Every client here comes from :mod:`pipeline.kafka_clients`, built from ``config.kafka``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Int8, Int16, Int32, Schema, String
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import OffsetAndMetadata

from pipeline import kafka_clients
from pipeline.batching import OffsetMove
from pipeline.config import Config
from pipeline.control import STATUS_TOPIC_CONFIG, control_topics
from pipeline.db import DeadLetter
from pipeline.errors import ConfigError, PipelineError, TransientError
from pipeline.kafka_clients import KafkaSettings, kafka_settings
from pipeline.records import DLQ_TOPIC

log = logging.getLogger(__name__)

MIRROR_TIMEOUT_S = 10.0
# A dead letter on the DLQ topic must fit the topic's max.message.bytes (Kafka's default is
# 1 MiB + 12; an operator may set less, on the topic or as the brokers' message.max.bytes) and
# the producer's max_request_size (aiokafka's default: 1 MiB). The agent reads the topic's
# limit at start-up (read_max_message_bytes) and sizes every letter to the smaller of the two
# (dead_letter_limit): the record's key, value and headers (all of them as one part) each go
# whole or not at all, smallest first while they fit; one left out is named by a
# dlq.<part>.omitted.bytes header holding its size. dead_letters keeps all of them, and the
# dlq.source.* headers say where the whole record still is.
PRODUCER_MAX_REQUEST_SIZE = 1024 * 1024  # aiokafka's default, set explicitly
PRODUCER_MAX_BATCH_SIZE = 16 * 1024  # aiokafka's default; lowered to a smaller limit
DLQ_MAX_REASON_BYTES = 4 * 1024  # dead_letters keeps the whole reason
# The room a letter with every part omitted keeps for its error class and reason together: a
# limit that leaves less is refused at start-up.
DLQ_MIN_REASON_BYTES = 256
DLQ_HEADERS = (
    "dlq.source.topic",
    "dlq.source.partition",
    "dlq.source.offset",
    "dlq.error.class",
    "dlq.reason",
)
Headers = list[tuple[str, bytes | None]]


def data_topics(config: Config) -> list[str]:
    """The deployed topics of the streams ``config`` ingests (``PIPELINE_STREAMS``, by
    default every stream of its catalog)."""
    catalog = config.catalog
    return [config.topic(catalog[name].topic) for name in config.streams]


async def ensure_topics(
    kafka: KafkaSettings | str,
    topics: Iterable[str],
    partitions: int,
    *,
    configs: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet, with ``configs`` (Kafka's topic settings);
    return the ones created.

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
            new = NewTopic(topic, partitions, replication_factor=1, topic_configs=configs or {})
            try:
                await admin.create_topics([new])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()


async def ensure_control_topics(kafka: KafkaSettings | str, prefix: str) -> list[str]:
    """Create the control and status topics under ``prefix`` that do not exist yet, one
    partition each (commands are totally ordered; status readers read one log), the status
    topic with :data:`~pipeline.control.STATUS_TOPIC_CONFIG`; return the ones created."""
    control, status = control_topics(prefix)
    created = await ensure_topics(kafka, [control], 1)
    return created + await ensure_topics(kafka, [status], 1, configs=STATUS_TOPIC_CONFIG)


async def create_topics(config: Config) -> list[str]:
    """`pipeline topics create`: every topic of ``config`` (data, dead letters, control,
    status) that does not exist yet, and an existing status topic's settings brought to
    :data:`~pipeline.control.STATUS_TOPIC_CONFIG`. One line per topic, and per setting
    changed, says what was done."""
    topics = [*data_topics(config), dead_letter_topic(config)]
    control, status = control_topics(config.topic_prefix)
    created = await ensure_topics(config.kafka, topics, config.topic_partitions)
    created += await ensure_control_topics(config.kafka, config.topic_prefix)
    lines = [f"{t}: {'created' if t in created else 'exists'}" for t in [*topics, control, status]]
    if status not in created:
        changed = await configure_topic(config.kafka, status, STATUS_TOPIC_CONFIG)
        lines += [
            f"{status}: {name} set to {STATUS_TOPIC_CONFIG[name]} (was {was})"
            for name, was in changed.items()
        ]
    return lines


async def topic_config(
    kafka: KafkaSettings | str, topic: str, names: Iterable[str]
) -> dict[str, str]:
    """The values Kafka applies to ``topic`` of the settings ``names`` (the topic's own or the
    brokers' defaults). Needs DESCRIBE_CONFIGS on the topic."""
    admin = kafka_clients.admin(kafka_settings(kafka), request_timeout_ms=30_000)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(names))]
        )
    finally:
        await admin.close()
    found: dict[str, str] = {}
    for error_code, error_message, _, name, entries in response.resources:
        if name != topic:
            continue
        if error_code:
            raise PipelineError(
                f"Kafka did not describe the configs of topic {topic}: "
                f"{for_code(error_code).__name__} {error_message or ''}".rstrip()
                + _CONFIGS_ACL
            )
        found.update((entry[0], entry[1]) for entry in entries)
    return found


async def configure_topic(
    kafka: KafkaSettings | str, topic: str, wanted: Mapping[str, str]
) -> dict[str, str]:
    """Set the settings of ``wanted`` that ``topic`` does not have yet, leaving its other
    settings as they are (Kafka's IncrementalAlterConfigs); return the ones changed, each with
    its former value. Needs DESCRIBE_CONFIGS and ALTER_CONFIGS on the topic."""
    current = await topic_config(kafka, topic, wanted)
    changed = {
        name: current.get(name, "") for name, value in wanted.items() if current.get(name) != value
    }
    if not changed:
        return {}
    client = kafka_clients.bootstrap_client(kafka_settings(kafka), request_timeout_ms=30_000)
    try:
        await client.bootstrap()
        request = _IncrementalAlterConfigs(topic, {name: wanted[name] for name in changed})
        response = await client.send(client.get_random_node(), request)
    finally:
        await client.close()
    for error_code, error_message, _, name in response.responses:
        if name == topic and error_code:
            raise PipelineError(
                f"Kafka did not alter the configs of topic {topic}: "
                f"{for_code(error_code).__name__} {error_message or ''}".rstrip()
                + _CONFIGS_ACL
            )
    return changed


_CONFIGS_ACL = " (the principal needs DESCRIBE_CONFIGS and ALTER_CONFIGS on it)"


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


async def read_max_message_bytes(kafka: KafkaSettings | str, topic: str) -> int:
    """The ``max.message.bytes`` Kafka applies to ``topic``: the topic's own, or the brokers'
    ``message.max.bytes`` when the topic sets none (``kafka`` as in :func:`ensure_topics`).
    Needs DESCRIBE_CONFIGS on the topic."""
    admin = kafka_clients.admin(kafka_settings(kafka), request_timeout_ms=30_000)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})]
        )
    finally:
        await admin.close()
    for error_code, error_message, _, name, entries in response.resources:
        if name != topic:
            continue
        if error_code == TopicAuthorizationFailedError.errno:
            raise ConfigError(
                f"Kafka refused to describe the configs of dead-letter topic {topic}: its "
                "max.message.bytes sizes dead letters; allow the agents' principal "
                "DESCRIBE_CONFIGS on it"
            )
        if error_code:
            raise PipelineError(
                f"Kafka did not describe the configs of topic {topic}: "
                f"{for_code(error_code).__name__} {error_message or ''}".rstrip()
            )
        for entry in entries:
            if entry[0] == "max.message.bytes":
                return int(entry[1])
    raise PipelineError(f"Kafka did not report max.message.bytes of topic {topic}")


def dead_letter_limit(
    topic: str, max_message_bytes: int, max_request_size: int, source_topics: Iterable[str]
) -> int:
    """The most bytes a dead letter on ``topic`` may take, batch framing included (what
    :func:`dlq_record` sizes against): the smaller of the topic's ``max.message.bytes`` and the
    producer's ``max_request_size``. Pure.

    :class:`ConfigError` naming the topic and ``max.message.bytes`` when even a letter from the
    longest of ``source_topics`` with its key, value and headers all omitted, the largest
    coordinates, and :data:`DLQ_MIN_REASON_BYTES` for its class and reason would not fit.
    """
    limit = min(max_message_bytes, max_request_size)
    longest = max(source_topics, key=len, default="")
    most = 2**31 - 1  # Kafka's largest partition number and record part
    floor = _size(
        *_letter(
            DeadLetter(longest, most, 2**63 - 1, b"", b"", [], None, "", ""),
            set(),  # every part omitted, each named with the largest size
            {name: most for name in ("key", "value", "headers")},
            _ours(longest, most, 2**63 - 1, "", b"x" * DLQ_MIN_REASON_BYTES),
        )
    )
    if limit < floor:
        raise ConfigError(
            f"dead-letter topic {topic}: its max.message.bytes is {max_message_bytes}, below "
            f"{floor} bytes, the size of a dead letter carrying only its coordinates and "
            f"reason: set the topic's max.message.bytes to at least {floor} (Kafka's default "
            "is 1048588)"
        )
    return limit


async def start_dead_letter_producer(config: Config, limit: int) -> AIOKafkaProducer:
    """The DLQ topic's producer (idempotent, acks=all), started; its client id is the
    instance id. ``limit`` is :func:`dead_letter_limit`'s: a batch of several letters stays
    within it too."""
    producer = kafka_clients.producer(
        config.kafka,
        acks="all",
        enable_idempotence=True,
        request_timeout_ms=30_000,
        max_request_size=PRODUCER_MAX_REQUEST_SIZE,
        max_batch_size=min(PRODUCER_MAX_BATCH_SIZE, limit),
    )
    await producer.start()
    return producer


async def publish_dead_letters(
    producer: AIOKafkaProducer,
    topic: str,
    letters: list[DeadLetter],
    ack_timeout: float,
    limit: int,
) -> None:
    """Send every dead letter to the DLQ topic, each within ``limit`` bytes
    (:func:`dead_letter_limit`), and wait for all acks, within ``ack_timeout`` s.

    The topic is at-least-once: a batch retried after a failure publishes its dead letters
    again. Its ``dlq.source.*`` headers identify a record; ``dead_letters`` holds each once.
    """
    if not letters:
        return
    try:
        async with asyncio.timeout(ack_timeout):
            futures = []
            for letter in letters:
                key, value, headers = dlq_record(letter, limit)
                futures.append(await producer.send(topic, value, key=key, headers=headers))
            await asyncio.gather(*futures)
    except MessageSizeTooLargeError as exc:
        # Letters are sized to the limit read at start-up: only a limit lowered since, or a
        # broker enforcing less than the cluster reported, refuses one. The agent recovers
        # (consumers/dlq.py, before_attempt) instead of stalling or stopping on this record.
        raise DeadLetterRefused(
            f"dead-letter topic {topic} refused a dead letter of at most {limit} bytes as "
            f"too large ({exc})"
        ) from exc
    except (KafkaError, TimeoutError) as exc:
        raise TransientError(
            f"dead-letter topic {topic} did not acknowledge: {exc!r}", source="kafka"
        ) from exc


class DeadLetterRefused(TransientError):
    """The DLQ topic refused a dead letter as too large (``MessageSizeTooLargeError``).

    Retrying the same letter cannot help, and a batch the broker refused leaves the idempotent
    producer's sequence behind (its next batch to that partition would be refused as out of
    order): the agent reads the topic's limit again, starts a new producer, and retries the
    batch with letters sized to a lowered limit, or, the limit unchanged, bare
    (:data:`BARE`); a bare letter refused too stops it, naming ``max.message.bytes``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, source="kafka")


#: The limit that makes :func:`dlq_record` omit every part and the reason: the smallest letter.
BARE = 0


def dlq_record(letter: DeadLetter, limit: int) -> tuple[bytes | None, bytes | None, Headers]:
    """The key, value and headers a dead letter carries on the DLQ topic: the record's own,
    then the ``dlq.*`` headers, within ``limit`` bytes (:func:`dead_letter_limit`); pure.

    The coordinates and class always go; the reason, cut at :data:`DLQ_MAX_REASON_BYTES`, is
    cut further only when a letter with every part omitted would not fit otherwise."""
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
    reason = _cut(letter.reason.encode(), DLQ_MAX_REASON_BYTES)
    while True:
        ours = _ours(letter.topic, letter.partition, letter.offset, letter.error_class, reason)
        over = _size(*_letter(letter, set(), sizes, ours)) - limit
        if over <= 0 or not reason:
            break
        reason = _cut(reason, len(reason) - over)
    carried: set[str] = set()
    for name in sorted(sizes, key=sizes.__getitem__):
        if _size(*_letter(letter, carried | {name}, sizes, ours)) <= limit:
            carried.add(name)
    return _letter(letter, carried, sizes, ours)


def _cut(text: bytes, size: int) -> bytes:
    """UTF-8 ``text`` cut to at most ``size`` bytes, on a character boundary."""
    if len(text) <= size:
        return text
    return text[: max(size, 0)].decode(errors="ignore").encode()


def _ours(topic: str, partition: int, offset: int, error_class: str, reason: bytes) -> Headers:
    values = (
        topic.encode(),
        str(partition).encode(),
        str(offset).encode(),
        error_class.encode(),
        reason,
    )
    return list(zip(DLQ_HEADERS, values, strict=True))


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


# -- the admin request aiokafka declares no method for ---------------------------------------

_TOPIC = 2  # ConfigResource type
_SET = 0  # IncrementalAlterConfigs' config_operation


class _IncrementalAlterConfigsResponse_v0(Response):  # type: ignore[misc]
    API_KEY = 44
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "responses",
            Array(
                ("error_code", Int16),
                ("error_message", String("utf-8")),
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
            ),
        ),
    )


class _IncrementalAlterConfigsRequest_v0(RequestStruct):  # type: ignore[misc]
    API_KEY = 44
    API_VERSION = 0
    RESPONSE_TYPE = _IncrementalAlterConfigsResponse_v0
    SCHEMA = Schema(
        (
            "resources",
            Array(
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
                (
                    "configs",
                    Array(
                        ("name", String("utf-8")),
                        ("config_operation", Int8),
                        ("value", String("utf-8")),
                    ),
                ),
            ),
        ),
        ("validate_only", Boolean),
    )


class _IncrementalAlterConfigs(Request[_IncrementalAlterConfigsRequest_v0]):  # type: ignore[misc]
    """Set some settings of one topic, leaving the others as they are (Kafka 2.3 and later;
    aiokafka's alter_configs replaces them all)."""

    API_KEY = 44

    def __init__(self, topic: str, settings: Mapping[str, str]) -> None:
        self._resource = (_TOPIC, topic, [(k, _SET, v) for k, v in settings.items()])

    def build(self, request_struct_class: type[_IncrementalAlterConfigsRequest_v0]) -> Any:
        return request_struct_class([self._resource], False)
