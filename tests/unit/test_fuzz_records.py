"""Fuzzing the record decoders: every input is a row or a dead letter with a reason.

The target is what the DatabaseAgent calls on each fetched batch,
``pipeline.rows.decoder(spec).rows``: it returns the rows and the rejected records (the
dead letters to be, each with an error class and a reason) and must raise nothing, whatever
the bytes and headers. ``FUZZ_INPUTS`` records (default 100,000) of every stream are decoded:
valid records mutated field by field (removed, added, wrong types, nulls, huge numbers, NaN,
odd or very long strings, surrogates, deep nesting, bad timestamps, empty values), in JSON
or MessagePack, under odd content types, plus byte-level mutants of each (truncations, bit
flips, splices, parser tokens) and random bytes. Every decoded row is checked against its
table's columns, and a batch decoded at once gives the same rows and reasons as its records
decoded one by one (the fast road and the record-by-record road agree).
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import catalog
from pipeline.batching import Row
from pipeline.records import (
    CONTENT_TYPE_HEADER,
    JSON,
    MSGPACK,
    AgentEvent,
    AnalyticsEvent,
    ConfigChange,
    Metric,
    StateChange,
    encode,
)
from pipeline.rows import PROVENANCE, StreamDecoder, Tombstone, decoder
from tests.builtin_streams import STREAMS
from tests.unit.fuzzing import FUZZ_INPUTS, MUTANTS, fuzz, mutate, storable

PARTITION, BATCH_ID = 5, 77
DECODERS: dict[str, StreamDecoder] = {s.name: decoder(s) for s in catalog.load()}
STREAM_NAMES = tuple(s.name for s in STREAMS)
ERROR_CLASSES = {"EmptyRecord", "UnsupportedContentType", "ValidationError", "DecodeError"}
# Exceptions other than msgspec's that the decoder turns into a DecodeError ("Type: message"):
# a MessagePack extension or an unusual map key in a sub-object (TypeError), nesting deeper
# than the interpreter allows (RecursionError), a MessagePack timestamp past year 9999
# (ValueError, from datetime). Any other (an IndexError, say) is a bug of ours the safety net
# would hide.
SAFETY_NET = {"TypeError", "RecursionError", "ValueError"}
_SAFETY_NET_REASON = re.compile(r"^([A-Za-z]+(?:Error|Exception)): ")


class Record(NamedTuple):
    """A consumed record: what ``StreamDecoder.rows`` reads of aiokafka's ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    serialized_value_size: int
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp: int


Headers = tuple[tuple[str, bytes | None], ...]
CT = CONTENT_TYPE_HEADER
JSON_HEADERS: tuple[Headers, ...] = ((), ((CT, JSON.encode()),))
MSGPACK_HEADERS: Headers = ((CT, MSGPACK.encode()),)
ODD_HEADERS: tuple[Headers, ...] = (
    ((CT, None),),  # a null value: not given, so JSON
    ((CT, b""),),
    ((CT, b"text/plain"),),
    ((CT, b"application/json; charset=utf-8"),),
    ((CT, b"APPLICATION/JSON"),),
    ((CT, b"\xff\xfe\x00json"),),
    ((CT, b"application/msgpack\x00"),),
    (("Content-Type", MSGPACK.encode()),),  # another header: names are case-sensitive
    (("trace", b"\x00\xff"), (CT, MSGPACK.encode())),
    ((CT, JSON.encode()), (CT, MSGPACK.encode())),  # the first one counts
    ((CT, MSGPACK.encode()), (CT, JSON.encode())),
)
ALL_HEADERS: tuple[Headers, ...] = (*JSON_HEADERS, MSGPACK_HEADERS, *ODD_HEADERS)

