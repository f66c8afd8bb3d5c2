"""Decoders compiled from the catalog: every column type at its edges, every source, paths,
defaults, nullable columns, tombstones, and reasons that name the stream and the column
(docs/streams.md)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import msgspec
import pytest

from pipeline import catalog, redrive
from pipeline.batching import Row
from pipeline.catalog import CatalogError, StreamSpec
from pipeline.rows import RecordRejected, Tombstone, decoder

PARTITION, OFFSET, BATCH_ID = 2, 40, 9
PROVENANCE = (PARTITION, OFFSET, BATCH_ID)
MSGPACK = [("content-type", b"application/msgpack")]
ORDER_ID = "6f1c2a34-8b5d-4e7f-9a01-23456789abcd"


class Rec(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    serialized_value_size: int
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp: int


def stream(columns: str, head: str = "", name: str = "s") -> StreamSpec:
    """A one-stream catalog's stream, from TOML lines of ``[streams.columns]``."""
    text = (
        f'[[streams]]\nname = "{name}"\ntopic = "t.{name}"\ntable = "{name}_t"\n{head}\n'
        f"[streams.columns]\n{columns}\n"
    )
    _, streams = catalog.parse(text, "test.toml")
    return catalog.validate(streams)[name]


def decode(
    spec: StreamSpec,
    value: bytes | None,
    headers: Any = (),
    key: bytes | None = None,
    timestamp: int | None = None,
) -> Row:
    return decoder(spec).row(
        value, headers, PARTITION, OFFSET, BATCH_ID, key=key, timestamp=timestamp
    )


def rejected(spec: StreamSpec, value: bytes | None, headers: Any = (), **kw: Any) -> str:
    with pytest.raises(RecordRejected) as caught:
        decode(spec, value, headers, **kw)
    assert caught.value.error_class == "ValidationError", caught.value.reason
    return caught.value.reason


def one(decl: str, json: bytes, **kw: Any) -> Any:
    """The value column ``x`` declared as ``decl`` decodes from ``{"x": json}`` to this."""
    row = decode(stream(f"x = {decl}"), b'{"x": ' + json + b"}", **kw)
    assert row[1:] == PROVENANCE
    return row[0]


def one_reason(decl: str, json: bytes) -> str:
    return rejected(stream(f"x = {decl}"), b'{"x": ' + json + b"}")


def same_type(actual: Any, expected: Any) -> None:
    assert actual == expected
    assert type(actual) is type(expected)


# -- numeric: exact --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("json", "expected"),
    [
        (b"0.1000000000000000000000000000001", "0.1000000000000000000000000000001"),
        (b"123456789012345678901234567890.123456789", "123456789012345678901234567890.123456789"),
        (b"-0.00", "-0.00"),
        (b"1.50", "1.50"),
        (b"1e3", "1E+3"),
        (b"12345678901234567890123456789", "12345678901234567890123456789"),
        (b'"99.990"', "99.990"),  # a string keeps its digits too
        (b'"NaN"', "NaN"),
        (b"1e131071", "1E+131071"),
        (b"1e-16383", "1E-16383"),
    ],
)
def test_numeric_is_exact(json: bytes, expected: str) -> None:
    value = one('"numeric"', json)
    assert isinstance(value, Decimal)
    assert str(value) == expected


@pytest.mark.parametrize(
    "json",
    [b'"Infinity"', b'"-Infinity"', b'"sNaN"', b"1e131072", b"1e-16384", b"true", b'"ten"'],
)
def test_numeric_out_of_postgresql_range_or_not_a_number_is_refused(json: bytes) -> None:
    reason = one_reason('"numeric"', json)
    assert reason.startswith("stream 's', column x: ")
    assert reason.endswith(" - at `$.x`")


def test_numeric_from_msgpack_strings_and_integers() -> None:
    spec = stream('x = "numeric"')
    for value, expected in (("0.10", "0.10"), (7, "7"), (-(2**63), str(-(2**63)))):
        row = decode(spec, msgspec.msgpack.encode({"x": value}), MSGPACK)
        assert str(row[0]) == expected


# -- timestamptz: RFC 3339 with an offset, or epoch numbers ----------------------------------


