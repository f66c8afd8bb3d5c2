"""The streams catalog: every stream the pipeline ingests, declared in TOML; pure, no IO but
reading the files.

The five agent streams are declared in ``pipeline/streams.toml``, which ships with the
package; an operator's file, named by ``PIPELINE_STREAMS_FILE``, adds streams of its own
(or, with ``builtin = false``, replaces them). Everything keyed by a stream name (decoders,
tables, control, replay, dead letters, metrics) reads a :class:`Catalog`. The format is a
contract: docs/streams.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import os
import re
import tomllib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from pipeline.errors import ConfigError
from pipeline.partitions import (
    DEFAULT_AHEAD,
    INTERVALS,
    MAX_AHEAD,
    PARTITION_TYPES,
    Partitioning,
    parse_retention,
)
from pipeline.sql_names import derived

BUILTIN_FILE = Path(__file__).resolve().parent / "streams.toml"
STREAMS_FILE_ENV = "PIPELINE_STREAMS_FILE"

MODES = ("append", "latest", "history")
TOMBSTONES = ("ignore", "delete")
UNITS = ("s", "ms", "us", "ns")
INDEX_METHODS = ("btree", "brin")

#: Every column type, and the Python type a value of it is checked against.
TYPES: dict[str, Any] = {
    "text": str,
    "boolean": bool,
    "smallint": Annotated[int, msgspec.Meta(ge=-(2**15), le=2**15 - 1)],
    "integer": Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)],
    "bigint": Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
    "real": float,
    "double precision": float,
    "numeric": decimal.Decimal,
    "uuid": uuid.UUID,
    "timestamptz": Annotated[datetime.datetime, msgspec.Meta(tz=True)],
    "date": datetime.date,
    "jsonb": Any,
    "bytea": bytes,
}
INTEGER_TYPES = ("smallint", "integer", "bigint")
VERSION_TYPES = (*INTEGER_TYPES, "timestamptz")
SOURCES = ("value", "key", "timestamp", "header")

#: The columns every data table ends with, after the stream's own: where each row came from.
PROVENANCE = ("src_partition", "src_offset", "batch_id")
#: Provenance written by the database, not by COPY.
INGESTED_AT = "ingested_at"
RESERVED_COLUMNS = (*PROVENANCE, INGESTED_AT)
#: The pipeline's own tables: no stream may take their names.
RESERVED_TABLES = (
    "schema_migrations",
    "ingest_offsets",
    "dead_letters",
    "control_log",
    "control_state",
    "assignments",
    "checkpoints",
    "checkpoint_offsets",
    "replays",
    "replay_partitions",
    "table_owners",
    "stream_catalog",
    "ingest_gaps",
)

_STREAM_NAME = re.compile(r"[a-z][a-z0-9_]*")
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
_TOPIC = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME = 63  # PostgreSQL's identifier limit, in bytes
_HISTORY_SUFFIX = "_history"
# A table leaves room for the longest name derived from it (its history table).
_MAX_TABLE = _MAX_NAME - len(_HISTORY_SUFFIX)
_MAX_STREAM_NAME = 48  # a label value and a part of derived names


class NoDefault:
    """The default of a column without one (absent field: the record is refused)."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT = NoDefault()


class CatalogError(ConfigError):
    """A catalog that cannot be used; the message names the file, the stream and the key."""


@dataclass(frozen=True)
class Column:
    """One column of a stream's table and where its value comes from."""

    name: str
    type: str
    source: str = "value"  # one of SOURCES
    header: str = ""  # the header's name, for source "header"
    path: tuple[str, ...] = ()  # the field's path in the value, for source "value"
    default: Any = NO_DEFAULT  # checked against the type; jsonb as msgspec.Raw JSON
    nullable: bool = False
    unit: str = ""  # epoch unit of a timestamptz given as a number: one of UNITS
    object: bool = False  # jsonb only: the value must be a JSON object

    @property
    def has_default(self) -> bool:
        return self.default is not NO_DEFAULT

    @property
    def required(self) -> bool:
        """Whether a record without this field is refused."""
        return not self.nullable and not self.has_default

    def declaration(self) -> dict[str, Any]:
        """The column as the catalog file would write it, every key given (for comparing
        catalogs and for ``pipeline streams list --json``)."""
        default: Any = None
        if self.has_default:
            default = (
                msgspec.json.decode(self.default)
                if isinstance(self.default, msgspec.Raw)
                else msgspec.to_builtins(self.default)
            )
        return {
            "type": self.type,
            "source": f"header:{self.header}" if self.source == "header" else self.source,
            "path": ".".join(self.path),
            "default": default,
            "has_default": self.has_default,
            "nullable": self.nullable,
            "unit": self.unit,
            "object": self.object,
        }