# -- values -----------------------------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates too
# Text a valid record may hold: PostgreSQL's text and jsonb cannot hold NUL (any_text can).
plain_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=24)
offsets = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-(24 * 60 - 1), 24 * 60 - 1)
)
aware = st.datetimes(timezones=st.one_of(st.just(UTC), offsets))
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    plain_text,
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(plain_text, inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(plain_text, json_values, max_size=5)

# Wrong timestamps: naive, impossible, out of range, other formats, other types.
bad_timestamps = st.one_of(
    st.sampled_from(
        [
            "",
            "2025-06-01T12:00:00",
            "2025-06-01",
            "12:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-02-30T00:00:00Z",
            "2025-06-01T24:00:01Z",
            "2025-06-01T12:00:60Z",
            "2025-06-01T12:00:00+24:00",
            "2025-06-01T12:00:00.1234567890123Z",
            "0000-01-01T00:00:00Z",
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59.999999-23:59",
            "10000-01-01T00:00:00Z",
            "2025-06-01 12:00:00Z",
            "2025-06-01t12:00:00z",
            "now",
            "1717243200",
        ]
    ),
    st.datetimes().map(datetime.isoformat),  # naive
    st.integers(-(2**64), 2**64),
    st.floats(),
)


@dataclass(frozen=True)
class Deep:
    """A placeholder for JSON nested ``depth`` levels, written into the text after dumps (not
    a tuple, which dumps would write as a list)."""

    depth: int
    open: str


odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.just(""),
    st.just({}),
    st.just([]),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400, -1, 0]),
    st.floats(),  # NaN and infinities included
    any_text,
    st.builds(lambda c, n: c * n, st.characters(exclude_categories=()), st.integers(1000, 70_000)),
    st.binary(max_size=40),
    json_values,
    bad_timestamps,
    st.uuids().map(str),
    st.builds(Deep, st.one_of(st.integers(2, 50), st.integers(900, 5000)), st.sampled_from("[{")),
    # MessagePack only (JSON gets their text): extension types, timestamps, non-string keys.
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8)),
    st.builds(  # MessagePack timestamps (extension -1) of 96 bits, around datetime's range
        lambda ns, s: msgspec.msgpack.Ext(-1, struct.pack(">Iq", ns, s)),
        st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
        st.one_of(
            st.sampled_from([253402300799, 253402300800, -62135596800, -62135596801]),
            st.integers(-(2**63), 2**63 - 1),
        ),
    ),
    aware,
    st.datetimes(),
    st.dictionaries(st.one_of(st.integers(), st.floats(), st.booleans()), json_leaves, max_size=3),
)


def _valid_fields(stream: str) -> st.SearchStrategy[dict[str, Any]]:
    version = st.integers(0, 2**63 - 1)
    ids = st.uuids()
    if stream == "states":
        return st.fixed_dictionaries(
            {"agent_id": plain_text, "state": plain_text, "version": version, "ts": aware},
            optional={"data": json_objects},
        )
    if stream == "events":
        return st.fixed_dictionaries(
            {"event_id": ids, "agent_id": plain_text, "kind": plain_text, "ts": aware},
            optional={"severity": plain_text, "payload": json_objects},
        )
    if stream == "metrics":
        value = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-9, 9))
        return st.fixed_dictionaries(
            {"agent_id": plain_text, "name": plain_text, "value": value, "ts": aware},
            optional={"labels": json_objects},
        )
    if stream == "analytics":
        return st.fixed_dictionaries(
            {"event_id": ids, "user_id": plain_text, "action": plain_text, "ts": aware},
            optional={"properties": json_objects},
        )
    assert stream == "config"
    return st.fixed_dictionaries(
        {"key": plain_text, "value": json_values, "version": version, "ts": aware},
        optional={"updated_by": plain_text},
    )