@pytest.mark.parametrize(
    ("json", "expected"),
    [
        (b'"2025-06-01T12:00:00Z"', datetime(2025, 6, 1, 12, tzinfo=UTC)),
        (
            b'"2025-06-01T12:00:00.123456+02:00"',
            datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
        ),
        (
            b'"2025-06-01T12:00:00-05:30"',
            datetime(2025, 6, 1, 12, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
        ),
    ],
)
def test_timestamp_with_an_offset_keeps_it(json: bytes, expected: datetime) -> None:
    value = one('"timestamptz"', json)
    assert value == expected and value.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    ("json", "message"),
    [
        (b'"2025-06-01T12:00:00"', "Expected `datetime` with a timezone component"),
        (b'"2025-06-01"', "Invalid RFC3339 encoded datetime"),
        (b"1717243200", "Expected `datetime`, got `int`"),
        (b"null", "Expected `datetime`, got `null`"),
    ],
)
def test_timestamp_without_an_offset_is_refused(json: bytes, message: str) -> None:
    assert one_reason('"timestamptz"', json) == f"stream 's', column x: {message} - at `$.x`"


T = datetime(2024, 6, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("unit", "json", "expected"),
    [
        ("s", b"1717243200", T),
        ("s", b"1717243200.5", T + timedelta(milliseconds=500)),
        ("s", b"-1", datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("s", b"0", datetime(1970, 1, 1, tzinfo=UTC)),
        ("ms", b"1717243200123", T + timedelta(milliseconds=123)),
        ("ms", b"1717243200123.5", T + timedelta(microseconds=123500)),
        ("us", b"1717243200123456", T + timedelta(microseconds=123456)),
        ("ns", b"1717243200123456789", T + timedelta(microseconds=123457)),  # rounded
        ("ns", b"1717243200123456499", T + timedelta(microseconds=123456)),
        ("s", b"253402300799", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_epoch_numbers_in_every_unit(unit: str, json: bytes, expected: datetime) -> None:
    value = one(f'{{ type = "timestamptz", unit = "{unit}" }}', json)
    assert value == expected and value.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("json", "message"),
    [
        (b"253402300800", "Expected an epoch time in s within years 1 to 9999"),
        (b"1e300", "Expected an epoch time in s within years 1 to 9999"),
        (b'"1717243200"', "Expected `int | float`, got `str`"),
        (b'"2025-06-01T12:00:00Z"', "Expected `int | float`, got `str`"),
        (b"true", "Expected `int | float`, got `bool`"),
    ],
)
def test_epoch_out_of_range_or_not_a_number_is_refused(json: bytes, message: str) -> None:
    reason = one_reason('{ type = "timestamptz", unit = "s" }', json)
    assert reason == f"stream 's', column x: {message} - at `$.x`"


# -- uuid, booleans, integers, floats, dates, bytea ------------------------------------------


@pytest.mark.parametrize(
    "json",
    [
        b'"6f1c2a34-8b5d-4e7f-9a01-23456789abcd"',
        b'"6F1C2A34-8B5D-4E7F-9A01-23456789ABCD"',
        b'"6f1c2a348b5d4e7f9a0123456789abcd"',
    ],
)
def test_uuid_forms(json: bytes) -> None:
    same_type(one('"uuid"', json), uuid.UUID(ORDER_ID))


def test_uuid_from_msgpack_binary() -> None:
    row = decode(
        stream('x = "uuid"'), msgspec.msgpack.encode({"x": uuid.UUID(ORDER_ID).bytes}), MSGPACK
    )
    same_type(row[0], uuid.UUID(ORDER_ID))


@pytest.mark.parametrize(
    "json",
    [
        b'"{6f1c2a34-8b5d-4e7f-9a01-23456789abcd}"',
        b'"urn:uuid:6f1c2a34-8b5d-4e7f-9a01-23456789abcd"',
        b'"6f1c2a34-8b5d-4e7f-9a01-23456789abc"',
        b'"not-a-uuid"',
    ],
)
def test_malformed_uuid_is_refused(json: bytes) -> None:
    assert one_reason('"uuid"', json) == "stream 's', column x: Invalid UUID - at `$.x`"


def test_booleans_are_booleans() -> None:
    same_type(one('"boolean"', b"true"), True)
    same_type(one('"boolean"', b"false"), False)
    for json, came in ((b"1", "int"), (b"0", "int"), (b'"true"', "str"), (b"null", "null")):
        assert one_reason('"boolean"', json) == (
            f"stream 's', column x: Expected `bool`, got `{came}` - at `$.x`"
        )


@pytest.mark.parametrize(
    ("kind", "low", "high"),
    [
        ("smallint", -(2**15), 2**15 - 1),
        ("integer", -(2**31), 2**31 - 1),
        ("bigint", -(2**63), 2**63 - 1),
    ],
)
def test_integers_at_their_edges(kind: str, low: int, high: int) -> None:
    same_type(one(f'"{kind}"', str(low).encode()), low)
    same_type(one(f'"{kind}"', str(high).encode()), high)
    assert one_reason(f'"{kind}"', str(high + 1).encode()) == (
        f"stream 's', column x: Expected `int` <= {high} - at `$.x`"
    )
    assert one_reason(f'"{kind}"', str(low - 1).encode()) == (
        f"stream 's', column x: Expected `int` >= {low} - at `$.x`"
    )
    assert one_reason(f'"{kind}"', b"1.0") == (
        "stream 's', column x: Expected `int`, got `float` - at `$.x`"
    )
    assert one_reason(f'"{kind}"', b'"1"') == (
        "stream 's', column x: Expected `int`, got `str` - at `$.x`"
    )


def test_integer_far_beyond_64_bits_is_refused() -> None:
    assert one_reason('"bigint"', b"9" * 40).startswith("stream 's', column x: Expected `int` <=")


def test_floats() -> None:
    same_type(one('"double precision"', b"12"), 12.0)
    same_type(one('"double precision"', b"1e308"), 1e308)
    same_type(one('"real"', b"3.4e38"), 3.4e38)
    same_type(one('"real"', b"-1.5"), -1.5)
    assert one_reason('"real"', b"3.5e38") == (
        "stream 's', column x: Expected `float` within real's range (3.4e38), got a larger "
        "number - at `$.x`"
    )
    assert one_reason('"double precision"', b'"1.5"') == (
        "stream 's', column x: Expected `float`, got `str` - at `$.x`"
    )


def test_real_refuses_a_batch_member_out_of_range_on_the_batch_road_too() -> None:
    spec = stream('x = "real"')
    records = [Rec("t", 0, i, None, v, 0, (), 0) for i, v in enumerate([b'{"x":1}', b'{"x":1e39}'])]
    rows, dead = decoder(spec).rows(records, 0, 1)
    assert rows == [(1.0, 0, 0, 1)]
    assert [(d.record.offset, d.reason) for d in dead] == [
        (
            1,
            "stream 's', column x: Expected `float` within real's range (3.4e38), got a larger "
            "number - at `$.x`",
        )
    ]


def test_date() -> None:
    same_type(one('"date"', b'"2025-06-01"'), date(2025, 6, 1))
    assert one_reason('"date"', b'"2025-06-01T00:00:00Z"') == (
        "stream 's', column x: Invalid RFC3339 encoded date - at `$.x`"
    )


def test_bytea_is_base64_in_json_and_raw_in_msgpack() -> None:
    same_type(one('"bytea"', b'"AP8Q"'), b"\x00\xff\x10")
    assert one_reason('"bytea"', b'"AP8"') == (
        "stream 's', column x: Invalid base64 encoded string - at `$.x`"
    )
    spec = stream('x = "bytea"')
    same_type(
        decode(spec, msgspec.msgpack.encode({"x": b"\x00\xff\x10"}), MSGPACK)[0], b"\x00\xff\x10"
    )
    assert rejected(spec, msgspec.msgpack.encode({"x": "AP8Q"}), MSGPACK) == (
        "stream 's', column x: Expected `bytes`, got `str` - at `$.x`"
    )


def test_text_refuses_nul_and_other_types() -> None:
    assert one_reason('"text"', b'"a\\u0000b"') == (
        "stream 's', column x: text cannot contain NUL (\\u0000) - at `$.x`"
    )
    assert (
        one_reason('"text"', b"5") == "stream 's', column x: Expected `str`, got `int` - at `$.x`"
    )


# -- jsonb: kept byte for byte ---------------------------------------------------------------


@pytest.mark.parametrize(
    "json",
    [
        b'{ "a" : [1, 2.50, {"b": null}], "\\u00e9": "x\\"y" }',
        b"[ 1,2 ]",
        b'"text"',
        b"1.000",
        b"true",
        b"null",
        '{"ville": "Zürich"}'.encode(),
    ],
)
def test_jsonb_keeps_the_bytes(json: bytes) -> None:
    value = one('"jsonb"', json)
    assert isinstance(value, msgspec.Raw) and bytes(value) == json


def test_jsonb_object_refuses_other_json() -> None:
    decl = '{ type = "jsonb", object = true }'
    assert bytes(one(decl, b'{"k": 1}')) == b'{"k": 1}'
    for json in (b"[1]", b"null", b'"{}"', b"1"):
        assert one_reason(decl, json) == "stream 's', column x: Expected `object` - at `$.x`"


def test_jsonb_from_msgpack_is_json_text() -> None:
    spec = stream('x = "jsonb"\ny = { type = "jsonb", nullable = true }')
    row = decode(spec, msgspec.msgpack.encode({"x": {"a": [1, None]}, "y": None}), MSGPACK)
    assert bytes(row[0]) == b'{"a":[1,null]}'
    assert row[1] is None


def test_jsonb_nul_is_refused() -> None:
    assert one_reason('"jsonb"', b'{"k": "\\u0000"}') == (
        "stream 's', column x: text cannot contain NUL (\\u0000) - at `$.x`"
    )


# -- paths -----------------------------------------------------------------------------------

NESTED = stream(
    """
id = "bigint"
customer = { type = "text", path = "customer.id" }
tier = { type = "text", path = "customer.profile.tier", default = "basic" }
note = { type = "text", path = "meta.note", nullable = true }
extra = { type = "jsonb", path = "meta.extra", nullable = true }
"""
)


def test_nested_paths() -> None:
    value = (
        b'{"id": 1, "customer": {"id": "c-1", "profile": {"tier": "gold", "x": 1}},'
        b' "meta": {"note": "n", "extra": {"z": [1]}}, "other": 2}'
    )
    row = decode(NESTED, value)
    assert row[:4] == (1, "c-1", "gold", "n")
    assert bytes(row[4]) == b'{"z": [1]}'


@pytest.mark.parametrize(
    "meta", [b"", b', "meta": null', b', "meta": {}', b', "meta": {"note": null, "extra": null}']
)
def test_an_optional_object_absent_or_null_leaves_its_columns_absent(meta: bytes) -> None:
    row = decode(NESTED, b'{"id": 1, "customer": {"id": "c", "profile": null}' + meta + b"}")
    assert row == (1, "c", "basic", None, None, *PROVENANCE)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (
            b'{"id": 1}',
            "stream 's', columns customer, tier: Object missing required field `customer`",
        ),
        (
            b'{"id": 1, "customer": {}}',
            "stream 's', column customer: Object missing required field `id` - at `$.customer`",
        ),
        (
            b'{"id": 1, "customer": null}',
            "stream 's', columns customer, tier: Expected `object`, got `null` - at `$.customer`",
        ),
        (
            b'{"id": 1, "customer": {"id": 5}}',
            "stream 's', column customer: Expected `str`, got `int` - at `$.customer.id`",
        ),
        (
            b'{"id": 1, "customer": {"id": "c"}, "meta": {"extra": 1, "note": 2}}',
            "stream 's', column note: Expected `str | null`, got `int` - at `$.meta.note`",
        ),
    ],
)
def test_nested_reasons_name_the_column(value: bytes, reason: str) -> None:
    assert rejected(NESTED, value) == reason


def test_nested_paths_from_msgpack_decode_to_the_same_row() -> None:
    value = {"id": 1, "customer": {"id": "c-1"}, "meta": {"extra": {"z": [1]}}}
    row = decode(NESTED, msgspec.msgpack.encode(value), MSGPACK)
    assert row[:4] == (1, "c-1", "basic", None)
    assert bytes(row[4]) == b'{"z":[1]}'


def test_a_field_fills_one_column() -> None:
    with pytest.raises(CatalogError, match=r"columns\.b: path 'a\.c' is column 'a'"):
        stream('a = "jsonb"\nb = { type = "text", path = "a.c" }')
    with pytest.raises(CatalogError, match=r"columns\.a: path 'v' is column 'b'"):
        stream('a = { type = "text", path = "v" }\nb = { type = "text", path = "v" }')


# -- key, header and timestamp sources -------------------------------------------------------

SOURCES = stream(
    """
id = { type = "bigint", source = "key" }
trace = { type = "text", source = "header:trace" }
tries = { type = "smallint", source = "header:tries", default = 0 }
at = { type = "timestamptz", source = "timestamp" }
at_ms = { type = "bigint", source = "timestamp" }
v = "text"
"""
)
TS_MS = 1717243200123


def test_key_header_and_timestamp_sources() -> None:
    row = decode(
        SOURCES,
        b'{"v": "x", "id": 99}',
        [("trace", b"abc"), ("tries", b"3")],
        key=b"42",
        timestamp=TS_MS,
    )
    assert row == (42, "abc", 3, T + timedelta(milliseconds=123), TS_MS, "x", *PROVENANCE)
    assert row[3].utcoffset() == timedelta(0)


def test_an_absent_header_takes_the_default_and_a_null_header_is_absent() -> None:
    row = decode(SOURCES, b'{"v": "x"}', [("trace", b"t"), ("tries", None)], b"1", TS_MS)
    assert row[2] == 0


@pytest.mark.parametrize(
    ("headers", "key", "timestamp", "reason"),
    [
        (
            [("trace", b"t")],
            None,
            TS_MS,
            "stream 's', column id: Expected `bigint`, got nothing - at the Kafka key",
        ),
        (
            [("trace", b"t")],
            b"4x",
            TS_MS,
            "stream 's', column id: Expected `bigint`, got text that is not one (JSON is "
            "malformed: trailing characters (byte 2)) - at the Kafka key",
        ),
        (
            [("trace", b"t")],
            b"1.5",
            TS_MS,
            "stream 's', column id: Expected `int`, got `float` - at the Kafka key",
        ),
        (
            [],
            b"1",
            TS_MS,
            "stream 's', column trace: Expected `text`, got nothing - at header `trace`",
        ),
        (
            [("trace", b"\xff")],
            b"1",
            TS_MS,
            "stream 's', column trace: Expected UTF-8 text, got bytes that are not - at "
            "header `trace`",
        ),
        (
            [("trace", b"a\x00")],
            b"1",
            TS_MS,
            "stream 's', column trace: text cannot contain NUL (\\u0000) - at header `trace`",
        ),
        (
            [("trace", b"t"), ("tries", b"40000")],
            b"1",
            TS_MS,
            "stream 's', column tries: Expected `int` <= 32767 - at header `tries`",
        ),
        (
            [("trace", b"t")],
            b"1",
            -1,
            "stream 's', column at: Expected a record timestamp, got none - at the Kafka timestamp",
        ),
    ],
)
def test_source_reasons_name_the_column(
    headers: Any, key: bytes | None, timestamp: int, reason: str
) -> None:
    assert rejected(SOURCES, b'{"v": "x"}', headers, key=key, timestamp=timestamp) == reason


def test_sources_on_the_batch_road() -> None:
    records = [
        Rec("t", PARTITION, 7, b"5", b'{"v": "a"}', 9, (("trace", b"t"),), TS_MS),
        Rec("t", PARTITION, 8, None, b'{"v": "b"}', 9, (("trace", b"t"),), TS_MS),
    ]
    rows, dead = decoder(SOURCES).rows(records, PARTITION, BATCH_ID)
    assert rows == [
        (5, "t", 0, T + timedelta(milliseconds=123), TS_MS, "a", PARTITION, 7, BATCH_ID)
    ]
    assert [(d.record.offset, d.error_class) for d in dead] == [(8, "ValidationError")]


@pytest.mark.parametrize(
    ("decl", "key", "expected"),
    [
        ('"text"', "k-ü", "k-ü"),
        ('"uuid"', ORDER_ID, uuid.UUID(ORDER_ID)),
        ('"boolean"', "true", True),
        ('"numeric"', "1.10", Decimal("1.10")),
        ('"date"', "2025-06-01", date(2025, 6, 1)),
        ('"timestamptz"', "2025-06-01T12:00:00Z", datetime(2025, 6, 1, 12, tzinfo=UTC)),
        ('{ type = "timestamptz", unit = "ms" }', "1717243200123", T + timedelta(milliseconds=123)),
        ('"double precision"', "2.5", 2.5),
        ('"bytea"', "AP8=", b"\x00\xff"),
    ],
)
def test_key_text_converts_to_every_type(decl: str, key: str, expected: Any) -> None:
    head = (
        decl[:-1] + ', source = "key" }'
        if decl.startswith("{")
        else f'{{ type = {decl}, source = "key" }}'
    )
    spec = stream(f'k = {head}\nv = "text"')
    row = decode(spec, b'{"v": ""}', key=key.encode())
    same_type(row[0], expected)


def test_key_jsonb_is_json_text_kept() -> None:
    spec = stream('k = { type = "jsonb", source = "key" }\nv = "text"')
    assert bytes(decode(spec, b'{"v": ""}', key=b'{"a": 1}')[0]) == b'{"a": 1}'
    assert rejected(spec, b'{"v": ""}', key=b"{a}").startswith(
        "stream 's', column k: Expected `jsonb`, got text that is not one"
    )


def test_booleans_from_a_key_are_strict() -> None:
    spec = stream('k = { type = "boolean", source = "key" }\nv = "text"')
    assert rejected(spec, b'{"v": ""}', key=b"1") == (
        "stream 's', column k: Expected `bool`, got `int` - at the Kafka key"
    )


# -- defaults and nullable columns -----------------------------------------------------------

DEFAULTS = stream(
    """
t = { type = "text", default = "new" }
n = { type = "integer", default = 5 }
d = { type = "numeric", default = "1.50" }
at = { type = "timestamptz", default = 2025-06-01T00:00:00Z }
ms = { type = "timestamptz", unit = "ms", default = 2025-06-01T00:00:00Z }
j = { type = "jsonb", default = { a = 1 } }
b = { type = "boolean", default = false }
both = { type = "text", default = "dflt", nullable = true }
"""
)
DEFAULT_ROW = (
    "new",
    5,
    Decimal("1.50"),
    datetime(2025, 6, 1, tzinfo=UTC),
    datetime(2025, 6, 1, tzinfo=UTC),
    msgspec.Raw(b'{"a":1}'),
    False,
    "dflt",
)


def _bytes_of(row: Row) -> tuple[Any, ...]:
    return tuple(bytes(v) if isinstance(v, msgspec.Raw) else v for v in row)


def test_absent_fields_take_their_defaults() -> None:
    assert _bytes_of(decode(DEFAULTS, b"{}")) == _bytes_of((*DEFAULT_ROW, *PROVENANCE))
    msgpack = decode(DEFAULTS, msgspec.msgpack.encode({}), MSGPACK)
    assert _bytes_of(msgpack) == _bytes_of((*DEFAULT_ROW, *PROVENANCE))


def test_a_null_is_no_default() -> None:
    assert rejected(DEFAULTS, b'{"t": null}') == (
        "stream 's', column t: Expected `str`, got `null` - at `$.t`"
    )
    # Nullable with a default: absent is the default, null is NULL.
    assert decode(DEFAULTS, b'{"both": null}')[7] is None


@pytest.mark.parametrize("kind", [k for k in catalog.TYPES])
def test_nullable_columns_of_every_type_take_absent_and_null_as_none(kind: str) -> None:
    spec = stream(f'x = {{ type = "{kind}", nullable = true }}\nv = "text"')
    for value in (b'{"v": ""}', b'{"v": "", "x": null}'):
        assert decode(spec, value)[0] is None
    for fields in ({"v": ""}, {"v": "", "x": None}):
        assert decode(spec, msgspec.msgpack.encode(fields), MSGPACK)[0] is None


@pytest.mark.parametrize("kind", [k for k in catalog.TYPES if k != "jsonb"])
def test_a_required_column_of_every_type_refuses_absent_and_null(kind: str) -> None:
    spec = stream(f'x = "{kind}"\nv = "text"')
    assert rejected(spec, b'{"v": ""}') == (
        "stream 's', column x: Object missing required field `x`"
    )
    assert rejected(spec, b'{"v": "", "x": null}').startswith("stream 's', column x: Expected `")
    assert rejected(spec, b'{"v": "", "x": null}').endswith("got `null` - at `$.x`")


# -- versions --------------------------------------------------------------------------------


def test_a_negative_integer_version_is_refused() -> None:
    spec = stream(
        'k = "text"\nrev = "integer"',
        head='mode = "latest"\nkey = ["k"]\nversion = "rev"',
    )
    assert decode(spec, b'{"k": "a", "rev": 0}')[1] == 0
    assert rejected(spec, b'{"k": "a", "rev": -1}') == (
        "stream 's', column rev: Expected `int` >= 0 - at `$.rev`"
    )
    assert rejected(spec, b'{"k": "a", "rev": 2147483648}') == (
        "stream 's', column rev: Expected `int` <= 2147483647 - at `$.rev`"
    )


# -- tombstones ------------------------------------------------------------------------------

ORDERS = stream(
    """
order_id = "uuid"
customer = { type = "text", path = "customer.id" }
amount = "numeric"
status = { type = "text", default = "new" }
placed_at = "timestamptz"
shipped_at = { type = "timestamptz", unit = "ms", nullable = true }
items = "jsonb"
revision = "bigint"
region = { type = "text", source = "key" }
""",
    head='mode = "latest"\nkey = ["order_id"]\nversion = "revision"\ntombstones = "delete"',
    name="orders",
)
ORDER = (
    b'{"order_id": "' + ORDER_ID.encode() + b'", "customer": {"id": "c-9"}, "amount": 10.25,'
    b' "placed_at": "2025-06-01T12:00:00+02:00", "shipped_at": 1717243200123,'
    b' "items": [{"sku": "a", "qty": 2}], "revision": 3}'
)


def test_the_issue_example_decodes() -> None:
    row = decode(ORDERS, ORDER, key=b"eu")
    assert row[:6] == (
        uuid.UUID(ORDER_ID),
        "c-9",
        Decimal("10.25"),
        "new",
        datetime(2025, 6, 1, 12, tzinfo=timezone(timedelta(hours=2))),
        T + timedelta(milliseconds=123),
    )
    assert bytes(row[6]) == b'[{"sku": "a", "qty": 2}]'
    assert row[7:] == (3, "eu", *PROVENANCE)
    assert not isinstance(row, Tombstone)


def test_the_issue_example_from_msgpack_is_the_same_row() -> None:
    value = msgspec.json.decode(ORDER)
    row = decode(ORDERS, msgspec.msgpack.encode(value), MSGPACK, key=b"eu")
    expected = decode(ORDERS, ORDER, key=b"eu")
    assert row[:6] == expected[:6] and row[7:] == expected[7:]
    assert bytes(row[6]) == msgspec.json.encode(value["items"])


def test_a_tombstone_is_a_row_that_deletes_by_the_kafka_key() -> None:
    row = decode(ORDERS, None, key=ORDER_ID.encode())
    assert isinstance(row, Tombstone)
    assert row == (uuid.UUID(ORDER_ID), *[None] * 8, *PROVENANCE)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (
            None,
            "stream 'orders', column order_id: a tombstone (a record without a value) needs a "
            "Kafka key, got none - at the Kafka key",
        ),
        (b"nope", "stream 'orders', column order_id: Invalid UUID - at the Kafka key"),
        (
            b"\xff",
            "stream 'orders', column order_id: Expected UTF-8 text, got bytes that are not - "
            "at the Kafka key",
        ),
    ],
)
def test_a_tombstone_without_a_usable_key_is_refused(key: bytes | None, reason: str) -> None:
    assert rejected(ORDERS, None, key=key) == reason


