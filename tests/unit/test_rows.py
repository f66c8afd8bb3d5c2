"""Record bytes -> COPY rows: the wire contract of docs/architecture.md, decoded exactly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from aiokafka.structs import ConsumerRecord

from pipeline import catalog
from pipeline.batching import Row
from pipeline.records import (
    MSGPACK,
    AgentEvent,
    AnalyticsEvent,
    ConfigChange,
    Metric,
    Record,
    StateChange,
    encode,
)
from pipeline.rows import RecordRejected, StreamDecoder, decoder
from tests.builtin_streams import STREAMS

BUILTIN = catalog.load()
# The built-in streams' decoders, compiled from the catalog as any stream's are.
DECODERS: dict[str, StreamDecoder] = {s.name: decoder(s) for s in BUILTIN}
PARTITION, OFFSET, BATCH_ID = 3, 42, 7
PROVENANCE = (PARTITION, OFFSET, BATCH_ID)
MSGPACK_HEADERS = [("content-type", b"application/msgpack")]
JSON_HEADERS = [("content-type", b"application/json")]

TS = "2025-06-01T12:00:00.250+02:00"
TS_VALUE = datetime(2025, 6, 1, 12, 0, 0, 250_000, tzinfo=timezone(timedelta(hours=2)))
EVENT_ID = "6f1c2a34-8b5d-4e7f-9a01-23456789abcd"
EVENT_UUID = uuid.UUID(EVENT_ID)


def raw(data: bytes) -> msgspec.Raw:
    return msgspec.Raw(data)


def decode(stream: str, value: bytes | None, headers: Any = ()) -> Row:
    return DECODERS[stream].row(value, headers, PARTITION, OFFSET, BATCH_ID)


def assert_same_row(actual: Row, expected: Row) -> None:
    """Equal, and equal the strict way: same types, same bytes, same UTC offsets."""
    assert actual == expected
    assert [type(a) for a in actual] == [type(e) for e in expected]
    for a, e in zip(actual, expected, strict=True):
        if isinstance(e, msgspec.Raw):
            assert bytes(a) == bytes(e)
        if isinstance(e, datetime):
            assert a.utcoffset() == e.utcoffset()


# -- valid JSON records ----------------------------------------------------------------------

# Sub-objects with inner whitespace, nesting and escapes: the Raw slice must be these bytes
# exactly, not a re-encoding of them.
STATE_DATA = b'{"previous": "idle", "load": [0.5, 1, {"deep": null}], "note": "a\\"b"}'
EVENT_PAYLOAD = b'{ "reason" : "oom", "rss_mb": 2048 }'
METRIC_LABELS = b'{"host":"h1","zone":"eu-1"}'
ANALYTICS_PROPS = b'{"page": "/pricing", "ab": {"variant": "B"}}'
CONFIG_VALUE = b'{"max_records": 5000, "enabled": true}'

VALID = [
    pytest.param(
        "states",
        b'{"agent_id": "agent-7", "state": "busy", "version": 3, "ts": "'
        + TS.encode()
        + b'", "data": '
        + STATE_DATA
        + b"}",
        ("agent-7", "busy", 3, TS_VALUE, raw(STATE_DATA)),
        id="states",
    ),
    pytest.param(
        "events",
        # Field order on the wire differs from the table's column order on purpose.
        b'{"payload": '
        + EVENT_PAYLOAD
        + b', "severity": "warning", "ts": "'
        + TS.encode()
        + b'", "kind": "restart", "agent_id": "agent-7", "event_id": "'
        + EVENT_ID.encode()
        + b'"}',
        (EVENT_UUID, "agent-7", "restart", "warning", TS_VALUE, raw(EVENT_PAYLOAD)),
        id="events",
    ),
    pytest.param(
        "metrics",
        b'{"agent_id":"agent-7","name":"cpu","value":0.75,"ts":"'
        + TS.encode()
        + b'","labels":'
        + METRIC_LABELS
        + b"}",
        ("agent-7", "cpu", 0.75, TS_VALUE, raw(METRIC_LABELS)),
        id="metrics",
    ),
    pytest.param(
        "metrics",
        b'{"agent_id":"agent-7","name":"rss","value":12,"ts":"2025-06-01T10:00:00Z"}',
        ("agent-7", "rss", 12.0, datetime(2025, 6, 1, 10, tzinfo=UTC), raw(b"{}")),
        id="metrics-int-value-is-float",
    ),
    pytest.param(
        "analytics",
        b'{"event_id":"'
        + EVENT_ID.encode()
        + b'","user_id":"u-1","action":"click","ts":"'
        + TS.encode()
        + b'","properties":'
        + ANALYTICS_PROPS
        + b"}",
        (EVENT_UUID, "u-1", "click", TS_VALUE, raw(ANALYTICS_PROPS)),
        id="analytics",
    ),
    pytest.param(
        "config",
        b'{"key":"ingest.batch","value":'
        + CONFIG_VALUE
        + b',"version":9,"ts":"'
        + TS.encode()
        + b'","updated_by":"ops"}',
        ("ingest.batch", raw(CONFIG_VALUE), 9, TS_VALUE, "ops"),
        id="config",
    ),
]


@pytest.mark.parametrize(("stream", "value", "fields"), VALID)
def test_valid_json_record_decodes_to_the_exact_row(
    stream: str, value: bytes, fields: tuple[Any, ...]
) -> None:
    row = decode(stream, value)
    assert_same_row(row, (*fields, *PROVENANCE))
    assert len(row) == len(BUILTIN[stream].tables.table.columns)


@pytest.mark.parametrize(("stream", "value", "fields"), VALID)
def test_explicit_json_content_type_is_the_default(
    stream: str, value: bytes, fields: tuple[Any, ...]
) -> None:
    assert_same_row(decode(stream, value, JSON_HEADERS), (*fields, *PROVENANCE))


def test_every_stream_has_a_decoder_for_its_table() -> None:
    assert sorted(DECODERS) == sorted(s.name for s in STREAMS) == sorted(BUILTIN.names)
    assert all(DECODERS[s.name].tables == s.tables for s in BUILTIN)


MINIMAL = [
    pytest.param(
        "states",
        b'{"agent_id":"a","state":"idle","version":0,"ts":"2025-06-01T10:00:00Z"}',
        ("a", "idle", 0, datetime(2025, 6, 1, 10, tzinfo=UTC), raw(b"{}")),
        id="states-data",
    ),
    pytest.param(
        "events",
        b'{"event_id":"'
        + EVENT_ID.encode()
        + b'","agent_id":"a","kind":"boot","ts":"2025-06-01T10:00:00Z"}',
        (EVENT_UUID, "a", "boot", "info", datetime(2025, 6, 1, 10, tzinfo=UTC), raw(b"{}")),
        id="events-severity-payload",
    ),
    pytest.param(
        "metrics",
        b'{"agent_id":"a","name":"cpu","value":1.5,"ts":"2025-06-01T10:00:00Z"}',
        ("a", "cpu", 1.5, datetime(2025, 6, 1, 10, tzinfo=UTC), raw(b"{}")),
        id="metrics-labels",
    ),
    pytest.param(
        "analytics",
        b'{"event_id":"'
        + EVENT_ID.encode()
        + b'","user_id":"u","action":"view","ts":"2025-06-01T10:00:00Z"}',
        (EVENT_UUID, "u", "view", datetime(2025, 6, 1, 10, tzinfo=UTC), raw(b"{}")),
        id="analytics-properties",
    ),
    pytest.param(
        "config",
        b'{"key":"k","value":1,"version":0,"ts":"2025-06-01T10:00:00Z"}',
        ("k", raw(b"1"), 0, datetime(2025, 6, 1, 10, tzinfo=UTC), ""),
        id="config-updated_by",
    ),
]


@pytest.mark.parametrize(("stream", "value", "fields"), MINIMAL)
def test_missing_optional_fields_get_their_defaults(
    stream: str, value: bytes, fields: tuple[Any, ...]
) -> None:
    assert_same_row(decode(stream, value), (*fields, *PROVENANCE))


@pytest.mark.parametrize(("stream", "value", "fields"), [*VALID, *MINIMAL])
def test_unknown_fields_are_ignored(stream: str, value: bytes, fields: tuple[Any, ...]) -> None:
    # A newer producer's fields, of every JSON type, before and after the known ones.
    extended = (
        b'{"zz_new": {"deep": [1, {"x": "y"}]}, "flag": true,'
        + value[1:-1]
        + b', "added_later": [null, 1.5], "n": null}'
    )
    assert_same_row(decode(stream, extended), (*fields, *PROVENANCE))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"null", id="null"),
        pytest.param(b'[1, "two", {"3": 4}]', id="array"),
        pytest.param(b'"a string"', id="string"),
        pytest.param(b"-12.5e3", id="number"),
        pytest.param(b"true", id="bool"),
        pytest.param(b"{}", id="empty-object"),
        pytest.param(b'{"nested": {"a": [1]}}', id="object"),
    ],
)
def test_config_value_may_be_any_json(value: bytes) -> None:
    record = b'{"key":"k","value":' + value + b',"version":1,"ts":"2025-06-01T10:00:00Z"}'
    assert_same_row(
        decode("config", record),
        ("k", raw(value), 1, datetime(2025, 6, 1, 10, tzinfo=UTC), "", *PROVENANCE),
    )


# -- MessagePack -----------------------------------------------------------------------------

T0 = datetime(2025, 6, 1, 10, 0, 0, 123_000, tzinfo=UTC)

RECORDS: list[Any] = [
    pytest.param(
        StateChange("agent-7", "busy", 3, T0, {"previous": "idle", "load": [0.5, 1, None]}),
        id="states",
    ),
    pytest.param(
        AgentEvent(EVENT_UUID, "agent-7", "restart", T0, "error", {"reason": "oom"}),
        id="events",
    ),
    pytest.param(Metric("agent-7", "cpu", 0.75, T0, {"host": "h1"}), id="metrics"),
    pytest.param(
        AnalyticsEvent(EVENT_UUID, "u-1", "click", T0, {"ab": {"variant": "B"}}),
        id="analytics",
    ),
    pytest.param(ConfigChange("k", {"max": 5}, 9, T0, "ops"), id="config-object"),
    pytest.param(ConfigChange("k", [1, "two"], 9, T0), id="config-array"),
    pytest.param(ConfigChange("k", None, 9, T0), id="config-null"),
    pytest.param(StateChange("agent-7", "idle", 0, T0), id="states-default-data"),
]

JSON_SUBOBJECT = {"states": "data", "events": "payload", "metrics": "labels"}
JSON_SUBOBJECT |= {"analytics": "properties", "config": "value"}


def _stream_of(record: Record) -> str:
    return next(s.name for s in STREAMS if isinstance(record, s.record_type))


@pytest.mark.parametrize("record", RECORDS)
def test_msgpack_record_decodes_to_the_same_row_as_json(record: Record) -> None:
    stream = _stream_of(record)
    from_json = decode(stream, encode(record))
    from_msgpack = decode(stream, encode(record, MSGPACK), MSGPACK_HEADERS)
    assert_same_row(from_msgpack, from_json)
    column = BUILTIN[stream].tables.table.fields.index(JSON_SUBOBJECT[stream])
    sub_object = getattr(record, JSON_SUBOBJECT[stream])
    assert bytes(from_msgpack[column]) == msgspec.json.encode(sub_object)


def test_msgpack_record_from_a_plain_map_with_string_timestamp() -> None:
    # Not every producer uses our SDK: a hand-built map with an RFC 3339 string must do too.
    value = msgspec.msgpack.encode(
        {
            "agent_id": "a",
            "state": "busy",
            "version": 2,
            "ts": "2025-06-01T12:00:00+02:00",
            "data": {"k": [1, 2]},
            "unknown": {"ignored": True},
        }
    )
    assert_same_row(
        decode("states", value, MSGPACK_HEADERS),
        (
            "a",
            "busy",
            2,
            datetime(2025, 6, 1, 12, tzinfo=timezone(timedelta(hours=2))),
            raw(b'{"k":[1,2]}'),
            *PROVENANCE,
        ),
    )


# -- rejections ------------------------------------------------------------------------------

STATE_OK = {"agent_id": "a", "state": "s", "version": 1, "ts": "2025-06-01T10:00:00Z"}


def state_json(**changes: Any) -> bytes:
    """A states record with some fields changed; a value of ``...`` removes the field."""
    fields = {**STATE_OK, **changes}
    return msgspec.json.encode({k: v for k, v in fields.items() if v is not ...})


def with_field(stream: str, name: str, value_json: bytes) -> bytes:
    """A minimal valid record of ``stream`` whose field ``name`` is the JSON ``value_json``."""
    minimal = next(p.values[1] for p in MINIMAL if p.values[0] == stream)
    return minimal[:-1] + b',"' + name.encode() + b'":' + value_json + b"}"


REJECTED = [
    pytest.param("states", b'{"agent_id": "a",', (), "DecodeError", "truncated", id="truncated"),
    pytest.param(
        "states", b'{"agent_id": a}', (), "DecodeError", "JSON is malformed", id="malformed"
    ),
    pytest.param("states", b"", (), "DecodeError", "truncated", id="empty-bytes"),
    pytest.param(
        "states", b"[1, 2]", (), "ValidationError", "Expected `object`, got `array`", id="array"
    ),
    pytest.param(
        "states",
        b'{"agent_id":"\xff\xfe","state":"s","version":1,"ts":"2025-06-01T10:00:00Z"}',
        (),
        "DecodeError",
        "utf-8",
        id="invalid-utf8-in-string",
    ),
    pytest.param(
        "states",
        # Found by tests/unit/test_fuzz_records.py: msgspec keeps a sub-object raw without
        # checking its UTF-8, and PostgreSQL refuses a jsonb value that is not UTF-8.
        b'{"agent_id": "", "state": "", "version": 0, "ts": "2000-01-01T00:00:00.000001+00:00",'
        b' "data": {"": null, "\xe0\xa0\x7f": [null], "0": null}}',
        (),
        "DecodeError",
        "'utf-8' codec can't decode bytes in position 106-107: invalid continuation byte",
        id="invalid-utf8-in-a-raw-sub-object",
    ),
    pytest.param(
        "config",
        b'{"key":"k","version":1,"ts":"2025-06-01T10:00:00Z","value":"\xff"}',
        (),
        "DecodeError",
        "utf-8",
        id="invalid-utf8-in-a-raw-config-value",
    ),
    pytest.param(
        "states",
        state_json(unknown="XX").replace(b'"XX"', b'"\xc3"'),
        (),
        "DecodeError",
        "utf-8",
        id="invalid-utf8-in-an-ignored-field",
    ),
    pytest.param(
        "states",
        # A msgpack fixstr of two bytes (0xa2) that are not UTF-8.
        msgspec.msgpack.encode({**STATE_OK, "agent_id": "XX"}).replace(b"\xa2XX", b"\xa2\xff\xfe"),
        MSGPACK_HEADERS,
        "DecodeError",
        "utf-8",
        id="msgpack-invalid-utf8-in-string",
    ),
    pytest.param(
        "states",
        state_json(state=...),
        (),
        "ValidationError",
        "Object missing required field `state`",
        id="missing-required-field",
    ),
    pytest.param(
        "config",
        b'{"key":"k","version":1,"ts":"2025-06-01T10:00:00Z"}',
        (),
        "ValidationError",
        "Object missing required field `value`",
        id="config-missing-value",
    ),
    pytest.param(
        "states",
        state_json(version="1"),
        (),
        "ValidationError",
        "Expected `int`, got `str` - at `$.version`",
        id="wrong-type",
    ),
    pytest.param(
        "metrics",
        b'{"agent_id":"a","name":"cpu","value":"high","ts":"2025-06-01T10:00:00Z"}',
        (),
        "ValidationError",
        "Expected `float`, got `str` - at `$.value`",
        id="wrong-type-metric-value",
    ),
    pytest.param(
        "states",
        state_json(version=-1),
        (),
        "ValidationError",
        "Expected `int` >= 0 - at `$.version`",
        id="negative-version",
    ),
    pytest.param(
        "config",
        b'{"key":"k","value":1,"version":-5,"ts":"2025-06-01T10:00:00Z"}',
        (),
        "ValidationError",
        "Expected `int` >= 0 - at `$.version`",
        id="negative-config-version",
    ),
    pytest.param(
        "states",
        state_json(version=2**63),
        (),
        "ValidationError",
        "at `$.version`",
        id="version-beyond-bigint",
    ),
    pytest.param(
        "states",
        state_json(ts="2025-06-01T10:00:00"),
        (),
        "ValidationError",
        "Expected `datetime` with a timezone component - at `$.ts`",
        id="naive-timestamp",
    ),
    pytest.param(
        "states",
        state_json(ts="yesterday"),
        (),
        "ValidationError",
        "Invalid RFC3339 encoded datetime - at `$.ts`",
        id="not-a-timestamp",
    ),
    pytest.param(
        "events",
        b'{"event_id":"nope","agent_id":"a","kind":"k","ts":"2025-06-01T10:00:00Z"}',
        (),
        "ValidationError",
        "Invalid UUID - at `$.event_id`",
        id="bad-uuid",
    ),
    pytest.param(
        "states",
        with_field("states", "data", b"[1, 2]"),
        (),
        "ValidationError",
        "Expected `object` - at `$.data`",
        id="states-data-array",
    ),
    pytest.param(
        "events",
        with_field("events", "payload", b' ["x"]'),
        (),
        "ValidationError",
        "Expected `object` - at `$.payload`",
        id="events-payload-array",
    ),
    pytest.param(
        "metrics",
        with_field("metrics", "labels", b"[]"),
        (),
        "ValidationError",
        "Expected `object` - at `$.labels`",
        id="metrics-labels-array",
    ),
    pytest.param(
        "analytics",
        with_field("analytics", "properties", b"[{}]"),
        (),
        "ValidationError",
        "Expected `object` - at `$.properties`",
        id="analytics-properties-array",
    ),
    pytest.param(
        "states",
        with_field("states", "data", b"null"),
        (),
        "ValidationError",
        "Expected `object` - at `$.data`",
        id="states-data-null",
    ),
    pytest.param(
        "states",
        with_field("states", "data", b'"{}"'),
        (),
        "ValidationError",
        "Expected `object` - at `$.data`",
        id="states-data-string",
    ),
    pytest.param(
        "states",
        msgspec.msgpack.encode({**STATE_OK, "data": [1]}),
        MSGPACK_HEADERS,
        "ValidationError",
        "Expected `object`, got `array` - at `$.data`",
        id="msgpack-data-array",
    ),
    pytest.param(
        "states",
        msgspec.msgpack.encode({**STATE_OK, "version": -1}),
        MSGPACK_HEADERS,
        "ValidationError",
        "Expected `int` >= 0 - at `$.version`",
        id="msgpack-negative-version",
    ),
    pytest.param(
        "states",
        b"\xc1",
        MSGPACK_HEADERS,
        "DecodeError",
        "MessagePack data is malformed",
        id="msgpack-malformed",
    ),
    pytest.param(
        "states",
        state_json(),
        [("content-type", b"text/plain")],
        "UnsupportedContentType",
        "content-type 'text/plain' is not supported; use application/json or application/msgpack",
        id="unsupported-content-type",
    ),
    pytest.param(
        "states",
        state_json(),
        [("content-type", b"application/json; charset=utf-8")],
        "UnsupportedContentType",
        "content-type 'application/json; charset=utf-8' is not supported",
        id="content-type-with-parameters",
    ),
    # PostgreSQL's text and jsonb cannot hold NUL: refused here, not by the database.
    pytest.param(
        "states",
        state_json(agent_id="a\x00b"),
        (),
        "ValidationError",
        "text cannot contain NUL (\\u0000) - at `$.agent_id`",
        id="nul-in-a-text-field",
    ),
    pytest.param(
        "states",
        state_json(data={"deep": ["x", {"y": "\x00"}]}),
        (),
        "ValidationError",
        "text cannot contain NUL (\\u0000) - at `$.data`",
        id="nul-in-a-nested-json-string",
    ),
    pytest.param(
        "events",
        with_field("events", "payload", b'{"k\\\\\\u0000": 1}'),  # \\ then a NUL escape
        (),
        "ValidationError",
        "text cannot contain NUL (\\u0000) - at `$.payload`",
        id="nul-in-a-json-key-after-an-escaped-backslash",
    ),
    pytest.param(
        "config",
        b'{"key":"k","value":"\\u0000","version":1,"ts":"2025-06-01T10:00:00Z"}',
        (),
        "ValidationError",
        "text cannot contain NUL (\\u0000) - at `$.value`",
        id="nul-as-the-config-value",
    ),
    pytest.param(
        "metrics",
        encode(Metric("a", "cpu\x00", 1.0, datetime(2025, 6, 1, tzinfo=UTC)), MSGPACK),
        MSGPACK_HEADERS,
        "ValidationError",
        "text cannot contain NUL (\\u0000) - at `$.name`",
        id="nul-in-a-msgpack-text-field",
    ),
    pytest.param(
        "analytics",
        encode(
            AnalyticsEvent(EVENT_UUID, "u", "a", TS_VALUE, {"p": ["\x00"]}),
            MSGPACK,
        ),
        MSGPACK_HEADERS,
        "ValidationError",
        "text cannot contain NUL (\\u0000) - at `$.properties`",
        id="nul-in-a-msgpack-nested-string",
    ),
    pytest.param(
        "states",
        None,
        (),
        "EmptyRecord",
        "record has no value (a tombstone)",
        id="tombstone",
    ),
]


@pytest.mark.parametrize(("stream", "value", "headers", "error_class", "reason"), REJECTED)
def test_record_is_rejected_with_its_error_class_and_reason(
    stream: str, value: bytes | None, headers: Any, error_class: str, reason: str
) -> None:
    with pytest.raises(RecordRejected) as caught:
        decode(stream, value, headers)
    assert caught.value.error_class == error_class
    assert reason.lower() in caught.value.reason.lower()
    assert str(caught.value) == caught.value.reason


def test_rejection_reason_of_a_missing_field_is_exact() -> None:
    # The reason names the stream and the column, then what msgspec says was expected.
    with pytest.raises(RecordRejected) as caught:
        decode("events", b'{"agent_id":"a","kind":"k","ts":"2025-06-01T10:00:00Z"}')
    assert (caught.value.error_class, caught.value.reason) == (
        "ValidationError",
        "stream 'events', column event_id: Object missing required field `event_id`",
    )


def test_decoding_keeps_no_state_between_records() -> None:
    # A rejected record in between must not change how the next one decodes.
    good = state_json(version=5)
    first = decode("states", good)
    with pytest.raises(RecordRejected):
        decode("states", state_json(version=-1))
    assert_same_row(decode("states", good), first)


def test_utf8_beyond_ascii_in_a_raw_sub_object_is_kept_as_it_is() -> None:
    data = '{"ville": "Zürich", "emoji": "\U0001f600", "ключ": ["значение"]}'.encode()
    row = decode("states", state_json()[:-1] + b',"data":' + data + b"}")
    assert bytes(row[4]) == data


@pytest.mark.parametrize(
    ("value", "headers"),
    [
        pytest.param(
            msgspec.msgpack.encode(
                {
                    "agent_id": "a",
                    "state": "s",
                    "version": 1,
                    "ts": "2026-01-01T00:00:00Z",
                    "data": {"x": msgspec.msgpack.Ext(1, b"\x00")},
                }
            ),
            (("content-type", b"application/msgpack"),),
            id="msgpack-extension-type-in-a-sub-object",
        ),
        pytest.param(b"{", (("content-type", None),), id="null-content-type-header"),
        pytest.param(
            # A MessagePack timestamp (extension -1, 96 bits) of 9999-12-31T23:59:59Z + 1 s:
            # datetime raises ValueError ("year 10000 is out of range"), not msgspec.
            msgspec.msgpack.encode(
                {
                    **STATE_OK,
                    "ts": msgspec.msgpack.Ext(-1, (0).to_bytes(4) + (253402300800).to_bytes(8)),
                }
            ),
            (("content-type", b"application/msgpack"),),
            id="msgpack-timestamp-after-year-9999",
        ),
    ],
)
def test_odd_input_is_rejected_never_raised(value: bytes, headers: Any) -> None:
    # Anything a producer can put on the wire is a dead letter at worst, never a crash.
    with pytest.raises(RecordRejected) as caught:
        decode("states", value, headers)
    assert caught.value.error_class == "DecodeError"
    assert caught.value.reason


@pytest.mark.parametrize(
    ("stream", "value", "headers"),
    [
        # An escaped backslash followed by "u0000" is six characters of text, no NUL.
        pytest.param("states", state_json(agent_id="\\u0000"), (), id="escaped-backslash"),
        pytest.param(
            "states", state_json(data={"k": "\\\\u0000"}), (), id="two-escaped-backslashes"
        ),
        # A field the record type does not have is ignored, NUL or not.
        pytest.param("states", state_json(unknown="\x00"), (), id="nul-in-an-ignored-field"),
        # MessagePack numbers and lengths are full of 0x00 bytes.
        pytest.param(
            "metrics",
            encode(Metric("a", "cpu", 0.0, datetime(2025, 6, 1, tzinfo=UTC), {"n": 0}), MSGPACK),
            MSGPACK_HEADERS,
            id="msgpack-zero-bytes-outside-strings",
        ),
    ],
)
def test_what_only_looks_like_a_nul_is_kept(stream: str, value: bytes, headers: Any) -> None:
    assert b"\\u0000" in value or b"\x00" in value
    row = decode(stream, value, headers)
    rows, rejected = DECODERS[stream].rows([consumed(5, value, headers)], PARTITION, BATCH_ID)
    assert rejected == []
    assert_same_row(rows[0], (*row[:-2], 5, BATCH_ID))


# -- a partition's records at a time: the fast road and the per-record road agree ------------


def consumed(offset: int, value: bytes | None, headers: Any = ()) -> ConsumerRecord[Any, Any]:
    """A record as aiokafka hands it over (headers as a tuple of tuples)."""
    size = -1 if value is None else len(value)
    return ConsumerRecord(
        "t", PARTITION, offset, 0, 0, None, value, None, -1, size, tuple(map(tuple, headers))
    )


def per_record(stream: str, records: list[ConsumerRecord[Any, Any]]) -> tuple[list[Row], list[Any]]:
    rows, rejected = [], []
    for r in records:
        try:
            rows.append(DECODERS[stream].row(r.value, r.headers, PARTITION, r.offset, BATCH_ID))
        except RecordRejected as exc:
            rejected.append((r, exc.error_class, exc.reason))
    return rows, rejected


@pytest.mark.parametrize("headers", [(), JSON_HEADERS], ids=["no-headers", "json-header"])
@pytest.mark.parametrize("stream", [s.name for s in STREAMS])
def test_valid_records_decode_a_partition_at_a_time_to_the_same_rows(
    stream: str, headers: Any
) -> None:
    values = [value for s, value, _ in (p.values for p in [*VALID, *MINIMAL]) if s == stream]
    records = [consumed(offset, value, headers) for offset, value in enumerate(values, 100)]
    rows, rejected = DECODERS[stream].rows(records, PARTITION, BATCH_ID)
    expected, _ = per_record(stream, records)
    assert rejected == []
    assert len(rows) == len(expected) == len(values) > 0
    for actual, wanted in zip(rows, expected, strict=True):
        assert_same_row(actual, wanted)
    assert [row[-2] for row in rows] == list(range(100, 100 + len(values)))


@pytest.mark.parametrize(("stream", "value", "headers", "error_class", "reason"), REJECTED)
def test_a_bad_record_among_good_ones_is_rejected_alone_and_in_place(
    stream: str, value: bytes | None, headers: Any, error_class: str, reason: str
) -> None:
    good = [value for s, value, _ in (p.values for p in VALID) if s == stream]
    records = [
        consumed(10, good[0]),
        consumed(11, value, headers),
        consumed(12, good[-1], JSON_HEADERS),
    ]
    rows, rejected = DECODERS[stream].rows(records, PARTITION, BATCH_ID)
    expected_rows, expected_rejected = per_record(stream, records)
    assert [r[-2] for r in rows] == [10, 12]
    for actual, wanted in zip(rows, expected_rows, strict=True):
        assert_same_row(actual, wanted)
    assert [tuple(r) for r in rejected] == expected_rejected
    assert [(r.record.offset, r.error_class) for r in rejected] == [(11, error_class)]
    assert reason.lower() in rejected[0].reason.lower()


def test_a_msgpack_record_among_json_ones_decodes_to_its_row() -> None:
    (record,) = RECORDS[0].values
    stream = _stream_of(record)
    json_value = encode(record)
    records = [consumed(0, json_value), consumed(1, encode(record, MSGPACK), MSGPACK_HEADERS)]
    rows, rejected = DECODERS[stream].rows(records, PARTITION, BATCH_ID)
    assert rejected == []
    assert [r[:-3] for r in rows] == [decode(stream, json_value)[:-3]] * 2


@pytest.mark.parametrize("stream", [s.name for s in STREAMS])
def test_msgpack_records_decode_a_partition_at_a_time_to_the_same_rows(
    stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = [r for (r,) in (p.values for p in RECORDS) if _stream_of(r) == stream]
    records = [consumed(o, encode(r, MSGPACK), MSGPACK_HEADERS) for o, r in enumerate(sent, 100)]
    expected, _ = per_record(stream, records)

    def no_per_record_road(*args: Any, **kwargs: Any) -> Row:
        raise AssertionError("the per-record road was taken")

    monkeypatch.setattr(DECODERS[stream], "row", no_per_record_road)
    rows, rejected = DECODERS[stream].rows(records, PARTITION, BATCH_ID)
    assert rejected == []
    assert len(rows) == len(expected) == len(sent) > 0
    for actual, wanted in zip(rows, expected, strict=True):
        assert_same_row(actual, wanted)


def test_a_nul_in_a_msgpack_batch_is_rejected_alone() -> None:
    good = Metric("a", "cpu", 0.0, T0, {"n": 0})
    bad = [Metric("a", "cpu\x00", 1.0, T0), Metric("a", "cpu", 1.0, T0, {"k": "\x00"})]
    for nul in bad:
        values = [encode(good, MSGPACK), encode(nul, MSGPACK), encode(good, MSGPACK)]
        records = [consumed(o, v, MSGPACK_HEADERS) for o, v in enumerate(values)]
        rows, rejected = DECODERS["metrics"].rows(records, PARTITION, BATCH_ID)
        assert [r[-2] for r in rows] == [0, 2]
        assert [(r.record.offset, r.error_class) for r in rejected] == [(1, "ValidationError")]
        assert "text cannot contain NUL (\\u0000) - at `$." in rejected[0].reason
