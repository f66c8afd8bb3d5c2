"""Writes, replays and rollbacks on time-partitioned tables, against the real servers.

A user catalog's streams partitioned by the hour (two range partitions made here as the
migrator, and DEFAULT) and the built-in metrics, events and state history partitioned by the
day: every mode's write through the parent, as the agent's login; redelivery skipped with
exact counts; a key seen again at another time kept; the same writer on a table still keyed
without its time (before the upgrade partitions it); a replay's range and a rollback
to a checkpoint, each reading every partition's source index (EXPLAIN), the rollback in one
transaction; and `pipeline replay` of a partitioned stream's range fed by a real agent
(docs/streams.md "Partitions and retention", docs/replay.md, docs/control-plane.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from pipeline import (
    catalog,
    control_store,
    db,
    kafka_clients,
    partitions,
    schema_plan,
    sql_names,
    testbed,
)
from pipeline.catalog import Catalog, StreamSpec
from pipeline.db_session import Session
from pipeline.errors import TransientError
from pipeline.records import topic_name
from pipeline.replay import range_deletes
from tests.conftest import Servers
from tests.integration.harness import (
    agent_env,
    create_topics,
    running_agent,
    stored_offsets,
    until,
)

pytestmark = pytest.mark.timeout(240)

USER_STREAMS = """
[[streams]]
name = "orders"
topic = "shop.orders"
table = "shop.orders"
key = ["order_id"]
partition_by = "placed_at"
partition_interval = "hour"

[streams.columns]
order_id = "text"
amount = "bigint"
placed_at = "timestamptz"

[[streams]]
name = "clicks"
topic = "shop.clicks"
table = "clicks"
partition_by = "at"
partition_interval = "hour"

[streams.columns]
page = "text"
at = "timestamptz"

[[streams]]
name = "prices"
topic = "shop.prices"
table = "prices"
mode = "history"
key = ["sku"]
version = "rev"
partition_by = "at"
partition_interval = "hour"

[streams.columns]
sku = "text"
price = "bigint"
rev = "bigint"
at = "timestamptz"

[[streams]]
name = "accounts"
topic = "shop.accounts"
table = "accounts"
mode = "history"
key = ["account"]
partition_by = "at"
partition_interval = "hour"

