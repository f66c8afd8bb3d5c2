"""From a Kafka record's bytes to a row ready for binary COPY; pure, no IO.

One typed decoder per topic. JSON sub-objects (``data``, ``payload``, ``labels``,
``properties``, config ``value``) are never parsed into Python objects: msgspec hands them over
as :class:`msgspec.Raw` slices of the record, which go into ``jsonb`` as they are. MessagePack
records take the slower road: decoded with the public record type, sub-objects re-encoded as
JSON.

Every row ends with its provenance: source partition, source offset, ingest batch id.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import filterfalse
from typing import Any

import msgspec

from pipeline.batching import FetchedRecord, Rejected, Row
from pipeline.catalog import StreamSpec
from pipeline.records import (
    CONTENT_TYPE_HEADER,
    JSON,
    MSGPACK,
    RECORD_STREAMS,
    AgentEvent,
    AnalyticsEvent,
    ConfigChange,
    Metric,
    Record,
    StateChange,
    header_names_not_utf8,
)

PROVENANCE = ("src_partition", "src_offset", "batch_id")


def source_of(row: Row) -> tuple[int, int]:
    """The partition and offset of the record a row was decoded from."""
    return row[-3], row[-2]


class RecordRejected(Exception):
    """A record that can never be ingested as it is: it goes to the dead-letter store."""

    def __init__(self, error_class: str, reason: str) -> None:
        super().__init__(reason)
        self.error_class = error_class
        self.reason = reason


@dataclass(frozen=True)
class Table:
    """A target table and the record fields that fill its columns, in COPY order."""

    name: str
    fields: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.fields + PROVENANCE


@dataclass(frozen=True)
class StreamTables:
    """Where a stream lands: one table, or a "latest" table plus its append-only history."""

    table: Table
    history: Table | None = None
    # The natural key that makes redelivery harmless, and for "latest" tables the version
    # that decides which row wins.
    key: tuple[str, ...] = ()
    version: str | None = None


_STATE_FIELDS = ("agent_id", "state", "version", "ts", "data")
_CONFIG_FIELDS = ("key", "value", "version", "ts", "updated_by")

TABLES: dict[str, StreamTables] = {
    "states": StreamTables(
        Table("agent_states", _STATE_FIELDS),
        Table("agent_state_history", _STATE_FIELDS),
        key=("agent_id",),
        version="version",
    ),
    "events": StreamTables(
        Table("system_events", ("event_id", "agent_id", "kind", "severity", "ts", "payload")),
        key=("event_id",),
    ),
    "metrics": StreamTables(
        Table("performance_metrics", ("agent_id", "name", "value", "ts", "labels"))
    ),
    "analytics": StreamTables(
        Table("user_analytics", ("event_id", "user_id", "action", "ts", "properties")),
        key=("event_id",),
    ),
    "config": StreamTables(
        Table("system_config", _CONFIG_FIELDS),
        Table("system_config_history", _CONFIG_FIELDS),
        key=("key",),
        version="version",
    ),
}

#: Every table the data streams land in, "latest" tables before their histories.
DATA_TABLES: tuple[str, ...] = tuple(
    t.name for s in TABLES.values() for t in (s.table, s.history) if t is not None
)

# The fields that hold free-form JSON: kept raw, checked to be objects where the contract
# says "object" (a config value may be any JSON value).
_JSON_FIELDS: dict[type[Record], dict[str, bool]] = {
    StateChange: {"data": True},
    AgentEvent: {"payload": True},
    Metric: {"labels": True},
    AnalyticsEvent: {"properties": True},
    ConfigChange: {"value": False},
}
_EMPTY_OBJECT = msgspec.Raw(b"{}")
_OPEN_BRACE = ord("{")
_JSON_ONLY = ((CONTENT_TYPE_HEADER, JSON.encode()),)  # the headers our publisher sends
# PostgreSQL's text and jsonb cannot hold NUL. In JSON text a NUL can only be the escape
# \u0000 (msgspec refuses raw control characters), so a record without those six bytes has
# none; one with them may still be an escaped backslash followed by "u0000", which the regex
# tells apart: a NUL escape's backslash is preceded by an even number of backslashes.
_NUL_ESCAPE = b"\\u0000"
_NUL_LITERAL = re.compile(re.escape(_NUL_ESCAPE))
_NUL_IN_JSON = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_HEADERS = operator.attrgetter("headers")
_VALUE = operator.attrgetter("value")
_OFFSET = operator.attrgetter("offset")
astuple = msgspec.structs.astuple


def _raw_variant(record_type: type[Record], columns: tuple[str, ...]) -> type[msgspec.Struct]:
    """The record type with its free-form JSON fields typed as :class:`msgspec.Raw`, and its
    fields in the table's column order, so that ``astuple`` is the row (keyword-only, since
    that order can put a defaulted field before a required one)."""
    json_fields = _JSON_FIELDS[record_type]
    by_name = {info.name: info for info in msgspec.structs.fields(record_type)}
    assert sorted(by_name) == sorted(columns), f"{record_type.__name__} fields != {columns}"
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for info in map(by_name.__getitem__, columns):
        if info.name in json_fields:
            has_default = (
                info.default is not msgspec.NODEFAULT
                or info.default_factory is not msgspec.NODEFAULT
            )
            fields.append(
                (info.name, msgspec.Raw, _EMPTY_OBJECT) if has_default else (info.name, msgspec.Raw)
            )
        elif info.default is not msgspec.NODEFAULT:
            fields.append((info.name, info.type, info.default))
        else:
            fields.append((info.name, info.type))
    return msgspec.defstruct(f"Raw{record_type.__name__}", fields, frozen=True, kw_only=True)


class StreamDecoder:
    """Decodes one topic's record values into COPY rows for that stream's table."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.tables = TABLES[stream.name]
        raw_type = _raw_variant(stream.record_type, self.tables.table.fields)
        self._json = msgspec.json.Decoder(raw_type)
        self._msgpack = msgspec.msgpack.Decoder(stream.record_type)
        self._raw_type = raw_type
        # At most one field per stream must be a JSON object (the config value may be any JSON).
        objects = [
            f for f, must_be_object in _JSON_FIELDS[stream.record_type].items() if must_be_object
        ]
        self._object_field = objects[0] if objects else None
        self._object_of: Callable[[Any], msgspec.Raw] | None = (
            operator.attrgetter(objects[0]) if objects else None
        )
        self._json_fields = tuple(_JSON_FIELDS[stream.record_type])

    def rows(
        self, records: Sequence[FetchedRecord], partition: int, batch_id: int
    ) -> tuple[list[Row], list[Rejected]]:
        """The COPY rows of one partition's records, in order, and the records rejected.

        The common case (JSON, every record valid) is decoded a list at a time, without a
        Python call per record; anything else falls back to :meth:`row` record by record, so
        both roads give the same rows and the same reasons.
        """
        headers = list(map(_HEADERS, records))
        if headers.count(()) + headers.count(_JSON_ONLY) == len(records):
            values = list(map(_VALUE, records))
            try:
                decoded = list(map(self._json.decode, values))
                list(map(bytes.decode, filterfalse(bytes.isascii, values)))  # see _check_utf8
                has_nul = _may_hold_nul(values)
            except Exception:  # a bad record: the per-record road below names it
                pass
            else:
                # A record that may hold a NUL (rare) takes the per-record road below too.
                object_of = self._object_of
                if not has_nul and (
                    object_of is None
                    or [memoryview(o)[0] for o in map(object_of, decoded)].count(_OPEN_BRACE)
                    == len(decoded)
                ):
                    return [
                        (*astuple(d), partition, offset, batch_id)
                        for d, offset in zip(decoded, map(_OFFSET, records), strict=True)
                    ], []
        rows: list[Row] = []
        rejected: list[Rejected] = []
        # Both rare checks screened once for the batch: no call per record when it is clean.
        screened = (
            not _may_hold_nul(list(filter(None, map(_VALUE, records))))
            and "".join(
                [name for record_headers in headers for name, _ in record_headers]
            ).isascii()
        )
        for record in records:
            try:
                rows.append(
                    self.row(
                        record.value,
                        record.headers,
                        partition,
                        record.offset,
                        batch_id,
                        screened=screened,
                    )
                )
            except RecordRejected as exc:
                rejected.append(Rejected(record, exc.error_class, exc.reason))
        return rows, rejected

    def row(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        partition: int,
        offset: int,
        batch_id: int,
        *,
        screened: bool = False,
    ) -> Row:
        """The COPY row for one record; :class:`RecordRejected` when it cannot be ingested.
        ``screened``: the caller found, for a whole batch at once, no header name that is not
        ASCII and no NUL escape in any JSON record (see :meth:`rows`)."""
        if not screened and headers:
            bad_names = header_names_not_utf8(headers)
            if bad_names:
                raise RecordRejected("InvalidHeader", f"header name {bad_names[0]!r} is not UTF-8")
        if value is None:
            raise RecordRejected("EmptyRecord", "record has no value (a tombstone)")
        content_type = _content_type(headers) if headers else JSON
        try:
            if content_type == JSON:
                record = self._json.decode(value)
                _check_utf8(value)
                if not screened and _NUL_ESCAPE in value:
                    _check_no_nul(record)
            elif content_type == MSGPACK:
                record = self._from_msgpack(value)
                if b"\x00" in value:  # a NUL in a string is a raw 0x00 (numbers have them too)
                    _check_no_nul(record)
            else:
                raise RecordRejected(
                    "UnsupportedContentType",
                    f"content-type {content_type!r} is not supported; use {JSON} or {MSGPACK}",
                )
        except msgspec.ValidationError as exc:
            raise RecordRejected("ValidationError", str(exc)) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            # msgspec reports invalid UTF-8 inside a string as UnicodeDecodeError.
            raise RecordRejected("DecodeError", str(exc)) from None
        except RecordRejected:
            raise
        except Exception as exc:  # e.g. a MessagePack extension type: bad input, never a crash
            raise RecordRejected("DecodeError", f"{type(exc).__name__}: {exc}") from None
        name = self._object_field
        if name is not None and memoryview(getattr(record, name))[0] != _OPEN_BRACE:
            raise RecordRejected("ValidationError", f"Expected `object` - at `$.{name}`")
        return (*astuple(record), partition, offset, batch_id)

    def _from_msgpack(self, value: bytes) -> Any:
        record = self._msgpack.decode(value)
        as_dict = msgspec.structs.asdict(record)
        for name in self._json_fields:
            as_dict[name] = msgspec.Raw(msgspec.json.encode(as_dict[name]))
        return self._raw_type(**as_dict)


