"""Streams from a user's catalog, end to end on real servers (docs/streams.md): each in a fresh
database migrated by `pipeline migrate` from the catalog alone (``builtin = false``), with
``pipeline run`` processes, and judged by the exactly-once oracle plus a model of the log
(tests/integration/catalog_model.py) that says, row by row, what every table must hold.

* three agents SIGKILLed at random moments ingest an append stream with a key (the log holds
  duplicates), a latest stream with a version (out of order, equal versions, tombstones) and
  a history stream; bad records are dead-lettered naming their column;
* evolution under load: a nullable column added, `pipeline streams plan` shows the ALTER,
  `pipeline migrate`, agents of the old catalog keep ingesting until a rolling restart, new
  rows carry the field; a type change is refused with nothing changed;
* `pipeline control` deactivate/activate, a checkpoint and a rollback, `pipeline replay` and
  `pipeline dlq replay` on user streams.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest

from pipeline import catalog as catalogs
from pipeline import db, testbed
from pipeline.catalog import Catalog, StreamSpec
from pipeline.config import load_config
from pipeline.control import generate_key_pair, write_private_key_file, write_public_key_file
from pipeline.devstack import postgres
from tests.conftest import Servers
from tests.integration.catalog_model import Produced, Rows, expected_tables, landed
from tests.integration.harness import (
    AgentProcess,
    Outgoing,
    Sent,
    agent_env,
    assert_caught_up_exactly_once,
    assert_tables_match,
    create_topics,
    produce_paced,
    stored_offsets,
    until,
    wait_caught_up,
)

pytestmark = pytest.mark.timeout(600)

T0 = datetime(2026, 11, 1, tzinfo=UTC)
# Decimals as JSON numbers, digit for digit (msgspec writes them as strings by default).
JSON = msgspec.json.Encoder(decimal_format="number")
# ... and read back as they were written.
READ_JSON = msgspec.json.Decoder(float_hook=Decimal)

ORDERS = """
[[streams]]
name = "orders"
topic = "shop.orders"
table = "shop.orders"
key = ["order_id"]

[streams.columns]
order_id = "uuid"
customer = { type = "text", path = "customer.id" }
amount = "numeric"
status = { type = "text", default = "new" }
placed_at = "timestamptz"
shipped_at = { type = "timestamptz", unit = "ms", nullable = true }
items = "jsonb"
qty = "smallint"
channel = { type = "text", source = "header:channel", nullable = true }
"""

ACCOUNTS = """
[[streams]]
name = "accounts"
topic = "crm.accounts"
table = "accounts"
mode = "latest"
key = ["account_id"]
version = "revision"
tombstones = "delete"

[streams.columns]
account_id = { type = "text", source = "key" }
plan = "text"
balance = "numeric"
revision = "bigint"
active = "boolean"
opened = "date"
"""

SHIPMENTS = """
[[streams]]
name = "shipments"
topic = "shop.shipments"
table = "shipments"
mode = "history"
key = ["shipment_id"]

[streams.columns]
shipment_id = "uuid"
state = "text"
weight_g = "integer"
ratio = "double precision"
label = { type = "bytea", nullable = true }
"""


# -- traffic: each record with the row the model expects of it ---------------------------------


@dataclass(frozen=True)
class Planned:
    """A record to produce, and what it must become: a row (the stream's columns in catalog
    order, as PostgreSQL returns them), a tombstone of a key, or a dead letter naming a
    column (``out.poison``; "-" when no column is to blame: not JSON, an empty record)."""

    out: Outgoing
    row: tuple[Any, ...] | None = None
    tombstone_key: Any = None


def _stamp(rng: random.Random, at: datetime) -> str:
    """``at`` in RFC 3339 with an offset: Z, +00:00 or another zone's."""
    zone = rng.choice(
        (UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30)))
    )
    text = at.astimezone(zone).isoformat()
    return text.replace("+00:00", "Z") if rng.random() < 0.5 else text


