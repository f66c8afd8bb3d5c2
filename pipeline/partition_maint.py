"""Partition maintenance and inspection, against PostgreSQL: `pipeline partitions maintain` and
`list`, and the status the agents export as metrics. The planning is pure
(:func:`pipeline.partitions.plan_maintenance`); docs/operations.md, "Partitions and
retention", says what a pass does and why each step takes the locks it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg

from pipeline import db, partitions, schema_plan, sql_names
from pipeline.catalog import Catalog
from pipeline.db import Connection
from pipeline.errors import PipelineError, SchemaError
from pipeline.partitions import Partitioning, Range

#: One session-level advisory lock for every maintainer of a database.
MAINTENANCE_LOCK = int.from_bytes(
    hashlib.sha256(b"agent-pipeline partitions maintain").digest()[:8], "big", signed=True
)
#: How long a step waits for its table lock before giving up and trying again: short, so a
#: step queued behind a long transaction never holds the agents' writes behind it for long.
LOCK_TIMEOUT_S = 1.0
LOCK_ATTEMPTS = 10
#: Rows of a DEFAULT partition counted at most: by `list`, and by the agents every 30 s.
LIST_COUNT_CAP = 1_000_000
PROBE_COUNT_CAP = 10_000

Say = Callable[[str], None]


class NotPartitioned(SchemaError):
    """The catalog says a table is partitioned, the database has it as a plain table (or not
    at all): `pipeline migrate` makes or upgrades it."""


T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """A partitioned table of the catalog, as maintenance and the metrics see it."""

    stream: str
    table: str  # as the catalog writes it
    column: str
    column_type: str  # one of partitions.PARTITION_TYPES
    partitioning: Partitioning

    @property
    def schema(self) -> str:
        return sql_names.split_table(self.table)[0]

    @property
    def default(self) -> str:
        """The DEFAULT partition, quoted."""
        return sql_names.table(f"{self.schema}.{partitions.default_name(self.table)}")

    def partition(self, range_: Range) -> str:
        """The partition made for ``range_``, quoted."""
        name = partitions.partition_name(self.table, range_, self.partitioning.interval)
        return sql_names.table(f"{self.schema}.{name}")


def targets(catalog: Catalog, streams: Iterable[str] | None = None) -> list[Target]:
    """The partitioned tables of ``streams`` (default: every stream) in catalog order."""
    wanted = None if streams is None else set(streams)
    found = []
    for spec in catalog.partitioned:
        if wanted is not None and spec.name not in wanted:
            continue
        assert spec.partitioning is not None
        column = spec.column(spec.partitioning.column)
        for table in spec.partitioned_tables:
            found.append(Target(spec.name, table, column.name, column.type, spec.partitioning))
    return found


@dataclass(frozen=True)
class PartitionInfo:
    """One partition of a table: its name and range (None for DEFAULT), estimated rows
    (None when never analysed) and bytes on disk, indexes included."""

    name: str
    range: Range | None
    estimated_rows: int | None
    bytes: int


async def read_partitions(conn: Connection, table: str) -> list[PartitionInfo]:
    """``table``'s partitions, oldest range first, DEFAULT last. The caller's session or
    transaction has TimeZone UTC: the bounds are read as text. SchemaError when ``table`` is
    missing or not partitioned."""
    schema, bare = sql_names.split_table(table)
    kind = await conn.fetchval(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2",
        schema,
        bare,
    )
    if kind != "p":
        what = "does not exist" if kind is None else "is not partitioned"
        raise NotPartitioned(
            f"table {schema}.{bare} {what}: run `pipeline migrate` (the upgrade makes a "
            "partitioned table of an existing one)"
        )
    rows = await conn.fetch(
        """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound, c.reltuples,
                  pg_total_relation_size(c.oid) AS bytes
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_class p ON p.oid = i.inhparent
           JOIN pg_namespace n ON n.oid = p.relnamespace
           WHERE n.nspname = $1 AND p.relname = $2""",
        schema,
        bare,
    )
    found = [
        PartitionInfo(
            r["relname"],
            partitions.parse_bound(r["bound"]),
            None if r["reltuples"] < 0 else round(r["reltuples"]),
            r["bytes"],
        )
        for r in rows
    ]
    return sorted(found, key=lambda p: (p.range is None, p.range))


async def default_ranges(conn: Connection, target: Target) -> dict[Range, int]:
    """The rows in ``target``'s DEFAULT partition, counted per interval range (TimeZone UTC:
    date_trunc cuts a week from Monday, a day at midnight UTC)."""
    column = sql_names.ident(target.column)
    rows = await conn.fetch(
        f"SELECT date_trunc($1, {column}::timestamptz) AS start, count(*) AS n "
        f"FROM {target.default} GROUP BY 1",
        target.partitioning.interval,
    )
    return {
        partitions.interval_range(r["start"], target.partitioning.interval): r["n"] for r in rows
    }


async def count_default(conn: Connection, target: Target, cap: int) -> int:
    """The rows in ``target``'s DEFAULT partition, counted up to ``cap``."""
    count: int = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT 1 FROM {target.default} LIMIT {int(cap)}) AS kept"
    )
    return count


