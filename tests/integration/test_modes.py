"""Every mode's write semantics against the real database, with a user catalog whose names
need quoting (a table named ``order``, a schema-qualified table, a column named ``select``):
out-of-order and equal versions, redelivered duplicates, tombstones before, after and between
rows of one batch and across batches, composite keys; a rollback of each mode, and its
refusal for a stream it cannot restore; a replay's range replacement and the latest tables'
guard (docs/streams.md, docs/control-plane.md, docs/replay.md).

The tables are created here with plain SQL by the catalog's table conventions; the rows are
the tuples a decoder makes (columns in catalog order, then partition, offset, batch id)."""

from __future__ import annotations

import decimal
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from pipeline import catalog, control_store, db, sql_names
from pipeline.catalog import Catalog, StreamSpec
from pipeline.db_session import Session
from pipeline.replay import range_deletes
from pipeline.rows import Tombstone

pytestmark = pytest.mark.timeout(120)

CATALOG = """
builtin = false

[[streams]]
name = "clicks"
topic = "shop.clicks"
table = "clicks"

[streams.columns]
id = "bigint"
select = "text"

[[streams]]
name = "payments"
topic = "shop.payments"
table = "shop.payments"
key = ["payment_id"]

[streams.columns]
payment_id = "uuid"
amount = "numeric"

[[streams]]
name = "orders"
topic = "shop.orders"
table = "order"
mode = "latest"
key = ["order_id"]
version = "revision"
tombstones = "delete"

[streams.columns]
order_id = "text"
status = "text"
revision = "bigint"

[[streams]]
name = "sessions"
topic = "shop.sessions"
table = "sessions"
mode = "latest"
key = ["user_id"]
tombstones = "delete"

[streams.columns]
user_id = "text"
page = "text"

[[streams]]
name = "prices"
topic = "shop.prices"
table = "prices"
mode = "history"
key = ["shop", "sku"]
version = "rev"

[streams.columns]
shop = "text"
sku = "text"
price = "numeric"
rev = "integer"

[[streams]]
name = "accounts"
topic = "shop.accounts"
table = "accounts"
mode = "history"
key = ["account"]

[streams.columns]
account = "text"
plan = "text"

[[streams]]
name = "profiles"
topic = "shop.profiles"
table = "profiles"
mode = "history"
key = ["user_id"]
tombstones = "delete"

[streams.columns]
user_id = "text"
name = "text"
"""

GROUP = "modes"


def _catalog() -> Catalog:
    _, streams = catalog.parse(CATALOG, "test_modes.toml")
    return catalog.validate(streams)


CAT = _catalog()


def _ddl(spec: StreamSpec) -> list[str]:
    """The stream's tables as the catalog's conventions make them (docs/streams.md)."""
    ident = sql_names.ident
    columns = [
        f"{ident(c.name)} {c.type}{'' if c.nullable else ' NOT NULL'}" for c in spec.columns
    ] + [
        '"src_partition" integer NOT NULL',
        '"src_offset" bigint NOT NULL',
        '"batch_id" bigint NOT NULL',
        '"ingested_at" timestamptz NOT NULL DEFAULT now()',
    ]
    statements = []
    schema, _ = sql_names.split_table(spec.table)
    if schema != "public":
        statements.append(f"CREATE SCHEMA IF NOT EXISTS {ident(schema)}")
    key = f", PRIMARY KEY ({sql_names.columns(spec.key)})" if spec.key else ""
    statements.append(f"CREATE TABLE {sql_names.table(spec.table)} ({', '.join(columns)}{key})")
    if spec.history_table is not None:
        history_key = (*spec.key, spec.version) if spec.version else ("src_partition", "src_offset")
        statements.append(
            f"CREATE TABLE {sql_names.table(spec.history_table)} ({', '.join(columns)}, "
            f"PRIMARY KEY ({sql_names.columns(history_key)}))"
        )
    return statements


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[db.Connection]:
    connection = await db.connect(database_url, Session(command_timeout=30))
    try:
        for spec in CAT:
            for statement in _ddl(spec):
                await connection.execute(statement)
        yield connection
    finally:
        await connection.close()


