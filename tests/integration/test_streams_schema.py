"""The data tables made from the streams catalog, against the real server: `pipeline migrate`
makes the built-in tables as an upgraded older database has them, none with `builtin =
false`, adds what a catalog adds, refuses what it may not change (changing nothing), upgrades
a database migrated before the catalog with its rows, and runs safely twice at once; an agent
whose catalog needs more than the database has exits 2 naming `pipeline migrate`
(docs/streams.md, "Evolution")."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pipeline import catalog, db, testbed
from pipeline.devstack import postgres
from pipeline.errors import ConfigError, SchemaError
from pipeline.testbed import AgentProcess
from tests.conftest import Servers
from tests.integration.harness import (
    agent_env,
    assert_caught_up_exactly_once,
    create_topics,
    fleet_traffic,
    produce,
)

pytestmark = pytest.mark.timeout(300)

PIPELINE = (sys.executable, "-m", "pipeline.cli")
FIXTURE_MIGRATIONS = db.read_migrations(
    Path(__file__).resolve().parents[1] / "fixtures" / "schema_v9"
)
BUILTIN_TABLES = (
    "agent_states",
    "agent_state_history",
    "system_events",
    "performance_metrics",
    "user_analytics",
    "system_config",
    "system_config_history",
)

# The tables partitioned by day of ts, and the partitions an upgrade keeps their old rows in.
PARTITIONED = (
    "agent_state_history",
    "system_events",
    "performance_metrics",
    "user_analytics",
    "system_config_history",
)
LEGACY = tuple(f"{table}_legacy" for table in PARTITIONED)

ORDERS = """
builtin = false

[[streams]]
name = "orders"
topic = "shop.orders"
table = "orders"
mode = "latest"
key = ["order_id"]
version = "revision"

[streams.columns]
order_id = "uuid"
amount = "numeric"
revision = "bigint"
status = { type = "text", default = "new" }
"""
# The same stream with a nullable column and a defaulted one: both allowed.
ORDERS_V2 = (
    ORDERS
    + """note = { type = "text", nullable = true }