@st.composite
def _mutated(draw: st.DrawFn, fields: dict[str, Any]) -> dict[str, Any]:
    fields = dict(fields)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["remove", "add", "replace", "replace", "null", "empty"]))
        if op == "add" or not fields:
            fields[draw(st.one_of(any_text, st.sampled_from(sorted(fields) or ["x"])))] = draw(
                odd_values
            )
            continue
        name = draw(st.sampled_from(sorted(fields)))
        if op == "remove":
            del fields[name]
        elif op == "replace":
            fields[name] = draw(odd_values)
        elif op == "null":
            fields[name] = None
        else:
            fields[name] = draw(st.sampled_from(["", {}, [], 0]))
    return fields


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, msgspec.msgpack.Ext):
        return repr(value)
    if isinstance(value, Deep):
        return f"\x00deep:{value.depth}:{value.open}\x00"
    raise TypeError(type(value).__name__)


_DEEP = re.compile(r'"\\u0000deep:(\d+):([\[{])\\u0000"')


def _deep(match: re.Match[str]) -> str:
    depth, opening = int(match[1]), match[2]
    if opening == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def _to_json(value: Any, ascii_only: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True, default=_json_default)
    # Lone surrogates become \ud800 escapes (ascii_only) or invalid UTF-8 (otherwise).
    return _DEEP.sub(_deep, text).encode("utf-8", "surrogatepass")


def _for_msgpack(value: Any) -> Any:
    if isinstance(value, Deep):
        deep: Any = 1
        for _ in range(min(value.depth, 200)):  # msgspec's encoder recurses too
            deep = [deep] if value.open == "[" else {"a": deep}
        return deep
    if isinstance(value, dict):
        return {k: _for_msgpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_for_msgpack(v) for v in value]
    return value


class Case(NamedTuple):
    stream: str
    origin: str  # valid, mutated, any_json, random_bytes
    value: bytes
    headers: Headers
    seed: int
    # A mutated record's valid self: the other base of the byte-level mutants, which mostly
    # decode to records with odd content rather than fail to parse.
    valid: tuple[bytes, Headers] | None = None


def _encoded(value: Any, headers: Headers, ascii_only: bool, valid: bool) -> tuple[bytes, Headers]:
    if headers == MSGPACK_HEADERS:
        try:
            return msgspec.msgpack.encode(_for_msgpack(value)), headers
        except (msgspec.EncodeError, OverflowError, TypeError, UnicodeEncodeError):
            # Not MessagePack (a huge int, a surrogate): JSON, under a MessagePack header
            # unless the record is a valid one.
            headers = () if valid else headers
    return _to_json(value, ascii_only), headers


@st.composite
def cases(draw: st.DrawFn) -> Case:
    stream = draw(st.sampled_from(STREAM_NAMES))
    origin = draw(
        st.sampled_from(["valid", "mutated", "mutated", "mutated", "any_json", "random_bytes"])
    )
    seed = draw(st.integers(0, 2**32 - 1))
    if origin == "random_bytes":
        headers = draw(st.sampled_from(ALL_HEADERS))
        return Case(stream, origin, draw(st.binary(max_size=300)), headers, seed)
    headers = draw(st.sampled_from((*JSON_HEADERS, MSGPACK_HEADERS, MSGPACK_HEADERS)))
    ascii_only = draw(st.booleans())
    if origin == "any_json":
        value: Any = draw(st.one_of(json_values, odd_values))
        valid = None
    else:
        value = draw(_valid_fields(stream))
        valid = _encoded(value, headers, ascii_only, valid=True)
        if origin == "mutated":
            value = draw(_mutated(value))
    if origin != "valid" and draw(st.integers(0, 9)) == 0:
        headers = draw(st.sampled_from(ODD_HEADERS))
    encoded, headers = _encoded(value, headers, ascii_only, valid=origin == "valid")
    return Case(stream, origin, encoded, headers, seed, valid)


# -- checks -----------------------------------------------------------------------------------

