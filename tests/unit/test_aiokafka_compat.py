"""pipeline/aiokafka_compat.py: a fetched record whose header name is not UTF-8 is handed
over (its name with ``surrogateescape``), and the records around it too, in order; without
it, aiokafka's fetcher raises. The batches are built as a producer sends them."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from aiokafka.consumer import fetcher
from aiokafka.consumer.fetcher import READ_COMMITTED
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, TopicPartition

from pipeline import aiokafka_compat, db, kafka_clients
from pipeline.catalog import load as load_catalog
from pipeline.records import header_name_text, header_names_not_utf8
from pipeline.rows import decoder as stream_decoder
from tests.raw_headers import RawName, batch_builder

TP = TopicPartition("topic", 0)
BAD = "\udcff\udcfe"  # b"\xff\xfe" with surrogateescape
Header = tuple[str, bytes | None]
ORIGINAL = aiokafka_compat._PartitionRecords.__mro__[1]


def batch(base_offset: int, headers: list[list[Header]], *, gzip: bool = False) -> bytes:
    """A v2 batch of one record per entry of ``headers``, values ``v<offset>``."""
    builder = batch_builder(gzip=gzip)
    for i, record_headers in enumerate(headers):
        value = b"v%d" % (base_offset + i)
        assert builder.append(i, timestamp=None, key=None, value=value, headers=record_headers)
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)  # as the broker sets it (outside the CRC)
    return bytes(data)


def read(records_class: Any, memory: Any, data: bytes, fetch_offset: int = 0) -> list[Any]:
    records = records_class(TP, memory(data), [], fetch_offset, None, None, True, READ_COMMITTED)
    return [(r.offset, r.value, r.headers) for r in records]


def patched(data: bytes, fetch_offset: int = 0) -> list[Any]:
    return read(
        aiokafka_compat._PartitionRecords, aiokafka_compat._FetchedRecords, data, fetch_offset
    )


FIRST = batch(0, [[], [("a", b"1")]])
FETCH = (
    FIRST
    + batch(2, [[], [(RawName(b"\xff\xfe"), b"x"), ("content-type", b"j")], []])
    + batch(5, [[(RawName(b"\x80"), None)]], gzip=True)
    + batch(6, [[], []])
)
EXPECTED = [
    (0, b"v0", ()),
    (1, b"v1", (("a", b"1"),)),
    (2, b"v2", ()),
    (3, b"v3", ((BAD, b"x"), ("content-type", b"j"))),
    (4, b"v4", ()),
    (5, b"v5", (("\udc80", None),)),
    (6, b"v6", ()),
    (7, b"v7", ()),
]


def test_aiokafka_alone_raises_on_a_header_name_that_is_not_utf8() -> None:
    # The upstream bug this module works around: when this fails, aiokafka fixed it.
    with pytest.raises(UnicodeDecodeError):
        read(ORIGINAL, MemoryRecords, FETCH)


def test_every_record_is_handed_over_in_order_the_bad_names_with_surrogateescape() -> None:
    assert patched(FETCH) == EXPECTED


def test_a_fetch_from_inside_a_batch_with_a_bad_record_starts_at_the_fetch_offset() -> None:
    # As the broker answers a fetch: from the batch that holds the fetch offset.
    assert patched(FETCH[len(FIRST) :], fetch_offset=3) == EXPECTED[3:]
    assert patched(FETCH[len(FIRST) :], fetch_offset=4) == EXPECTED[4:]


def test_a_bad_record_first_or_last_in_its_batch_or_in_every_batch() -> None:
    bad: list[Header] = [(RawName(b"\xc3\x28"), b"")]
    data = batch(0, [bad, []]) + batch(2, [[], bad]) + batch(4, [bad]) + batch(5, [bad])
    assert [(o, h) for o, _, h in patched(data)] == [
        (0, (("\udcc3(", b""),)),
        (1, ()),
        (2, ()),
        (3, (("\udcc3(", b""),)),
        (4, (("\udcc3(", b""),)),
        (5, (("\udcc3(", b""),)),
    ]


@pytest.mark.parametrize("at", [b"v3", b"v4"])
def test_a_decode_error_that_is_not_a_header_name_is_raised_not_retried(at: bytes) -> None:
    # At the bad record itself, and at a good one after it in the batch parsed again.
    def value(raw: bytes) -> str:
        if raw == at:
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "a deserializer's own error")
        return raw.decode()

    records = aiokafka_compat._PartitionRecords(
        TP, aiokafka_compat._FetchedRecords(FETCH), [], 0, None, value, True, READ_COMMITTED
    )
    before = int(at[1:])
    assert [next(records).offset for _ in range(before)] == list(range(before))
    with pytest.raises(UnicodeDecodeError, match="deserializer"):
        next(records)
    assert records.next_fetch_offset == before  # nothing skipped


def test_a_good_fetch_is_parsed_by_aiokafka_alone() -> None:
    data = batch(0, [[("a", b"1")], []]) + batch(2, [[]])
    records = aiokafka_compat._PartitionRecords(
        TP, aiokafka_compat._FetchedRecords(data), [], 0, None, None, True, READ_COMMITTED
    )
    assert [r.offset for r in records] == [0, 1, 2]
    assert isinstance(records._records, aiokafka_compat._FetchedRecords)  # never re-parsed


def test_a_fetch_that_ends_in_a_partial_batch_hands_over_the_whole_ones() -> None:
    assert [o for o, _, _ in patched(FETCH[: len(FETCH) - 10])] == [0, 1, 2, 3, 4, 5]


async def test_installed_by_building_a_consumer_and_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetcher, "PartitionRecords", ORIGINAL)
    monkeypatch.setattr(fetcher, "MemoryRecords", MemoryRecords)
    assert not aiokafka_compat.installed()
    consumer = kafka_clients.consumer(kafka_clients.KafkaSettings(bootstrap_servers="127.0.0.1:1"))
    await consumer.stop()
    assert aiokafka_compat.installed()
    assert fetcher.PartitionRecords is aiokafka_compat._PartitionRecords
    assert fetcher.MemoryRecords is aiokafka_compat._FetchedRecords
    aiokafka_compat.install()
    assert aiokafka_compat.installed()


def test_header_names_not_utf8_are_found_as_their_bytes() -> None:
    assert header_names_not_utf8([]) == []
    assert header_names_not_utf8([("content-type", b"x"), ("é", None)]) == []
    assert header_names_not_utf8([("a", None), (BAD, b"x"), ("\udc80", None)]) == [
        b"\xff\xfe",
        b"\x80",
    ]
    assert header_name_text(BAD + "é") == "\\xff\\xfeé"
    assert header_name_text("trace-id") == "trace-id"


def test_a_record_with_a_bad_header_name_is_rejected_the_others_decode() -> None:
    decoder = stream_decoder(load_catalog()["metrics"])
    value = b'{"agent_id":"a","name":"cpu","value":1.0,"ts":"2026-11-01T00:00:00Z"}'
    good = ConsumerRecord("t", 0, 7, 0, 0, None, value, None, 0, 0, ())
    bad = ConsumerRecord("t", 0, 8, 0, 0, None, value, None, 0, 0, ((BAD, b"x"),))
    rows, rejected = decoder.rows([good, bad, good], 0, 1)
    assert len(rows) == 2
    assert [(r.record.offset, r.error_class, r.reason) for r in rejected] == [
        (8, "InvalidHeader", "header name b'\\xff\\xfe' is not UTF-8")
    ]
    letter = db.dead_letter(rejected[0].record, rejected[0].error_class, rejected[0].reason)
    assert letter.headers == [("\\xff\\xfe", b"x")]  # text both jsonb and the DLQ can carry
    assert letter.headers[0][0].encode() == b"\\xff\\xfe"
