"""The DDL that makes a database hold a streams catalog's tables, or every reason it will not;
pure.

:func:`plan` compares a :class:`~pipeline.catalog.Catalog` with what the database holds (a
:class:`DatabaseState`: its tables as pg_catalog describes them, and the catalog `pipeline
migrate` last recorded) and gives the statements that `pipeline migrate` runs and `pipeline
streams plan` prints, or raises :class:`Refused` listing every change it does not make.
:func:`missing` is the agents' check at start. The table conventions and the evolution rules:
docs/streams.md.
"""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pipeline import partition_upgrade, partitions, sql_names
from pipeline.catalog import (
    INGESTED_AT,
    INTEGER_TYPES,
    PROVENANCE,
    RESERVED_COLUMNS,
    Catalog,
    Column,
    Index,
    StreamSpec,
)
from pipeline.errors import SchemaError

WRITER, READER = "pipeline_writer", "pipeline_reader"
MIGRATE_HINT = (
    "run `pipeline migrate` as the migrator (PIPELINE_MIGRATE_DATABASE_URL, docs/streams.md)"
)

#: How pg_catalog's format_type() spells the catalog's types, where it differs.
_FORMAT_TYPE = {"timestamptz": "timestamp with time zone"}
_PROVENANCE_TYPES = dict(zip(PROVENANCE, ("integer", "bigint", "bigint"), strict=True))
_SOURCE_INDEX = "source"  # <table>_source: BRIN on the source range of row-per-record tables


# -- what the database holds ----------------------------------------------------------------


@dataclass(frozen=True)
class ColumnState:
    name: str
    type: str  # as format_type() gives it: "timestamp with time zone"
    not_null: bool
    has_default: bool = False


@dataclass(frozen=True)
class IndexState:
    name: str
    method: str  # btree, brin, ...
    columns: tuple[str, ...]
    primary: bool = False
    # False: a CREATE INDEX CONCURRENTLY that did not finish left it; writes keep it up to
    # date, but nothing may use it.
    valid: bool = True


@dataclass(frozen=True)
class CheckState:
    """A CHECK constraint: its name, the columns it reads, its definition as
    pg_get_constraintdef() gives it, and whether every row was checked (not NOT VALID)."""

    name: str
    columns: tuple[str, ...]
    definition: str
    validated: bool = True


@dataclass(frozen=True)
class TableState:
    columns: tuple[ColumnState, ...]
    primary_key: tuple[str, ...] = ()
    indexes: tuple[IndexState, ...] = ()
    checks: tuple[CheckState, ...] = ()
    # Partitioned (pg_class.relkind 'p'): by range of this column, with a DEFAULT partition
    # or not.
    partitioned: bool = False
    partition_by: str | None = None
    has_default: bool = False

    def column(self, name: str) -> ColumnState | None:
        return next((c for c in self.columns if c.name == name), None)

    def index(self, name: str) -> IndexState | None:
        return next((i for i in self.indexes if i.name == name), None)

    def check(self, name: str) -> CheckState | None:
        return next((c for c in self.checks if c.name == name), None)


@dataclass(frozen=True)
class DatabaseState:
    """The catalog's tables that exist, by ``(schema, table)``; the schemas of those tables
    that exist; each stream's declaration as `pipeline migrate` last recorded it."""

    tables: Mapping[tuple[str, str], TableState] = field(default_factory=dict)
    schemas: frozenset[str] = frozenset({"public"})
    applied: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# -- what the catalog needs -----------------------------------------------------------------


@dataclass(frozen=True)
class TableShape:
    """One table a stream needs, by the conventions of docs/streams.md."""

    stream: str
    name: str  # as the catalog writes it
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    indexes: tuple[Index, ...]
    version_check: str | None  # the integer version column that gets CHECK (>= 0)
    # The column the table is partitioned by range of, with a DEFAULT partition; None: a
    # plain table. Its primary key ends with this column, as PostgreSQL demands.
    partition_by: str | None = None
    partition_interval: str | None = None

    @property
    def qualified(self) -> tuple[str, str]:
        return sql_names.split_table(self.name)

    @property
    def display(self) -> str:
        return ".".join(self.qualified)