channel = { type = "text", default = "web" }
"""
)


@contextlib.asynccontextmanager
async def empty_database(servers: Servers, name: str) -> AsyncIterator[str]:
    """A new database owned by the migrator, with no schema: the administrator's URL."""
    assert servers.logins is not None
    admin = servers.endpoints.database_url
    url = testbed.database_url_for(admin, name)
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await postgres.create_database(conn, url, name, servers.logins.migrator.user)
    finally:
        await conn.close()
    try:
        yield url
    finally:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def describe(url: str, *, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every table of the database (but ``without``) as pg_catalog describes it: columns with
    type, nullability and default; constraints; indexes; owner and grants; how it is
    partitioned, or of which table it is a partition and its range (the DEFAULT partition
    and an upgrade's legacy one; not those partition maintenance makes by the interval,
    which depend on the day the database was made); and the sequences."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("SET TimeZone = 'UTC'")  # partition bounds, as UTC timestamps
        tables = await conn.fetch(
            """SELECT c.oid, n.nspname || '.' || c.relname AS name,
                      pg_get_userbyid(c.relowner) AS owner,
                      ARRAY(SELECT a::text FROM unnest(c.relacl) AS a ORDER BY 1) AS acl,
                      CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END
                          AS partitioned_by,
                      (SELECT i.inhparent::regclass::text FROM pg_inherits i
                       WHERE i.inhrelid = c.oid) AS partition_of,
                      pg_get_expr(c.relpartbound, c.oid) AS bound
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p')
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND (NOT c.relispartition
                      OR pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
                      OR pg_get_expr(c.relpartbound, c.oid) LIKE 'FOR VALUES FROM (MINVALUE)%')
               ORDER BY 2"""
        )
        found: dict[str, Any] = {}
        for table in tables:
            if table["name"].split(".")[1] in without:
                continue
            columns = await conn.fetch(
                """SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull,
                          pg_get_expr(d.adbin, d.adrelid) AS default
                   FROM pg_attribute a
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                   WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
                table["oid"],
            )
            constraints = await conn.fetch(
                """SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint
                   WHERE conrelid = $1 ORDER BY conname""",
                table["oid"],
            )
            indexes = await conn.fetch(
                """SELECT indexrelid::regclass::text AS name,
                          pg_get_indexdef(indexrelid) AS definition
                   FROM pg_index WHERE indrelid = $1 ORDER BY 1""",
                table["oid"],
            )
            found[table["name"]] = {
                "owner": table["owner"],
                "acl": list(table["acl"]),
                "columns": [tuple(c) for c in columns],
                "constraints": [tuple(c) for c in constraints],
                "indexes": [tuple(i) for i in indexes],
                "partitioning": (table["partitioned_by"], table["partition_of"], table["bound"]),
            }
        sequences = await conn.fetch(
            "SELECT schemaname, sequencename, increment_by FROM pg_sequences ORDER BY 1, 2"
        )
        owned = tuple(f"{table}_" for table in without)  # a serial column's sequence
        return {
            "tables": found,
            "sequences": [tuple(s) for s in sequences if not s[1].startswith(owned)],
        }
    finally:
        await conn.close()


def migrator_env(servers: Servers, url: str, streams_file: Path | None = None) -> dict[str, str]:
    env = agent_env(servers.endpoints.kafka_bootstrap, url, "unused.", "unused")
    env["PIPELINE_MIGRATE_DATABASE_URL"] = testbed.as_migrator(url)
    if streams_file is not None:
        env["PIPELINE_STREAMS_FILE"] = str(streams_file)
    return env


async def pipeline(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [*PIPELINE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def catalog_file(tmp_path: Path, text: str, name: str = "streams.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the built-in tables ---------------------------------------------------------------------


async def test_a_fresh_migrate_makes_the_builtin_tables_as_an_upgraded_schema_9_has_them(
    servers: Servers, unique: str
) -> None:
    """The built-in tables a fresh `pipeline migrate` makes are those of a database at schema
    9 (the numbered migrations of tests/fixtures/schema_v9 made its tables) that `pipeline
    migrate` then upgraded: the same columns, constraints, indexes, grants and partitioning,
    but for the old tables, which the upgrade keeps as the partitions before its cut-over."""
    async with (
        testbed.scratch_database(
            servers.endpoints.database_url, f"{unique}_v9", FIXTURE_MIGRATIONS
        ) as old,
        testbed.scratch_database(servers.endpoints.database_url, f"{unique}_new") as new,
    ):
        before = await describe(old)
        assert {f"public.{t}" for t in BUILTIN_TABLES} <= set(before["tables"])
        await testbed.migrate(old)
        upgraded = await describe(old, without=LEGACY)
        assert upgraded == await describe(new)
        legacy = (await describe(old))["tables"]
        for table in PARTITIONED:
            assert legacy[f"public.{table}_legacy"]["partitioning"][1] == table
            assert legacy[f"public.{table}_legacy"]["partitioning"][2].startswith(
                "FOR VALUES FROM (MINVALUE) TO ("
            )
            assert upgraded["tables"][f"public.{table}"]["partitioning"] == (
                "RANGE (ts)",
                None,
                None,
            )
        conn = await asyncpg.connect(new, timeout=10)
        try:
            recorded = await conn.fetch("SELECT stream FROM stream_catalog ORDER BY stream")
        finally:
            await conn.close()
        assert [r["stream"] for r in recorded] == sorted(catalog.load().names)


async def test_builtin_false_creates_none_of_the_builtin_tables(
    servers: Servers, unique: str, tmp_path: Path
) -> None:
    streams = catalog_file(
        tmp_path, ORDERS.replace('table = "orders"', 'table = "shop.orders"'), "shop.toml"
    )
    async with empty_database(servers, unique) as url:
        done = await pipeline(migrator_env(servers, url, streams), "migrate")
        assert done.returncode == 0, done.stderr
        names = ", ".join(m.name for m in db.read_migrations())
        assert done.stdout == (
            f"applied: {names}\n"
            "create schema shop\n"
            "create table shop.orders (stream orders)\n"
            "recorded the catalog of: orders\n"
        )
        conn = await asyncpg.connect(url, timeout=10)
        try:
            tables = await conn.fetch(
                "SELECT schemaname || '.' || tablename AS t FROM pg_tables "
                "WHERE tablename = ANY($1::text[]) OR schemaname = 'shop'",
                [*BUILTIN_TABLES, "orders"],
            )
            recorded = await conn.fetch("SELECT stream FROM stream_catalog")
        finally:
            await conn.close()
        assert [r["t"] for r in tables] == ["shop.orders"]
        assert [r["stream"] for r in recorded] == ["orders"]

        # The writer may write it (grants on the table and its schema); the built-in streams
        # would find nothing.
        writer = await asyncpg.connect(testbed.as_agent(url), timeout=10)
        try:
            await writer.execute(
                "INSERT INTO shop.orders VALUES (gen_random_uuid(), 1.5, 1, 'new', 0, 0, 1)"
            )
            await db.check_catalog(writer, catalog.load(streams))
            with pytest.raises(SchemaError) as caught:
                await db.check_catalog(writer, catalog.load(), ["metrics"])
            with pytest.raises(ConfigError) as unknown:
                await db.check_catalog(writer, catalog.load(streams), ["metrics"])
        finally:
            await writer.close()
        assert str(unknown.value) == (
            "stream(s) metrics are not in the streams catalog (choose from orders): set "
            "PIPELINE_STREAMS_FILE to the catalog that declares them"
        )
        assert str(caught.value) == (
            "the database does not hold the tables that stream(s) metrics need: no table "
            "public.performance_metrics: run `pipeline migrate` as the migrator "
            "(PIPELINE_MIGRATE_DATABASE_URL, docs/streams.md)"
        )


# -- evolution -------------------------------------------------------------------------------


async def test_a_new_nullable_and_a_new_defaulted_column_are_planned_then_added(
    servers: Servers, database_url: str, tmp_path: Path
) -> None:
    v1 = catalog_file(tmp_path, ORDERS, "v1.toml")
    v2 = catalog_file(tmp_path, ORDERS_V2, "v2.toml")
    first = await pipeline(migrator_env(servers, database_url, v1), "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout == (
        "create table public.orders (stream orders)\nrecorded the catalog of: orders\n"
    )
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute(
            "INSERT INTO orders VALUES ('00000000-0000-0000-0000-000000000001', 2.5, 7, 'paid', "
            "0, 0, 1)"
        )
    finally:
        await conn.close()

    plan = await pipeline(migrator_env(servers, database_url, v2), "streams", "plan")
    assert (plan.returncode, plan.stderr) == (0, "")
    assert plan.stdout == (
        'ALTER TABLE "public"."orders" ADD COLUMN "note" text;\n'
        'ALTER TABLE "public"."orders" ADD COLUMN "channel" text NOT NULL DEFAULT '
        "E'web'::text;\n"
    )
    migrated = await pipeline(migrator_env(servers, database_url, v2), "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout == (
        "add column public.orders.note (text)\n"
        "add column public.orders.channel (text)\n"
        "recorded the catalog of: orders\n"
    )
    again = await pipeline(migrator_env(servers, database_url, v2), "streams", "plan")
    assert (again.returncode, again.stdout) == (0, "nothing to do\n")

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        row = await conn.fetchrow("SELECT amount::text, status, note, channel FROM orders")
        assert tuple(row) == ("2.5", "paid", None, "web")
        # Agents of either catalog may start: the new columns are nullable or defaulted.
        writer = await asyncpg.connect(testbed.as_agent(database_url), timeout=10)
        try:
            await db.check_catalog(writer, catalog.load(v1))
            await db.check_catalog(writer, catalog.load(v2))
        finally:
            await writer.close()
    finally:
        await conn.close()


async def test_a_change_migrate_does_not_make_is_refused_with_every_problem_and_nothing_changed(
    servers: Servers, database_url: str, tmp_path: Path
) -> None:
    v1 = catalog_file(tmp_path, ORDERS, "v1.toml")
    assert (await pipeline(migrator_env(servers, database_url, v1), "migrate")).returncode == 0
    changed = (
        ORDERS.replace('mode = "latest"', 'mode = "append"')
        .replace('version = "revision"\n', "")
        .replace('amount = "numeric"', 'amount = "bigint"')
        .replace('status = { type = "text", default = "new" }', 'customer = "text"')
    )
    v3 = catalog_file(tmp_path, changed, "v3.toml")
    before = await describe(database_url)
    problems = [
        "stream 'orders': mode change, 'latest' when last migrated, 'append' in the catalog: "
        "the rows already there were written under the old mode; give the stream a new table "
        "(and a new name) for the new mode, or put the old mode back",
        "stream 'orders': version change, 'revision' when last migrated, none in the catalog: "
        "the rows already there were chosen by the old version; give the stream a new table "
        "for the new version, or put the old version back",
        "stream 'orders', table public.orders, column 'amount': type change, numeric in the "
        "database, bigint in the catalog. The pipeline does not rewrite a table: change it by "
        'hand (ALTER TABLE "public"."orders" ALTER COLUMN "amount" TYPE bigint USING ..., '
        "which rewrites and locks the table), or declare a new column instead",
        "stream 'orders', table public.orders, column 'customer': a new column (text NOT NULL) "
        "must be nullable or have a default, since the rows already there have no value for "
        "it: declare `nullable = true` or a `default`",
        "stream 'orders', table public.orders, column 'status': removed or renamed, text NOT "
        "NULL in the database and not in the catalog: put it back in the catalog (with "
        "`nullable = true` if new records lack it), or drop or rename it by hand (ALTER TABLE "
        '"public"."orders" DROP COLUMN "status") once no agent writes it',
    ]
    expected = (
        "pipeline: error: the streams catalog asks for 5 change(s) `pipeline migrate` does "
        "not make; nothing was changed:\n" + "".join(f"  - {p}\n" for p in problems)
    )
    for command in (("streams", "plan"), ("migrate",)):
        refused = await pipeline(migrator_env(servers, database_url, v3), *command)
        assert (refused.returncode, refused.stdout, refused.stderr) == (2, "", expected)
    assert await describe(database_url) == before


# -- the upgrade of a database migrated before the catalog -----------------------------------


async def copy_rows(source: str, target: str) -> dict[str, int]:
    """Every row of ``source``'s tables into the same tables of ``target`` (foreign keys'
    targets first), and its sequences' positions; the rows copied by table."""
    order = ["checkpoints", "replays"]  # referenced by checkpoint_offsets, replay_partitions
    src = await asyncpg.connect(source, timeout=10)
    dst = await asyncpg.connect(target, timeout=10)
    try:
        names = [
            r["tablename"]
            for r in await dst.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'schema_migrations'"
            )
        ]
        names.sort(key=lambda n: (n not in order, n))
        copied = {}
        for name in names:
            rows = await src.fetch(f'SELECT * FROM "{name}"')
            if rows:
                await dst.copy_records_to_table(
                    name, records=[tuple(r) for r in rows], columns=list(rows[0].keys())
                )
            copied[name] = len(rows)
        for sequence in await src.fetch(
            "SELECT sequencename, last_value FROM pg_sequences WHERE last_value IS NOT NULL"
        ):
            await dst.execute("SELECT setval($1, $2)", sequence[0], sequence[1])
        return copied
    finally:
        await src.close()
        await dst.close()