def test_tombstones_on_the_batch_road() -> None:
    records = [
        Rec("t", PARTITION, 1, b"eu", ORDER, 9, (), 0),
        Rec("t", PARTITION, 2, ORDER_ID.encode(), None, -1, (), 0),
        Rec("t", PARTITION, 3, None, None, -1, (), 0),
    ]
    rows, dead = decoder(ORDERS).rows(records, PARTITION, BATCH_ID)
    assert [type(r) for r in rows] == [tuple, Tombstone]
    assert [r[-2] for r in rows] == [1, 2]
    assert [(d.record.offset, d.error_class) for d in dead] == [(3, "ValidationError")]


def test_a_null_value_on_a_stream_that_ignores_tombstones_is_an_empty_record() -> None:
    spec = stream('k = "text"', head='mode = "latest"\nkey = ["k"]')
    with pytest.raises(RecordRejected) as caught:
        decode(spec, None, key=b"k")
    assert (caught.value.error_class, caught.value.reason) == (
        "EmptyRecord",
        "record has no value (a tombstone)",
    )


# -- reasons ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (
            ORDER.replace(b'"amount": 10.25', b'"amount": "ten"'),
            "stream 'orders', column amount: Invalid decimal string - at `$.amount`",
        ),
        (
            ORDER.replace(b', "revision": 3', b""),
            "stream 'orders', column revision: Object missing required field `revision`",
        ),
        (
            ORDER.replace(b'"revision": 3', b'"revision": null'),
            "stream 'orders', column revision: Expected `int`, got `null` - at `$.revision`",
        ),
        (
            ORDER.replace(b'"revision": 3', b'"revision": 9223372036854775808'),
            "stream 'orders', column revision: Expected `int` <= 9223372036854775807 - at "
            "`$.revision`",
        ),
        (
            ORDER.replace(b"+02:00", b""),
            "stream 'orders', column placed_at: Expected `datetime` with a timezone component "
            "- at `$.placed_at`",
        ),
        (
            ORDER.replace(ORDER_ID.encode(), b"6f1c2a34"),
            "stream 'orders', column order_id: Invalid UUID - at `$.order_id`",
        ),
        (b"[1]", "stream 'orders': Expected `object`, got `array`"),
    ],
)
def test_every_reason_names_the_stream_and_the_column(value: bytes, reason: str) -> None:
    assert rejected(ORDERS, value, key=b"eu") == reason