@dataclass(frozen=True)
class Index:
    """An index a stream's table gets beside its key (and its provenance index)."""

    name: str
    columns: tuple[str, ...]
    using: str = "btree"


@dataclass(frozen=True)
class Table:
    """A target table and the stream's columns that fill it, in COPY order."""

    name: str  # as the catalog writes it: "table" or "schema.table"
    fields: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column COPY writes: the stream's, then the provenance."""
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
    # The column the row-per-record table (the append table, or the history) is partitioned
    # by: its unique key includes it, since PostgreSQL demands it (docs/streams.md).
    partition_by: str | None = None


@dataclass(frozen=True)
class StreamSpec:
    """One stream: its topic, its table(s), how records become rows."""

    name: str
    topic: str  # without PIPELINE_TOPIC_PREFIX
    table: str
    columns: tuple[Column, ...]
    mode: str = "append"
    key: tuple[str, ...] = ()
    version: str | None = None
    tombstones: str = "ignore"
    history_table: str | None = None  # set for mode "history" only
    indexes: tuple[Index, ...] = ()
    partitioning: Partitioning | None = None
    origin: str = "built-in"  # "built-in", or the file that declared it

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    @property
    def tables(self) -> StreamTables:
        fields = self.column_names
        history = Table(self.history_table, fields) if self.history_table else None
        partition_by = self.partitioning.column if self.partitioning else None
        return StreamTables(
            Table(self.table, fields), history, self.key, self.version, partition_by
        )

    @property
    def table_names(self) -> tuple[str, ...]:
        """The stream's tables, the "latest" table before its history."""
        return (self.table, self.history_table) if self.history_table else (self.table,)

    @property
    def row_per_record(self) -> tuple[str, ...]:
        """The tables that hold one row per record, which a replay or a rollback restores by
        source range: an append table, a history table; not a "latest" table."""
        if self.mode == "append":
            return (self.table,)
        return (self.history_table,) if self.history_table else ()

    @property
    def partitioned_tables(self) -> tuple[str, ...]:
        """The tables partitioned by time: the row-per-record one, when the stream declares
        ``partition_by``. A "latest" table is never partitioned: its key holds no time."""
        return self.row_per_record if self.partitioning else ()

    def declaration(self) -> dict[str, Any]:
        """The stream as its file would write it, every key given: what `pipeline migrate`
        records as applied, and what ``pipeline streams list --json`` prints."""
        return {
            "name": self.name,
            "topic": self.topic,
            "table": self.table,
            "history_table": self.history_table,
            "mode": self.mode,
            "key": list(self.key),
            "version": self.version,
            "tombstones": self.tombstones,
            "indexes": [
                {"name": i.name, "columns": list(i.columns), "using": i.using} for i in self.indexes
            ],
            "columns": {c.name: c.declaration() for c in self.columns},
            **(
                self.partitioning.declaration()
                if self.partitioning
                else {
                    "partition_by": None,
                    "partition_interval": None,
                    "partitions_ahead": None,
                    "retention": None,
                }
            ),
            "origin": self.origin,
        }