def shapes(spec: StreamSpec) -> tuple[TableShape, ...]:
    """The tables of a stream: one, or a "latest" table and its history.

    A table with a row per record (append, history) gets a BRIN index on its source range,
    which a replay and a rollback delete by: rows arrive in offset order per partition, so
    each block range covers a narrow span of offsets, and a BRIN index costs COPY next to
    nothing where a B-tree would cost it dearly (docs/replay.md). A "latest" table holds a row
    per key and is restored through its history. The stream's own indexes go on its first
    table."""
    version = spec.version
    check = version if version and spec.column(version).type in INTEGER_TYPES else None
    partition_by = spec.partitioning.column if spec.partitioning else None
    interval = spec.partitioning.interval if spec.partitioning else None
    source = Index(
        sql_names.derived(spec.table, _SOURCE_INDEX), ("src_partition", "src_offset"), "brin"
    )
    if spec.mode == "append":
        indexes = (source, *spec.indexes)
        key = partition_key(spec.key, partition_by)
        return (
            TableShape(
                spec.name, spec.table, spec.columns, key, indexes, check, partition_by, interval
            ),
        )
    latest = TableShape(spec.name, spec.table, spec.columns, spec.key, spec.indexes, check)
    if spec.history_table is None:
        return (latest,)
    history_key = partition_key(
        (*spec.key, version) if version else ("src_partition", "src_offset"), partition_by
    )
    history_source = Index(
        sql_names.derived(spec.history_table, _SOURCE_INDEX),
        ("src_partition", "src_offset"),
        "brin",
    )
    history = TableShape(
        spec.name,
        spec.history_table,
        spec.columns,
        history_key,
        (history_source,),
        check,
        partition_by,
        interval,
    )
    return (latest, history)


def partition_key(key: tuple[str, ...], partition_by: str | None) -> tuple[str, ...]:
    """A partitioned table's primary key: the key, then the partition column unless the key
    has it. A table without a key gets none."""
    if not key or partition_by is None or partition_by in key:
        return key
    return (*key, partition_by)


def pg_type(column_type: str) -> str:
    """A catalog type as format_type() spells it."""
    return _FORMAT_TYPE.get(column_type, column_type)


# -- statements -----------------------------------------------------------------------------


def create_table(shape: TableShape, check_name: str | None = None) -> str:
    """``check_name`` names the version column's CHECK: a table attached as a partition must
    have each CHECK of its parent under the same name."""
    lines = []
    for column in shape.columns:
        line = f"    {sql_names.ident(column.name)} {column.type}"
        if not column.nullable:
            line += " NOT NULL"
        if column.name == shape.version_check:
            named = f" CONSTRAINT {sql_names.ident(check_name)}" if check_name else ""
            line += f"{named} CHECK ({sql_names.ident(column.name)} >= 0)"
        lines.append(line)
    for name in PROVENANCE:
        lines.append(f"    {sql_names.ident(name)} {_PROVENANCE_TYPES[name]} NOT NULL")
    # Written by the database, not by COPY. now() is the transaction's time, not volatile:
    # COPY keeps its multi-row insert path.
    lines.append(f"    {sql_names.ident(INGESTED_AT)} timestamptz NOT NULL DEFAULT now()")
    if shape.primary_key:
        lines.append(f"    PRIMARY KEY ({sql_names.columns(shape.primary_key)})")
    body = ",\n".join(lines)
    partitioned = (
        f" PARTITION BY RANGE ({sql_names.ident(shape.partition_by)})" if shape.partition_by else ""
    )
    return f"CREATE TABLE {sql_names.table(shape.name)} (\n{body}\n){partitioned}"


def create_default_partition(shape: TableShape) -> str:
    """The DEFAULT partition of a partitioned table: a row whose range has no partition yet
    lands there, never fails; `pipeline partitions maintain` moves it out."""
    schema, _ = shape.qualified
    name = sql_names.table(f"{schema}.{partitions.default_name(shape.name)}")
    return f"CREATE TABLE {name} PARTITION OF {sql_names.table(shape.name)} DEFAULT"