def row(spec: StreamSpec, partition: int, offset: int, *values: Any) -> tuple[Any, ...]:
    assert len(values) == len(spec.columns)
    return (*values, partition, offset, 1)


def tomb(spec: StreamSpec, partition: int, offset: int, key: Any) -> Tombstone:
    values = [key if c == spec.key[0] else None for c in spec.column_names]
    return Tombstone((*values, partition, offset, 1))


@pytest.fixture(params=[False, True], ids=["emptied", "last"])
def last(request: pytest.FixtureRequest) -> bool:
    """Each mode's test runs both ways a write may take: emptying its staging table as it
    reads it (for a second write of the table in the transaction, as in a bisection), and as
    the transaction's last write of the table, leaving the staged rows for COMMIT to empty
    (the agent's first attempt at a batch)."""
    return bool(request.param)


async def write(
    conn: db.Connection, stream: str, rows: Sequence[Any], *, last: bool = False
) -> int:
    writer = db.TableWriter(CAT[stream])
    async with db.transaction(conn):
        return await writer.write(conn, rows, last=last)


async def table(conn: db.Connection, name: str, *columns: str) -> list[tuple[Any, ...]]:
    cols = sql_names.columns(columns)
    found = await conn.fetch(f"SELECT {cols} FROM {sql_names.table(name)} ORDER BY {cols}")
    return [tuple(r) for r in found]


# -- the modes ---------------------------------------------------------------------------------


async def test_append_without_a_key_is_a_plain_copy_of_every_row(
    conn: db.Connection, last: bool
) -> None:
    clicks = CAT["clicks"]
    rows = [row(clicks, 0, i, i, f"s{i}") for i in range(3)]
    assert await write(conn, "clicks", rows, last=last) == 3
    assert (
        await write(conn, "clicks", rows[:1], last=last) == 1
    )  # no key: a redelivery is a row again
    assert await table(conn, "clicks", "id", "select", "src_offset") == [
        (0, "s0", 0),
        (0, "s0", 0),
        (1, "s1", 1),
        (2, "s2", 2),
    ]


async def test_append_with_a_key_skips_and_counts_a_key_it_has(
    conn: db.Connection, last: bool
) -> None:
    payments = CAT["payments"]
    a, b, c = (uuid.UUID(int=n) for n in (1, 2, 3))
    d = decimal.Decimal
    first = [row(payments, 0, 0, a, d("1.10")), row(payments, 0, 1, b, d("2.20"))]
    assert await write(conn, "payments", first, last=last) == 2
    # b again (a producer's redelivery at a later offset), twice in one batch, and c new.
    again = [
        row(payments, 0, 2, b, d("9.99")),
        row(payments, 0, 3, c, d("3.30")),
        row(payments, 0, 4, c, d("8.88")),
    ]
    assert await write(conn, "payments", again, last=last) == 1
    assert await table(conn, "shop.payments", "payment_id", "amount", "src_offset") == [
        (a, d("1.10"), 0),
        (b, d("2.20"), 1),
        (c, d("3.30"), 3),
    ]


async def test_latest_with_a_version_keeps_the_highest_and_of_equal_ones_the_first(
    conn: db.Connection, last: bool
) -> None:
    orders = CAT["orders"]
    batch = [
        row(orders, 0, 0, "a", "paid", 2),
        row(orders, 0, 1, "a", "new", 1),  # older, after the newer
        row(orders, 0, 2, "b", "new", 1),
        row(orders, 0, 3, "b", "other", 1),  # equal version: the first stays
    ]
    assert await write(conn, "orders", batch, last=last) == 2
    later = [
        row(orders, 0, 4, "a", "again", 2),  # equal version across batches: the stored stays
        row(orders, 0, 5, "a", "stale", 1),  # older: never replaces
        row(orders, 1, 0, "b", "moved", 0),  # another partition, but an older version
    ]
    assert await write(conn, "orders", later, last=last) == 0
    assert await write(conn, "orders", [row(orders, 0, 6, "b", "shipped", 5)], last=last) == 1
    assert await table(conn, "order", "order_id", "status", "revision", "src_offset") == [
        ("a", "paid", 2, 0),
        ("b", "shipped", 5, 6),
    ]