[streams.columns]
account = "text"
plan = "text"
at = "timestamptz"
"""

GROUP = "partitioned"
REPLAY = (sys.executable, "-m", "pipeline.cli", "replay")
H10 = datetime(2026, 11, 2, 10, tzinfo=UTC)  # the two hour partitions: 10:00 and 11:00
DAY = datetime(2026, 11, 2, tzinfo=UTC)  # the built-in tables' day partition


def at(minutes: float) -> datetime:
    """A time ``minutes`` after 10:00: [0, 60) is the 10:00 partition, [60, 120) the 11:00
    one, and from 120 on no range partition exists: DEFAULT."""
    return H10 + timedelta(minutes=minutes)


def _catalog(path: Path) -> Catalog:
    path.write_text(USER_STREAMS)
    return catalog.load(path)  # with the built-in streams


PARTITIONED = ("orders", "clicks", "prices", "accounts", "metrics", "events", "states")


async def _make(
    migrator: asyncpg.Connection, table: str, range_: partitions.Range, interval: str
) -> str:
    """A range partition of ``table``, made as the migrator; its bare name."""
    schema, _ = sql_names.split_table(table)
    name = partitions.partition_name(table, range_, interval)
    await migrator.execute(
        f"CREATE TABLE {sql_names.table(f'{schema}.{name}')} PARTITION OF "
        f"{sql_names.table(table)} FOR VALUES FROM ('{range_.start.isoformat()}') "
        f"TO ('{range_.end.isoformat()}')"
    )
    return name


async def _partition(migrator: asyncpg.Connection, spec: StreamSpec) -> None:
    """The range partitions of the stream's partitioned table, made as `pipeline partitions
    maintain` would: 10:00 and 11:00 of an hourly table, the day of a daily one."""
    assert spec.partitioning is not None
    interval = spec.partitioning.interval
    (table,) = spec.partitioned_tables
    first = H10 if interval == "hour" else DAY
    for i in range(2 if interval == "hour" else 1):
        start = partitions.step(first, interval, i)
        await _make(
            migrator, table, partitions.Range(start, partitions.step(start, interval)), interval
        )


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    return _catalog(tmp_path / "streams.toml")


@pytest.fixture
async def conn(database_url: str, cat: Catalog) -> AsyncIterator[db.Connection]:
    """The agent's connection to a database with the catalog's tables and the range
    partitions, made as the migrator."""
    await testbed.migrate(database_url, catalog=cat)
    migrator = await asyncpg.connect(testbed.as_migrator(database_url), timeout=10)
    try:
        for stream in PARTITIONED:
            await _partition(migrator, cat[stream])
    finally:
        await migrator.close()
    connection = await db.connect(testbed.as_agent(database_url), Session(command_timeout=30))
    try:
        yield connection
    finally:
        await connection.close()


def row(spec: StreamSpec, partition: int, offset: int, *values: Any) -> tuple[Any, ...]:
    assert len(values) == len(spec.columns)
    return (*values, partition, offset, 1)


async def write(conn: db.Connection, spec: StreamSpec, rows: Sequence[Any]) -> int:
    writer = db.TableWriter(spec)
    async with db.transaction(conn):
        return await writer.write(conn, rows)


async def placed(conn: db.Connection, table: str, *columns: str) -> list[tuple[Any, ...]]:
    """The table's rows, each with the partition that holds it (its bare name first)."""
    cols = sql_names.columns(columns)
    found = await conn.fetch(
        f"SELECT c.relname::text, {', '.join(f't.{sql_names.ident(c)}' for c in columns)} "
        f"FROM {sql_names.table(table)} AS t JOIN pg_class c ON c.oid = t.tableoid "
        f"ORDER BY {cols}"
    )
    return [tuple(r) for r in found]


H10_PART, H11_PART = "p2026110210", "p2026110211"


# -- every mode's write --------------------------------------------------------------------------


async def test_a_keyed_append_lands_by_hour_skips_redelivery_and_keeps_a_key_at_another_time(
    conn: db.Connection, cat: Catalog
) -> None:
    orders = cat["orders"]
    batch = [
        row(orders, 0, 0, "a", 1, at(5)),
        row(orders, 0, 1, "b", 2, at(65)),
        row(orders, 0, 2, "c", 3, at(130)),  # no range partition yet: DEFAULT
        row(orders, 0, 3, "a", 9, at(5)),  # the producer's redelivery: the first stays
    ]
    assert await write(conn, orders, batch) == 3
    assert await write(conn, orders, batch) == 0  # the batch redelivered
    # The unique key holds the time: a key seen again at another time is a row of its own.
    again = [
        row(orders, 1, 0, "a", 7, at(70)),
        row(orders, 1, 1, "a", 8, at(70)),
        row(orders, 1, 2, "b", 2, at(65)),
    ]
    assert await write(conn, orders, again) == 1
    assert await placed(conn, "shop.orders", "order_id", "placed_at", "amount", "src_offset") == [
        (f"orders_{H10_PART}", "a", at(5), 1, 0),
        (f"orders_{H11_PART}", "a", at(70), 7, 0),
        (f"orders_{H11_PART}", "b", at(65), 2, 1),
        ("orders_default", "c", at(130), 3, 2),
    ]


async def test_keyless_appends_are_a_plain_copy_into_the_parent(
    conn: db.Connection, cat: Catalog
) -> None:
    clicks, metrics = cat["clicks"], cat["metrics"]
    rows = [row(clicks, 0, i, f"/{i}", at(i * 65)) for i in range(3)]
    assert await write(conn, clicks, rows) == 3
    assert await write(conn, clicks, rows[:1]) == 1  # no key: a redelivery is a row again
    assert await placed(conn, "clicks", "page", "src_offset") == [
        (f"clicks_{H10_PART}", "/0", 0),
        (f"clicks_{H10_PART}", "/0", 0),
        (f"clicks_{H11_PART}", "/1", 1),
        ("clicks_default", "/2", 2),
    ]
    later = DAY + timedelta(days=3)
    samples = [
        row(metrics, 0, 0, "agent-1", "cpu", 0.5, DAY + timedelta(hours=1), {}),
        row(metrics, 0, 1, "agent-1", "cpu", 0.7, later, {"core": "1"}),
    ]
    assert await write(conn, metrics, samples) == 2
    assert await placed(conn, "performance_metrics", "src_offset", "value") == [
        ("performance_metrics_p20261102", 0, 0.5),
        ("performance_metrics_default", 1, 0.7),
    ]


async def test_built_in_events_skip_a_redelivered_event_and_keep_one_at_another_time(
    conn: db.Connection, cat: Catalog
) -> None:
    events = cat["events"]
    a, b = uuid.UUID(int=1), uuid.UUID(int=2)
    noon, later = DAY + timedelta(hours=12), DAY + timedelta(days=2)
    batch = [
        row(events, 0, 0, a, "agent-1", "boot", "info", noon, {}),
        row(events, 0, 1, b, "agent-1", "crash", "error", noon, {}),
        row(events, 0, 2, a, "agent-1", "again", "info", noon, {}),  # redelivered: skipped
    ]
    assert await write(conn, events, batch) == 2
    assert await write(conn, events, batch) == 0
    assert (
        await write(conn, events, [row(events, 0, 3, a, "agent-1", "late", "info", later, {})]) == 1
    )
    assert await placed(conn, "system_events", "event_id", "ts", "kind") == [
        ("system_events_p20261102", a, noon, "boot"),
        ("system_events_default", a, later, "late"),
        ("system_events_p20261102", b, noon, "crash"),
    ]


async def _parent_written(conn: db.Connection, table: str) -> bool:
    """Whether this transaction wrote through ``table`` itself: a write into a partition by
    name takes no ROW EXCLUSIVE lock on its parent."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() "
            "AND relation = $1::regclass AND mode = 'RowExclusiveLock'",
            table,
        )
    )


async def test_a_batch_within_one_current_partition_is_written_into_it_by_name(
    conn: db.Connection, cat: Catalog, database_url: str
) -> None:
    events, orders, metrics = cat["events"], cat["orders"], cat["metrics"]
    # The writer names only the current day's partition and later ones, by its own clock:
    # a test begun in the last minute of a day starts in the next one instead.
    now = datetime.now(UTC)
    if (left := partitions.interval_range(now, "day").end - now) < timedelta(minutes=1):
        await asyncio.sleep(left.total_seconds())
        now = datetime.now(UTC)
    today = partitions.interval_range(now, "day")
    tomorrow = partitions.Range(today.end, partitions.step(today.end, "day"))
    hour = partitions.interval_range(now, "hour")
    migrator = await asyncpg.connect(testbed.as_migrator(database_url), timeout=10)
    try:
        named = [await _make(migrator, "system_events", r, "day") for r in (today, tomorrow)]
        metrics_today = await _make(migrator, "performance_metrics", today, "day")
        # In schema shop, which has no default privileges: the agent may not insert into it.
        shop = await _make(migrator, "shop.orders", hour, "hour")
    finally:
        await migrator.close()
    a, b, c = (uuid.UUID(int=i) for i in (1, 2, 3))
    noon = today.start + timedelta(hours=12)
    late = tomorrow.start - timedelta(seconds=1)
    batch = [
        row(events, 0, 0, a, "agent-1", "boot", "info", noon, {}),
        row(events, 0, 1, b, "agent-1", "crash", "error", today.start, {}),
        row(events, 0, 2, a, "agent-1", "again", "info", noon, {}),  # redelivered: skipped
    ]
    writer = db.TableWriter(events)
    async with db.transaction(conn):
        assert await writer.partition_for(conn, batch) == named[0]
        assert await writer.write(conn, batch) == 2
        assert not await _parent_written(conn, "system_events")
    async with db.transaction(conn):
        assert await writer.write(conn, batch) == 0  # redelivered whole
    # A batch across midnight goes through the parent, and skips an event written by name...
    across = [
        row(events, 0, 0, a, "agent-1", "boot", "info", noon, {}),
        row(events, 0, 3, c, "agent-1", "late", "info", late, {}),
        row(events, 0, 4, c, "agent-1", "next", "info", tomorrow.start, {}),
    ]
    async with db.transaction(conn):
        assert await writer.partition_for(conn, across) is None
        assert await writer.write(conn, across) == 2
        assert await _parent_written(conn, "system_events")
    # ...and a write by name skips one written through the parent.
    async with db.transaction(conn):
        assert await writer.write(conn, across[1:2]) == 0
        assert not await _parent_written(conn, "system_events")
    # An older batch, and one with a NULL time, go through the parent; the NULL is refused
    # there as it always was (a not-null violation).
    older = [row(events, 0, 5, c, "agent-1", "old", "info", today.start - timedelta(days=3), {})]
    async with db.transaction(conn):
        assert await writer.partition_for(conn, older) is None
        assert await writer.write(conn, older) == 1
    null = [row(events, 0, 6, c, "agent-1", "null", "info", None, {})]
    with pytest.raises(asyncpg.NotNullViolationError):
        async with db.transaction(conn):
            assert await writer.partition_for(conn, null) is None
            await writer.write(conn, null)
    assert await placed(conn, "system_events", "event_id", "ts", "kind") == [
        (named[0], a, noon, "boot"),
        (named[0], b, today.start, "crash"),
        ("system_events_default", c, today.start - timedelta(days=3), "old"),
        (named[0], c, late, "late"),
        (named[1], c, tomorrow.start, "next"),
    ]
    # A keyless append's COPY goes into the partition by name too.
    samples = [
        row(metrics, 0, i, "agent-1", "cpu", i / 10, today.start + timedelta(hours=i), {})
        for i in range(3)
    ]
    metrics_writer = db.TableWriter(metrics)
    async with db.transaction(conn):
        assert await metrics_writer.partition_for(conn, samples) == metrics_today
        assert await metrics_writer.write(conn, samples) == 3
        assert not await _parent_written(conn, "performance_metrics")
    assert await placed(conn, "performance_metrics", "src_offset", "value") == [
        (metrics_today, i, i / 10) for i in range(3)
    ]
    # A partition the agent's login may not insert into is never named: through the parent.
    orders_writer = db.TableWriter(orders)
    placed_at = hour.start + timedelta(minutes=1)
    order = [row(orders, 0, 0, "o1", 5, placed_at)]
    async with db.transaction(conn):
        assert await orders_writer.partition_for(conn, order) is None
        assert await orders_writer.write(conn, order) == 1
        assert await _parent_written(conn, "shop.orders")
    assert await placed(conn, "shop.orders", "order_id", "placed_at") == [(shop, "o1", placed_at)]


async def test_a_partition_dropped_after_the_writer_read_it_costs_a_retry_not_a_row(
    conn: db.Connection, cat: Catalog, database_url: str
) -> None:
    events = cat["events"]
    today = partitions.interval_range(datetime.now(UTC), "day")
    noon = today.start + timedelta(hours=12)
    migrator = await asyncpg.connect(testbed.as_migrator(database_url), timeout=10)
    try:
        name = await _make(migrator, "system_events", today, "day")
        writer = db.TableWriter(events)
        first = [row(events, 0, 0, uuid.UUID(int=1), "agent-1", "boot", "info", noon, {})]
        async with db.transaction(conn):
            assert await writer.write(conn, first) == 1  # the routes read, the partition named
        # An operator drops it (or detaches it: its rows leave the table alike).
        await migrator.execute(f"DROP TABLE {sql_names.ident(name)}")
    finally:
        await migrator.close()
    second = [row(events, 0, 1, uuid.UUID(int=2), "agent-1", "crash", "error", noon, {})]
    with pytest.raises(TransientError, match=f"42P01 writing into partition {name}"):
        async with db.transaction(conn):
            await writer.write(conn, second)
    # The retry, as the agent makes it: the batch whole, through the parent, into DEFAULT.
    async with db.transaction(conn):
        assert await writer.partition_for(conn, second) is None
        assert await writer.write(conn, second) == 1
        assert await _parent_written(conn, "system_events")
    assert await placed(conn, "system_events", "event_id", "kind") == [
        ("system_events_default", uuid.UUID(int=2), "crash")
    ]


async def test_a_partitioned_history_keeps_a_row_per_version_and_time_and_latest_by_version(
    conn: db.Connection, cat: Catalog
) -> None:
    prices = cat["prices"]
    batch = [
        row(prices, 0, 0, "k1", 10, 1, at(5)),
        row(prices, 0, 1, "k1", 12, 3, at(65)),
        row(prices, 0, 2, "k1", 11, 2, at(10)),
        row(prices, 0, 3, "k2", 5, 1, at(130)),
        row(prices, 0, 4, "k2", 6, 1, at(130)),  # the same version and time: the first stays
    ]
    assert await write(conn, prices, batch) == 4
    assert await write(conn, prices, batch) == 0  # redelivered
    # The same version at another time: a history row of its own; latest keeps version 3.
    assert await write(conn, prices, [row(prices, 1, 0, "k1", 99, 3, at(70))]) == 1
    assert await placed(conn, "prices_history", "sku", "rev", "at", "price") == [
        (f"prices_history_{H10_PART}", "k1", 1, at(5), 10),
        (f"prices_history_{H10_PART}", "k1", 2, at(10), 11),
        (f"prices_history_{H11_PART}", "k1", 3, at(65), 12),
        (f"prices_history_{H11_PART}", "k1", 3, at(70), 99),
        ("prices_history_default", "k2", 1, at(130), 5),
    ]
    # The latest table is not partitioned: one row per key, the highest version, the first.
    assert await placed(conn, "prices", "sku", "rev", "price") == [
        ("prices", "k1", 3, 12),
        ("prices", "k2", 1, 5),
    ]
    accounts, states = cat["accounts"], cat["states"]
    plans = [row(accounts, 0, i, "x", p, at(i * 65)) for i, p in enumerate(("free", "pro", "team"))]
    assert await write(conn, accounts, plans) == 3
    assert await write(conn, accounts, plans) == 0
    assert await placed(conn, "accounts_history", "src_offset", "plan") == [
        (f"accounts_history_{H10_PART}", 0, "free"),
        (f"accounts_history_{H11_PART}", 1, "pro"),
        ("accounts_history_default", 2, "team"),
    ]
    assert await placed(conn, "accounts", "account", "plan") == [("accounts", "x", "team")]
    noon = DAY + timedelta(hours=12)
    seen = [row(states, 0, i, "agent-1", s, i, noon, {}) for i, s in enumerate(("up", "down"))]
    assert await write(conn, states, seen) == 2
    assert await write(conn, states, seen) == 0
    assert await placed(conn, "agent_state_history", "version", "state") == [
        ("agent_state_history_p20261102", 0, "up"),
        ("agent_state_history_p20261102", 1, "down"),
    ]
    assert await placed(conn, "agent_states", "agent_id", "state") == [
        ("agent_states", "agent-1", "down")
    ]


async def test_the_same_writer_works_on_a_table_still_keyed_without_its_time(
    conn: db.Connection, cat: Catalog, database_url: str
) -> None:
    """Before the upgrade partitions a table, its primary key is the stream's key
    alone: the agents' check accepts it, and the writers skip a key they have whatever its
    time, as they always did."""
    orders = dataclasses.replace(cat["orders"], table="legacy_orders")
    prices = dataclasses.replace(
        cat["prices"], table="legacy_prices", history_table="legacy_prices_history"
    )
    migrator = await asyncpg.connect(testbed.as_migrator(database_url), timeout=10)
    try:
        for spec in (orders, prices):
            for shape in schema_plan.shapes(dataclasses.replace(spec, partitioning=None)):
                await migrator.execute(schema_plan.create_table(shape))
                for grant in schema_plan.grants(shape.name):
                    await migrator.execute(grant)
    finally:
        await migrator.close()
    state = await db.database_state(conn, [orders, prices], applied=False)
    assert state.tables[("public", "legacy_orders")].primary_key == ("order_id",)
    assert schema_plan.missing([orders, prices], state) == []
    batch = [
        row(orders, 0, 0, "a", 1, at(5)),
        row(orders, 0, 1, "a", 2, at(70)),  # the key at another time: skipped here
        row(orders, 0, 2, "b", 3, at(65)),
        row(orders, 0, 3, "c", 4, at(70)),
        row(orders, 0, 4, "c", 5, at(10)),  # of a key at two times in a batch, the earlier
    ]
    assert await write(conn, orders, batch) == 3
    assert await write(conn, orders, [row(orders, 0, 5, "b", 6, at(130))]) == 0
    assert await placed(conn, "legacy_orders", "order_id", "amount", "src_offset") == [
        ("legacy_orders", "a", 1, 0),
        ("legacy_orders", "b", 3, 2),
        ("legacy_orders", "c", 5, 4),
    ]
    versions = [
        row(prices, 0, 0, "k1", 10, 1, at(5)),
        row(prices, 0, 1, "k1", 11, 2, at(10)),
        row(prices, 0, 2, "k1", 99, 2, at(70)),  # the version again at another time: skipped
    ]
    assert await write(conn, prices, versions) == 2
    assert await placed(conn, "legacy_prices_history", "sku", "rev", "price") == [
        ("legacy_prices_history", "k1", 1, 10),
        ("legacy_prices_history", "k1", 2, 11),
    ]
    assert await placed(conn, "legacy_prices", "sku", "rev", "price") == [
        ("legacy_prices", "k1", 2, 11)
    ]


# -- replay and rollback -------------------------------------------------------------------------


async def _replay(conn: db.Connection, spec: StreamSpec, rows: Sequence[Any], end: int) -> int:
    """What a replay's transaction does for partition 0's range [first row's offset, end):
    the range's per-record rows deleted, then the range written again."""
    async with db.transaction(conn):
        for statement in range_deletes(spec):
            await conn.execute(statement, 0, rows[0][-2], end)
        return await db.TableWriter(spec).write(conn, rows)


async def test_a_replayed_range_is_replaced_in_whichever_partition_its_rows_were(
    conn: db.Connection, cat: Catalog
) -> None:
    orders, prices = cat["orders"], cat["prices"]
    log = [
        row(orders, 0, i, k, i, at(m))
        for i, (k, m) in enumerate((("a", 5), ("b", 65), ("c", 130), ("d", 10), ("e", 70)))
    ]
    await write(conn, orders, log)
    # The bug: amounts rewritten, a row lost, and one record's time decoded an hour late.
    await conn.execute("UPDATE shop.orders SET amount = -1 WHERE src_offset IN (1, 2)")
    await conn.execute("DELETE FROM shop.orders WHERE src_offset = 3")
    await conn.execute(
        "UPDATE shop.orders SET placed_at = placed_at + interval '1 hour' WHERE src_offset = 0"
    )
    # A replay of [0, 4): the late row is deleted from the 11:00 partition, written to 10:00.
    assert await _replay(conn, orders, log[:4], 4) == 4
    assert await placed(conn, "shop.orders", "order_id", "placed_at", "amount", "src_offset") == [
        (f"orders_{H10_PART}", "a", at(5), 0, 0),
        (f"orders_{H11_PART}", "b", at(65), 1, 1),
        ("orders_default", "c", at(130), 2, 2),
        (f"orders_{H10_PART}", "d", at(10), 3, 3),
        (f"orders_{H11_PART}", "e", at(70), 4, 4),
    ]
    versions = [row(prices, 0, i, "k1", 10 + i, i, at(i * 50)) for i in range(3)]
    await write(conn, prices, versions)
    await conn.execute("UPDATE prices_history SET price = 0")
    assert await _replay(conn, prices, versions[1:], 3) == 2
    assert await placed(conn, "prices_history", "rev", "price", "src_offset") == [
        (f"prices_history_{H10_PART}", 0, 0, 0),  # outside the range: as the bug left it
        (f"prices_history_{H10_PART}", 1, 11, 1),
        (f"prices_history_{H11_PART}", 2, 12, 2),
    ]
    # The latest table is not emptied by a replay: its version guard keeps version 2.
    assert await placed(conn, "prices", "sku", "rev", "price") == [("prices", "k1", 2, 12)]


async def _stored(conn: db.Connection, offsets: dict[str, int]) -> None:
    await conn.executemany(
        "INSERT INTO ingest_offsets (group_id, topic, partition, next_offset) "
        "VALUES ($1, $2, 0, $3)",
        [(GROUP, topic, offset) for topic, offset in offsets.items()],
    )


class _Abandoned(Exception):
    pass


async def test_a_rollback_restores_partitioned_tables_in_one_transaction(
    conn: db.Connection, cat: Catalog
) -> None:
    orders, prices, accounts = cat["orders"], cat["prices"], cat["accounts"]
    await write(conn, orders, [row(orders, 0, i, f"o{i}", i, at(i * 30)) for i in range(5)])
    await write(
        conn,
        prices,
        [
            row(prices, 0, 0, "k1", 10, 1, at(5)),
            row(prices, 0, 1, "k2", 20, 1, at(65)),
            # After the checkpoint (offset 2): a newer version of k1 in another partition,
            # a new key in DEFAULT.
            row(prices, 0, 2, "k1", 11, 2, at(70)),
            row(prices, 0, 3, "k3", 30, 1, at(130)),
        ],
    )
    await write(
        conn,
        accounts,
        [row(accounts, 0, i, "x", p, at(i * 40)) for i, p in enumerate(("free", "pro", "team"))],
    )
    topics = {s: cat[s].topic for s in ("orders", "prices", "accounts")}
    await _stored(conn, {t: 5 for t in topics.values()})
    checkpoint = {(topics["orders"], 0): 2, (topics["prices"], 0): 2, (topics["accounts"], 0): 2}
    before = {
        t: await placed(conn, t, "src_offset")
        for t in ("shop.orders", "prices_history", "prices", "accounts_history", "accounts")
    }

    async def roll_back(abandon: bool) -> control_store.RolledBack:
        async with db.transaction(conn):
            done = await control_store.roll_back_data(conn, GROUP, checkpoint, topics, cat)
            if abandon:
                raise _Abandoned
            return done

    # Abandoned after every table was restored: the transaction takes it all back.
    with pytest.raises(_Abandoned):
        await roll_back(abandon=True)
    for table, rows in before.items():
        assert await placed(conn, table, "src_offset") == rows
    assert await db.stored_offsets(conn, GROUP) == {(t, 0): 5 for t in topics.values()}

    done = await roll_back(abandon=False)
    assert done.rows == {"shop.orders": 3, "prices_history": 2, "accounts_history": 1}
    assert await placed(conn, "shop.orders", "order_id", "src_offset") == [
        (f"orders_{H10_PART}", "o0", 0),
        (f"orders_{H10_PART}", "o1", 1),
    ]
    assert await placed(conn, "prices_history", "sku", "rev", "src_offset") == [
        (f"prices_history_{H10_PART}", "k1", 1, 0),
        (f"prices_history_{H11_PART}", "k2", 1, 1),
    ]
    assert await placed(conn, "prices", "sku", "rev", "price") == [
        ("prices", "k1", 1, 10),
        ("prices", "k2", 1, 20),
    ]
    assert await placed(conn, "accounts_history", "plan", "src_offset") == [
        (f"accounts_history_{H10_PART}", "free", 0),
        (f"accounts_history_{H10_PART}", "pro", 1),
    ]
    assert await placed(conn, "accounts", "account", "plan") == [("accounts", "x", "pro")]
    assert await db.stored_offsets(conn, GROUP) == {(t, 0): 2 for t in topics.values()}


# -- the source indexes ----------------------------------------------------------------------------


_SUFFIX = "_src_partition_src_offset_idx"  # how PostgreSQL names a partition's index


def _deletes(plan: Any, table: str) -> list[Any]:
    """The plan's nodes that delete from ``table`` (a bare name), wherever they are."""
    found = []
    if plan["Node Type"] == "ModifyTable" and plan.get("Relation Name") == table:
        found.append(plan)
    for child in plan.get("Plans", ()):
        found += _deletes(child, table)
    return found


def _scans(plan: Any) -> list[tuple[str, str]]:
    """Every scan of a plan (EXPLAIN's JSON): (node type, the relation or index it reads)."""
    found = []
    if "Scan" in plan["Node Type"]:
        found.append((plan["Node Type"], plan.get("Index Name") or plan.get("Relation Name", "")))
    for child in plan.get("Plans", ()):
        found += _scans(child)
    return found


async def test_replays_and_rollbacks_read_every_partition_s_source_index(
    conn: db.Connection, cat: Catalog, database_url: str
) -> None:
    """The BRIN source index made on the parent exists on every partition, and the replay's
    range delete and the rollback's delete use it there. Neither statement names the
    partition column (a replayed record may decode to another time than the row it
    replaces), so no partition is pruned: each one's index is read, and costs a few pages."""
    migrator = await asyncpg.connect(testbed.as_migrator(database_url), timeout=10)
    try:
        for table, columns, values in (
            ("shop.orders", "order_id, amount, placed_at", "'o' || i, i"),
            ("prices_history", "sku, price, rev, at", "'k' || i, i, i"),
        ):
            await migrator.execute(
                f"INSERT INTO {table} ({columns}, src_partition, src_offset, batch_id) "
                f"SELECT {values}, $1::timestamptz + (i % 3) * interval '1 hour', i % 2, i / 2, "
                "1 FROM generate_series(0, 599999) AS i",
                H10 + timedelta(minutes=1),
            )
            await migrator.execute(f"ANALYZE {table}")
    finally:
        await migrator.close()
    for spec, table in ((cat["orders"], "shop.orders"), (cat["prices"], "prices_history")):
        schema, bare = sql_names.split_table(table)
        shape = next(s for s in schema_plan.shapes(spec) if s.partition_by)
        (index,) = (i for i in shape.indexes if i.columns == ("src_partition", "src_offset"))
        source = sql_names.table(f"{schema}.{index.name}")
        indexes = {
            r[0]
            for r in await conn.fetch(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                f"WHERE i.inhparent = '{source}'::regclass"
            )
        }
        assert indexes == {f"{bare}_{p}{_SUFFIX}" for p in (H10_PART, H11_PART, "default")}
        (delete,) = range_deletes(spec)
        restore = control_store.restore_statement(spec)
        # A replay runs its delete once per batch, a prepared statement that PostgreSQL may
        # plan once for any offsets (a generic plan): that plan must use the index too. A
        # rollback runs its statement once, planned for its cut's offsets.
        await conn.execute(f"PREPARE replay_delete (int, bigint, bigint) AS {delete}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        explained = {
            "replay, generic": await conn.fetchval(
                "EXPLAIN (FORMAT JSON) EXECUTE replay_delete (0, 100000, 100500)"
            ),
            "replay": await conn.fetchval(f"EXPLAIN (FORMAT JSON) {delete}", 0, 100000, 100500),
            "rollback": await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) {restore}", [0, 1], [290000, 285000]
            ),
        }
        await conn.execute("DEALLOCATE replay_delete")
        await conn.execute("RESET plan_cache_mode")
        for what, text in explained.items():
            (deleting,) = _deletes(json.loads(text)[0]["Plan"], bare)
            # Every scan of a relation (not the rollback's of its cut): the table's partitions.
            scans = [(kind, name) for kind, name in _scans(deleting) if name]
            assert {kind for kind, _ in scans} == {"Bitmap Heap Scan", "Bitmap Index Scan"}, (
                what,
                scans,
            )
            assert {name for kind, name in scans if kind == "Bitmap Index Scan"} == indexes
            read = sorted(name for kind, name in scans if kind == "Bitmap Heap Scan")
            assert read == sorted(i.removesuffix(_SUFFIX) for i in indexes), (what, scans)


# -- `pipeline replay` of a partitioned stream, fed by a real agent -------------------------------


async def test_pipeline_replay_puts_a_partitioned_stream_s_range_back_to_the_log(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    """An agent ingests a stream partitioned by the hour (records straddle both partitions
    and DEFAULT; some redelivered, some keys again at another time); a bug rewrites and
    deletes rows; `pipeline replay` of an offset range puts exactly that range back, in the
    partitions its times belong to, and leaves the rest as the bug left it."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    path = tmp_path / "orders.toml"
    path.write_text("builtin = false\n" + USER_STREAMS)
    only = catalog.load(path)
    orders = only["orders"]
    await testbed.migrate(database_url, catalog=only)
    migrator = await asyncpg.connect(testbed.as_migrator(database_url), timeout=10)
    try:
        await _partition(migrator, orders)
    finally:
        await migrator.close()
    await create_topics(bootstrap, prefix, 2, only)
    # Record i: order o<i % 150> at minute 7i % 180 (10:00, 11:00, then DEFAULT), so each
    # order comes twice at two times; then records 0..19 sent again (the producer's
    # redelivery: the same order and time).
    values = [(f"o{i % 150}", i, at(i * 7 % 180)) for i in range(300)]
    values += [(f"o{i}", 1000 + i, at(i * 7 % 180)) for i in range(20)]
    messages = [
        testbed.Message(
            topic_name(orders.topic, prefix),
            msgspec.json.encode({"order_id": o, "amount": a, "placed_at": t.isoformat()}),
            o.encode(),
        )
        for o, a, t in values
    ]
    sent: list[tuple[int, int]] = []
    await testbed.produce(
        kafka_clients.kafka_settings(bootstrap),
        [messages],
        acked=lambda found: sent.extend((m.partition, m.offset) for m in found),
    )
    # An order's records share a partition: the first of each order and time is kept.
    first: dict[tuple[str, datetime], tuple[Any, ...]] = {}
    for (o, a, t), (p, off) in sorted(zip(values, sent, strict=True), key=lambda v: v[1]):
        first.setdefault((o, t), (o, t, a, p, off))
    ends: dict[int, int] = {}
    for p, off in sent:
        ends[p] = max(ends.get(p, 0), off + 1)
    # The range replayed ends before the first redelivered record of any partition.
    end = min(off for _, off in sent[300:])
    start = end // 3
    assert start > 10
    async with running_agent(bootstrap, database_url, prefix, streams_file=path):

        async def caught_up() -> bool:
            stored = await stored_offsets(database_url, prefix, prefix)
            return {p: n for (t, p), n in stored.items() if t == orders.topic} == ends

        await until(caught_up, within=90, what="the agent ingested every record")
    conn = await db.connect(testbed.as_agent(database_url), Session(command_timeout=30))
    try:
        expected = sorted(first.values())
        columns = ("order_id", "placed_at", "amount", "src_partition", "src_offset")
        ingested = await placed(conn, "shop.orders", *columns)
        assert [r[1:] for r in ingested] == expected
        assert [r[0] for r in ingested] == [_partition_of(r[2]) for r in ingested]
        # The bug: every amount rewritten, a third of the rows lost.
        await conn.execute("UPDATE shop.orders SET amount = -1")
        await conn.execute("DELETE FROM shop.orders WHERE src_offset % 3 = 0")
        env = agent_env(bootstrap, database_url, prefix, prefix, streams_file=path)
        command = (*REPLAY, "--stream", "orders", "--from", str(start), "--to", str(end))
        done = await asyncio.to_thread(
            subprocess.run, command, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        replayed = [r for r in expected if start <= r[4] < end]
        left = [(*r[:2], -1, *r[3:]) for r in expected if not start <= r[4] < end and r[4] % 3]
        assert replayed and left
        assert [r[1:] for r in await placed(conn, "shop.orders", *columns)] == sorted(
            replayed + left
        )
    finally:
        await conn.close()


def _partition_of(moment: datetime) -> str:
    if moment < H10 + timedelta(hours=1):
        return f"orders_{H10_PART}"
    if moment < H10 + timedelta(hours=2):
        return f"orders_{H11_PART}"
    return "orders_default"