def create_index(shape: TableShape, index: Index) -> str:
    # The index goes in its table's schema: CREATE INDEX takes no schema for its name.
    using = f" USING {index.using}" if index.using != "btree" else ""
    return (
        f"CREATE INDEX {sql_names.ident(index.name)} ON {sql_names.table(shape.name)}{using} "
        f"({sql_names.columns(index.columns)})"
    )


def grants(table: str) -> tuple[str, ...]:
    quoted = sql_names.table(table)
    return (
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {quoted} TO {sql_names.ident(WRITER)}",
        f"GRANT SELECT ON {quoted} TO {sql_names.ident(READER)}",
    )


def create_schema(schema: str) -> tuple[str, ...]:
    quoted = sql_names.ident(schema)
    return (
        f"CREATE SCHEMA IF NOT EXISTS {quoted}",
        f"GRANT USAGE ON SCHEMA {quoted} TO {sql_names.ident(WRITER)}, {sql_names.ident(READER)}",
    )


def add_column(table: str, column: Column) -> str:
    """An added column: nullable, or NOT NULL with its default as a constant, which the rows
    already there take without a rewrite of the table."""
    definition = f"{sql_names.ident(column.name)} {column.type}"
    if not column.nullable:
        definition += f" NOT NULL DEFAULT {literal(column)}"
    return f"ALTER TABLE {sql_names.table(table)} ADD COLUMN {definition}"


def literal(column: Column) -> str:
    """The column's default as an SQL constant of its type."""
    value = column.default
    if column.type == "boolean":
        return "true" if value else "false"
    if column.type in INTEGER_TYPES:
        return str(int(value))
    if column.type in ("real", "double precision"):
        number = float(value)
        text = repr(number) if math.isfinite(number) else str(number).replace("inf", "Infinity")
        return f"{_string(text)}::{column.type}"
    if column.type == "bytea":
        return f"{_string(chr(92) + 'x' + bytes(value).hex())}::bytea"
    if column.type == "jsonb":
        raw = value if isinstance(value, msgspec.Raw) else msgspec.json.encode(value)
        return f"{_string(bytes(raw).decode())}::jsonb"
    if isinstance(value, datetime.datetime | datetime.date):
        return f"{_string(value.isoformat())}::{column.type}"
    if isinstance(value, decimal.Decimal | uuid.UUID | str):
        return f"{_string(str(value))}::{column.type}"
    raise TypeError(f"no SQL constant for {value!r} ({column.type})")