async def test_latest_tombstones_before_after_and_between_rows(
    conn: db.Connection, last: bool
) -> None:
    orders = CAT["orders"]
    assert await write(conn, "orders", [row(orders, 0, 0, "a", "paid", 5)], last=last) == 1
    assert await write(conn, "orders", [row(orders, 0, 1, "b", "paid", 1)], last=last) == 1
    batch = [
        row(orders, 0, 2, "c", "new", 1),
        tomb(orders, 0, 3, "c"),  # after c's row: c never lands
        row(orders, 0, 4, "a", "paid", 9),
        tomb(orders, 0, 5, "a"),  # between rows of a: deletes the stored v5
        row(orders, 0, 6, "a", "again", 1),  # after the tombstone, whatever its version
        tomb(orders, 0, 7, "b"),  # b's stored row goes
        tomb(orders, 0, 8, "d"),  # before d's row: nothing to delete yet
        row(orders, 0, 9, "d", "new", 3),
        tomb(orders, 0, 10, "e"),  # a key never seen
    ]
    # New: a's v1 row, d's row, and the rows the tombstones of a and b deleted.
    assert await write(conn, "orders", batch, last=last) == 4
    assert await table(conn, "order", "order_id", "status", "revision", "src_offset") == [
        ("a", "again", 1, 6),
        ("d", "new", 3, 9),
    ]
    # Across batches: a tombstone alone, then the key again.
    assert await write(conn, "orders", [tomb(orders, 0, 11, "a")], last=last) == 1
    assert await table(conn, "order", "order_id") == [("d",)]
    assert await write(conn, "orders", [row(orders, 0, 12, "a", "back", 0)], last=last) == 1
    # A tombstone redelivered from before the stored row's offset (a replay) deletes nothing.
    assert (
        await write(conn, "orders", [tomb(orders, 0, 8, "d"), tomb(orders, 0, 11, "a")], last=last)
        == 0
    )
    assert await table(conn, "order", "order_id", "status", "src_offset") == [
        ("a", "back", 12),
        ("d", "new", 9),
    ]


async def test_latest_without_a_version_takes_the_later_offset_or_another_partition(
    conn: db.Connection, last: bool
) -> None:
    sessions = CAT["sessions"]
    batch = [row(sessions, 0, 0, "u1", "home"), row(sessions, 0, 1, "u1", "cart")]
    assert await write(conn, "sessions", batch, last=last) == 1
    assert await write(conn, "sessions", batch[:1], last=last) == 0  # redelivered, older: no change
    assert (
        await write(conn, "sessions", batch[1:], last=last) == 0
    )  # redelivered, the same: no change
    assert await table(conn, "sessions", "user_id", "page", "src_partition", "src_offset") == [
        ("u1", "cart", 0, 1)
    ]
    # The key moved partitions: a row from another partition replaces.
    assert await write(conn, "sessions", [row(sessions, 1, 0, "u1", "pay")], last=last) == 1
    assert await table(conn, "sessions", "user_id", "page", "src_partition", "src_offset") == [
        ("u1", "pay", 1, 0)
    ]
    # A tombstone of the stored row's partition deletes it; one from another partition too.
    more = [row(sessions, 1, 1, "u2", "home"), tomb(sessions, 1, 2, "u1")]
    assert await write(conn, "sessions", more, last=last) == 2
    assert await write(conn, "sessions", [tomb(sessions, 0, 9, "u2")], last=last) == 1
    assert await table(conn, "sessions", "user_id") == []