def _order(rng: random.Random, spec: StreamSpec, i: int, order_id: uuid.UUID) -> Planned:
    placed = T0 + timedelta(seconds=i, microseconds=rng.randrange(1_000_000))
    value: dict[str, Any] = {
        "order_id": str(order_id) if rng.random() < 0.8 else order_id.hex,
        "customer": {"id": f"c-{rng.randrange(300)}", "tier": "gold"},
        "amount": Decimal(rng.randrange(1, 10**9)) / 100,
        "placed_at": _stamp(rng, placed),
        "items": [{"sku": f"s-{rng.randrange(50)}", "n": rng.randrange(1, 5)}],
        "qty": rng.choice((-32768, 32767, 0, rng.randrange(1, 100))),
        "unknown_field": "ignored",
    }
    status = None
    if rng.random() < 0.7:
        status = value["status"] = rng.choice(("paid", "packed"))
    shipped = None
    match rng.randrange(3):
        case 0:
            ms = rng.randrange(10**12, 2 * 10**12)
            value["shipped_at"] = ms
            shipped = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
        case 1:
            value["shipped_at"] = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    channel = None
    if rng.random() < 0.5:
        channel = rng.choice(("web", "app"))
        headers = (("channel", channel.encode()),)
    row = (
        order_id,
        value["customer"]["id"],
        value["amount"],
        status or "new",
        placed,
        shipped,
        value["items"],
        value["qty"],
        channel,
    )
    return Planned(Outgoing(spec, str(order_id).encode(), JSON.encode(value), None, headers), row)


def orders(rng: random.Random, spec: StreamSpec, count: int) -> list[Planned]:
    """``count`` orders; about one in ten sent again later (another status: the first one
    stays), as a producer's redelivery does."""
    placed: list[tuple[float, Planned]] = []
    for i in range(count):
        order_id = uuid.UUID(int=rng.getrandbits(128))
        placed.append((i, _order(rng, spec, i, order_id)))
        if rng.random() < 0.1:  # right after it (one batch) or up to 300 records later
            placed.append(
                (i + rng.choice((0.5, rng.uniform(0.5, 300))), _order(rng, spec, i, order_id))
            )
    return [p for _, p in sorted(placed, key=lambda item: item[0])]