# -- one pass ----------------------------------------------------------------------------


@dataclass
class TableResult:
    """What one pass did to one table."""

    table: str
    created: int = 0  # partitions made ahead (no row of theirs was in DEFAULT)
    moved: int = 0  # partitions made for rows that were in DEFAULT
    dropped: int = 0
    rows_moved: int = 0
    rows_expired: int = 0  # rows in DEFAULT older than the horizon, deleted
    error: str | None = None
    actions: list[str] = field(default_factory=list)


def _literal(moment: datetime.datetime) -> str:
    return f"{partitions.bound_literal(moment, 'timestamptz')}::timestamptz"


def _lock_timeout() -> str:
    return f"SET LOCAL lock_timeout = {max(1, round(LOCK_TIMEOUT_S * 1000))}"


async def _with_lock_retries(
    conn: Connection, say: Say, what: str, step: Callable[[], Awaitable[T]]
) -> T:
    """Run ``step()`` (a coroutine function) in its own transaction, whose locks wait at most
    LOCK_TIMEOUT_S; a step that timed out, or lost a deadlock, is tried again, up to
    LOCK_ATTEMPTS times. Every step is undone whole when it fails.

    The step also holds the maintainers' lock for its transaction: granted at once under the
    session's own (:func:`maintain`), and what keeps two maintainers' steps apart where a
    transaction pooler leaves no session to hold a lock in. Each step checks, under it, that
    it is still to be done."""
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            async with db.transaction(conn, durable=True):
                await conn.execute(f"{_lock_timeout()}; SET LOCAL TimeZone = 'UTC'")
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MAINTENANCE_LOCK)
                return await step()
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            if attempt == LOCK_ATTEMPTS:
                raise PipelineError(
                    f"{what}: the table stayed locked through {LOCK_ATTEMPTS} attempts "
                    f"({type(exc).__name__}); a long transaction holds it"
                ) from exc
            say(f"{what}: waiting for a lock (attempt {attempt} of {LOCK_ATTEMPTS})")
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


async def _columns(conn: Connection, table: str) -> list[str]:
    schema, bare = sql_names.split_table(table)
    rows = await conn.fetch(
        """SELECT a.attname FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
           ORDER BY a.attnum""",
        schema,
        bare,
    )
    return [r["attname"] for r in rows]


async def _make_partition(
    conn: Connection, target: Target, range_: Range, horizon: datetime.datetime | None
) -> tuple[int, int] | None:
    """Make the partition of ``range_`` in one transaction, moving in its rows from DEFAULT:
    (rows moved, rows deleted as older than the horizon); None when a partition over the
    range is there already (another maintainer made it).

    PostgreSQL refuses ``CREATE TABLE ... PARTITION OF`` while DEFAULT holds a row of the
    range. So the table is made standalone, the rows moved in, then it is attached. First the
    parent is locked against writes (SHARE ROW EXCLUSIVE; reads go on): a write already
    routed to DEFAULT by the partitions it saw at its start would otherwise fail the new
    DEFAULT constraint once the attach commits. Writers wait for this short transaction, then
    route by the new partitions."""
    parent = sql_names.table(target.table)
    column = sql_names.ident(target.column)
    new = target.partition(range_)
    await conn.execute(f"LOCK TABLE {parent} IN SHARE ROW EXCLUSIVE MODE")
    await conn.execute(f"LOCK TABLE {target.default} IN ACCESS EXCLUSIVE MODE")
    existing = await read_partitions(conn, target.table)
    if any(p.range is not None and partitions.overlaps(p.range, range_) for p in existing):
        return None
    expired = 0
    start = range_.start
    if horizon is not None and horizon > range_.start:
        status = await conn.execute(
            f"DELETE FROM {target.default} WHERE {column} >= {_literal(range_.start)} "
            f"AND {column} < {_literal(min(horizon, range_.end))}"
        )
        expired = db.row_count(status)
        start = min(horizon, range_.end)
    await conn.execute(
        f"CREATE TABLE {new} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
        "INCLUDING STORAGE INCLUDING COMMENTS)"
    )
    names = sql_names.columns(await _columns(conn, target.table))
    status = await conn.execute(
        f"WITH moved AS (DELETE FROM {target.default} WHERE {column} >= {_literal(start)} "
        f"AND {column} < {_literal(range_.end)} RETURNING {names}) "
        f"INSERT INTO {new} ({names}) SELECT {names} FROM moved"
    )
    moved = db.row_count(status)
    low = partitions.bound_literal(range_.start, target.column_type)
    high = partitions.bound_literal(range_.end, target.column_type)
    await conn.execute(
        f"ALTER TABLE {parent} ATTACH PARTITION {new} FOR VALUES FROM ({low}) TO ({high})"
    )
    return moved, expired


