"""From a Kafka record to a row ready for binary COPY; pure, no IO.

Each stream's decoder is compiled from its :class:`~pipeline.catalog.StreamSpec` into
``msgspec`` structs, the built-in streams' as any user's. A JSON record's jsonb values are
never parsed into Python objects: msgspec hands them over as :class:`msgspec.Raw` slices of the
record, which go into ``jsonb`` as they are (a MessagePack record's are encoded as JSON). A
batch is decoded a list at a time when it can be, record by record when a record is bad; both
roads give the same rows and reasons. Types, sources and reasons: docs/streams.md.

Every row ends with its provenance: source partition, source offset, ingest batch id.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import filterfalse
from typing import Annotated, Any

import msgspec

from pipeline import catalog
from pipeline.batching import FetchedRecord, Rejected, Row
from pipeline.catalog import PROVENANCE, Column, StreamSpec, StreamTables, Table
from pipeline.records import CONTENT_TYPE_HEADER, JSON, MSGPACK, header_names_not_utf8

__all__ = [
    "PROVENANCE",
    "RecordRejected",
    "StreamDecoder",
    "StreamTables",
    "Table",
    "Tombstone",
    "decoder",
    "source_of",
]


def source_of(row: Row) -> tuple[int, int]:
    """The partition and offset of the record a row was decoded from."""
    return row[-3], row[-2]


class RecordRejected(Exception):
    """A record that can never be ingested as it is: it goes to the dead-letter store."""

    def __init__(self, error_class: str, reason: str) -> None:
        super().__init__(reason)
        self.error_class = error_class
        self.reason = reason


class Tombstone(tuple[Any, ...]):
    """A row that deletes: a record without a value on a stream with ``tombstones =
    "delete"``. Its key column holds the Kafka key, the stream's other columns are None, and
    its provenance is the record's, like any row's."""

    __slots__ = ()


_OPEN_BRACE = ord("{")
_JSON_ONLY = ((CONTENT_TYPE_HEADER, JSON.encode()),)  # the headers our publisher sends
_MSGPACK_ONLY = ((CONTENT_TYPE_HEADER, MSGPACK.encode()),)
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
_MSGSPEC_PATH = re.compile(r"`\$((?:\.[^`]*)?)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `([^`]*)`")
astuple = msgspec.structs.astuple

# A jsonb field the record does not have (a distinct object: compared by identity).
_ABSENT_RAW = msgspec.Raw(b"")
_NULL_JSON = b"null"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECONDS = {"s": 1_000_000, "ms": 1_000, "us": 1}
# PostgreSQL's limits: real is a 4-byte float; numeric has at most 131072 digits before the
# point and 16383 after it, and no infinity before PostgreSQL 14.
_INTEGER_MAX = {"smallint": 2**15 - 1, "integer": 2**31 - 1, "bigint": 2**63 - 1}
_REAL_MAX = 3.4028234663852886e38
_NUMERIC_MAX_ADJUSTED = 131071
_NUMERIC_MIN_EXPONENT = -16383


class _Bad(Exception):
    """A column's value that does not fit it: the message says what was expected, what came."""


def _is_absent(value: Any) -> bool:
    return value is msgspec.UNSET or value is _ABSENT_RAW


def _epoch(value: int | float, unit: str) -> datetime:
    """An epoch number in ``unit`` as an aware datetime, to the microsecond (nanoseconds
    rounded half up, as PostgreSQL rounds a fraction it cannot hold)."""
    try:
        if isinstance(value, int):
            micros = (value + 500) // 1000 if unit == "ns" else value * _MICROSECONDS[unit]
        else:
            if not math.isfinite(value):
                raise _Bad(f"Expected an epoch time in {unit}, got `{value}`")
            scale = 0.001 if unit == "ns" else _MICROSECONDS[unit]
            micros = round(value * scale)
        return _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise _Bad(f"Expected an epoch time in {unit} within years 1 to 9999") from None


def _real_fits(value: float) -> bool:
    return not (abs(value) > _REAL_MAX and math.isfinite(value))


def _numeric_fits(value: Decimal) -> bool:
    if value.is_finite():
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)
        return exponent >= _NUMERIC_MIN_EXPONENT and value.adjusted() <= _NUMERIC_MAX_ADJUSTED
    # PostgreSQL has one NaN; a signalling one would raise where a writer compares it.
    return value.is_qnan()