def test_a_reason_never_holds_the_value() -> None:
    secret = "s3cr3t-" * 50
    value = ORDER.replace(b'"amount": 10.25', b'"amount": "' + secret.encode() + b'"')
    assert secret[:7] not in rejected(ORDERS, value, key=b"eu")
    assert secret[:7] not in rejected(ORDERS, ORDER, key=secret.encode() + b"\xff")


# -- compiled once ---------------------------------------------------------------------------


def test_one_decoder_per_spec_and_builtin_streams_take_the_fast_road() -> None:
    builtin = catalog.load()
    for spec in builtin:
        assert decoder(spec) is decoder(spec)
        assert decoder(spec)._flat, spec.name
    assert not decoder(ORDERS)._flat
    assert not decoder(NESTED)._flat


def test_a_flat_stream_keeps_the_fast_road_and_its_tombstones() -> None:
    spec = stream(
        'k = "integer"\nv = { type = "real", nullable = true }\nn = "numeric"',
        head='mode = "latest"\nkey = ["k"]\ntombstones = "delete"',
    )
    assert decoder(spec)._flat
    records = [
        Rec("t", PARTITION, 1, b"7", b'{"k": 7, "n": 0.10}', 9, (), 0),
        Rec("t", PARTITION, 2, b"7", None, -1, (), 0),
        Rec("t", PARTITION, 3, b"8", b'{"k": 8, "v": 1.5, "n": "NaN"}', 9, (), 0),
    ]
    rows, dead = decoder(spec).rows(records, PARTITION, BATCH_ID)
    assert dead == []
    assert [type(r) for r in rows] == [tuple, Tombstone, tuple]
    assert rows[0] == (7, None, Decimal("0.10"), PARTITION, 1, BATCH_ID)
    assert rows[1] == (7, None, None, PARTITION, 2, BATCH_ID)
    assert rows[2][:2] == (8, 1.5) and rows[2][2].is_nan()
    rows, dead = decoder(spec).rows(records[:1] + records[2:], PARTITION, BATCH_ID)
    assert [r[-2] for r in rows] == [1, 3] and dead == []