@dataclass(frozen=True)
class Catalog:
    """Every stream, built-in ones first, in declaration order."""

    streams: tuple[StreamSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {s.name: s for s in self.streams})

    def __getitem__(self, name: str) -> StreamSpec:
        by_name: dict[str, StreamSpec] = self._by_name  # type: ignore[attr-defined]
        return by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name  # type: ignore[attr-defined]

    def __iter__(self) -> Any:
        return iter(self.streams)

    def __len__(self) -> int:
        return len(self.streams)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.streams)

    def unknown(self, names: Iterable[str]) -> list[str]:
        """The names of ``names`` that are not streams of this catalog."""
        return [n for n in names if n not in self]

    def check_names(self, names: Iterable[str]) -> None:
        """Raise ValueError naming the streams that are not in the catalog, and the choices."""
        unknown = self.unknown(names)
        if unknown:
            raise ValueError(
                f"unknown stream(s) {', '.join(unknown)}; choose from {', '.join(self.names)}"
            )

    def topics(self, prefix: str = "", only: Iterable[str] | None = None) -> dict[str, str]:
        """Deployed topic -> stream name, for ``only`` these streams (default: all)."""
        wanted = None if only is None else set(only)
        return {
            f"{prefix}{s.topic}": s.name for s in self.streams if wanted is None or s.name in wanted
        }

    @property
    def data_tables(self) -> tuple[str, ...]:
        """Every table the streams land in, each "latest" table before its history."""
        return tuple(t for s in self.streams for t in s.table_names)

    def declaration(self) -> list[dict[str, Any]]:
        return [s.declaration() for s in self.streams]

    @property
    def partitioned(self) -> tuple[StreamSpec, ...]:
        """The streams whose tables are partitioned by time."""
        return tuple(s for s in self.streams if s.partitioning is not None)

    def with_retention(self, retention: Mapping[str, str]) -> Catalog:
        """This catalog with the retention of some streams set by the operator (``"90d"``,
        or ``"none"`` to keep rows for ever), by stream name: the ``PIPELINE_RETENTION_<STREAM>``
        settings. ValueError names every stream that is unknown or not partitioned, and every
        value that is not a retention."""
        errors = []
        changed = {}
        for name, text in retention.items():
            spec = self._by_name.get(name)  # type: ignore[attr-defined]
            if spec is None:
                errors.append(f"{name}: no such stream; choose from {', '.join(self.names)}")
                continue
            if spec.partitioning is None:
                errors.append(f"{name}: the stream is not partitioned (no partition_by)")
                continue
            try:
                value = parse_retention(text)
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
                continue
            partitioning = dataclasses.replace(spec.partitioning, retention=value)
            changed[name] = dataclasses.replace(spec, partitioning=partitioning)
        if errors:
            raise ValueError("; ".join(errors))
        return Catalog(tuple(changed.get(s.name, s) for s in self.streams))


# -- reading ---------------------------------------------------------------------------------