async def count_rows(url: str, tables: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return {t: await conn.fetchval(f'SELECT count(*) FROM "{t}"') for t in tables}
    finally:
        await conn.close()


async def test_a_database_at_the_schema_before_the_catalog_upgrades_with_its_rows(
    servers: Servers, unique: str
) -> None:
    """Rows ingested exactly once into a database at schema 9 (made by the frozen migrations
    of tests/fixtures/schema_v9, holding what an agent wrote), then `pipeline migrate`: the
    built-in tables are adopted, those with a row per record made partitioned with their rows,
    and ingestion goes on exactly once."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    admin = servers.endpoints.database_url
    await create_topics(bootstrap, prefix, partitions=2)
    # One fleet's traffic in two halves: a second fleet would repeat the first one's keys.
    traffic = fleet_traffic(3_000, seed=90)
    first = await produce(bootstrap, prefix, traffic[:1_500])
    async with (
        testbed.scratch_database(admin, f"{unique}_ingest") as ingested,
        testbed.scratch_database(admin, f"{unique}_v9", FIXTURE_MIGRATIONS) as old,
    ):
        agent = AgentProcess(agent_env(bootstrap, ingested, prefix, prefix)).start()
        try:
            await assert_caught_up_exactly_once(ingested, bootstrap, prefix, first, within=120)
            assert agent.stop() == 0
        finally:
            agent.kill()
        copied = await copy_rows(ingested, old)
        assert all(copied[t] > 0 for t in BUILTIN_TABLES), copied

        env = migrator_env(servers, old)
        migrated = await pipeline(env, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        lines = migrated.stdout.splitlines()
        newer = ", ".join(m.name for m in db.read_migrations() if m.version > 9)
        assert lines[0] == f"applied: {newer}"
        assert [line.split(":")[0] for line in lines if line.startswith("partition ")] == [
            f"partition public.{table} by day of ts" for table in PARTITIONED
        ]
        assert lines[-1] == "recorded the catalog of: states, events, metrics, analytics, config"
        assert await count_rows(old, list(copied)) == copied
        assert await count_rows(old, list(LEGACY)) == {
            f"{table}_legacy": copied[table] for table in PARTITIONED
        }
        plan = await pipeline(env, "streams", "plan")
        assert (plan.returncode, plan.stdout) == (0, "nothing to do\n")
        assert await describe(old, without=LEGACY) == await describe(ingested)

        second = await produce(bootstrap, prefix, traffic[1_500:])
        agent = AgentProcess(agent_env(bootstrap, old, prefix, prefix)).start()
        try:
            await assert_caught_up_exactly_once(old, bootstrap, prefix, first + second, within=120)
            assert agent.stop() == 0
        finally:
            agent.kill()


# -- agents at start, and migrate twice at once ----------------------------------------------


async def test_an_agent_whose_catalog_needs_a_missing_column_exits_2_naming_migrate(
    servers: Servers, database_url: str, unique: str
) -> None:
    conn = await asyncpg.connect(testbed.as_migrator(database_url), timeout=10)
    try:
        await conn.execute("ALTER TABLE system_config_history DROP COLUMN updated_by")
    finally:
        await conn.close()
    env = agent_env(servers.endpoints.kafka_bootstrap, database_url, f"{unique}.", unique)
    env["PIPELINE_STREAMS"] = "config,metrics"
    agent = await asyncio.create_subprocess_exec(
        *testbed.AGENT_COMMAND,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(agent.communicate(), 60)
    assert agent.returncode == 2, stderr
    assert "Traceback" not in stderr.decode()
    assert stderr.decode().strip().splitlines()[-1] == (
        "pipeline: error: the database does not hold the tables that stream(s) config, "
        "metrics need: no column public.system_config_history.updated_by: run `pipeline "
        "migrate` as the migrator (PIPELINE_MIGRATE_DATABASE_URL, docs/streams.md)"
    )


async def test_migrate_twice_at_once_applies_everything_once(servers: Servers, unique: str) -> None:
    async with (
        empty_database(servers, unique) as url,
        testbed.scratch_database(servers.endpoints.database_url, f"{unique}_ref") as reference,
    ):
        env = migrator_env(servers, url)
        one, two = await asyncio.gather(pipeline(env, "migrate"), pipeline(env, "migrate"))
        assert (one.returncode, two.returncode) == (0, 0), (one.stderr, two.stderr)
        outputs = sorted([one.stdout, two.stdout], key=len)
        assert outputs[0] == "the schema is up to date\n"
        assert outputs[1].startswith("applied: 001_data_tables.sql, ")
        assert outputs[1].endswith(
            "recorded the catalog of: states, events, metrics, analytics, config\n"
        )
        assert await describe(url) == await describe(reference)