async def test_history_with_a_composite_key_keeps_every_version_and_the_highest_as_latest(
    conn: db.Connection, last: bool
) -> None:
    prices = CAT["prices"]
    d = decimal.Decimal
    batch = [
        row(prices, 0, 0, "s1", "k1", d("10"), 1),
        row(prices, 0, 1, "s1", "k1", d("12"), 3),
        row(prices, 0, 2, "s1", "k1", d("11"), 2),
        row(prices, 0, 3, "s1", "k2", d("5"), 1),
        row(prices, 0, 4, "s2", "k1", d("7"), 1),  # same sku, another shop: another key
    ]
    assert await write(conn, "prices", batch, last=last) == 5
    assert await write(conn, "prices", batch[2:3], last=last) == 0  # a redelivered version
    assert await write(conn, "prices", [row(prices, 0, 5, "s1", "k1", d("99"), 2)], last=last) == 0
    assert await table(conn, "prices", "shop", "sku", "price", "rev") == [
        ("s1", "k1", d("12"), 3),
        ("s1", "k2", d("5"), 1),
        ("s2", "k1", d("7"), 1),
    ]
    assert await table(conn, "prices_history", "shop", "sku", "rev", "src_offset") == [
        ("s1", "k1", 1, 0),
        ("s1", "k1", 2, 2),
        ("s1", "k1", 3, 1),
        ("s1", "k2", 1, 3),
        ("s2", "k1", 1, 4),
    ]


async def test_history_without_a_version_keeps_every_record_and_tombstones_delete_latest(
    conn: db.Connection, last: bool
) -> None:
    profiles = CAT["profiles"]
    batch = [
        row(profiles, 0, 0, "u1", "A"),
        row(profiles, 0, 1, "u1", "B"),
        tomb(profiles, 0, 2, "u1"),
        row(profiles, 0, 3, "u1", "C"),
        row(profiles, 0, 4, "u2", "X"),
        tomb(profiles, 0, 5, "u2"),
    ]
    # History: A, B, C, X (tombstones are not history rows); latest: u1 = C.
    assert await write(conn, "profiles", batch, last=last) == 4
    assert (
        await write(conn, "profiles", batch, last=last) == 0
    )  # the whole batch again: nothing new
    assert await table(conn, "profiles", "user_id", "name", "src_offset") == [("u1", "C", 3)]
    assert await table(conn, "profiles_history", "user_id", "name", "src_offset") == [
        ("u1", "A", 0),
        ("u1", "B", 1),
        ("u1", "C", 3),
        ("u2", "X", 4),
    ]
    assert await write(conn, "profiles", [tomb(profiles, 0, 6, "u1")], last=last) == 1
    assert await table(conn, "profiles", "user_id") == []
    assert len(await table(conn, "profiles_history", "src_offset")) == 4


async def _staged_rows(conn: db.Connection, writer: db.TableWriter) -> int:
    count = await conn.fetchval(f"SELECT count(*) FROM pg_temp.{sql_names.ident(writer.stage)}")
    return int(count)


async def test_a_last_write_leaves_its_stage_to_commit_and_an_earlier_one_empties_it(
    conn: db.Connection,
) -> None:
    payments = CAT["payments"]
    writer = db.TableWriter(payments)
    a, b, c, e = (uuid.UUID(int=n) for n in (1, 2, 3, 4))
    d = decimal.Decimal
    async with db.transaction(conn):
        assert (
            await writer.write(
                conn, [row(payments, 0, 0, a, d("1")), row(payments, 0, 1, b, d("2"))]
            )
            == 2
        )
        assert await _staged_rows(conn, writer) == 0  # emptied as read: a next write may come
        # The transaction's last write of the table: b again (skipped) and c.
        again = [row(payments, 0, 2, b, d("9")), row(payments, 0, 3, c, d("3"))]
        assert await writer.write(conn, again, last=True) == 1
        assert await _staged_rows(conn, writer) == 2  # read, left for COMMIT
    assert await _staged_rows(conn, writer) == 0  # COMMIT emptied it
    # The next transaction on the same session sees only its own staged rows.
    async with db.transaction(conn):
        later = [row(payments, 0, 4, c, d("8")), row(payments, 0, 5, e, d("4"))]
        assert await writer.write(conn, later, last=True) == 1
    assert await table(conn, "shop.payments", "payment_id", "amount", "src_offset") == [
        (a, d("1"), 0),
        (b, d("2"), 1),
        (c, d("3"), 3),
        (e, d("4"), 5),
    ]


# -- rollback ----------------------------------------------------------------------------------


