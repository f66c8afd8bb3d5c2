"""What a dead letter carries on the DLQ topic (pipeline/kafka.py): it always fits under the
limit the agent read from the topic, whatever the size of the record's key, value and headers;
what is left out is named with its size, and the source coordinates always go. A limit too
small for a letter carrying nothing but its coordinates is refused (at start-up)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from pipeline import kafka as kafka_io
from pipeline.db import DeadLetter
from pipeline.errors import ConfigError, TransientError

# The producer's max_request_size; the broker's default max.message.bytes is 12 more.
KAFKA_LIMIT = kafka_io.PRODUCER_MAX_REQUEST_SIZE
MiB = 1024 * 1024
KiB = 1024
SOURCES = ["p.agents.states", "p.agents.metrics", "p.system.config"]


class RecordingProducer:
    """Stands in for AIOKafkaProducer.send: refuses what aiokafka's producer refuses (a record
    over max_request_size), and keeps the rest."""

    def __init__(self, refuse: BaseException | None = None) -> None:
        self.sent: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = []
        self.refuse = refuse

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Any = None,
    ) -> asyncio.Future[None]:
        headers = list(headers or [])
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > KAFKA_LIMIT:
            raise MessageSizeTooLargeError(f"the message is {size} bytes when serialized")
        self.sent.append((key, value, headers))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.refuse is None:
            done.set_result(None)
        else:
            done.set_exception(self.refuse)
        return done


def letter(
    key: bytes | None = b"k",
    value: bytes | None = b"{bad",
    headers: list[tuple[str, bytes | None]] | None = None,
    reason: str = "JSON is malformed",
) -> DeadLetter:
    return DeadLetter(
        topic="p.agents.states",
        partition=2,
        offset=41,
        key=key,
        value=value,
        headers=[("trace", b"t-1")] if headers is None else headers,
        timestamp_ms=0,
        error_class="DecodeError",
        reason=reason,
    )


async def published(*letters: DeadLetter, limit: int = 900 * KiB) -> list[Any]:
    producer = RecordingProducer()
    await kafka_io.publish_dead_letters(producer, "p.pipeline.dlq", list(letters), 5.0, limit)
    return producer.sent


def size(key: bytes | None, value: bytes | None, headers: list[Any]) -> int:
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


OURS = [
    ("dlq.source.topic", b"p.agents.states"),
    ("dlq.source.partition", b"2"),
    ("dlq.source.offset", b"41"),
    ("dlq.error.class", b"DecodeError"),
    ("dlq.reason", b"JSON is malformed"),
]


async def test_a_letter_carries_the_record_whole_then_its_coordinates_and_reason() -> None:
    assert await published(letter()) == [(b"k", b"{bad", [("trace", b"t-1"), *OURS])]


async def test_a_tombstone_stays_a_tombstone_and_no_key_stays_none() -> None:
    assert await published(letter(key=None, value=None, headers=[])) == [(None, None, OURS)]


def big(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


@pytest.mark.parametrize(
    ("record", "carried", "omitted"),
    [
        pytest.param(
            letter(key=big(MiB - 1000)),
            {"value", "headers"},
            [("dlq.key.omitted.bytes", str(MiB - 1000).encode())],
            id="huge-key",
        ),
        pytest.param(
            letter(headers=[("a", big(500_000)), ("b", big(548_000, 1))]),
            {"key", "value"},
            [("dlq.headers.omitted.bytes", b"1048002")],
            id="huge-headers",
        ),
        pytest.param(
            letter(value=b"{" + b"x" * 950_000),
            {"key", "headers"},
            [("dlq.value.omitted.bytes", b"950001")],
            id="huge-value",
        ),
        pytest.param(
            # Each part fits alone: the smallest ones go while they fit, the largest is left.
            letter(key=big(300_000), value=big(400_000, 1), headers=[("h", big(340_000, 2))]),
            {"key", "headers"},
            [("dlq.value.omitted.bytes", b"400000")],
            id="near-1-MiB-in-three-parts",
        ),
        pytest.param(
            letter(key=big(1000), value=big(MiB - 4000, 1), headers=[("h", big(2000, 2))]),
            {"key", "headers"},
            [("dlq.value.omitted.bytes", str(MiB - 4000).encode())],
            id="a-source-record-just-under-the-limit",
        ),
        pytest.param(
            letter(headers=[(f"h{i}", b"") for i in range(200_000)]),
            {"key", "value"},
            [("dlq.headers.omitted.bytes", b"1288890")],
            id="many-empty-headers",
        ),
    ],
)
async def test_a_letter_always_fits_and_names_what_it_left_out(
    record: DeadLetter, carried: set[str], omitted: list[tuple[str, bytes]]
) -> None:
    [(key, value, headers)] = await published(record, limit=900 * KiB)
    assert size(key, value, headers) <= 900 * KiB
    assert key == (record.key if "key" in carried else None)
    assert value == (record.value if "value" in carried else b"")
    assert headers == [*omitted, *(record.headers if "headers" in carried else []), *OURS]


async def test_a_long_reason_is_cut_on_a_character_boundary() -> None:
    reason = "é" * 5000  # two bytes each: the limit falls between characters only at evens
    [(_, _, headers)] = await published(letter(reason=reason + "x"))
    cut = dict(headers)["dlq.reason"]
    assert cut is not None
    assert cut == ("é" * (kafka_io.DLQ_MAX_REASON_BYTES // 2)).encode()
    [(_, _, headers)] = await published(letter(reason="x" + reason))
    assert dict(headers)["dlq.reason"] == ("x" + "é" * 2047).encode()


async def test_a_letter_the_topic_refuses_as_too_large_is_a_refusal_the_agent_recovers_from() -> (
    None
):
    # Only a limit lowered after start-up (or a broker enforcing less than it reports) can
    # refuse one: the agent renews its producer and retries the batch with bare letters.
    producer = RecordingProducer(refuse=MessageSizeTooLargeError())
    with pytest.raises(
        kafka_io.DeadLetterRefused,
        match=r"^dead-letter topic p\.pipeline\.dlq refused a dead letter of at most 20000 bytes",
    ):
        await kafka_io.publish_dead_letters(producer, "p.pipeline.dlq", [letter()], 5.0, 20_000)


async def test_a_bare_letter_carries_only_its_coordinates_class_and_the_omitted_sizes() -> None:
    [(key, value, headers)] = await published(letter(reason="r" * 100), limit=kafka_io.BARE)
    assert (key, value) == (None, b"")
    assert headers == [
        ("dlq.key.omitted.bytes", b"1"),
        ("dlq.value.omitted.bytes", b"4"),
        ("dlq.headers.omitted.bytes", b"8"),
        *OURS[:4],
        ("dlq.reason", b""),
    ]


async def test_a_broker_away_is_still_retried() -> None:
    producer = RecordingProducer(refuse=KafkaConnectionError())
    with pytest.raises(TransientError):
        await kafka_io.publish_dead_letters(producer, "p.pipeline.dlq", [letter()], 5.0, MiB)


def floor() -> int:
    """The smallest letter sizing allows, stated on its own: a letter from the longest source
    topic, at the largest partition and offset, every part omitted and named with the largest
    size a part can have, an empty class and a reason of DLQ_MIN_REASON_BYTES."""
    most = str(2**31 - 1).encode()
    return size(
        None,
        b"",
        [
            ("dlq.key.omitted.bytes", most),
            ("dlq.value.omitted.bytes", most),
            ("dlq.headers.omitted.bytes", most),
            ("dlq.source.topic", b"p.agents.metrics"),
            ("dlq.source.partition", most),
            ("dlq.source.offset", str(2**63 - 1).encode()),
            ("dlq.error.class", b""),
            ("dlq.reason", b"x" * kafka_io.DLQ_MIN_REASON_BYTES),
        ],
    )


@pytest.mark.parametrize(
    ("max_message_bytes", "limit"),
    [
        pytest.param(1_048_588, KAFKA_LIMIT, id="Kafka's default: the producer's limit"),
        pytest.param(MiB, MiB, id="1 MiB"),
        pytest.param(900 * KiB, 900 * KiB, id="900 KiB"),
        pytest.param(20_000, 20_000, id="20 kB"),
        pytest.param(floor(), floor(), id="the smallest"),
    ],
)
def test_the_limit_is_the_smaller_of_the_topics_and_the_producers(
    max_message_bytes: int, limit: int
) -> None:
    assert (
        kafka_io.dead_letter_limit("p.pipeline.dlq", max_message_bytes, KAFKA_LIMIT, SOURCES)
        == limit
    )


@pytest.mark.parametrize("max_message_bytes", [floor() - 1, 200, 0])
def test_a_limit_too_small_for_a_letter_without_its_parts_is_refused_naming_the_setting(
    max_message_bytes: int,
) -> None:
    with pytest.raises(ConfigError) as refused:
        kafka_io.dead_letter_limit("p.pipeline.dlq", max_message_bytes, KAFKA_LIMIT, SOURCES)
    assert str(refused.value) == (
        f"dead-letter topic p.pipeline.dlq: its max.message.bytes is {max_message_bytes}, "
        f"below {floor()} bytes, the size of a dead letter carrying only its coordinates and "
        f"reason: set the topic's max.message.bytes to at least {floor()} (Kafka's default "
        "is 1048588)"
    )


def near_a_mebibyte() -> DeadLetter:
    """A record that just fits the producer's limit: key 600 kB, headers the rest."""
    key = big(600_000)
    headers = [("blob", big(KAFKA_LIMIT - 600_000 - 200, 1))]
    return letter(key=key, headers=headers)