def _check_real(value: float) -> float:
    if not _real_fits(value):
        raise _Bad("Expected `float` within real's range (3.4e38), got a larger number")
    return value


def _check_numeric(value: Decimal) -> Decimal:
    if not _numeric_fits(value):
        raise _Bad(
            "Expected `decimal` within numeric's range (131072 digits before the point, "
            "16383 after, NaN but no infinity nor sNaN)"
        )
    return value


def _check_object(value: msgspec.Raw) -> msgspec.Raw:
    if memoryview(value)[0] != _OPEN_BRACE:
        raise _Bad("Expected `object`")
    return value


def _value_type(column: Column, version: bool) -> Any:
    """The Python type msgspec decodes a column's JSON or MessagePack value into."""
    if column.unit:
        return int | float
    if version and column.type in catalog.INTEGER_TYPES:
        # A version orders a key's rows: a negative one is refused, as the table's CHECK does.
        return Annotated[int, msgspec.Meta(ge=0, le=_INTEGER_MAX[column.type])]
    if column.type in ("real", "double precision"):
        return float
    return catalog.TYPES[column.type]


def _field(column: Column, version: bool, msgpack: bool) -> tuple[Any, Any]:
    """A value column's field type and default in the struct decoded from a record."""
    if column.type == "jsonb":
        if msgpack:
            kind: Any = dict[str, Any] if column.object else Any
            if column.required:
                return kind, msgspec.NODEFAULT
            return (kind | None if column.nullable and column.object else kind), msgspec.UNSET
        if column.required:
            return msgspec.Raw, msgspec.NODEFAULT
        if column.nullable:
            return msgspec.Raw, _ABSENT_RAW
        return msgspec.Raw, column.default
    kind = _value_type(column, version)
    if column.required:
        return kind, msgspec.NODEFAULT
    if column.unit:  # a default is a datetime already: absent must be told from a number
        return (kind | None if column.nullable else kind) | msgspec.UnsetType, msgspec.UNSET
    if column.nullable and column.has_default:
        return kind | None | msgspec.UnsetType, msgspec.UNSET
    if column.nullable:
        return kind | None, None
    return kind, column.default


def _struct(
    name: str, columns: Sequence[Column], version: str | None, msgpack: bool
) -> tuple[type[msgspec.Struct], dict[str, tuple[str, ...]]]:
    """The struct a record's value decodes into, nested as the columns' paths are, and each
    value column's attribute path in it. An object every column under it may do without is
    optional (absent or null: its columns are absent)."""
    tree: dict[str, Any] = {}
    for column in columns:
        node = tree
        for part in column.path[:-1]:
            node = node.setdefault(part, {})
        node[column.path[-1]] = column
    attrs: dict[str, tuple[str, ...]] = {}

    def build(node: dict[str, Any], struct_name: str, at: tuple[str, ...]) -> tuple[Any, bool]:
        fields: list[tuple[str, Any, Any]] = []
        required = False
        for i, (wire, child) in enumerate(node.items()):
            attr = f"f{i}"
            if isinstance(child, Column):
                kind, default = _field(child, child.name == version, msgpack)
                attrs[child.name] = (*at, attr)
                required |= child.required
            else:
                sub, sub_required = build(child, f"{struct_name}_{i}", (*at, attr))
                kind, default = (sub, msgspec.NODEFAULT) if sub_required else (sub | None, None)
                required |= sub_required
            fields.append((attr, kind, msgspec.field(default=default, name=wire)))
        return msgspec.defstruct(struct_name, fields, kw_only=True, frozen=True), required

    struct, _ = build(tree, name, ())
    return struct, attrs


def _text_converter(column: Column, version: bool) -> Callable[[str, bytes], Any]:
    """How a key's or a header's UTF-8 text becomes a value of the column's type: numbers and
    booleans as JSON writes them, the other types as their JSON strings are."""
    kind = _value_type(column, version)
    if column.type == "text":
        return lambda text, _: text
    if column.type == "jsonb":

        def jsonb(_: str, raw: bytes) -> msgspec.Raw:
            msgspec.json.decode(raw)
            return msgspec.Raw(raw)

        return jsonb
    if column.unit or column.type in (*catalog.INTEGER_TYPES, "boolean", "real"):
        decoder = msgspec.json.Decoder(kind)
        return lambda _, raw: decoder.decode(raw)
    if column.type == "double precision":
        decoder = msgspec.json.Decoder(float)
        return lambda _, raw: decoder.decode(raw)
    return lambda text, _: msgspec.convert(text, kind)