async def _expire_default(conn: Connection, target: Target, range_: Range) -> int:
    column = sql_names.ident(target.column)
    status = await conn.execute(
        f"DELETE FROM {target.default} WHERE {column} >= {_literal(range_.start)} "
        f"AND {column} < {_literal(range_.end)}"
    )
    return db.row_count(status)


async def _drop(conn: Connection, target: Target, name: str) -> bool:
    """DETACH then DROP, in one transaction; False when it is gone already (another
    maintainer dropped it). ``DETACH ... CONCURRENTLY`` is refused on a table with a DEFAULT
    partition, so the detach takes ACCESS EXCLUSIVE on the parent: only for a moment, and
    never queued for longer than the lock timeout."""
    if name not in {p.name for p in await read_partitions(conn, target.table)}:
        return False
    partition = sql_names.table(f"{target.schema}.{name}")
    await conn.execute(f"ALTER TABLE {sql_names.table(target.table)} DETACH PARTITION {partition}")
    await conn.execute(f"DROP TABLE {partition}")
    return True


async def _grant_default(conn: Connection, target: Target) -> None:
    """Let the agents and readers count DEFAULT's rows (the metrics, `partitions list`): a
    table in a schema other than public gets no default privileges."""
    for role in (schema_plan.WRITER, schema_plan.READER):
        allowed = await conn.fetchval(
            "SELECT has_table_privilege($1, $2::regclass, 'SELECT')", role, target.default
        )
        if not allowed:
            await conn.execute(f"GRANT SELECT ON {target.default} TO {sql_names.ident(role)}")


async def maintain_table(
    conn: Connection, target: Target, now: datetime.datetime, say: Say
) -> TableResult:
    """One pass over one table (:func:`maintain` holds the lock)."""
    result = TableResult(target.table)

    def act(line: str) -> None:
        result.actions.append(line)
        say(f"{target.table}: {line}")

    async with db.transaction(conn):
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        found = await read_partitions(conn, target.table)
        if not any(p.range is None for p in found):
            raise SchemaError(
                f"table {target.table} has no DEFAULT partition: run `pipeline migrate`"
            )
        in_default = await default_ranges(conn, target)
    existing = [p.range for p in found if p.range is not None]
    plan = partitions.plan_maintenance(existing, set(in_default), now, target.partitioning)
    horizon = target.partitioning.horizon(now)
    for range_ in plan.blocked:
        act(
            f"{in_default[range_]} row(s) of {partitions.show_range(range_)} stay in DEFAULT: "
            "an existing partition covers part of that range"
        )
    # Each step counts what it did in its own transaction: the counts hold even when a later
    # step fails or the maintainer is stopped.
    for range_ in plan.expire:

        async def expire(r: Range = range_) -> int:
            gone = await _expire_default(conn, target, r)
            await _count(conn, target.table, rows_expired=gone)
            return gone

        gone = await _with_lock_retries(conn, say, f"{target.table}: expiring", expire)
        result.rows_expired += gone
        act(
            f"deleted {gone} row(s) of {partitions.show_range(range_)} from DEFAULT: "
            "older than the retention"
        )
    for range_ in sorted({*plan.move, *plan.create}):

        async def make(r: Range = range_) -> tuple[int, int] | None:
            done = await _make_partition(conn, target, r, horizon)
            if done is not None:
                moved, gone = done
                kind = "partitions_moved" if r in plan.move or moved else "partitions_created"
                await _count(conn, target.table, **{kind: 1}, rows_moved=moved, rows_expired=gone)
            return done

        done = await _with_lock_retries(
            conn, say, f"{target.table}: making {partitions.show_range(range_)}", make
        )
        if done is None:
            continue
        moved, gone = done
        name = partitions.partition_name(target.table, range_, target.partitioning.interval)
        result.rows_moved += moved
        result.rows_expired += gone
        if range_ in plan.move or moved:
            result.moved += 1
            extra = f", deleted {gone} older than the retention" if gone else ""
            act(
                f"made {name} {partitions.show_range(range_)}, "
                f"moved {moved} row(s) from DEFAULT{extra}"
            )
        else:
            result.created += 1
            act(f"made {name} {partitions.show_range(range_)}")
    names = {p.range: p.name for p in found if p.range is not None}
    for range_ in plan.drop:
        name = names[range_]

        async def drop(n: str = name) -> bool:
            dropped = await _drop(conn, target, n)
            if dropped:
                await _count(conn, target.table, partitions_dropped=1)
            return dropped

        if not await _with_lock_retries(conn, say, f"{target.table}: dropping {name}", drop):
            continue
        result.dropped += 1
        act(f"dropped {name} {partitions.show_range(range_)}: older than the retention")
    await _with_lock_retries(
        conn,
        say,
        f"{target.table}: granting SELECT on DEFAULT",
        lambda: _grant_default(conn, target),
    )
    return result