# Valid encodings of every stream: the splice material of the byte-level mutations.
_TS = datetime(2025, 6, 1, 12, tzinfo=UTC)
_ID = uuid.UUID("6f1c2a34-8b5d-4e7f-9a01-23456789abcd")
SAMPLES = [
    StateChange("a-1", "busy", 3, _TS, {"load": [0.5, {"x": None}]}),
    AgentEvent(_ID, "a-1", "oom", _TS, "error", {"rss_mb": 2048}),
    Metric("a-1", "cpu", 0.25, _TS, {"host": "h1"}),
    AnalyticsEvent(_ID, "u-1", "click", _TS, {"page": "/"}),
    ConfigChange("batch.max", {"records": 5000}, 9, _TS, "ops"),
]
CORPUS = [encode(r, ct) for r in SAMPLES for ct in (JSON, MSGPACK)]


def _check_row(stream: str, row: Row, offset: int, shown: str) -> None:
    tables = DECODERS[stream].tables
    columns = tables.table.columns
    assert len(row) == len(columns), shown
    assert row[-len(PROVENANCE) :] == (PARTITION, offset, BATCH_ID), shown
    for column, value in zip(columns, row, strict=True):
        if column in ("data", "payload", "labels", "properties", "value") and isinstance(
            value, msgspec.Raw
        ):
            try:  # a jsonb value as it is, never re-encoded
                parsed = json.loads(bytes(value))
            except RecursionError:  # nested near the limit msgspec shares: check less
                parsed = {} if bytes(value).startswith(b"{") else None
            except ValueError as exc:  # not JSON (not UTF-8): the database would refuse it
                pytest.fail(f"{column} is not JSON: {exc}\n{shown}")
            if column != "value":
                assert isinstance(parsed, dict), shown
        elif column == "ts":
            assert isinstance(value, datetime) and value.utcoffset() is not None, shown
        elif column == "version":
            assert type(value) is int and 0 <= value <= 2**63 - 1, shown
        elif column == "event_id":
            assert isinstance(value, uuid.UUID), shown
        elif column == "value" and stream == "metrics":
            assert type(value) is float, shown
        elif column not in PROVENANCE:
            assert type(value) is str, shown


def _same(row: Row) -> tuple[Any, ...]:
    # Rows compared across both roads: NaN equal to NaN, Raw by its bytes, a Decimal by its
    # digits (a Decimal NaN is not equal to itself).
    return tuple(
        "NaN"
        if isinstance(v, float) and math.isnan(v)
        else bytes(v)
        if isinstance(v, msgspec.Raw)
        else ("Decimal", str(v))
        if isinstance(v, Decimal)
        else v
        for v in row
    )


def _shown(stream: str, record: Record) -> str:
    return f"input: stream={stream} value={record.value!r} headers={record.headers!r}"


def _decode(stream: str, records: list[Record]) -> tuple[list[Row], list[Any]]:
    try:
        return DECODERS[stream].rows(records, PARTITION, BATCH_ID)
    except Exception as exc:  # the property: nothing raises
        shown = "\n".join(_shown(stream, r) for r in records)
        pytest.fail(f"rows() raised {type(exc).__name__}: {exc}\n{shown}")