@pytest.mark.parametrize("spec", [ORDERS, NESTED, SOURCES, DEFAULTS], ids=lambda s: s.name)
def test_clean_json_batches_take_the_list_road_to_the_same_rows(
    spec: StreamSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "orders": [ORDER, ORDER.replace(b', "shipped_at": 1717243200123', b"")],
        "s": [b'{"v": "x", "id": 1}'],
    }.get(spec.name, [])
    if spec is NESTED:
        values = [
            b'{"id": 1, "customer": {"id": "c", "profile": {"tier": "t"}},'
            b' "meta": {"note": "n", "extra": [1]}}',
            b'{"id": 2, "customer": {"id": "d", "profile": {}}, "meta": {"extra": null}}',
        ]
    if spec is DEFAULTS:
        values = [b"{}", b'{"both": null, "ms": 1.5, "j": [2]}', b'{"both": "b", "d": 2.5}']
    headers = (("trace", b"t"), ("content-type", b"application/json"))
    records = [
        Rec("t", PARTITION, offset, b"17", value, len(value), headers, TS_MS)
        for offset, value in enumerate(values * 2)
    ]
    dec = decoder(spec)
    expected = [
        dec.row(r.value, r.headers, PARTITION, r.offset, BATCH_ID, key=r.key, timestamp=r.timestamp)
        for r in records
    ]

    def no_per_record_road(*args: Any, **kwargs: Any) -> Row:
        raise AssertionError("the per-record road was taken")

    monkeypatch.setattr(dec, "row", no_per_record_road)
    rows, dead = dec.rows(records, PARTITION, BATCH_ID)
    assert dead == []
    assert list(map(_bytes_of, rows)) == list(map(_bytes_of, expected))
    assert [type(r) for r in rows] == [tuple] * len(records)


def test_an_absent_optional_object_in_a_batch_is_decoded_record_by_record() -> None:
    records = [
        Rec(
            "t",
            PARTITION,
            1,
            None,
            b'{"id": 1, "customer": {"id": "c", "profile": null}}',
            9,
            (),
            0,
        ),
        Rec(
            "t",
            PARTITION,
            2,
            None,
            b'{"id": 2, "customer": {"id": "c"}, "meta": {"note": "a"}}',
            9,
            (),
            0,
        ),
    ]
    rows, dead = decoder(NESTED).rows(records, PARTITION, BATCH_ID)
    assert dead == []
    assert [r[:4] for r in rows] == [(1, "c", "basic", None), (2, "c", "basic", "a")]


@pytest.mark.parametrize("ms", [0, -1, 1, 1717243200123, 1717243200999, 253402300799999])
def test_a_dead_letters_stored_timestamp_is_its_kafka_timestamp_again(ms: int) -> None:
    # dead_letters.record_ts is to_timestamp(ms / 1000.0): a float, at microseconds.
    stored = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    for error in (-1, 0, 1):  # a float's error, in microseconds
        assert redrive._epoch_ms(stored + timedelta(microseconds=error)) == ms