async def _stored(conn: db.Connection, offsets: dict[str, int]) -> None:
    """The group's stored offsets: partition 0 of each topic at its given next offset."""
    await conn.executemany(
        "INSERT INTO ingest_offsets (group_id, topic, partition, next_offset) "
        "VALUES ($1, $2, 0, $3)",
        [(GROUP, topic, offset) for topic, offset in offsets.items()],
    )


async def _roll_back(
    conn: db.Connection, checkpoint: dict[str, int], streams: Sequence[str]
) -> control_store.RolledBack:
    async with db.transaction(conn):
        return await control_store.roll_back_data(
            conn,
            GROUP,
            {(topic, 0): offset for topic, offset in checkpoint.items()},
            {s: CAT[s].topic for s in streams},
            CAT,
        )


async def test_a_rollback_restores_append_and_history_tables_of_any_key(
    conn: db.Connection,
) -> None:
    clicks, payments, prices, accounts = (
        CAT[s] for s in ("clicks", "payments", "prices", "accounts")
    )
    d = decimal.Decimal
    await write(conn, "clicks", [row(clicks, 0, i, i, "s") for i in range(5)])
    keys = [uuid.UUID(int=n) for n in range(5)]
    await write(conn, "payments", [row(payments, 0, i, keys[i], d(i)) for i in range(5)])
    await write(
        conn,
        "prices",
        [
            row(prices, 0, 0, "s1", "k1", d("10"), 1),
            row(prices, 0, 1, "s1", "k2", d("20"), 1),
            # After the checkpoint (offset 2): a newer version of k1, and a new key k3.
            row(prices, 0, 2, "s1", "k1", d("11"), 2),
            row(prices, 0, 3, "s1", "k3", d("30"), 1),
            # Out of order: an older version after the checkpoint stays out of latest anyway.
            row(prices, 0, 4, "s1", "k2", d("19"), 0),
        ],
    )
    await write(
        conn,
        "accounts",
        [
            row(accounts, 0, 0, "x", "free"),
            row(accounts, 0, 1, "x", "pro"),
            row(accounts, 0, 2, "y", "free"),
            row(accounts, 0, 3, "x", "team"),  # after the checkpoint (offset 2)
            row(accounts, 0, 4, "y", "pro"),
        ],
    )
    topics = {s: CAT[s].topic for s in ("clicks", "payments", "prices", "accounts")}
    await _stored(conn, {t: 5 for t in topics.values()})
    checkpoint = {topics["clicks"]: 3, topics["payments"]: 1, topics["prices"]: 2}
    checkpoint[topics["accounts"]] = 3
    done = await _roll_back(conn, checkpoint, list(topics))
    assert done.rows == {
        "clicks": 2,
        "shop.payments": 4,
        "prices_history": 3,
        "accounts_history": 2,
    }
    assert await table(conn, "clicks", "src_offset") == [(0,), (1,), (2,)]
    assert await table(conn, "shop.payments", "payment_id") == [(keys[0],)]
    assert await table(conn, "prices", "shop", "sku", "price", "rev", "src_offset") == [
        ("s1", "k1", d("10"), 1, 0),
        ("s1", "k2", d("20"), 1, 1),
    ]
    assert await table(conn, "prices_history", "sku", "rev") == [("k1", 1), ("k2", 1)]
    # Without a version, the latest row is the one of the highest offset left.
    assert await table(conn, "accounts", "account", "plan", "src_offset") == [
        ("x", "pro", 1),
        ("y", "free", 2),
    ]
    assert await table(conn, "accounts_history", "src_offset") == [(0,), (1,), (2,)]
    stored = await db.stored_offsets(conn, GROUP)
    assert stored == {(t, 0): checkpoint[t] for t in topics.values()}


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        ("orders", "stream 'orders' (order) is a \"latest\" table without history"),
        ("profiles", "stream 'profiles' (profiles) deletes on tombstones"),
    ],
)
async def test_a_rollback_that_cannot_restore_a_stream_is_refused_with_nothing_changed(
    conn: db.Connection, stream: str, why: str
) -> None:
    spec, clicks = CAT[stream], CAT["clicks"]
    await write(conn, "clicks", [row(clicks, 0, i, i, "s") for i in range(3)])
    values: list[tuple[Any, ...]] = [("a", "one"), ("b", "two")]
    if spec.version is not None:
        values = [(*v, 1) for v in values]
    await write(conn, stream, [row(spec, 0, i, *v) for i, v in enumerate(values)])
    await _stored(conn, {clicks.topic: 3, spec.topic: 2})
    before = await table(conn, spec.table, "src_offset"), await table(conn, "clicks", "src_offset")
    with pytest.raises(control_store.RollbackRefused, match="nothing was changed") as refused:
        await _roll_back(conn, {clicks.topic: 1, spec.topic: 1}, ["clicks", stream])
    assert why in str(refused.value)
    assert "clicks" not in str(refused.value)
    after = await table(conn, spec.table, "src_offset"), await table(conn, "clicks", "src_offset")
    assert after == before
    assert await db.stored_offsets(conn, GROUP) == {(clicks.topic, 0): 3, (spec.topic, 0): 2}
    assert await conn.fetchval("SELECT count(*) FROM table_owners") == 0
    # A stream that did not move past the checkpoint has nothing to restore: no refusal.
    done = await _roll_back(conn, {clicks.topic: 1, spec.topic: 2}, ["clicks", stream])
    assert done.rows == {"clicks": 2}