def test_every_record_decodes_or_becomes_a_dead_letter_with_a_reason() -> None:
    outcomes: Counter[tuple[str, str]] = Counter()  # (stream, decoded | rejected)
    by_origin: Counter[tuple[str, str]] = Counter()
    error_classes: Counter[str] = Counter()
    safety_net: Counter[str] = Counter()

    @fuzz
    @given(cases())
    def decode_one_and_its_mutants(case: Case) -> None:
        rng = random.Random(case.seed)
        values: list[tuple[str, bytes | None, Headers]] = [(case.origin, case.value, case.headers)]
        for _ in range(MUTANTS):
            base, headers = case.value, case.headers
            if case.valid is not None and rng.random() < 0.5:
                base, headers = case.valid
            if rng.random() < 0.1:
                headers = rng.choice(ALL_HEADERS)
            if rng.random() < 0.005:
                values.append(("tombstone", None, headers))
            else:
                values.append(("byte_mutant", mutate(base, rng, CORPUS), headers))
        records = [
            Record("t", PARTITION, offset, None, value, len(value or b""), headers, 0)
            for offset, (_, value, headers) in enumerate(values)
        ]
        stream = case.stream
        # The agent's call, on the whole batch, then on each record alone.
        batch_rows, batch_rejected = _decode(stream, records)
        rows: list[Row] = []
        rejected: list[Any] = []
        for (origin, _, _), record in zip(values, records, strict=True):
            shown = _shown(stream, record)
            one_rows, one_rejected = _decode(stream, [record])
            assert len(one_rows) + len(one_rejected) == 1, shown
            if one_rows:
                _check_row(stream, one_rows[0], record.offset, shown)
                outcome = "decoded"
            else:
                dead = one_rejected[0]
                assert dead.record is record, shown
                assert dead.error_class in ERROR_CLASSES, (dead.error_class, shown)
                assert storable(dead.reason), (dead.reason, shown)
                error_classes[dead.error_class] += 1
                net = _SAFETY_NET_REASON.match(dead.reason)
                if net:
                    assert net[1] in SAFETY_NET, (dead.reason, shown)
                    safety_net[net[1]] += 1
                outcome = "rejected"
            outcomes[stream, outcome] += 1
            by_origin[origin, outcome] += 1
            rows += one_rows
            rejected += one_rejected
        # The batch road gives the same rows and the same reasons as record by record.
        assert list(map(_same, batch_rows)) == list(map(_same, rows)), case
        assert [(r.record.offset, r.error_class, r.reason) for r in batch_rejected] == [
            (r.record.offset, r.error_class, r.reason) for r in rejected
        ], case

    decode_one_and_its_mutants()

    total = sum(outcomes.values())
    print(
        f"\nrecords fuzzed: {total}; by stream {dict(sorted(outcomes.items()))}; "
        f"by origin {dict(sorted(by_origin.items()))}; error classes {dict(error_classes)}; "
        f"safety net {dict(safety_net)}"
    )
    assert total >= FUZZ_INPUTS
    # Not vacuous: every stream both decodes and rejects, and so do the mutated inputs.
    for stream in STREAM_NAMES:
        assert outcomes[stream, "decoded"] > 0, stream
        assert outcomes[stream, "rejected"] > 0, stream
    for origin in ("mutated", "byte_mutant"):
        assert by_origin[origin, "decoded"] > 0, origin
        assert by_origin[origin, "rejected"] > 0, origin
    assert by_origin["valid", "rejected"] == 0  # a valid record under a JSON or MessagePack
    assert set(error_classes) == ERROR_CLASSES


# -- a user's stream: every type, every source ------------------------------------------------

EVERY_TYPE = """
[[streams]]
name = "every"
topic = "t.every"
table = "every_type"
mode = "history"
key = ["id"]
version = "rev"
tombstones = "delete"

[streams.columns]
id = "uuid"
rev = "bigint"
flag = "boolean"
small = { type = "smallint", nullable = true }
medium = { type = "integer", default = 7 }
r = "real"
d = { type = "double precision", path = "m.d" }
amount = "numeric"
at = "timestamptz"
at_ms = { type = "timestamptz", unit = "ms", path = "m.t" }
at_ns = { type = "timestamptz", unit = "ns", nullable = true, default = 2025-01-01T00:00:00Z }
day = { type = "date", nullable = true }
name = { type = "text", default = "none" }
doc = { type = "jsonb", object = true, default = {} }
anything = { type = "jsonb", nullable = true, path = "m.deep.j" }
blob = { type = "bytea", default = "" }
region = { type = "text", source = "key" }
trace = { type = "integer", source = "header:trace", nullable = true }
seen = { type = "timestamptz", source = "timestamp" }
"""
USER_SPEC = catalog.validate(catalog.parse(EVERY_TYPE, "fuzz.toml")[1])["every"]
TRACE = "trace"