class _Compiled:
    """How one column's value is found and finished, compiled once."""

    def __init__(self, spec: StreamSpec, column: Column) -> None:
        self.column = column
        self.name = column.name
        version = column.name == spec.version
        if column.source == "value":
            self.place = "`$." + ".".join(column.path) + "`"
        elif column.source == "key":
            self.place = "the Kafka key"
        elif column.source == "header":
            self.place = f"header `{column.header}`"
        else:
            self.place = "the Kafka timestamp"
        self.from_text = _text_converter(column, version)
        checks: list[Callable[[Any], Any]] = []
        if column.type == "jsonb" and column.object:
            checks.append(_check_object)
        if column.type == "real":
            checks.append(_check_real)
        if column.type == "numeric":
            checks.append(_check_numeric)
        if column.unit and column.source != "timestamp":
            unit = column.unit
            checks.insert(0, lambda v: _epoch(v, unit))
        self.checks = tuple(checks)
        self.text_like = column.type in ("text", "jsonb")
        # A JSON value column whose decoded value is the row's as it is.
        self.plain = (
            column.source == "value"
            and not checks
            and not column.unit
            and not (column.nullable and (column.has_default or column.type == "jsonb"))
        )

    def finish(self, value: Any, msgpack: bool) -> Any:
        """A value as found (absent, null or a value) as it goes into the row."""
        column = self.column
        if value is None or _is_absent(value):
            if value is not None and column.has_default:
                return column.default
            if column.nullable:
                return None
            if column.type == "jsonb" and msgpack and value is None:
                value = msgspec.Raw(_NULL_JSON)  # a JSON null is a jsonb value
            elif value is None:
                raise _Bad(f"Expected `{column.type}`, got `null`")
            else:
                raise _Bad(f"Expected `{column.type}`, got nothing")
        elif column.type == "jsonb":
            if msgpack:
                value = msgspec.Raw(msgspec.json.encode(value))
            elif column.nullable and len(value) == 4 and bytes(value) == _NULL_JSON:
                return None
        for check in self.checks:
            value = check(value)
        return value