ALL = {"key", "value", "headers"}


@pytest.mark.parametrize(
    ("limit", "record", "carried"),
    [
        # A 50 kB value with a 1000-byte key and 3000 bytes of headers.
        pytest.param("floor", "50k", set(), id="smallest-50k"),
        pytest.param(20_000, "50k", {"key", "headers"}, id="20kB-50k"),
        pytest.param(900 * KiB, "50k", ALL, id="900KiB-50k"),
        pytest.param(MiB, "50k", ALL, id="1MiB-50k"),
        # A record near 1 MiB: 600 kB of key, the rest headers.
        pytest.param("floor", "1MiB", {"value"}, id="smallest-1MiB"),  # 4 bytes: room left
        pytest.param(20_000, "1MiB", {"value"}, id="20kB-1MiB"),
        pytest.param(900 * KiB, "1MiB", {"value", "headers"}, id="900KiB-1MiB"),
        pytest.param(MiB, "1MiB", {"value", "headers"}, id="1MiB-1MiB"),
    ],
)
async def test_a_letter_fits_each_limit_carrying_what_fits_and_naming_the_rest(
    limit: int | str, record: str, carried: set[str]
) -> None:
    cap = floor() if limit == "floor" else int(limit)
    source = (
        letter(key=big(1000), value=b"{" + b"x" * 50_000, headers=[("h", big(2999, 2))])
        if record == "50k"
        else near_a_mebibyte()
    )
    [(key, value, headers)] = await published(source, limit=cap)
    assert size(key, value, headers) <= cap
    assert key == (source.key if "key" in carried else None)
    assert value == (source.value if "value" in carried else b"")
    assert source.key is not None and source.value is not None
    parts = {
        "key": len(source.key),
        "value": len(source.value),
        "headers": sum(len(n) + len(v or b"") for n, v in source.headers),
    }
    omitted = [(f"dlq.{p}.omitted.bytes", str(n).encode()) for p, n in parts.items()]
    assert headers == [
        *(o for o, p in zip(omitted, parts, strict=True) if p not in carried),
        *(source.headers if "headers" in carried else []),
        *OURS,
    ]


async def test_at_the_smallest_limit_a_long_reason_is_cut_to_what_fits() -> None:
    # The longest source topic, the largest partition: the least room for the reason.
    long_topic = replace(letter(reason="r" * 10_000), topic="p.agents.metrics", partition=2**31 - 1)
    [(key, value, headers)] = await published(long_topic, limit=floor())
    assert size(key, value, headers) <= floor()
    reason = dict(headers)["dlq.reason"]
    assert reason is not None
    assert len(reason) >= kafka_io.DLQ_MIN_REASON_BYTES - len(b"DecodeError")
    assert reason == b"r" * len(reason)
    # With room to spare, the reason is cut at DLQ_MAX_REASON_BYTES only.
    [(_, _, headers)] = await published(long_topic, limit=20_000)
    assert dict(headers)["dlq.reason"] == b"r" * kafka_io.DLQ_MAX_REASON_BYTES