def _string(text: str) -> str:
    """An escape string constant: the same whatever standard_conforming_strings says."""
    if "\x00" in text:
        raise ValueError("a NUL cannot be in an SQL string constant")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upgrade:
    """An existing table made partitioned, its rows kept (docs/streams.md, "Upgrading to
    partitioned tables"): ``online``, each statement on its own outside a transaction (none
    blocks writes for long), then ``swap``, one short transaction; and what they do."""

    table: str
    online: tuple[str, ...]
    swap: tuple[str, ...]
    actions: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """The statements that make the database hold the catalog, and what each part does, in
    words (what `pipeline migrate` prints): ``statements`` in one transaction, then each of
    ``upgrades``."""

    statements: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    upgrades: tuple[Upgrade, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.statements and not self.upgrades

    @property
    def script(self) -> tuple[str, ...]:
        """Every statement in the order `pipeline migrate` runs them, each upgrade's parts
        introduced by a comment (what `pipeline streams plan` prints)."""
        lines = [f"{s};" for s in self.statements]
        for upgrade in self.upgrades:
            if upgrade.online:
                lines.append(f"-- partition {upgrade.table}: each statement on its own")
                lines.extend(f"{s};" for s in upgrade.online)
            lines.append(f"-- partition {upgrade.table}: in one transaction")
            lines.extend(f"{s};" for s in upgrade.swap)
        return tuple(lines)


class Refused(SchemaError):
    """The catalog asks for a change `pipeline migrate` does not make; every one is listed,
    each with what to do by hand."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"the streams catalog asks for {len(self.problems)} change(s) `pipeline migrate` "
            f"does not make; nothing was changed:\n{lines}"
        )


def plan(
    catalog: Catalog | Iterable[StreamSpec],
    state: DatabaseState,
    now: datetime.datetime | None = None,
) -> Plan:
    """The DDL that gives the database the catalog's tables, or :class:`Refused`.

    Allowed: a new stream (its schema, tables, indexes, grants), and a new column that is
    nullable or has a default; an index of the catalog that is missing; a partitioned
    table's missing DEFAULT partition; an existing table made partitioned, its rows kept
    (:mod:`pipeline.partition_upgrade`, its cut-over reckoned from ``now``). Refused:
    whatever would change or drop what the tables hold, or change how a table is
    partitioned (docs/streams.md, "Evolution")."""
    now = datetime.datetime.now(datetime.UTC) if now is None else now
    upgrades: list[Upgrade] = []
    problems: list[str] = []
    schemas: list[str] = []
    created: list[str] = []
    altered: list[str] = []
    actions: list[str] = []
    for spec in catalog:
        problems.extend(_declaration_changes(spec, state.applied.get(spec.name)))
        for shape in shapes(spec):
            schema, _ = shape.qualified
            table = state.tables.get(shape.qualified)
            if table is None:
                if schema not in state.schemas and schema not in schemas:
                    schemas.append(schema)
                    actions.append(f"create schema {schema}")
                created.append(create_table(shape))
                if shape.partition_by:
                    created.append(create_default_partition(shape))
                created.extend(create_index(shape, index) for index in shape.indexes)
                created.extend(grants(shape.name))
                actions.append(f"create table {shape.display} (stream {spec.name})")
                continue
            statements, done, found = _evolve(shape, table)
            altered.extend(statements)
            actions.extend(done)
            problems.extend(found)
            if found:
                continue
            if shape.partition_by and not table.partitioned:
                added = tuple(i.name for i in shape.indexes if table.index(i.name) is None)
                upgrades.append(partition_upgrade.upgrade(shape, table, now, added))
            elif shape.partition_by and not table.has_default:
                altered.append(create_default_partition(shape))
                actions.append(f"create the DEFAULT partition of {shape.display}")
    if problems:
        raise Refused(problems)
    statements = [s for schema in schemas for s in create_schema(schema)]
    actions.extend(a for u in upgrades for a in u.actions)
    return Plan(tuple(statements + created + altered), tuple(actions), tuple(upgrades))


def _evolve(shape: TableShape, table: TableState) -> tuple[list[str], list[str], list[str]]:
    """An existing table against its shape: the statements that add what is new, what they
    do, and every problem."""
    statements: list[str] = []
    actions: list[str] = []
    problems: list[str] = []
    where = f"stream {shape.stream!r}, table {shape.display}"
    quoted = sql_names.table(shape.name)
    declared = {c.name for c in shape.columns}
    for name, kind in _PROVENANCE_TYPES.items():
        found = table.column(name)
        if found is None or found.type != kind or not found.not_null:
            problems.append(
                f"{where}: has no provenance column {name} ({kind} NOT NULL), so the pipeline "
                "did not make it: rename or drop it by hand, or give the stream another table"
            )
            return statements, actions, problems
    for column in shape.columns:
        found = table.column(column.name)
        wanted = _describe(pg_type(column.type), not column.nullable)
        if found is None:
            if column.required:
                problems.append(
                    f"{where}, column {column.name!r}: a new column ({wanted}) must be "
                    "nullable or have a default, since the rows already there have no value "
                    "for it: declare `nullable = true` or a `default`"
                )
                continue
            statements.append(add_column(shape.name, column))
            actions.append(f"add column {shape.display}.{column.name} ({column.type})")
            continue
        if found.type != pg_type(column.type):
            problems.append(
                f"{where}, column {column.name!r}: type change, {found.type} in the database, "
                f"{pg_type(column.type)} in the catalog. The pipeline does not rewrite a "
                f"table: change it by hand (ALTER TABLE {quoted} ALTER COLUMN "
                f"{sql_names.ident(column.name)} TYPE {column.type} USING ..., which rewrites "
                "and locks the table), or declare a new column instead"
            )
        elif found.not_null != (not column.nullable):
            fix = "DROP NOT NULL" if column.nullable else "SET NOT NULL"
            problems.append(
                f"{where}, column {column.name!r}: nullability change, "
                f"{_describe(found.type, found.not_null)} in the database, {wanted} in the "
                f"catalog: change it by hand (ALTER TABLE {quoted} ALTER COLUMN "
                f"{sql_names.ident(column.name)} {fix}), or put the old definition back"
            )
    for extra in table.columns:
        if extra.name in declared or extra.name in RESERVED_COLUMNS:
            continue
        problems.append(
            f"{where}, column {extra.name!r}: removed or renamed, "
            f"{_describe(extra.type, extra.not_null)} in the database and not in the "
            "catalog: put it back in the catalog (with `nullable = true` if new records lack "
            f"it), or drop or rename it by hand (ALTER TABLE {quoted} DROP COLUMN "
            f"{sql_names.ident(extra.name)}) once no agent writes it"
        )
    if table.partitioned and table.partition_by != shape.partition_by:
        problems.append(_partitioning_change(shape, table))
        return statements, actions, problems
    # An unpartitioned table keeps its key until it is made partitioned.
    keys = (shape.primary_key, unpartitioned_key(shape)) if not table.partitioned else ()
    if table.primary_key != shape.primary_key and table.primary_key not in keys:
        problems.append(
            f"{where}: key change, primary key {_key(table.primary_key)} in the database, "
            f"{_key(shape.primary_key)} in the catalog: the rows already there were "
            "deduplicated by the old key; move them to a new table by hand and give the "
            "stream that table, or put the old key back"
        )
    for index in shape.indexes:
        found_index = table.index(index.name)
        if found_index is None:
            statements.append(create_index(shape, index))
            actions.append(f"create index {index.name} on {shape.display}")
        elif (found_index.method, found_index.columns) != (index.using, index.columns):
            problems.append(
                f"{where}, index {index.name!r}: {found_index.method} "
                f"({', '.join(found_index.columns)}) in the database, {index.using} "
                f"({', '.join(index.columns)}) in the catalog: drop it by hand (DROP INDEX "
                f"{sql_names.ident(index.name)}) and migrate again, or give it another name"
            )
    return statements, actions, problems


def unpartitioned_key(shape: TableShape) -> tuple[str, ...]:
    """The primary key ``shape``'s table had before it was partitioned: without the
    partition column that :func:`partition_key` added."""
    key = shape.primary_key
    if shape.partition_by and key and key[-1] == shape.partition_by:
        return key[:-1]
    return key


def _partitioning_change(shape: TableShape, table: TableState) -> str:
    where = f"stream {shape.stream!r}, table {shape.display}"
    if shape.partition_by is None:
        return (
            f"{where}: partitioned by range of {table.partition_by} in the database, not "
            "partitioned in the catalog. The pipeline does not merge partitions: put "
            "partition_by back, or copy the rows into a new unpartitioned table by hand and "
            "give the stream that table"
        )
    return (
        f"{where}: partitioned by range of {table.partition_by} in the database, of "
        f"{shape.partition_by} in the catalog. The pipeline does not repartition a table: put "
        "the old partition_by back, or copy the rows into a new table partitioned by hand "
        "and give the stream that table"
    )


# What a recorded declaration pins that the tables do not show (an append table with a key
# and a "latest" one look alike), and what to do about a change of it.
_PINNED = {
    "mode": "the rows already there were written under the old mode; give the stream a new "
    "table (and a new name) for the new mode, or put the old mode back",
    "key": "the rows already there were deduplicated by the old key; give the stream a new "
    "table for the new key, or put the old key back",
    "version": "the rows already there were chosen by the old version; give the stream a new "
    "table for the new version, or put the old version back",
    "table": "the stream's rows are in the old table: rename it by hand (ALTER TABLE ... RENAME "
    "TO ...) before you migrate, or put the old name back",
    "history_table": "the stream's history is in the old table: rename it by hand (ALTER TABLE "
    "... RENAME TO ...) before you migrate, or put the old name back",
    "partition_by": "the table is partitioned by the old column; put it back, or copy the "
    "rows into a new table partitioned as you want by hand and give the stream that table",
    "partition_interval": "the partitions there cover the old interval's ranges; put it back, "
    "or copy the rows into a new table partitioned as you want by hand and give the stream "
    "that table",
}
# Keys pinned only once set: an unpartitioned table may become partitioned (its upgrade).
_PINNED_ONCE_SET = frozenset({"partition_by", "partition_interval"})


def _declaration_changes(spec: StreamSpec, applied: Mapping[str, Any] | None) -> list[str]:
    if applied is None:
        return []
    new = spec.declaration()
    problems = []
    for key, fix in _PINNED.items():
        if key not in applied:
            continue
        was, now = applied[key], new[key]
        if key in _PINNED_ONCE_SET and applied.get("partition_by") is None:
            continue
        if key in ("table", "history_table") and was and now:
            # "orders" and "public.orders" are one table.
            was, now = (".".join(sql_names.split_table(t)) for t in (was, now))
        if was != now:
            problems.append(
                f"stream {spec.name!r}: {key} change, {_show(applied[key])} when last "
                f"migrated, {_show(new[key])} in the catalog: {fix}"
            )
    return problems


def _show(value: Any) -> str:
    if isinstance(value, list):
        return _key(tuple(value))
    return "none" if value is None else repr(value)


def _key(columns: Sequence[str]) -> str:
    return f"({', '.join(columns)})" if columns else "none"


def _describe(kind: str, not_null: bool) -> str:
    return f"{kind} NOT NULL" if not_null else f"{kind} nullable"


# -- the agents' check ----------------------------------------------------------------------


def missing(streams: Iterable[StreamSpec], state: DatabaseState) -> list[str]:
    """What the tables of ``streams`` lack for an agent to write them, each in a few words: a
    table, a column, a column of another type, the primary key its upserts and duplicate
    checks need, or a column the catalog does not know that a row must fill (NOT NULL without
    a default). A column the database has beyond the
    catalog's that is nullable or has a default is fine: agents of the previous catalog keep
    writing after a migration that added it.

    A partitioned stream's table may have either primary key: the key with the partition
    column, or the key alone of the table before the upgrade partitioned it; the
    writers' statements work on both (docs/streams.md, "Partitions and retention")."""
    found: list[str] = []
    for spec in streams:
        for shape in shapes(spec):
            table = state.tables.get(shape.qualified)
            if table is None:
                found.append(f"no table {shape.display}")
                continue
            declared = {c.name for c in shape.columns}
            for column in shape.columns:
                there = table.column(column.name)
                if there is None:
                    found.append(f"no column {shape.display}.{column.name}")
                elif there.type != pg_type(column.type):
                    found.append(
                        f"{shape.display}.{column.name} is {there.type}, the catalog says "
                        f"{pg_type(column.type)}"
                    )
            # A table not yet partitioned keeps its key until `pipeline migrate` upgrades it.
            keys: tuple[tuple[str, ...], ...] = (shape.primary_key,)
            if not table.partitioned:
                keys = (shape.primary_key, unpartitioned_key(shape))
            if table.primary_key not in keys:
                found.append(
                    f"{shape.display} has primary key {_key(table.primary_key)}, the catalog "
                    f"says {_key(shape.primary_key)}"
                )
            for extra in table.columns:
                known = extra.name in declared or extra.name in RESERVED_COLUMNS
                if not known and extra.not_null and not extra.has_default:
                    found.append(
                        f"{shape.display}.{extra.name} is NOT NULL without a default and not "
                        "in the catalog"
                    )
    return found


def tables_of(streams: Iterable[StreamSpec]) -> list[tuple[str, str]]:
    """Every ``(schema, table)`` the streams need, for reading their state."""
    return [shape.qualified for spec in streams for shape in shapes(spec)]