# -- replay ------------------------------------------------------------------------------------


async def _replay(conn: db.Connection, stream: str, rows: Sequence[Any], end: int) -> int:
    """What a replay's transaction does for partition 0's range [first row's offset, end):
    the range's per-record rows deleted, then the range written again."""
    spec = CAT[stream]
    writer = db.TableWriter(spec)
    async with db.transaction(conn):
        for statement in range_deletes(spec):
            await conn.execute(statement, 0, rows[0][-2], end)
        return await writer.write(conn, rows)


async def test_a_replay_never_puts_an_older_record_over_a_newer_latest_row(
    conn: db.Connection,
) -> None:
    orders, sessions = CAT["orders"], CAT["sessions"]
    assert range_deletes(orders) == [] and range_deletes(sessions) == []
    log = [row(orders, 0, 0, "a", "new", 1), row(orders, 0, 1, "a", "paid", 2)]
    await write(conn, "orders", log)
    await write(conn, "orders", [row(orders, 0, 2, "a", "shipped", 3)])
    assert await _replay(conn, "orders", log, 2) == 0
    assert await table(conn, "order", "order_id", "status", "src_offset") == [("a", "shipped", 2)]
    visits = [row(sessions, 0, 0, "u", "home"), tomb(sessions, 0, 1, "u")]
    await write(conn, "sessions", visits)
    await write(conn, "sessions", [row(sessions, 0, 2, "u", "cart")])
    # Neither the older row nor the older tombstone touches the row of offset 2.
    assert await _replay(conn, "sessions", visits, 2) == 0
    assert await table(conn, "sessions", "user_id", "page", "src_offset") == [("u", "cart", 2)]


async def test_a_replayed_range_is_replaced_and_its_tombstones_delete_again(
    conn: db.Connection,
) -> None:
    clicks, profiles = CAT["clicks"], CAT["profiles"]
    await write(conn, "clicks", [row(clicks, 0, i, i, "s") for i in range(4)])
    # The range [1, 3) replaced: its rows once, the others untouched.
    assert await _replay(conn, "clicks", [row(clicks, 0, i, i, "r") for i in (1, 2)], 3) == 2
    assert await table(conn, "clicks", "src_offset", "select") == [
        (0, "s"),
        (1, "r"),
        (2, "r"),
        (3, "s"),
    ]
    log = [
        row(profiles, 0, 0, "u1", "A"),
        row(profiles, 0, 1, "u1", "B"),
        tomb(profiles, 0, 2, "u1"),
    ]
    await write(conn, "profiles", log)
    assert await _replay(conn, "profiles", log, 3) == 2  # A and B in the history again
    assert await table(conn, "profiles", "user_id") == []
    assert await table(conn, "profiles_history", "name", "src_offset") == [("A", 0), ("B", 1)]