def accounts(rng: random.Random, spec: StreamSpec, keys: int, per_key: int) -> list[Planned]:
    """Per key, revisions 0..per_key-1 shuffled, some sent twice (equal versions, other
    contents) and tombstones among them; the keys interleaved."""
    sequences = []
    for k in range(keys):
        key = f"acct-{k}"
        revisions = list(range(per_key))
        revisions += rng.sample(revisions, per_key // 5)
        rng.shuffle(revisions)
        sequence: list[Planned] = []
        for revision in revisions:
            if rng.random() < 0.06:
                sequence.append(
                    Planned(Outgoing(spec, key.encode(), None), None, tombstone_key=key)
                )
            balance = Decimal(rng.randrange(-(10**6), 10**6)) / 1000
            opened = date(2020, 1, 1) + timedelta(days=rng.randrange(2000))
            active = rng.random() < 0.5
            plan = rng.choice(("free", "pro", "team"))
            value = {
                "plan": plan,
                "balance": balance,
                "revision": revision,
                "active": active,
                "opened": opened.isoformat(),
            }
            row = (key, plan, balance, revision, active, opened)
            sequence.append(Planned(Outgoing(spec, key.encode(), JSON.encode(value)), row))
        if rng.random() < 0.1:  # deleted for good
            sequence.append(Planned(Outgoing(spec, key.encode(), None), None, tombstone_key=key))
        sequences.append(sequence)
    return _interleave(rng, sequences)


def shipments(rng: random.Random, spec: StreamSpec, keys: int, per_key: int) -> list[Planned]:
    sequences = []
    for _ in range(keys):
        shipment_id = uuid.UUID(int=rng.getrandbits(128))
        sequence = []
        for _ in range(per_key):
            weight = rng.choice((2**31 - 1, -(2**31), rng.randrange(1, 50_000)))
            ratio = rng.random() * 10 ** rng.randrange(-5, 6)
            value: dict[str, Any] = {
                "shipment_id": str(shipment_id),
                "state": rng.choice(("created", "in_transit", "delivered")),
                "weight_g": weight,
                "ratio": ratio,
            }
            label = None
            if rng.random() < 0.6:
                label = rng.randbytes(rng.randrange(0, 40))
                value["label"] = base64.b64encode(label).decode()
            row = (shipment_id, value["state"], weight, ratio, label)
            key = str(shipment_id).encode()
            sequence.append(Planned(Outgoing(spec, key, JSON.encode(value)), row))
        sequences.append(sequence)
    return _interleave(rng, sequences)


def _interleave(rng: random.Random, sequences: list[list[Planned]]) -> list[Planned]:
    """The sequences merged at random, each keeping its own order."""
    slots = [i for i, s in enumerate(sequences) for _ in s]
    rng.shuffle(slots)
    iterators = [iter(s) for s in sequences]
    return [next(iterators[i]) for i in slots]


def _poison(spec: StreamSpec, key: bytes, value: bytes | None, column: str) -> Planned:
    return Planned(Outgoing(spec, key, value, column))


def bad_records(catalog: Catalog) -> list[Planned]:
    """One record per way a record can be wrong, each naming the column to blame."""
    o, a, s = catalog["orders"], catalog["accounts"], catalog["shipments"]
    order = {
        "order_id": str(uuid.uuid4()),
        "customer": {"id": "c-1"},
        "amount": 1,
        "placed_at": "2026-11-01T10:00:00Z",
        "items": [],
        "qty": 1,
    }
    account = {"plan": "free", "balance": 0, "revision": 1, "active": True, "opened": "2026-01-01"}
    shipment = {"shipment_id": str(uuid.uuid4()), "state": "x", "weight_g": 1, "ratio": 1.5}

    def bad(record: dict[str, Any], **change: Any) -> bytes:
        changed = {**record, **change}
        return JSON.encode({k: v for k, v in changed.items() if v is not _ABSENT})

    return [
        _poison(o, b"o1", bad(order, amount=_ABSENT), "amount"),  # a missing required field
        _poison(o, b"o2", bad(order, qty=40_000), "qty"),  # out of range
        _poison(o, b"o3", bad(order, placed_at="2026-11-01T10:00:00"), "placed_at"),  # no offset
        _poison(o, b"o4", bad(order, order_id="not-a-uuid"), "order_id"),  # malformed uuid
        _poison(o, b"o5", bad(order, customer={"id": 17}), "customer"),  # wrong type, nested
        _poison(a, b"acct-1", bad(account, active="yes"), "active"),  # not a boolean
        _poison(a, b"acct-2", bad(account, revision=-1), "revision"),  # a negative version
        _poison(a, b"acct-3", bad(account, plan=None), "plan"),  # null in a non-null column
        _poison(a, b"acct-4", bad(account, opened="2026-13-45"), "opened"),  # not a date
        _poison(s, b"s1", bad(shipment, weight_g=2**31), "weight_g"),  # out of range
        _poison(s, b"s2", bad(shipment, weight_g="heavy"), "weight_g"),  # wrong type
        _poison(s, b"s3", bad(shipment, label="***"), "label"),  # not base64
        _poison(s, b"s4", None, "-"),  # a tombstone on a stream that ignores them
        _poison(s, b"s5", b"{broken", "-"),  # not JSON
    ]


_ABSENT = object()


def _sprinkle(rng: random.Random, good: list[Planned], bad: Iterable[Planned]) -> list[Planned]:
    out = list(good)
    for planned in bad:
        out.insert(rng.randrange(len(out) + 1), planned)
    return out


def produced(planned: list[Planned], sent: list[Sent]) -> list[Produced]:
    return [
        Produced(p.out.stream.name, s.partition, s.offset, p.row, p.tombstone_key, s.poison)
        for p, s in zip(planned, sent, strict=True)
    ]


def model(catalog: Catalog, records: list[Produced]) -> dict[str, Rows]:
    """Every table of the catalog and the rows it must hold."""
    tables: dict[str, Rows] = {}
    for spec in catalog:
        tables.update(expected_tables(spec, records))
    return tables


# -- servers and commands -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, name: str) -> AsyncIterator[str]:
    """A new, empty database owned by the migrator (nothing migrated): its URL with
    ``server_url``'s login; dropped afterwards."""
    url = testbed.database_url_for(server_url, name)
    owner = urlsplit(testbed.as_migrator(url)).username
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await postgres.create_database(conn, url, name, owner)
    finally:
        await conn.close()
    try:
        yield url
    finally:
        conn = await asyncpg.connect(server_url, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def write_catalog(path: Path, *streams: str) -> Catalog:
    path.write_text("builtin = false\n" + "".join(streams))
    return catalogs.load(path)


def env_for(
    bootstrap: str, database_url: str, prefix: str, catalog_file: Path, **settings: object
) -> dict[str, str]:
    """An agent's environment with the catalog; the migrator's URL too, for the commands
    that change the schema (the agents never use it)."""
    env = agent_env(bootstrap, database_url, prefix, prefix, streams_file=catalog_file, **settings)
    env["PIPELINE_MIGRATE_DATABASE_URL"] = testbed.as_migrator(database_url)
    return env


def pipeline(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def pipeline_ok(env: dict[str, str], *args: str, within: float = 180) -> str:
    done = await asyncio.to_thread(pipeline, env, *args, timeout=within)
    assert done.returncode == 0, (
        f"pipeline {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def agent_log(agent: AgentProcess) -> str:
    assert agent.log_path is not None
    return agent.log_path.read_text()[-3000:]


async def fetch(database_url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def execute(database_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def tables_in(database_url: str) -> set[str]:
    rows = await fetch(
        database_url,
        "SELECT schemaname || '.' || tablename AS t FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    )
    return {r["t"] for r in rows}


async def assert_letters_name_their_columns(
    database_url: str, group: str, prefix: str, planned: list[Planned], sent: list[Sent]
) -> list[str]:
    """Every bad record has one dead letter, whose reason names the column to blame; returns
    the reasons (for the test's output)."""
    letters = await fetch(
        database_url,
        "SELECT src_topic, src_partition, src_offset, error_class, reason FROM dead_letters "
        "WHERE group_id = $1",
        group,
    )
    by_source = {(r["src_topic"], r["src_partition"], r["src_offset"]): r for r in letters}
    reasons = []
    for p, s in zip(planned, sent, strict=True):
        if p.out.poison is None:
            continue
        letter = by_source[(f"{prefix}{s.topic}", s.partition, s.offset)]
        reason = letter["reason"]
        reasons.append(f"{p.out.stream.name}: {letter['error_class']}: {reason}")
        if p.out.poison != "-":  # the stream and the column, by name
            where = f"stream '{p.out.stream.name}', column {p.out.poison}"
            assert where in reason, (where, reason)
    assert len(reasons) == len(letters)
    return reasons


# -- 1. three agents, SIGKILLs, every table against the model -----------------------------------


async def test_a_user_catalog_lands_exactly_once_through_sigkills_row_by_row(
    servers: Servers, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    catalog_file = tmp_path / "streams.toml"
    catalog = write_catalog(catalog_file, ORDERS, ACCOUNTS, SHIPMENTS)
    rng = random.Random(2026)
    good = _interleave(
        rng,
        [
            orders(rng, catalog["orders"], 5_000),
            accounts(rng, catalog["accounts"], 150, 25),
            shipments(rng, catalog["shipments"], 200, 12),
        ],
    )
    traffic = _sprinkle(rng, good, bad_records(catalog))
    started = time.monotonic()
    async with fresh_database(servers.endpoints.database_url, unique) as database_url:
        env = env_for(
            bootstrap, database_url, prefix, catalog_file,
            batch_max_records=300, session_timeout_ms=6000,
        )  # fmt: skip
        migrated = await pipeline_ok(env, "migrate")
        print(f"\npipeline migrate:\n{migrated}")
        # builtin = false: only the catalog's tables, none of the built-in streams'.
        data = await tables_in(database_url)
        assert {
            "shop.orders",
            "public.accounts",
            "public.shipments",
            "public.shipments_history",
        } <= data
        assert not data & {"public.agent_states", "public.performance_metrics"}, data
        assert (await pipeline_ok(env, "streams", "plan")).strip() == "nothing to do"
        await create_topics(bootstrap, prefix, 3, catalog)

        agents = [AgentProcess(env, tmp_path / f"agent{i}.log").start() for i in range(3)]
        try:
            sending = asyncio.create_task(
                produce_paced(bootstrap, prefix, [p.out for p in traffic], over=14.0)
            )
            for kill in range(5):
                await asyncio.sleep(rng.uniform(1.0, 2.5))  # the random moment is the fault
                victim = agents[rng.randrange(3)]
                assert victim.alive(), agent_log(victim)
                victim.kill()
                victim.start()
                print(f"kill {kill + 1}: agent pid {victim.pid} restarted")
            assert not sending.done(), "the kills must land while records are still arriving"
            sent = await sending
            expected = model(catalog, produced(traffic, sent))
            await assert_caught_up_exactly_once(
                database_url, bootstrap, prefix, sent, within=240,
                catalog=catalog, landed=landed(expected),
            )  # fmt: skip
            await assert_tables_match(database_url, catalog, expected)
            reasons = await assert_letters_name_their_columns(
                database_url, prefix, prefix, traffic, sent
            )
            print("dead letters:\n  " + "\n  ".join(reasons))
            for agent in agents:
                assert agent.alive(), agent_log(agent)
        finally:
            await testbed.stop_agents(agents)
            for agent in agents:
                agent.kill()
    counts = {t: len(rows) for t, rows in expected.items()}
    print(f"{len(traffic)} records, tables {counts}: {time.monotonic() - started:.1f}s")
    # The log really had what the test is about.
    assert counts["shop.orders"] < sum(1 for p in traffic if p.out.stream.name == "orders")
    assert counts["accounts"] < 150  # some keys deleted for good


# -- 2. evolution under load ---------------------------------------------------------------------


def _with_coupon(rng: random.Random, planned: Planned) -> tuple[Planned, str | None]:
    """The same order, half the time with a field `coupon` the old catalog does not name."""
    if rng.random() < 0.5:
        return planned, None
    value = READ_JSON.decode(planned.out.value or b"")
    value["coupon"] = coupon = f"C{rng.randrange(10**6)}"
    out = Outgoing(
        planned.out.stream, planned.out.key, JSON.encode(value), None, planned.out.headers
    )
    return Planned(out, planned.row), coupon


async def test_a_new_nullable_column_under_load_with_a_rolling_restart(
    servers: Servers, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    old_file, new_file, bad_file = (tmp_path / f"{n}.toml" for n in ("old", "new", "bad"))
    old = write_catalog(old_file, ORDERS, SHIPMENTS)
    new = write_catalog(new_file, ORDERS.rstrip() + _coupon("text"), SHIPMENTS)
    write_catalog(bad_file, ORDERS.rstrip() + _coupon("integer"), SHIPMENTS)
    rng = random.Random(7)
    traffic: list[Planned] = []
    coupons: list[str | None] = []  # the coupon each record of traffic carries
    for planned in orders(rng, old["orders"], 12_000):
        with_coupon, coupon = _with_coupon(rng, planned)
        traffic.append(with_coupon)
        coupons.append(coupon)
    async with fresh_database(servers.endpoints.database_url, unique) as database_url:
        old_env = env_for(bootstrap, database_url, prefix, old_file, batch_max_records=200)
        new_env = env_for(bootstrap, database_url, prefix, new_file, batch_max_records=200)
        bad_env = env_for(bootstrap, database_url, prefix, bad_file)
        await pipeline_ok(old_env, "migrate")
        await create_topics(bootstrap, prefix, 3, old)
        agents = [AgentProcess(old_env, tmp_path / f"old{i}.log").start() for i in range(2)]
        try:
            sending = asyncio.create_task(
                produce_paced(bootstrap, prefix, [p.out for p in traffic], over=35.0)
            )

            async def stored() -> int:
                return sum((await stored_offsets(database_url, prefix, prefix)).values())

            async def ingested(records: int) -> None:
                async def enough() -> bool:
                    return await stored() >= records

                await until(enough, within=90, what=f"{records} records stored")

            await ingested(1_000)
            plan = await pipeline_ok(new_env, "streams", "plan")
            print(f"\npipeline streams plan:\n{plan}")
            assert 'ALTER TABLE "shop"."orders" ADD COLUMN "coupon" text' in plan, plan
            assert "CREATE TABLE" not in plan, plan
            print(await pipeline_ok(new_env, "migrate"))
            assert (await pipeline_ok(new_env, "streams", "plan")).strip() == "nothing to do"

            # The agents of the old catalog go on writing into the table with the new column.
            await ingested(await stored() + 1_500)
            for agent in agents:
                assert agent.alive(), agent_log(agent)
            # The rolling restart: one by one, each with the new catalog.
            for i, agent in enumerate(agents):
                assert agent.stop() == 0, agent_log(agent)
                agents[i] = AgentProcess(new_env, tmp_path / f"new{i}.log").start()
                await ingested(await stored() + 300)
            restarted_at = datetime.now(UTC)
            assert not sending.done(), "the restart must end while records are still arriving"
            sent = await sending
            expected = model(old, produced(traffic, sent))
            await assert_caught_up_exactly_once(
                database_url, bootstrap, prefix, sent, within=240,
                catalog=new, landed=landed(expected),
            )  # fmt: skip
            # Every column the old catalog has, row by row.
            await assert_tables_match(database_url, old, expected)
        finally:
            await testbed.stop_agents(agents)
            for agent in agents:
                agent.kill()

        # A coupon is the record's own or NULL: NULL in rows the old agents wrote, the
        # record's in every row the new ones wrote.
        rows = await fetch(
            database_url, "SELECT src_partition, src_offset, coupon, ingested_at FROM shop.orders"
        )
        carries = {(s.partition, s.offset): c for s, c in zip(sent, coupons, strict=True)}
        source = [(r, carries[(r["src_partition"], r["src_offset"])]) for r in rows]
        assert all(r["coupon"] in (None, c) for r, c in source)
        late = [(r, c) for r, c in source if r["ingested_at"] > restarted_at]
        assert late and all(r["coupon"] == c for r, c in late)
        assert any(c is not None for _, c in late)
        dropped = [r for r, c in source if c is not None and r["coupon"] is None]
        assert dropped, "the old catalog's agents wrote records with a coupon, without it"
        print(
            f"{len(rows)} rows; {sum(r['coupon'] is not None for r in rows)} with the coupon; "
            f"{len(dropped)} written without it by the old catalog's agents"
        )

        # A type change: refused by plan and by migrate, and nothing changes.
        columns = (
            "SELECT table_schema, table_name, column_name, data_type, is_nullable "
            "FROM information_schema.columns WHERE table_schema IN ('public', 'shop') "
            "ORDER BY 1, 2, ordinal_position"
        )
        applied = "SELECT * FROM stream_catalog ORDER BY 1"
        before = [tuple(r) for r in await fetch(database_url, columns)]
        recorded = [tuple(r) for r in await fetch(database_url, applied)]
        for command in (("streams", "plan"), ("migrate",)):
            refused = await asyncio.to_thread(pipeline, bad_env, *command)
            assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
            for part in ("'orders'", "'coupon'", "type change", "text", "integer"):
                assert part in refused.stderr, (part, refused.stderr)
            print(f"pipeline {' '.join(command)}, coupon as integer: exit 2\n{refused.stderr}")
        assert [tuple(r) for r in await fetch(database_url, columns)] == before
        assert [tuple(r) for r in await fetch(database_url, applied)] == recorded


def _coupon(column_type: str) -> str:
    return f'\n[streams.columns.coupon]\ntype = "{column_type}"\nnullable = true\n'


# -- 3. control, rollback, replay, dlq replay on user streams ------------------------------------


async def test_control_checkpoint_rollback_replay_and_dlq_replay_on_user_streams(
    servers: Servers, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    catalog_file = tmp_path / "streams.toml"
    catalog = write_catalog(catalog_file, ORDERS, SHIPMENTS)
    private, public = generate_key_pair()
    write_private_key_file(tmp_path / "antigravity.key", private)
    write_public_key_file(tmp_path / "antigravity.pub", public)
    rng = random.Random(11)
    first = _interleave(
        rng, [orders(rng, catalog["orders"], 8_000), shipments(rng, catalog["shipments"], 150, 10)]
    )
    # Orders from a producer that writes the customer flat (`customer_id`), which the catalog
    # reads at `customer.id`: dead-lettered until a catalog reads them where they are.
    flat = []
    for planned in orders(rng, catalog["orders"], 6):
        value = READ_JSON.decode(planned.out.value or b"")
        value["customer_id"] = value.pop("customer")["id"]
        out = Outgoing(
            planned.out.stream, planned.out.key, JSON.encode(value), "customer", planned.out.headers
        )
        flat.append(Planned(out, planned.row))
    traffic = _sprinkle(rng, first, flat)
    async with fresh_database(servers.endpoints.database_url, unique) as database_url:
        env = env_for(
            bootstrap, database_url, prefix, catalog_file,
            control_public_keys=tmp_path / "antigravity.pub",
            control_private_key_file=tmp_path / "antigravity.key",
            batch_max_records=200,
        )  # fmt: skip
        await pipeline_ok(env, "migrate")
        await create_topics(bootstrap, prefix, 2, catalog)
        agents = [AgentProcess(env, tmp_path / f"agent{i}.log").start() for i in range(2)]
        try:
            status = await pipeline_ok(env, "control", "status", "--json")
            print(status)
            sending = asyncio.create_task(
                produce_paced(bootstrap, prefix, [p.out for p in traffic], over=40.0)
            )

            async def orders_stored() -> int:
                stored = await stored_offsets(database_url, prefix, prefix)
                return sum(o for (t, _), o in stored.items() if t == "shop.orders")

            async def shipments_stored() -> int:
                stored = await stored_offsets(database_url, prefix, prefix)
                return sum(o for (t, _), o in stored.items() if t == "shop.shipments")

            async def at_least(what: Any, count: int) -> None:
                async def ok() -> bool:
                    return await what() >= count

                await until(ok, within=90, what=f"{what.__name__} >= {count}")

            await at_least(orders_stored, 500)
            # -- deactivate a user stream: its offsets stay, the other stream goes on ----------
            out = await pipeline_ok(env, "control", "deactivate", "--streams", "orders")
            print(out)
            assert "applied" in out
            frozen, shipped = await orders_stored(), await shipments_stored()
            await at_least(shipments_stored, shipped + 200)
            assert await orders_stored() == frozen
            print(await pipeline_ok(env, "control", "activate", "--streams", "orders"))
            await at_least(orders_stored, frozen + 500)

            # -- a checkpoint, more records, a rollback to it: re-ingested exactly once --------
            assert not sending.done(), "the checkpoint must be taken while records arrive"
            print(await pipeline_ok(env, "control", "checkpoint", "cp"))
            at_checkpoint = await orders_stored()
            await at_least(orders_stored, at_checkpoint + 500)
            rollback = await pipeline_ok(
                env, "control", "rollback", "--to-checkpoint", "cp", within=240
            )
            print(rollback)
            assert "applied" in rollback
            assert not sending.done(), "the rollback must land while records arrive"
            sent = await sending
            expected = model(catalog, produced(traffic, sent))
            await assert_caught_up_exactly_once(
                database_url, bootstrap, prefix, sent, within=240,
                catalog=catalog, landed=landed(expected),
            )  # fmt: skip
            await assert_tables_match(database_url, catalog, expected)

            # -- a replay puts back rows a bug changed, in an append and a history table ------
            await execute(
                database_url,
                "DELETE FROM shop.orders WHERE src_offset % 7 = 0",
                "UPDATE shipments_history SET state = 'broken' WHERE src_offset % 5 = 0",
                "DELETE FROM shipments WHERE src_offset % 3 = 0",
            )
            replayed = await pipeline_ok(
                env, "replay", "--stream", "orders,shipments", "--from", "earliest", "--to", "now",
                within=240,
            )  # fmt: skip
            print(replayed)
            await assert_tables_match(database_url, catalog, expected)

            # -- `pipeline dlq replay` with a catalog that reads `customer_id`: the letters
            # rejected under the old catalog are decoded with the new one (a path changes no
            # table: nothing to migrate) and land; the agents go on with theirs.
            flat_file = tmp_path / "flat.toml"
            write_catalog(
                flat_file,
                ORDERS.replace('path = "customer.id"', 'path = "customer_id"'),
                SHIPMENTS,
            )
            flat_env = {**env, "PIPELINE_STREAMS_FILE": str(flat_file)}
            listed = await pipeline_ok(flat_env, "dlq", "list", "--stream", "orders")
            assert (
                listed.splitlines()[-1]
                == f"{len(flat)} of {len(flat)} dead letter(s) of group {prefix}"
            ), listed
            redriven = await pipeline_ok(flat_env, "dlq", "replay", "--stream", "orders")
            print(redriven)
            # A redelivered order among them finds its key stored by the first one.
            again = len(flat) - len({f.row[0] for f in flat if f.row is not None})
            stored = f" ({again} found already stored)" if again else ""
            assert redriven.splitlines()[0] == (f"redriven {len(flat)}{stored}, still failing 0"), (
                redriven
            )
            now_good = [
                Produced(p.out.stream.name, s.partition, s.offset, p.row)
                for p, s in zip(traffic, sent, strict=True)
            ]
            await assert_tables_match(database_url, catalog, model(catalog, now_good))
            await wait_caught_up(
                database_url, bootstrap, prefix, prefix, within=60, catalog=catalog
            )
        finally:
            await testbed.stop_agents(agents)
            for agent in agents:
                agent.kill()


# -- 4. a batch written again keeps the first record of a key -----------------------------------


MOVES = """
[[streams]]
name = "moves"
topic = "shop.moves"
table = "moves"
mode = "history"
key = ["item"]
version = "rev"

[streams.columns]
item = "text"
rev = "bigint"
note = "text"
"""


async def test_a_key_twice_in_a_batch_keeps_its_first_record_whatever_the_stage_order(
    database_url: str, tmp_path: Path
) -> None:
    """The staging table gives its rows back in the order they sit on disk, which is not the
    order COPY wrote them in once rows of different sizes fill and free its pages (batches
    before in the session, an attempt rolled back). A key twice in one batch (an append
    table with a key), or a (key, version) twice (a history table, and an equal version in
    its latest table), must keep its first record all the same, as the model says."""
    catalog_file = tmp_path / "streams.toml"
    catalog = write_catalog(catalog_file, ORDERS, MOVES)
    env = env_for("127.0.0.1:1", database_url, "unused.", catalog_file)
    await pipeline_ok(env, "migrate")
    rng = random.Random(5)
    batches: list[dict[str, list[tuple[Any, ...]]]] = []
    records: list[Produced] = []

    def add(batch: dict[str, list[tuple[Any, ...]]], stream: str, row: tuple[Any, ...]) -> None:
        offset = len(records)
        spec = catalog[stream]
        wire = tuple(
            msgspec.Raw(JSON.encode(v)) if c.type == "jsonb" else v
            for c, v in zip(spec.columns, row, strict=True)
        )
        batch.setdefault(stream, []).append((*wire, 0, offset, 1))
        records.append(Produced(stream, 0, offset, row))

    for b in range(6):
        batch: dict[str, list[tuple[Any, ...]]] = {}
        for planned in orders(rng, catalog["orders"], 400):  # a tenth of them twice
            assert planned.row is not None
            row = list(planned.row)
            row[6] = [{"sku": "x" * rng.randrange(400)}] * rng.randrange(1, 4)  # sizes vary
            add(batch, "orders", tuple(row))
        for i in range(400):
            item, rev, note = f"item-{b}-{i % 40}", rng.randrange(8), "n" * rng.randrange(600)
            add(batch, "moves", (item, rev, f"first {i} {note}"))
            if rng.random() < 0.3:
                add(batch, "moves", (item, rev, f"again {i}"))
        batches.append(batch)
    config = load_config(env)
    conn = await db.connect(testbed.as_agent(database_url), config.db_session)
    try:
        for i, batch in enumerate(batches):
            for stream, rows in batch.items():
                writer = db.TableWriter(catalog[stream])
                if i % 2:  # an attempt refused first, as the writer's bisection has
                    with pytest.raises(_Refused):
                        async with db.transaction(conn):
                            await writer.write(conn, rows[::2])
                            raise _Refused
                async with db.transaction(conn):
                    await writer.write(conn, rows)
    finally:
        await conn.close()
    expected = model(catalog, records)
    assert len(expected["shop.orders"]) == 2400, len(expected["shop.orders"])
    await assert_tables_match(database_url, catalog, expected)


class _Refused(Exception):
    """An attempt refused: its transaction rolls back."""