def _check_utf8(value: bytes) -> None:
    """Raise UnicodeDecodeError unless the whole JSON record is UTF-8. msgspec checks the
    strings it decodes, but not the sub-objects it keeps raw nor the fields it ignores, and
    PostgreSQL refuses a jsonb value that is not UTF-8: without this, such a record would
    cost its batch a bisection in the database instead of being rejected here. ASCII
    records, the common case, are checked without decoding."""
    if not value.isascii():
        value.decode()


def _may_hold_nul(values: list[bytes]) -> bool:
    """Whether any of these JSON records may hold a NUL: one search of them all at once, no
    call per record. (Records are JSON objects: none ends with a part of the escape.) The
    regular expression of a literal scans faster than ``in`` does, and the search runs only
    when there is a backslash at all (found by memchr)."""
    joined = b"".join(values)
    return joined.find(b"\\") >= 0 and _NUL_LITERAL.search(joined) is not None


def _check_no_nul(record: msgspec.Struct) -> None:
    """Refuse a record whose stored text holds a NUL, which PostgreSQL's text and jsonb
    cannot: found here, it costs no bisection in the database. Only the fields that are
    stored count (an ignored field may hold anything)."""
    for name in record.__struct_fields__:
        field = getattr(record, name)
        if (isinstance(field, str) and "\x00" in field) or (
            isinstance(field, msgspec.Raw) and _NUL_IN_JSON.search(field)
        ):
            raise RecordRejected(
                "ValidationError", f"text cannot contain NUL (\\u0000) - at `$.{name}`"
            )


def _content_type(headers: Sequence[tuple[str, bytes | None]]) -> str:
    for name, value in headers:
        if name == CONTENT_TYPE_HEADER and value:  # a null or empty value means "not given"
            return value.decode("utf-8", "replace")
    return JSON


@dataclass(frozen=True)
class _Stream:
    name: str
    record_type: type[Record]


DECODERS: dict[str, StreamDecoder] = {
    name: StreamDecoder(_Stream(name, record_type)) for record_type, name in RECORD_STREAMS.items()
}


class Tombstone(tuple[Any, ...]):
    """A row that deletes: a record without a value on a stream with ``tombstones =
    "delete"``. Its key column holds the Kafka key, the stream's other columns are None, and
    its provenance is the record's, like any row's."""

    __slots__ = ()


def decoder(spec: StreamSpec) -> StreamDecoder:
    """The decoder of a catalog stream (one per spec, made on first use)."""
    return DECODERS[spec.name]