def _user_fields(msgpack: bool) -> st.SearchStrategy[dict[str, Any]]:
    numbers = st.one_of(
        st.decimals(min_value=-(10**20), max_value=10**20, places=6),
        st.integers(-(2**63), 2**63 - 1),
    )
    epoch = st.one_of(st.integers(0, 2**42), st.floats(0, 2.0**42))
    real = st.floats(-3.4e38, 3.4e38, allow_nan=False)
    return st.fixed_dictionaries(
        {
            "id": st.uuids(),
            "rev": st.integers(0, 2**63 - 1),
            "flag": st.booleans(),
            "r": real,
            "amount": numbers,
            "at": aware,
            "m": st.fixed_dictionaries(
                {"d": st.floats(allow_nan=False, allow_infinity=False), "t": epoch},
                optional={"deep": st.fixed_dictionaries({}, optional={"j": json_values})},
            ),
        },
        optional={
            "small": st.one_of(st.none(), st.integers(-(2**15), 2**15 - 1)),
            "medium": st.integers(-(2**31), 2**31 - 1),
            "at_ns": st.one_of(st.none(), st.integers(0, 2**62)),
            "day": st.one_of(st.none(), st.dates()),
            "name": plain_text,
            "doc": json_objects,
            "blob": st.binary(max_size=16),
        },
    )


def _builtins(value: Any, msgpack: bool) -> Any:
    """Fields as the wire holds them: bytes base64 in JSON, raw in MessagePack."""
    return msgspec.to_builtins(value, builtin_types=(bytes, datetime) if msgpack else ())


class UserCase(NamedTuple):
    origin: str
    value: bytes | None
    headers: Headers
    key: bytes | None
    timestamp: int
    seed: int
    valid: tuple[bytes, Headers] | None


_OPTIONAL = ("small", "medium", "at_ns", "day", "name", "doc", "blob")
_user_keys = st.one_of(
    any_text.map(lambda t: t.encode("utf-8", "surrogatepass")), st.none(), st.binary(max_size=40)
)
_timestamps = st.one_of(st.integers(0, 2**41), st.sampled_from([-1, 2**62, 2**63 - 1]))
_traces = st.one_of(
    st.none(),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: str(i).encode()),
    st.binary(max_size=12),
    st.sampled_from([b"2147483648", b"1.5", b"true", b""]),
)


@st.composite
def user_cases(draw: st.DrawFn) -> UserCase:
    origin = draw(
        st.sampled_from(["valid", "mutated", "mutated", "mutated", "any_json", "random_bytes"])
    )
    seed = draw(st.integers(0, 2**32 - 1))
    msgpack = draw(st.booleans())
    content = MSGPACK_HEADERS if msgpack else draw(st.sampled_from(JSON_HEADERS))
    trace = draw(_traces) if origin != "valid" else str(draw(st.integers(0, 99))).encode()
    traced: Headers = ((TRACE, trace),) if draw(st.booleans()) else ()
    timestamp = draw(_timestamps) if origin != "valid" else draw(st.integers(0, 2**41))
    if origin == "random_bytes":
        value = draw(st.binary(max_size=300))
        return UserCase(origin, value, content + traced, draw(_user_keys), timestamp, seed, None)
    if origin == "any_json":
        encoded, headers = _encoded(
            draw(st.one_of(json_values, odd_values)), content, True, valid=False
        )
        key = draw(_user_keys)
        return UserCase(origin, encoded, headers + traced, key, timestamp, seed, None)
    fields = draw(_user_fields(msgpack))
    key = str(fields["id"]).encode()
    wire = _builtins(fields, msgpack)
    ascii_only = draw(st.booleans())
    value, headers = _encoded(wire, content, ascii_only, valid=True)
    if msgpack and headers != MSGPACK_HEADERS:  # not MessagePack (a huge int): JSON after all
        wire = _builtins(fields, False)
        value, headers = _encoded(wire, (), ascii_only, valid=True)
    valid = (value, headers + traced)
    if origin == "valid":
        return UserCase(origin, *valid, key, timestamp, seed, valid)
    if draw(st.booleans()):  # the optional fields only: more of these records decode
        optional = {k: wire.pop(k) for k in _OPTIONAL if k in wire}
        wire.update(draw(_mutated(optional)))
    else:
        wire = draw(_mutated(wire))
    if isinstance(wire.get("m"), dict) and draw(st.booleans()):
        wire["m"] = draw(_mutated(wire["m"]))
    if draw(st.integers(0, 4)) == 0:
        key = draw(_user_keys)
    value, headers = _encoded(wire, content, ascii_only, valid=False)
    return UserCase(origin, value, headers + traced, key, timestamp, seed, valid)


