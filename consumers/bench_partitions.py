"""`pipeline bench --partitioning`: what time partitions buy on this PostgreSQL, measured on
the same metric rows in a partitioned and an unpartitioned table: dropping a day by retention
against DELETE (and the VACUUM it leaves), and one agent's day of metrics under
``EXPLAIN (ANALYZE, BUFFERS)``. How to read it: docs/scaling.md, "Measured here: retention
and a day's query".

Both tables are the built-in ``metrics`` stream's, as the migrator creates them (the
unpartitioned one from the same shape without ``PARTITION BY``), in a scratch database that
is dropped afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import msgspec

from pipeline import partitions, schema_plan, sql_names, testbed
from pipeline.catalog import load as load_catalog
from pipeline.records import Metric, Record

STREAM = "metrics"
AGENTS = 143  # the reference deployment's fleet
FIRST_DAY = datetime(2026, 11, 2, tzinfo=UTC)
CHUNK = 20_000  # records per COPY: the agent's batches are of this order
SAME_TICK = 100  # records stamped with one time: the simulator's fleet reports in bursts
_COLUMNS = ("agent_id", "name", "value", "ts", "labels", "src_partition", "src_offset", "batch_id")
_DELETED = re.compile(r"DELETE (\d+)")


class Fleet(Protocol):
    """Where the metric rows come from: the simulator's fleet (``pipeline bench`` passes a
    :class:`~producers.simulator.FleetSimulator` sending only metrics)."""

    agent_ids: tuple[str, ...]

    def next_records(self, n: int, now: datetime) -> list[Record]: ...


@dataclass(frozen=True)
class QueryRun:
    """One ``EXPLAIN (ANALYZE, BUFFERS)`` of the query on one table."""

    execution_ms: float
    planning_ms: float
    rows: int
    shared_hit: int
    shared_read: int
    scanned: tuple[str, ...]  # the relations the plan reads, in plan order


@dataclass(frozen=True)
class QueryResult:
    """The query on one table: the median of the measured runs, the buffers of the last."""

    table: str
    execution_ms: float
    planning_ms: float
    rows: int
    shared_hit: int
    shared_read: int
    scanned: tuple[str, ...]
    partitions_total: int  # 0: not partitioned
    plan: str  # the text plan of one more run, for the reader


@dataclass(frozen=True)
class DropRun:
    """One day removed from each table: seconds for each step, rows each removed."""

    day: str
    detach_drop_s: float
    delete_s: float
    vacuum_s: float
    rows: int


@dataclass(frozen=True)
class PartitionBench:
    rows_per_day: int
    days: int
    runs: int
    load_s: float
    query_day: str
    agent: str
    queries: tuple[QueryResult, QueryResult]  # partitioned, unpartitioned
    drops: tuple[DropRun, ...]
    unpartitioned_bytes: tuple[int, int]  # heap size before the drops, after them
    server: str

    @property
    def detach_drop_s(self) -> float:
        return statistics.median(d.detach_drop_s for d in self.drops)

    @property
    def delete_s(self) -> float:
        return statistics.median(d.delete_s for d in self.drops)

    @property
    def vacuum_s(self) -> float:
        return statistics.median(d.vacuum_s for d in self.drops)


# -- pure ----------------------------------------------------------------------------------


def day_ranges(first: datetime, days: int) -> list[partitions.Range]:
    """The ``days`` day-long ranges from ``first`` (a UTC midnight)."""
    return [partitions.interval_range(first + timedelta(days=i), "day") for i in range(days)]


def tick(day: partitions.Range, rows: int, index: int) -> datetime:
    """The time of the ``index``-th record of a day of ``rows``: spread evenly over the day,
    in bursts of :data:`SAME_TICK`, in time order as a fleet's metrics arrive."""
    bursts = max(1, -(-rows // SAME_TICK))
    return day.start + (day.end - day.start) * ((index // SAME_TICK) / bursts)


def query_run(explained: Sequence[dict[str, Any]]) -> QueryRun:
    """The numbers of one ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` result."""
    top = explained[0]
    plan = top["Plan"]
    scanned: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        name = node.get("Relation Name")
        if name is not None and name not in scanned:
            scanned.append(name)
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan)
    return QueryRun(
        execution_ms=float(top["Execution Time"]),
        planning_ms=float(top["Planning Time"]),
        rows=int(plan["Actual Rows"]),
        shared_hit=int(plan.get("Shared Hit Blocks", 0)),
        shared_read=int(plan.get("Shared Read Blocks", 0)),
        scanned=tuple(scanned),
    )


def query_result(
    table: str, runs: Sequence[QueryRun], partitions_total: int, plan: str
) -> QueryResult:
    last = runs[-1]
    return QueryResult(
        table=table,
        execution_ms=statistics.median(r.execution_ms for r in runs),
        planning_ms=statistics.median(r.planning_ms for r in runs),
        rows=last.rows,
        shared_hit=last.shared_hit,
        shared_read=last.shared_read,
        scanned=last.scanned,
        partitions_total=partitions_total,
        plan=plan,
    )


def deleted(status: str) -> int:
    """The row count of a ``DELETE n`` command status."""
    found = _DELETED.fullmatch(status)
    if found is None:
        raise ValueError(f"not a DELETE status: {status!r}")
    return int(found[1])


def table(result: PartitionBench) -> str:
    """The results as the command prints them."""
    parted, flat = result.queries
    mb = 1024 * 1024
    lines = [
        f"{result.days} days x {result.rows_per_day:,} metric rows ({AGENTS} agents) in each "
        f"table, loaded with COPY in {result.load_s:.1f} s; {result.server}",
        "",
        f"(a) one day of {result.rows_per_day:,} rows removed; median of {len(result.drops)} "
        "runs, each the oldest day left",
        f"  partitioned:   DETACH + DROP of the day's partition  {result.detach_drop_s:9.3f} s",
        f"  unpartitioned: DELETE of the same rows              {result.delete_s:9.3f} s",
        f"                 then VACUUM (reported apart)          {result.vacuum_s:9.3f} s",
        f"  DELETE / (DETACH + DROP): {result.delete_s / result.detach_drop_s:,.0f}x; "
        f"with VACUUM: {(result.delete_s + result.vacuum_s) / result.detach_drop_s:,.0f}x",
        f"  unpartitioned heap: {result.unpartitioned_bytes[0] / mb:,.0f} MB before, "
        f"{result.unpartitioned_bytes[1] / mb:,.0f} MB after (VACUUM frees the space for reuse,"
        " not to the disk)",
        "  per run (day, DETACH+DROP s, DELETE s, VACUUM s, rows):",
        *(
            f"    {d.day}  {d.detach_drop_s:.3f}  {d.delete_s:.3f}  {d.vacuum_s:.3f}  {d.rows:,}"
            for d in result.drops
        ),
        "",
        f"(b) {result.agent}'s metrics of {result.query_day}, EXPLAIN (ANALYZE, BUFFERS); "
        f"warm (one unmeasured run each), median of {result.runs} interleaved runs",
        f"  {'table':<14}{'exec ms':>10}{'plan ms':>10}{'rows':>8}{'shared hit':>12}"
        f"{'read':>8}  relations scanned",
    ]
    for name, q in (("partitioned", parted), ("unpartitioned", flat)):
        scanned = (
            f"{len(q.scanned)} of {q.partitions_total} partitions ({', '.join(q.scanned)})"
            if q.partitions_total
            else ", ".join(q.scanned)
        )
        lines.append(
            f"  {name:<14}{q.execution_ms:>10.2f}{q.planning_ms:>10.2f}{q.rows:>8,}"
            f"{q.shared_hit:>12,}{q.shared_read:>8,}  {scanned}"
        )
    for name, q in (("partitioned", parted), ("unpartitioned", flat)):
        lines += ["", f"  plan, {name}:", *("    " + line for line in q.plan.splitlines())]
    return "\n".join(lines)


def as_json(result: PartitionBench) -> dict[str, object]:
    out = dataclasses.asdict(result)
    out.update(
        detach_drop_s=result.detach_drop_s, delete_s=result.delete_s, vacuum_s=result.vacuum_s
    )
    return out


# -- IO --------------------------------------------------------------------------------------


async def run_partition_bench(
    admin_url: str,
    fleet: Fleet,
    rows_per_day: int,
    report: Callable[[str], None],
    *,
    drops: int = 3,
    runs: int = 5,
) -> PartitionBench:
    """Load both tables with ``fleet``'s metrics in a scratch database on the server of
    ``admin_url`` (a login that may create databases and run CHECKPOINT), measure, drop the
    database. ``drops`` days are removed, one a run; the day after them is queried ``runs``
    times."""
    days = drops + 1
    catalog = load_catalog()
    database = f"bench_partitions_{uuid.uuid4().hex[:12]}"
    async with testbed.scratch_database(admin_url, database, catalog=catalog) as url:
        conn = await asyncpg.connect(url, timeout=10, command_timeout=None)
        try:
            await conn.execute("SET TimeZone = 'UTC'")
            shape = schema_plan.shapes(catalog[STREAM])[0]
            flat = _unpartitioned(shape)
            await _create(conn, shape, flat, day_ranges(FIRST_DAY, days))
            report(f"loading {days} days x {rows_per_day:,} metric rows into each table")
            started = time.perf_counter()
            await _load(conn, shape.name, flat.name, _chunks(fleet, rows_per_day, days))
            load_s = time.perf_counter() - started
            for name in (shape.name, flat.name):
                await conn.execute(f"VACUUM (ANALYZE) {sql_names.table(name)}")
            await _same_rows(conn, shape.name, flat.name, rows_per_day * days)
            query_day = day_ranges(FIRST_DAY, days)[-1]
            agent = fleet.agent_ids[42]
            report(f"query: {agent}'s metrics of {query_day.start:%Y-%m-%d}")
            queries = await _queries(conn, (shape.name, flat.name), agent, query_day, runs)
            size_before = await _size(conn, flat.name)
            removed = []
            for i, day in enumerate(day_ranges(FIRST_DAY, drops)):
                report(f"removing {day.start:%Y-%m-%d} from both tables")
                removed.append(await _drop_day(conn, shape.name, flat.name, day, first=i % 2))
                await _same_rows(conn, shape.name, flat.name, rows_per_day * (days - i - 1))
            server = await conn.fetchval("SELECT version()")
            return PartitionBench(
                rows_per_day=rows_per_day,
                days=days,
                runs=runs,
                load_s=load_s,
                query_day=f"{query_day.start:%Y-%m-%d}",
                agent=agent,
                queries=queries,
                drops=tuple(removed),
                unpartitioned_bytes=(size_before, await _size(conn, flat.name)),
                server=str(server).split(" on ")[0],
            )
        finally:
            await conn.close()


def _unpartitioned(shape: schema_plan.TableShape) -> schema_plan.TableShape:
    """The same table, unpartitioned, beside it: its indexes renamed to match."""
    name = f"{shape.name}_unpartitioned"
    indexes = tuple(
        dataclasses.replace(i, name=i.name.replace(shape.name, name, 1)) for i in shape.indexes
    )
    return dataclasses.replace(shape, name=name, indexes=indexes, partition_by=None)


async def _create(
    conn: asyncpg.Connection,
    shape: schema_plan.TableShape,
    flat: schema_plan.TableShape,
    days: list[partitions.Range],
) -> None:
    """The unpartitioned table and its indexes; a partition per day of the partitioned one.
    Autovacuum off on both: a worker that lands in one measurement and not the other would
    decide the comparison (the measurements VACUUM where they say)."""
    await conn.execute(schema_plan.create_table(flat))
    for index in flat.indexes:
        await conn.execute(schema_plan.create_index(flat, index))
    leaves = [flat.name, partitions.default_name(shape.name)]
    for day in days:
        name = partitions.partition_name(shape.name, day, "day")
        await conn.execute(
            f"CREATE TABLE {sql_names.ident(name)} PARTITION OF {sql_names.table(shape.name)} "
            f"FOR VALUES FROM ('{day.start.isoformat()}') TO ('{day.end.isoformat()}')"
        )
        leaves.append(name)
    for leaf in leaves:
        await conn.execute(
            f"ALTER TABLE {sql_names.table(leaf)} SET (autovacuum_enabled = off, "
            "toast.autovacuum_enabled = off)"
        )


def _chunks(fleet: Fleet, rows_per_day: int, days: int) -> Iterator[list[tuple[Any, ...]]]:
    """The fleet's metric rows, day by day in time order, :data:`CHUNK` at a time, with the
    provenance an agent would give them (one source partition, consecutive offsets)."""
    labels: dict[int, str] = {}
    offset = 0
    for day in day_ranges(FIRST_DAY, days):
        for start in range(0, rows_per_day, CHUNK):
            chunk: list[tuple[Any, ...]] = []
            for burst in range(start, min(start + CHUNK, rows_per_day), SAME_TICK):
                count = min(SAME_TICK, rows_per_day - burst)
                for m in fleet.next_records(count, tick(day, rows_per_day, burst)):
                    assert isinstance(m, Metric)
                    # One labels object per agent: encoded once.
                    text = labels.get(id(m.labels))
                    if text is None:
                        text = labels[id(m.labels)] = msgspec.json.encode(m.labels).decode()
                    batch = offset // CHUNK
                    chunk.append((m.agent_id, m.name, m.value, m.ts, text, 0, offset, batch))
                    offset += 1
            yield chunk


async def _load(
    conn: asyncpg.Connection, parted: str, flat: str, chunks: Iterator[list[tuple[Any, ...]]]
) -> None:
    """The same rows, in the same order, into both tables. A bench's scratch tables, not a
    batch of records: COPY straight in, not through the agents' write path."""
    for chunk in chunks:
        for name in (parted, flat):
            schema, bare = sql_names.split_table(name)
            await conn.copy_records_to_table(
                bare, records=chunk, columns=_COLUMNS, schema_name=schema
            )


async def _same_rows(conn: asyncpg.Connection, parted: str, flat: str, expected: int) -> None:
    """Both tables hold ``expected`` rows, none in DEFAULT: the comparison is fair."""
    counts = [
        await conn.fetchval(f"SELECT count(*) FROM {sql_names.table(name)}")
        for name in (parted, flat, partitions.default_name(parted))
    ]
    if counts != [expected, expected, 0]:
        raise AssertionError(
            f"rows (partitioned, unpartitioned, DEFAULT) are {counts}, not "
            f"[{expected}, {expected}, 0]"
        )


async def _queries(
    conn: asyncpg.Connection,
    tables: tuple[str, str],
    agent: str,
    day: partitions.Range,
    runs: int,
) -> tuple[QueryResult, QueryResult]:
    """The query on each table: one warm-up run each, then ``runs`` runs alternating tables,
    then one text plan each."""

    def sql(name: str) -> str:
        # Literal times, as a dashboard's query sends them: the planner prunes at plan time.
        return (
            f"SELECT ts, name, value FROM {sql_names.table(name)} "
            f"WHERE agent_id = '{agent}' AND ts >= '{day.start.isoformat()}' "
            f"AND ts < '{day.end.isoformat()}'"
        )

    async def explain(name: str) -> QueryRun:
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql(name)}")
        return query_run(json.loads(text))

    measured: dict[str, list[QueryRun]] = {name: [] for name in tables}
    for name in tables:
        await explain(name)
    for i in range(runs):
        for name in tables if i % 2 == 0 else tables[::-1]:
            measured[name].append(await explain(name))
    parted, flat = tables
    total = await conn.fetchval(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = $1::text::regclass", parted
    )
    results = []
    for name, partitions_total in ((parted, int(total)), (flat, 0)):
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql(name)}")
        plan = "\n".join(r[0] for r in rows)
        results.append(query_result(name, measured[name], partitions_total, plan))
    if results[0].rows != results[1].rows:
        raise AssertionError(f"the query found {results[0].rows} and {results[1].rows} rows")
    return results[0], results[1]


async def _drop_day(
    conn: asyncpg.Connection, parted: str, flat: str, day: partitions.Range, first: int
) -> DropRun:
    """Remove ``day`` from both tables as each would: the partitioned one as retention does
    (a plain DETACH, since the table has a DEFAULT partition, then DROP, in one transaction;
    docs/operations.md, "Partitions and retention"), the other by DELETE
    and the VACUUM that makes its space reusable. A CHECKPOINT before each, so neither pays
    for the other's dirty pages; ``first`` says which goes first (alternated run by run)."""
    partition = sql_names.ident(partitions.partition_name(parted, day, "day"))
    times: dict[str, float] = {}
    removed = 0

    async def retention() -> None:
        started = time.perf_counter()
        # Two statements in one query string: one transaction, as retention runs them.
        await conn.execute(
            f"ALTER TABLE {sql_names.table(parted)} DETACH PARTITION {partition}; "
            f"DROP TABLE {partition}"
        )
        times["drop"] = time.perf_counter() - started

    async def delete() -> None:
        nonlocal removed
        started = time.perf_counter()
        status = await conn.execute(
            f"DELETE FROM {sql_names.table(flat)} WHERE ts >= $1 AND ts < $2", day.start, day.end
        )
        times["delete"] = time.perf_counter() - started
        removed = deleted(status)
        await _checkpoint(conn)
        started = time.perf_counter()
        await conn.execute(f"VACUUM {sql_names.table(flat)}")
        times["vacuum"] = time.perf_counter() - started

    for step in (retention, delete) if first == 0 else (delete, retention):
        await _checkpoint(conn)
        await step()
    return DropRun(
        f"{day.start:%Y-%m-%d}", times["drop"], times["delete"], times["vacuum"], removed
    )


async def _checkpoint(conn: asyncpg.Connection) -> None:
    await conn.execute("CHECKPOINT")


async def _size(conn: asyncpg.Connection, name: str) -> int:
    return int(await conn.fetchval("SELECT pg_relation_size($1::text::regclass)", name))