class _ColumnDecl(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    path: str | None = None
    source: str = "value"
    default: Any = msgspec.UNSET
    nullable: bool = False
    unit: str | None = None
    object: bool = False


class _IndexDecl(msgspec.Struct, forbid_unknown_fields=True):
    columns: list[str]
    name: str | None = None
    using: Literal["btree", "brin"] = "btree"


class _StreamDecl(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    topic: str
    table: str
    # Each column is converted on its own (_column), so that an error names it: msgspec
    # names a dict's value only as `columns[...]`.
    columns: dict[str, Any]
    mode: Literal["append", "latest", "history"] = "append"
    key: list[str] = []
    version: str | None = None
    tombstones: Literal["ignore", "delete"] = "ignore"
    history_table: str | None = None
    indexes: list[_IndexDecl] = []
    partition_by: str | None = None
    partition_interval: str | None = None
    partitions_ahead: int | None = None
    retention: str | None = None


class _FileDecl(msgspec.Struct, forbid_unknown_fields=True):
    builtin: bool = True
    streams: list[_StreamDecl] = []


def load(path: str | os.PathLike[str] | None = None) -> Catalog:
    """The catalog: the built-in streams, then those of the file at ``path`` (none: only the
    built-in ones). A file without ``builtin = false`` adds to the built-in streams.
    :class:`CatalogError` names the file, the stream and the key of every problem."""
    if not path:
        return _builtin()
    file = Path(path)
    try:
        stat = file.stat()
    except OSError as exc:
        raise CatalogError(f"{STREAMS_FILE_ENV}: cannot read {file}: {exc.strerror}") from None
    return _load_file(str(file), stat.st_mtime_ns, stat.st_size)


@functools.cache
def _builtin() -> Catalog:
    _, streams = parse(BUILTIN_FILE.read_text(), "built-in")
    return validate(streams)


@functools.lru_cache(maxsize=8)
def _load_file(path: str, _mtime_ns: int, _size: int) -> Catalog:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{STREAMS_FILE_ENV}: cannot read {path}: {exc}") from None
    builtin, streams = parse(text, path)
    return validate((*_builtin().streams, *streams) if builtin else streams)


def parse(text: str, origin: str) -> tuple[bool, tuple[StreamSpec, ...]]:
    """The file's ``builtin`` flag and its streams, each checked on its own; the checks
    across streams are :func:`validate`'s."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin}: not valid TOML: {exc}") from None
    try:
        decl = msgspec.convert(raw, _FileDecl)
    except msgspec.ValidationError as exc:
        raise CatalogError(f"{origin}: {_place(raw, str(exc))}") from None
    errors: list[str] = []
    streams = []
    for i, stream in enumerate(decl.streams):
        where = f"{origin}: stream {stream.name!r} (streams[{i}])"
        try:
            streams.append(_spec(stream, origin, where))
        except CatalogError as exc:
            errors.append(str(exc))
    if errors:
        raise CatalogError("\n".join(errors))
    return decl.builtin, tuple(streams)


def validate(streams: Iterable[StreamSpec]) -> Catalog:
    """The catalog of these streams, once no two share a name, a topic, a table or an index
    (an index's name is unique in its schema)."""
    streams = tuple(streams)
    errors = []
    seen: dict[str, dict[str, StreamSpec]] = {"name": {}, "topic": {}, "table": {}, "index": {}}
    for spec in streams:
        schema = spec.table.rpartition(".")[0] or "public"
        for what, values in (
            ("name", (spec.name,)),
            ("topic", (spec.topic,)),
            ("table", tuple(_bare_public(t) for t in spec.table_names)),
            ("index", tuple(_bare_public(f"{schema}.{i.name}") for i in spec.indexes)),
        ):
            for value in values:
                other = seen[what].get(value)
                if other is not None:
                    errors.append(
                        f"{spec.origin}: stream {spec.name!r}: {what} {value!r} is also "
                        f"stream {other.name!r}'s ({other.origin})"
                    )
                seen[what][value] = spec
    if errors:
        raise CatalogError("\n".join(errors))
    return Catalog(streams)


def _bare_public(table: str) -> str:
    return table.removeprefix("public.")


def _place(raw: Mapping[str, Any], message: str) -> str:
    """msgspec's ``... - at `$.streams[0].topic``` as ``stream 'orders' (streams[0]): topic:
    ...``, so the error names the stream by its name."""
    found = re.search(r"^(.*) - at `\$\.streams\[(\d+)\]\.?(.*)`$", message)
    if found is None:
        elsewhere = re.search(r"^(.*) - at `\$\.(.*)`$", message)
        return f"{elsewhere[2]}: {elsewhere[1]}" if elsewhere else message
    text, index, key = found.groups()
    name = None
    streams = raw.get("streams")
    if isinstance(streams, list) and int(index) < len(streams):
        entry = streams[int(index)]
        name = entry.get("name") if isinstance(entry, dict) else None
    stream = f"stream {name!r} (streams[{index}])" if name else f"streams[{index}]"
    return f"{stream}: {key or 'the stream'}: {text}" if key else f"{stream}: {text}"


def _spec(decl: _StreamDecl, origin: str, where: str) -> StreamSpec:
    errors: list[str] = []

    def error(key: str, message: str) -> None:
        errors.append(f"{where}: {key}: {message}")

    if not _STREAM_NAME.fullmatch(decl.name) or len(decl.name) > _MAX_STREAM_NAME:
        error(
            "name",
            f"{decl.name!r} must match [a-z][a-z0-9_]* and be at most "
            f"{_MAX_STREAM_NAME} characters",
        )
    if not _TOPIC.fullmatch(decl.topic) or len(decl.topic) > 200:
        error("topic", f"{decl.topic!r} is not a Kafka topic name ([A-Za-z0-9._-], at most 200)")
    _check_table(decl.table, "table", error, max_length=_MAX_TABLE)
    columns: list[Column] = []
    for name, column_decl in decl.columns.items():
        column = _column(name, column_decl, lambda m, n=name: error(f"columns.{n}", m))
        if column is not None:
            columns.append(column)
    if not decl.columns:
        error("columns", "a stream needs at least one column")
    by_name = {c.name: c for c in columns}
    # A record's field is one column's: the decoder reads a field as one type, and a field
    # cannot be both a value and an object holding another column's field.
    paths = {c.path: c.name for c in columns if c.source == "value"}
    for column in columns:
        if column.source != "value":
            continue
        for length in range(1, len(column.path) + 1):
            other = paths.get(column.path[:length])
            if other is not None and other != column.name:
                error(
                    f"columns.{column.name}",
                    f"path {'.'.join(column.path)!r} is column {other!r}'s field or inside it; "
                    "a field fills one column",
                )
                break

    if decl.mode == "append":
        if decl.version is not None:
            error("version", 'only a "latest" or "history" stream has a version')
        if decl.tombstones != "ignore":
            error("tombstones", 'only a "latest" or "history" stream deletes on tombstones')
        if decl.history_table is not None:
            error("history_table", 'only a "history" stream has a history table')
    elif not decl.key:
        error("key", f"a {decl.mode!r} stream needs a key: the columns that name its row")
    if len(set(decl.key)) != len(decl.key):
        error("key", f"{decl.key} names a column twice")
    for name in decl.key:
        key_column = by_name.get(name)
        if key_column is None:
            if name in decl.columns:
                continue  # the column's own error says what is wrong
            error("key", f"{name!r} is not a column of the stream")
        elif key_column.nullable:
            error("key", f"{name!r} is nullable; a key column must always have a value")
        elif key_column.type == "jsonb":
            error("key", f"{name!r} is jsonb; a key column is a scalar")
    if decl.version is not None:
        version_column = by_name.get(decl.version)
        if version_column is None:
            if decl.version not in decl.columns:
                error("version", f"{decl.version!r} is not a column of the stream")
        elif version_column.type not in VERSION_TYPES:
            error(
                "version",
                f"{decl.version!r} is {version_column.type}; a version is one of "
                f"{', '.join(VERSION_TYPES)}",
            )
        elif version_column.nullable:
            error("version", f"{decl.version!r} is nullable; a version must always have a value")
        elif decl.version in decl.key:
            error("version", f"{decl.version!r} is also in the key")
    if decl.tombstones == "delete" and len(decl.key) != 1:
        error(
            "tombstones",
            '"delete" needs a single-column key: a tombstone names its row '
            f"by its Kafka key alone, and the key is {decl.key}",
        )

    history_table = None
    if decl.mode == "history":
        history_table = decl.history_table or f"{decl.table}{_HISTORY_SUFFIX}"
        _check_table(history_table, "history_table", error, max_length=_MAX_NAME)
    elif decl.mode == "latest" and decl.history_table is not None:
        error("history_table", 'only a "history" stream has a history table')

    if history_table is not None and _bare_public(history_table) == _bare_public(decl.table):
        error("history_table", f"{history_table!r} is the stream's table too")

    indexes = []
    # Names the tables' own indexes take: their primary keys' and their source ranges'.
    taken = {
        derived(t, suffix)
        for t in (decl.table, history_table)
        if t
        for suffix in ("pkey", "source")
    }
    for i, index in enumerate(decl.indexes):
        missing = [c for c in index.columns if c not in decl.columns]
        if missing or not index.columns:
            error(f"indexes[{i}]", f"columns {index.columns} must be columns of the stream")
        name = index.name or derived(decl.table, *index.columns)
        if index.name is not None and (
            not _IDENTIFIER.fullmatch(index.name) or len(index.name) > _MAX_NAME
        ):
            error(
                f"indexes[{i}].name",
                f"{index.name!r} must match [a-z_][a-z0-9_]* and be at most {_MAX_NAME} characters",
            )
        elif name in taken:
            error(
                f"indexes[{i}].name",
                f"{name!r} is the name of another index of the stream's tables",
            )
        taken.add(name)
        indexes.append(Index(name, tuple(index.columns), index.using))

    partitioning = _partitioning(decl, by_name, error)

    if errors:
        raise CatalogError("\n".join(errors))
    return StreamSpec(
        name=decl.name,
        topic=decl.topic,
        table=decl.table,
        columns=tuple(columns),
        mode=decl.mode,
        key=tuple(decl.key),
        version=decl.version,
        tombstones=decl.tombstones,
        history_table=history_table,
        indexes=tuple(indexes),
        partitioning=partitioning,
        origin=origin,
    )


def _partitioning(
    decl: _StreamDecl, by_name: Mapping[str, Column], error: Any
) -> Partitioning | None:
    """The stream's partitioning, or None; every problem reported through ``error``."""
    if decl.partition_by is None:
        for key in ("partition_interval", "partitions_ahead", "retention"):
            if getattr(decl, key) is not None:
                error(key, "is for a partitioned stream: declare partition_by first")
        return None
    failed = False

    def fail(key: str, message: str) -> None:
        nonlocal failed
        failed = True
        error(key, message)

    if decl.mode == "latest":
        fail(
            "partition_by",
            'a "latest" table is not partitioned: it holds a row per key, and its key holds no '
            'time (a "history" stream partitions its history table)',
        )
    column = by_name.get(decl.partition_by)
    if column is None:
        if decl.partition_by not in decl.columns:
            fail("partition_by", f"{decl.partition_by!r} is not a column of the stream")
        else:
            failed = True  # the column's own error says what is wrong
    elif column.type not in PARTITION_TYPES:
        fail(
            "partition_by",
            f"{decl.partition_by!r} is {column.type}; a stream is partitioned by a "
            f"{' or '.join(PARTITION_TYPES)} column",
        )
    elif column.nullable:
        fail(
            "partition_by",
            f"{decl.partition_by!r} is nullable; a partition column must always have a value",
        )
    interval = decl.partition_interval or "day"
    if interval not in INTERVALS:
        fail(
            "partition_interval",
            f"unknown interval {interval!r}; choose from {', '.join(INTERVALS)}",
        )
    elif interval == "hour" and column is not None and column.type == "date":
        fail("partition_interval", f'"hour" needs a timestamptz column; {column.name!r} is a date')
    ahead = DEFAULT_AHEAD if decl.partitions_ahead is None else decl.partitions_ahead
    if not 1 <= ahead <= MAX_AHEAD:
        fail("partitions_ahead", f"{ahead} must be from 1 to {MAX_AHEAD}")
    retention = None
    if decl.retention is not None:
        try:
            retention = parse_retention(decl.retention)
        except ValueError as exc:
            fail("retention", str(exc))
    if failed:
        return None
    return Partitioning(decl.partition_by, interval, ahead, retention)


def _check_table(name: str, key: str, error: Any, *, max_length: int) -> None:
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        error(key, f"{name!r} must be a name or schema.name, each matching [a-z_][a-z0-9_]*")
        return
    if any(len(p) > max_length for p in parts):
        error(key, f"{name!r}: a name is at most {max_length} characters here")
    if parts[-1] in RESERVED_TABLES:
        error(key, f"{name!r} is one of the pipeline's own tables ({', '.join(RESERVED_TABLES)})")
    if parts[0] in ("pg_catalog", "information_schema") or parts[0].startswith("pg_"):
        error(key, f"{name!r} is in a system schema")


def _column(name: str, raw: Any, error: Any) -> Column | None:
    try:
        decl = msgspec.convert(raw, str | _ColumnDecl)
    except msgspec.ValidationError as exc:
        text, _, where = str(exc).partition(" - at `$")
        error(f"{where.rstrip('`').lstrip('.')}: {text}" if where else text)
        return None
    if isinstance(decl, str):
        decl = _ColumnDecl(type=decl)
    failed = False

    def fail(message: str) -> None:
        nonlocal failed
        failed = True
        error(message)

    if not _IDENTIFIER.fullmatch(name) or len(name) > _MAX_NAME:
        fail(f"the name must match [a-z_][a-z0-9_]* and be at most {_MAX_NAME} characters")
    elif name in RESERVED_COLUMNS:
        fail(f"{name!r} is a provenance column every table has ({', '.join(RESERVED_COLUMNS)})")
    if decl.type not in TYPES:
        fail(f"unknown type {decl.type!r}; choose from {', '.join(TYPES)}")
    source, colon, header = decl.source.partition(":")
    if source not in SOURCES or (source == "header") != bool(colon and header):
        fail(f"source {decl.source!r} must be value, key, timestamp or header:NAME")
    path: tuple[str, ...] = ()
    if decl.path is not None:
        if source != "value":
            fail(f"path is for a field of the value, not of source {decl.source!r}")
        path = tuple(decl.path.split("."))
        if not all(path):
            fail(f"path {decl.path!r} must be field names joined by dots")
    elif source == "value":
        path = (name,)
    if decl.unit is not None and (decl.type != "timestamptz" or decl.unit not in UNITS):
        fail(
            f"unit {decl.unit!r} is for a timestamptz given as an epoch number: one of "
            f"{', '.join(UNITS)}"
        )
    if source == "timestamp" and decl.type not in ("timestamptz", "bigint"):
        fail(
            f'source "timestamp" (the Kafka record\'s time) fills a timestamptz or bigint, '
            f"not {decl.type}"
        )
    if decl.object and decl.type != "jsonb":
        fail("object = true is for a jsonb column")
    default: Any = NO_DEFAULT
    if decl.default is not msgspec.UNSET and not failed:
        try:
            if decl.type == "jsonb":
                if decl.object and not isinstance(decl.default, dict):
                    raise msgspec.ValidationError("Expected `object`")
                default = msgspec.Raw(msgspec.json.encode(decl.default))
            else:
                default = msgspec.convert(decl.default, TYPES[decl.type])
        except (msgspec.ValidationError, TypeError) as exc:
            fail(f"default {decl.default!r} is not a {decl.type}: {exc}")
    if failed:
        return None
    return Column(
        name=name,
        type=decl.type,
        source=source,
        header=header,
        path=path,
        default=default,
        nullable=decl.nullable,
        unit=decl.unit or "",
        object=decl.object,
    )
