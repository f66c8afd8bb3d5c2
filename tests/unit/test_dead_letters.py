"""What a dead letter carries on the DLQ topic (pipeline/kafka.py): it always fits under
Kafka's record limit, whatever the size of the record's key, value and headers; what is left
out is named with its size, and the source coordinates always go."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from pipeline import kafka as kafka_io
from pipeline.db import DeadLetter
from pipeline.errors import ConfigError, TransientError

# The producer's default max_request_size; the broker's default max.message.bytes is 12 more.
KAFKA_LIMIT = 1024 * 1024
MiB = 1024 * 1024


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


async def published(*letters: DeadLetter) -> list[Any]:
    producer = RecordingProducer()
    await kafka_io.publish_dead_letters(producer, "p.pipeline.dlq", list(letters), 5.0)
    return producer.sent


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
    [(key, value, headers)] = await published(record)
    assert DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers) <= (
        kafka_io.DLQ_MAX_RECORD_BYTES
    )
    assert kafka_io.DLQ_MAX_RECORD_BYTES < KAFKA_LIMIT
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


async def test_a_letter_the_topic_refuses_as_too_large_stops_the_agent_saying_why() -> None:
    # Only a DLQ topic whose max.message.bytes is below Kafka's default can refuse one:
    # retrying cannot help, and would stall the partition for ever.
    producer = RecordingProducer(refuse=MessageSizeTooLargeError())
    with pytest.raises(ConfigError, match=r"p\.pipeline\.dlq .*max\.message\.bytes"):
        await kafka_io.publish_dead_letters(producer, "p.pipeline.dlq", [letter()], 5.0)


async def test_a_broker_away_is_still_retried() -> None:
    producer = RecordingProducer(refuse=KafkaConnectionError())
    with pytest.raises(TransientError):
        await kafka_io.publish_dead_letters(producer, "p.pipeline.dlq", [letter()], 5.0)