_INTEGER_RANGE = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}


def _check_user_row(row: Row, offset: int, shown: str) -> None:
    """The row fits the spec: a value of each column's type (asyncpg's encoders take it,
    PostgreSQL stores it), None only where the column is nullable or the row a tombstone."""
    spec = USER_SPEC
    assert len(row) == len(spec.columns) + len(PROVENANCE), shown
    assert row[-len(PROVENANCE) :] == (PARTITION, offset, BATCH_ID), shown
    tombstone = isinstance(row, Tombstone)
    for column, value in zip(spec.columns, row, strict=False):
        if value is None:
            assert column.nullable or (tombstone and column.name != "id"), (column.name, shown)
            continue
        assert not tombstone or column.name == "id", shown
        kind = column.type
        if kind == "text":
            assert type(value) is str and "\x00" not in value, shown
            value.encode()  # UTF-8
        elif kind == "boolean":
            assert type(value) is bool, shown
        elif kind in _INTEGER_RANGE:
            low = 0 if column.name == spec.version else -_INTEGER_RANGE[kind]
            assert type(value) is int and low <= value < _INTEGER_RANGE[kind], shown
        elif kind == "real":
            assert type(value) is float and not (math.isfinite(value) and abs(value) > 3.4029e38)
        elif kind == "double precision":
            assert type(value) is float, shown
        elif kind == "numeric":
            assert isinstance(value, Decimal) and not value.is_infinite(), shown
            assert not value.is_snan(), shown  # a signalling NaN raises when compared
            if value.is_finite():
                exponent = value.as_tuple().exponent
                assert isinstance(exponent, int) and exponent >= -16383, shown
                assert value.adjusted() < 131072, shown
        elif kind == "uuid":
            assert isinstance(value, uuid.UUID), shown
        elif kind == "timestamptz":
            assert isinstance(value, datetime) and value.utcoffset() is not None, shown
        elif kind == "date":
            assert type(value) is date, shown
        elif kind == "bytea":
            assert type(value) is bytes, shown
        else:
            assert kind == "jsonb" and isinstance(value, msgspec.Raw), shown
            try:
                parsed = json.loads(bytes(value))
            except RecursionError:
                parsed = {} if bytes(value).startswith(b"{") else None
            except ValueError as exc:
                pytest.fail(f"{column.name} is not JSON: {exc}\n{shown}")
            assert "\\u0000" not in bytes(value).decode().replace("\\\\", ""), shown
            if column.object:
                assert isinstance(parsed, dict), shown