class StreamDecoder:
    """Decodes one stream's records into COPY rows for its table(s)."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.stream = spec  # its ``name`` is the stream's
        self.tables: StreamTables = spec.tables
        self._name = spec.name
        columns = spec.columns
        self._compiled = tuple(_Compiled(spec, c) for c in columns)
        self._by_name = {c.name: c for c in self._compiled}
        value_columns = [c for c in columns if c.source == "value"]
        self._paths = {"$." + ".".join(c.path): c.name for c in value_columns}
        json_struct, self._json_attrs = _struct(
            f"Json_{spec.name}", value_columns, spec.version, False
        )
        msgpack_struct, self._msgpack_attrs = _struct(
            f"Msgpack_{spec.name}", value_columns, spec.version, True
        )
        self._json = msgspec.json.Decoder(json_struct)
        self._msgpack = msgspec.msgpack.Decoder(msgpack_struct)
        # The fast road: every column a top-level field of the value whose decoded value is
        # the row's as it is (no unit, no absent-or-null to tell apart), so ``astuple`` of the
        # struct is the row, checked a whole list at a time.
        self._flat = all(
            c.source == "value"
            and len(c.path) == 1
            and not c.unit
            and not (c.nullable and (c.has_default or c.type == "jsonb"))
            for c in columns
        )
        self._checked = tuple(
            (operator.attrgetter(self._json_attrs[c.name][0]), c)
            for c in self._compiled
            if c.checks and c.column.source == "value"
        )
        self._objects = tuple(
            getter for getter, c in self._checked if c.column.type == "jsonb" and c.column.object
        )
        self._others = tuple((g, c) for g, c in self._checked if not c.column.object)
        self._text_sources = tuple(c for c in self._compiled if c.column.source != "value")
        # The list road of the other streams, and of MessagePack batches: records decoded a
        # list at a time, then their rows built a column at a time.
        self._json_getters: tuple[Any, ...] = tuple(
            operator.attrgetter(".".join(self._json_attrs[c.name])) if c.source == "value" else None
            for c in columns
        )
        self._key_column = self._by_name[spec.key[0]] if spec.tombstones == "delete" else None

    # -- many records ----------------------------------------------------------------------

    def rows(
        self, records: Sequence[FetchedRecord], partition: int, batch_id: int
    ) -> tuple[list[Row], list[Rejected]]:
        """The COPY rows of one partition's records, in order, and the records rejected.

        The common case (JSON, flat fields, every record valid) is decoded a list at a time,
        without a Python call per record; other streams' clean batches, and MessagePack ones,
        a list at a time and then a column at a time. Anything else falls back to :meth:`row`
        record by record, so every road gives the same rows and the same reasons.
        """
        headers = list(map(_HEADERS, records))
        if headers.count(()) + headers.count(_JSON_ONLY) == len(records) or (
            not self._flat and _all_json(headers)
        ):
            values = list(map(_VALUE, records))
            try:
                decoded = list(map(self._json.decode, values))
                list(map(bytes.decode, filterfalse(bytes.isascii, values)))  # see _check_utf8
                has_nul = _may_hold_nul(values)
            except Exception:  # a bad record: the per-record road below names it
                pass
            else:
                # A record that may hold a NUL (rare) takes the per-record road below too.
                if has_nul:
                    pass
                elif self._flat:
                    if self._all_fit(decoded):
                        return [
                            (*astuple(d), partition, offset, batch_id)
                            for d, offset in zip(decoded, map(_OFFSET, records), strict=True)
                        ], []
                else:
                    by_column = self._by_column(decoded, records, partition, batch_id, False)
                    if by_column is not None:
                        return by_column, []
        elif headers.count(_MSGPACK_ONLY) == len(records):
            try:
                decoded = list(map(self._msgpack.decode, map(_VALUE, records)))
            except Exception:  # a bad record: the per-record road below names it
                pass
            else:
                by_column = self._by_column(decoded, records, partition, batch_id, True)
                if by_column is not None:
                    return by_column, []
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
                        key=record.key,
                        timestamp=record.timestamp,
                        screened=screened,
                    )
                )
            except RecordRejected as exc:
                rejected.append(Rejected(record, exc.error_class, exc.reason))
        return rows, rejected

    def _by_column(
        self,
        decoded: list[Any],
        records: Sequence[FetchedRecord],
        partition: int,
        batch_id: int,
        msgpack: bool,
    ) -> list[Row] | None:
        """The rows of these decoded records built a column at a time, or None when a record
        needs the per-record road (a value that does not fit, an absent optional object, a
        NUL): that road names it. (The JSON and MessagePack structs have the same shape.)"""
        n = len(decoded)
        columns: list[list[Any]] = []
        try:
            for compiled, value_of in zip(self._compiled, self._json_getters, strict=True):
                source = compiled.column.source
                if source == "value":
                    found = list(map(value_of, decoded))
                    if not (compiled.plain and not (msgpack and compiled.column.type == "jsonb")):
                        found = list(map(compiled.finish, found, [msgpack] * n))
                    # A JSON batch was searched for NUL escapes as a whole; a MessagePack
                    # record's strings hold a NUL as it is, and its numbers hold 0x00 bytes.
                    if msgpack and compiled.text_like and _holds_nul(found):
                        return None
                    columns.append(found)
                elif source == "timestamp":
                    columns.append([self._timestamp(compiled, r.timestamp) for r in records])
                else:
                    name = compiled.column.header
                    made = [
                        compiled.finish(
                            self._from_bytes(
                                compiled, r.key if source == "key" else _header(r.headers, name)
                            ),
                            False,
                        )
                        for r in records
                    ]
                    if compiled.text_like and _holds_nul(made):
                        return None
                    columns.append(made)
        except Exception:  # an absent optional object (AttributeError), a bad value: per record
            return None
        return list(
            zip(*columns, [partition] * n, map(_OFFSET, records), [batch_id] * n, strict=True)
        )

    def _all_fit(self, decoded: list[Any]) -> bool:
        """Whether every checked column of every decoded record fits, a column at a time."""
        n = len(decoded)
        for object_of in self._objects:
            if [memoryview(o)[0] for o in map(object_of, decoded)].count(_OPEN_BRACE) != n:
                return False
        for value_of, compiled in self._others:
            try:
                list(map(compiled.finish, map(value_of, decoded), [False] * n))
            except Exception:  # the per-record road names it
                return False
        return True

    # -- one record ------------------------------------------------------------------------

    def row(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        partition: int,
        offset: int,
        batch_id: int,
        *,
        key: bytes | None = None,
        timestamp: int | None = None,
        screened: bool = False,
    ) -> Row:
        """The COPY row for one record; :class:`RecordRejected` when it cannot be ingested.
        ``key`` and ``timestamp`` are the Kafka record's (a column may take them).
        ``screened``: the caller found, for a whole batch at once, no header name that is not
        ASCII and no NUL escape in any JSON record (see :meth:`rows`)."""
        if not screened and headers:
            bad_names = header_names_not_utf8(headers)
            if bad_names:
                raise RecordRejected("InvalidHeader", f"header name {bad_names[0]!r} is not UTF-8")
        if value is None:
            if self._key_column is None:
                raise RecordRejected("EmptyRecord", "record has no value (a tombstone)")
            return self._tombstone(key, partition, offset, batch_id)
        content_type = _content_type(headers) if headers else JSON
        msgpack = False
        try:
            if content_type == JSON:
                record = self._json.decode(value)
                _check_utf8(value)
                may_hold_nul = not screened and _NUL_ESCAPE in value
            elif content_type == MSGPACK:
                msgpack = True
                record = self._msgpack.decode(value)
                # A NUL in a string is a raw 0x00 (numbers have them too).
                may_hold_nul = b"\x00" in value
            else:
                raise RecordRejected(
                    "UnsupportedContentType",
                    f"content-type {content_type!r} is not supported; use {JSON} or {MSGPACK}",
                )
            if self._flat and not msgpack:
                for value_of, compiled in self._checked:
                    try:
                        compiled.finish(value_of(record), False)
                    except _Bad as exc:
                        raise self._rejected(compiled, str(exc)) from None
                fields = astuple(record)
            else:
                fields = self._fields(record, msgpack, key, headers, timestamp)
        except msgspec.ValidationError as exc:
            raise RecordRejected("ValidationError", self._reason(str(exc))) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            # msgspec reports invalid UTF-8 inside a string as UnicodeDecodeError.
            raise RecordRejected("DecodeError", str(exc)) from None
        except RecordRejected:
            raise
        except Exception as exc:  # e.g. a MessagePack extension type: bad input, never a crash
            raise RecordRejected("DecodeError", f"{type(exc).__name__}: {exc}") from None
        if may_hold_nul or self._text_sources:
            self._check_no_nul(fields, only_sources=not may_hold_nul)
        return (*fields, partition, offset, batch_id)

    def _fields(
        self,
        record: Any,
        msgpack: bool,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        timestamp: int | None,
    ) -> tuple[Any, ...]:
        attrs = self._msgpack_attrs if msgpack else self._json_attrs
        fields = []
        for compiled in self._compiled:
            column = compiled.column
            try:
                if column.source == "value":
                    found = record
                    *parents, last = attrs[compiled.name]
                    for attr in parents:
                        found = getattr(found, attr)
                        if found is None:  # an optional object that is not there
                            break
                    found = msgspec.UNSET if found is None else getattr(found, last)
                    fields.append(compiled.finish(found, msgpack))
                elif column.source == "timestamp":
                    fields.append(self._timestamp(compiled, timestamp))
                else:
                    raw = key if column.source == "key" else _header(headers, column.header)
                    fields.append(compiled.finish(self._from_bytes(compiled, raw), False))
            except _Bad as exc:
                raise self._rejected(compiled, str(exc)) from None
        return tuple(fields)

    def _from_bytes(self, compiled: _Compiled, raw: bytes | None) -> Any:
        """A key's or header's value in the column's type (UNSET when there is none)."""
        if raw is None:
            return msgspec.UNSET
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise _Bad("Expected UTF-8 text, got bytes that are not") from None
        try:
            return compiled.from_text(text, raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            message = str(exc).removesuffix(" - at `$`")
            if not isinstance(exc, msgspec.ValidationError):  # not JSON at all
                message = f"Expected `{compiled.column.type}`, got text that is not one ({message})"
            raise _Bad(message) from None

    def _timestamp(self, compiled: _Compiled, timestamp: int | None) -> Any:
        if timestamp is None or timestamp < 0:
            if compiled.column.nullable:
                return None
            raise _Bad("Expected a record timestamp, got none")
        if compiled.column.type == "bigint":
            return timestamp
        return _epoch(timestamp, "ms")

    def _tombstone(self, key: bytes | None, partition: int, offset: int, batch_id: int) -> Row:
        compiled = self._key_column
        assert compiled is not None
        try:
            if key is None:
                raise _Bad("a tombstone (a record without a value) needs a Kafka key, got none")
            value = self._from_bytes(compiled, key)
            if compiled.text_like and "\x00" in (value if isinstance(value, str) else ""):
                raise _Bad("text cannot contain NUL (\\u0000)")
            value = compiled.finish(value, False)
        except _Bad as exc:
            raise RecordRejected(
                "ValidationError",
                f"stream {self._name!r}, column {compiled.name}: {exc} - at the Kafka key",
            ) from None
        fields = [value if c is compiled else None for c in self._compiled]
        return Tombstone((*fields, partition, offset, batch_id))

    def _check_no_nul(self, fields: tuple[Any, ...], *, only_sources: bool) -> None:
        """Refuse a record whose stored text holds a NUL, which PostgreSQL's text and jsonb
        cannot: found here, it costs no bisection in the database. Only the fields that are
        stored count (an ignored field may hold anything)."""
        for compiled, field in zip(self._compiled, fields, strict=True):
            if only_sources and compiled.column.source == "value":
                continue
            if (isinstance(field, str) and "\x00" in field) or (
                isinstance(field, msgspec.Raw) and _NUL_IN_JSON.search(field)
            ):
                raise self._rejected(compiled, "text cannot contain NUL (\\u0000)")

    def _rejected(self, compiled: _Compiled, message: str) -> RecordRejected:
        return RecordRejected(
            "ValidationError",
            f"stream {self._name!r}, column {compiled.name}: {message} - at {compiled.place}",
        )

    def _reason(self, message: str) -> str:
        """msgspec's message with the stream and the column it is about in front."""
        found = _MSGSPEC_PATH.search(message)
        path = "$" + (found[1] if found else "")
        missing = _MISSING_FIELD.match(message)
        if missing:
            path = f"{path}.{missing[1]}"
        names = [
            name
            for p, name in self._paths.items()
            if p == path
            or p.startswith(path + ".")
            or path.startswith(p + ".")
            or path.startswith(p + "[")
        ]
        if path == "$" or not names:
            return f"stream {self._name!r}: {message}"
        what = "column" if len(names) == 1 else "columns"
        return f"stream {self._name!r}, {what} {', '.join(names)}: {message}"


def _holds_nul(values: list[Any]) -> bool:
    """Whether any of a text or jsonb column's values holds a NUL (None: none there)."""
    texts = [v for v in values if v is not None]
    if not texts:
        return False
    if isinstance(texts[0], str):
        return "\x00" in "".join(texts)
    joined = b"".join(texts)
    return _NUL_ESCAPE in joined and any(_NUL_IN_JSON.search(v) for v in texts)


def _all_json(headers: list[Sequence[tuple[str, bytes | None]]]) -> bool:
    """Whether every record of a batch is JSON and has only UTF-8 header names (ASCII ones:
    any other takes the per-record road, which checks it)."""
    return (
        all(not h or _content_type(h) == JSON for h in headers)
        and "".join([name for record_headers in headers for name, _ in record_headers]).isascii()
    )


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    for header, value in headers:
        if header == name:
            return value
    return None


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


def _content_type(headers: Sequence[tuple[str, bytes | None]]) -> str:
    for name, value in headers:
        if name == CONTENT_TYPE_HEADER and value:  # a null or empty value means "not given"
            return value.decode("utf-8", "replace")
    return JSON


_DECODERS: dict[int, tuple[StreamSpec, StreamDecoder]] = {}


def decoder(spec: StreamSpec) -> StreamDecoder:
    """The decoder of a catalog stream (one per spec, compiled on first use). Specs are not
    hashable (a jsonb default is a msgspec.Raw): the cache holds each spec it was given, so
    its id stays its own."""
    cached = _DECODERS.get(id(spec))
    if cached is None or cached[0] is not spec:
        cached = _DECODERS[id(spec)] = (spec, StreamDecoder(spec))
    return cached[1]