_COUNTS = (
    "partitions_created",
    "partitions_moved",
    "partitions_dropped",
    "rows_moved",
    "rows_expired",
)


async def _count(conn: Connection, table: str, **added: int) -> None:
    """Add to ``table``'s counts in partition_maintenance, in the step's transaction."""
    values = [added.get(name, 0) for name in _COUNTS]
    updates = ", ".join(f"{name} = m.{name} + excluded.{name}" for name in _COUNTS)
    columns = ", ".join(_COUNTS)
    await conn.execute(
        f"""INSERT INTO partition_maintenance AS m (table_name, last_attempt_at, {columns})
            VALUES ($1, clock_timestamp(), $2, $3, $4, $5, $6)
            ON CONFLICT (table_name) DO UPDATE SET {updates}""",
        table,
        *values,
    )


async def _record(conn: Connection, result: TableResult) -> None:
    """The end of ``result.table``'s pass: its success, or its error."""
    async with db.transaction(conn, durable=True):
        await conn.execute(
            """INSERT INTO partition_maintenance AS m
                   (table_name, last_success_at, last_attempt_at, last_error, last_error_at)
               VALUES ($1, CASE WHEN $2::text IS NULL THEN clock_timestamp() END,
                       clock_timestamp(), $2::text,
                       CASE WHEN $2::text IS NOT NULL THEN clock_timestamp() END)
               ON CONFLICT (table_name) DO UPDATE SET
                   last_success_at = coalesce(excluded.last_success_at, m.last_success_at),
                   last_attempt_at = excluded.last_attempt_at,
                   last_error = excluded.last_error,
                   last_error_at = excluded.last_error_at""",
            result.table,
            result.error,
        )


async def maintain(
    conn: Connection,
    tables: Sequence[Target],
    now: datetime.datetime,
    say: Say,
    *,
    session_lock: bool = True,
) -> list[TableResult]:
    """One maintenance pass over ``tables``, holding the maintainers' session-level advisory
    lock (a second maintainer waits, then finds nothing left to do). A table whose pass fails
    is recorded with its error and the others go on; ``partition_maintenance`` records each
    table. ``session_lock=False`` behind a transaction pooler, where a session lock would stay
    on whichever server session took it: each step's own lock then keeps maintainers apart
    (:func:`_with_lock_retries`)."""
    if session_lock:
        await conn.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK)
    try:
        results = []
        for target in tables:
            try:
                result = await maintain_table(conn, target, now, say)
            except (asyncpg.PostgresError, PipelineError) as exc:
                line = (str(exc).splitlines() or [type(exc).__name__])[0]
                result = TableResult(target.table, error=line)
                say(f"{target.table}: maintenance failed: {line}")
            await _record(conn, result)
            results.append(result)
        return results
    finally:
        if session_lock:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)


# -- status ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableStatus:
    """What the metrics say of a partitioned table (:func:`status`)."""

    target: Target
    partitions: int  # DEFAULT aside
    premade: int  # starting at or after the end of the current interval
    newest_end: datetime.datetime | None
    default_rows: int | None  # None: not allowed to count them
    last_success: datetime.datetime | None


async def status(
    conn: Connection, tables: Sequence[Target], now: datetime.datetime, cap: int = PROBE_COUNT_CAP
) -> list[TableStatus]:
    """Each table's partitions, rows in DEFAULT (up to ``cap``) and last successful
    maintenance: catalog reads and one bounded count, cheap enough for every 30 s. A table
    that is not partitioned (yet) is left out."""
    found = []
    async with db.transaction(conn):
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        last = {
            r["table_name"]: r["last_success_at"]
            for r in await conn.fetch(
                "SELECT table_name, last_success_at FROM partition_maintenance"
            )
        }
        for target in tables:
            try:
                async with db.transaction(conn):  # a savepoint
                    parts = await read_partitions(conn, target.table)
            except NotPartitioned:
                continue  # not partitioned yet (`pipeline migrate` upgrades it): no gauges
            ranges = [p.range for p in parts if p.range is not None]
            rows: int | None
            try:
                async with db.transaction(conn):  # a savepoint: a refusal spoils nothing
                    rows = await count_default(conn, target, cap)
            except asyncpg.InsufficientPrivilegeError:
                rows = None
            found.append(
                TableStatus(
                    target,
                    len(ranges),
                    partitions.premade(ranges, now, target.partitioning.interval),
                    partitions.newest_end(ranges),
                    rows,
                    last.get(target.table),
                )
            )
    return found