def test_a_user_stream_of_every_type_decodes_or_dead_letters_every_record() -> None:
    """The catalog decoder, compiled from a user's spec with every type and every source,
    fuzzed as the built-in ones are: rows that fit the spec, or dead letters with reasons."""
    user_decoder = decoder(USER_SPEC)
    outcomes: Counter[tuple[str, str]] = Counter()  # (origin, decoded | rejected)
    error_classes: Counter[str] = Counter()
    tombstones = 0
    valid_rejected: list[tuple[str, str]] = []

    def shown_of(record: Record) -> str:
        return f"input: {record!r}"

    def decode_all(records: list[Record]) -> tuple[list[Row], list[Any]]:
        try:
            return user_decoder.rows(records, PARTITION, BATCH_ID)
        except Exception as exc:  # the property: nothing raises
            shown = "\n".join(shown_of(r) for r in records)
            pytest.fail(f"rows() raised {type(exc).__name__}: {exc}\n{shown}")

    @fuzz
    @given(user_cases())
    def decode_one_and_its_mutants(case: UserCase) -> None:
        nonlocal tombstones
        rng = random.Random(case.seed)
        inputs: list[tuple[str, bytes | None, Headers, bytes | None]] = [
            (case.origin, case.value, case.headers, case.key)
        ]
        for _ in range(MUTANTS):
            base, headers = case.value or b"", case.headers
            if case.valid is not None and rng.random() < 0.5:
                base, headers = case.valid
            key = case.key
            if rng.random() < 0.1:
                key = None if rng.random() < 0.5 else mutate(key or b"k", rng, CORPUS)
            if rng.random() < 0.02:
                inputs.append(("tombstone", None, headers, key))
            else:
                inputs.append(("byte_mutant", mutate(base, rng, CORPUS), headers, key))
        records = [
            Record("t", PARTITION, offset, key, value, len(value or b""), headers, case.timestamp)
            for offset, (_, value, headers, key) in enumerate(inputs)
        ]
        batch_rows, batch_rejected = decode_all(records)
        rows: list[Row] = []
        rejected: list[Any] = []
        for (origin, _, _, _), record in zip(inputs, records, strict=True):
            shown = shown_of(record)
            one_rows, one_rejected = decode_all([record])
            assert len(one_rows) + len(one_rejected) == 1, shown
            if one_rows:
                _check_user_row(one_rows[0], record.offset, shown)
                tombstones += isinstance(one_rows[0], Tombstone)
                outcomes[origin, "decoded"] += 1
            else:
                dead = one_rejected[0]
                assert dead.record is record, shown
                assert dead.error_class in ERROR_CLASSES | {"InvalidHeader"}, shown
                assert storable(dead.reason), (dead.reason, shown)
                if dead.error_class == "ValidationError":
                    assert dead.reason.startswith("stream 'every'"), (dead.reason, shown)
                net = _SAFETY_NET_REASON.match(dead.reason)
                if net:
                    assert net[1] in SAFETY_NET, (dead.reason, shown)
                error_classes[dead.error_class] += 1
                outcomes[origin, "rejected"] += 1
                if origin == "valid":
                    valid_rejected.append((dead.reason, shown))
            rows += one_rows
            rejected += one_rejected
        assert list(map(_same, batch_rows)) == list(map(_same, rows)), case
        assert [type(r) for r in batch_rows] == [type(r) for r in rows], case
        if case.valid is not None:  # a clean batch: the list road, which must agree too
            value, headers = case.valid
            clean = [
                Record("t", PARTITION, offset, case.key, value, len(value), headers, case.timestamp)
                for offset in range(3)
            ]
            clean_rows, clean_rejected = decode_all(clean)
            one_by_one = [decode_all([r]) for r in clean]
            assert list(map(_same, clean_rows)) == [_same(r) for o, _ in one_by_one for r in o]
            assert [(r.record.offset, r.reason) for r in clean_rejected] == [
                (r.record.offset, r.reason) for _, d in one_by_one for r in d
            ]
        assert [(r.record.offset, r.error_class, r.reason) for r in batch_rejected] == [
            (r.record.offset, r.error_class, r.reason) for r in rejected
        ], case

    decode_one_and_its_mutants()

    total = sum(outcomes.values())
    print(
        f"\nuser stream records fuzzed: {total}; {dict(sorted(outcomes.items()))}; "
        f"error classes {dict(error_classes)}; tombstones {tombstones}"
    )
    assert total >= FUZZ_INPUTS
    assert valid_rejected == []
    for origin in ("mutated", "byte_mutant"):
        assert outcomes[origin, "decoded"] > 0, origin
        assert outcomes[origin, "rejected"] > 0, origin
    assert tombstones > 0
    assert {"ValidationError", "DecodeError"} <= set(error_classes)
