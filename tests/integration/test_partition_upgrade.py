"""The upgrade of a database made before partitioning, against the real server: `pipeline
migrate` makes the built-in row-per-record tables partitioned while agents ingest, every old
row kept in the partition before the cut-over, exactly once throughout; an upgrade
interrupted after its index and constraint steps finishes when migrate runs again
(docs/streams.md, "Upgrading to partitioned tables")."""

from __future__ import annotations

import asyncio
import datetime
import time
from pathlib import Path

import asyncpg
import pytest

from pipeline import catalog, db, partition_upgrade, partitions, testbed
from pipeline.db_session import Session
from pipeline.testbed import AgentProcess
from tests.conftest import Servers
from tests.integration.harness import (
    agent_env,
    assert_caught_up_exactly_once,
    create_topics,
    fleet_traffic,
    produce,
    produce_paced,
)
from tests.integration.test_streams_schema import (
    FIXTURE_MIGRATIONS,
    copy_rows,
    migrator_env,
    pipeline,
)

pytestmark = pytest.mark.timeout(300)

# The built-in tables a row per record, partitioned by day of ts.
PARTITIONED = (
    "agent_state_history",
    "system_events",
    "performance_metrics",
    "user_analytics",
    "system_config_history",
)
STREAM_NAMES = "states, events, metrics, analytics, config"


def catalog_before_partitioning(tmp_path: Path) -> Path:
    """The built-in streams as the release before partitioning declared them."""
    builtin = (Path(catalog.__file__).parent / "streams.toml").read_text()
    lines = [line for line in builtin.splitlines() if not line.startswith("partition_by")]
    path = tmp_path / "before.toml"
    path.write_text("builtin = false\n" + "\n".join(lines) + "\n")
    return path


def cutovers(start: datetime.datetime) -> set[str]:
    """The cut-over a migrate run from ``start`` until now chose, as pg_get_expr() writes it
    in UTC (a run across midnight may have chosen either day's)."""
    now = datetime.datetime.now(datetime.UTC)
    return {
        partition_upgrade.cutover(moment, "day").strftime("%Y-%m-%d %H:%M:%S+00")
        for moment in (start, now)
    }


async def partitions_of(url: str) -> dict[str, dict[str, str]]:
    """Each partitioned table's partitions and their bounds; the plain tables of PARTITIONED
    as "not partitioned"."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("SET TimeZone = 'UTC'")
        rows = await conn.fetch(
            """SELECT p.relname::text AS parent, c.relname::text AS part,
                      pg_get_expr(c.relpartbound, c.oid) AS bound
               FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_class c ON c.oid = i.inhrelid
               WHERE p.relkind = 'p' ORDER BY 1, 2"""
        )
        found: dict[str, dict[str, str]] = {}
        for row in rows:
            found.setdefault(row["parent"], {})[row["part"]] = row["bound"]
        return found
    finally:
        await conn.close()


async def relkinds(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT relname::text AS name, relkind::text AS kind FROM pg_class "
            "WHERE relname = ANY($1::text[])",
            list(PARTITIONED),
        )
        return {r["name"]: r["kind"] for r in rows}
    finally:
        await conn.close()


async def sources(url: str, table: str) -> set[tuple[int, int]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(f'SELECT src_partition, src_offset FROM "{table}"')
        return {(r[0], r[1]) for r in rows}
    finally:
        await conn.close()


def expected_partitions(cutover: str) -> dict[str, dict[str, str]]:
    """The DEFAULT and legacy partitions the upgrade made, and the days after the cut-over
    that `pipeline migrate`'s maintenance pass made, up to partitions_ahead after today."""
    start = datetime.datetime.fromisoformat(cutover)
    now = datetime.datetime.now(datetime.UTC)
    made = [r for r in partitions.wanted(now, "day", partitions.DEFAULT_AHEAD) if r.start >= start]
    stamp = "%Y-%m-%d %H:%M:%S+00"
    return {
        t: {
            f"{t}_default": "DEFAULT",
            f"{t}_legacy": f"FOR VALUES FROM (MINVALUE) TO ('{cutover}')",
            **{
                partitions.partition_name(t, r, "day"): (
                    f"FOR VALUES FROM ('{r.start.strftime(stamp)}') TO ('{r.end.strftime(stamp)}')"
                )
                for r in made
            },
        }
        for t in PARTITIONED
    }


def upgrade_output(cutover: str) -> str:
    """What `pipeline migrate` prints when it upgrades the built-in tables, none begun."""
    iso = datetime.datetime.fromisoformat(cutover).isoformat()
    keys = {
        "agent_state_history": "agent_id, version, ts",
        "system_events": "event_id, ts",
        "user_analytics": "event_id, ts",
        "system_config_history": "key, version, ts",
    }
    lines = []
    for table in PARTITIONED:
        if table in keys:
            lines.append(
                f"build the unique index {table}_partition_key on public.{table} "
                f"({keys[table]}), without blocking writes"
            )
        lines.append(
            f"check that every row of public.{table} has ts before {iso}, without blocking writes"
        )
        lines.append(
            f"partition public.{table} by day of ts: its rows before {iso} kept in the "
            f"partition public.{table}_legacy, a DEFAULT partition for the rest"
        )
    return "\n".join(lines) + "\n"


async def test_a_database_before_partitioning_is_upgraded_while_agents_ingest(
    servers: Servers, unique: str, tmp_path: Path
) -> None:
    """Rows ingested exactly once into a database at schema 9, migrated by the release
    before partitioning; agents of this release ingest while `pipeline migrate` upgrades it,
    then more traffic: every record exactly once, every old row kept in the legacy
    partition."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    admin = servers.endpoints.database_url
    before = catalog.load(catalog_before_partitioning(tmp_path))
    await create_topics(bootstrap, prefix, partitions=2)
    traffic = fleet_traffic(8_000, seed=21)
    first = await produce(bootstrap, prefix, traffic[:2_000])
    async with (
        testbed.scratch_database(admin, f"{unique}_ingest", catalog=before) as ingested,
        testbed.scratch_database(admin, f"{unique}_v9", FIXTURE_MIGRATIONS) as old,
    ):
        agent = AgentProcess(agent_env(bootstrap, ingested, prefix, prefix)).start()
        try:
            await assert_caught_up_exactly_once(ingested, bootstrap, prefix, first, within=120)
            assert agent.stop() == 0
        finally:
            agent.kill()
        copied = await copy_rows(ingested, old)
        assert all(copied[t] > 0 for t in PARTITIONED), copied
        old_rows = {t: await sources(ingested, t) for t in PARTITIONED}
        # The release before partitioning migrated it: numbered migrations, catalog recorded.
        await testbed.migrate(old, catalog=before)
        assert await relkinds(old) == dict.fromkeys(PARTITIONED, "r")

        agents = [AgentProcess(agent_env(bootstrap, old, prefix, prefix)).start() for _ in range(2)]
        try:
            second = await produce(bootstrap, prefix, traffic[2_000:3_000])
            await assert_caught_up_exactly_once(old, bootstrap, prefix, first + second, within=120)
            # Traffic goes on throughout the upgrade, and after it.
            start = datetime.datetime.now(datetime.UTC)
            began = time.monotonic()
            env = migrator_env(servers, old)
            paced, migrated = await asyncio.gather(
                produce_paced(bootstrap, prefix, traffic[3_000:6_000], over=10, chunks=50),
                pipeline(env, "migrate"),
            )
            took = time.monotonic() - began
            assert migrated.returncode == 0, migrated.stderr
            assert took > 9, "the upgrade did not run while traffic was sent"
            found = await partitions_of(old)
            cutover = found["system_events"]["system_events_legacy"].split("'")[1]
            assert cutover in cutovers(start)
            assert migrated.stdout == (
                upgrade_output(cutover) + f"recorded the catalog of: {STREAM_NAMES}\n"
            )
            last = await produce(bootstrap, prefix, traffic[6_000:])
            await assert_caught_up_exactly_once(
                old, bootstrap, prefix, first + second + paced + last, within=120
            )
            for agent in agents:
                assert agent.stop() == 0
        finally:
            for agent in agents:
                agent.kill()

        assert await relkinds(old) == dict.fromkeys(PARTITIONED, "p")
        assert await partitions_of(old) == expected_partitions(cutover)
        for table in PARTITIONED:
            assert old_rows[table] <= await sources(old, f"{table}_legacy"), table
        plan = await pipeline(env, "streams", "plan")
        assert (plan.returncode, plan.stdout) == (0, "nothing to do\n")


async def test_an_upgrade_interrupted_after_its_index_and_check_finishes_when_run_again(
    servers: Servers, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    admin = servers.endpoints.database_url
    before = catalog.load(catalog_before_partitioning(tmp_path))
    await create_topics(bootstrap, prefix, partitions=2)
    traffic = fleet_traffic(3_000, seed=22)
    first = await produce(bootstrap, prefix, traffic[:1_500])
    async with testbed.scratch_database(admin, unique, catalog=before) as url:
        agent = AgentProcess(agent_env(bootstrap, url, prefix, prefix)).start()
        try:
            await assert_caught_up_exactly_once(url, bootstrap, prefix, first, within=120)
            assert agent.stop() == 0
        finally:
            agent.kill()
        old_rows = {t: await sources(url, t) for t in PARTITIONED}

        # Interrupted: every table's index and check done, but for one index whose build
        # was cut short (PostgreSQL leaves it invalid) and one check not yet validated.
        start = datetime.datetime.now(datetime.UTC)
        migrator = await db.connect(testbed.as_migrator(url), Session(command_timeout=60))
        try:
            _, plan = await db.plan_schema(migrator, db.read_migrations(), catalog.load())
            assert [u.table for u in plan.upgrades] == [f"public.{t}" for t in PARTITIONED]
            for upgrade in plan.upgrades:
                for statement in upgrade.online:
                    if not (upgrade.table == "public.user_analytics" and "VALIDATE" in statement):
                        await migrator.execute(statement)
        finally:
            await migrator.close()
        conn = await asyncpg.connect(testbed.database_url_for(admin, unique), timeout=10)
        try:
            await conn.execute(
                "UPDATE pg_index SET indisvalid = false "
                "WHERE indexrelid = 'system_events_partition_key'::regclass"
            )
        finally:
            await conn.close()

        env = migrator_env(servers, url)
        shown = await pipeline(env, "streams", "plan")
        assert shown.returncode == 0, shown.stderr
        online, section = [], ""
        for line in shown.stdout.splitlines():
            if line.startswith("-- "):
                section = line
            elif section.endswith("each statement on its own"):
                online.append(line)
        assert online[:2] == [
            'DROP INDEX CONCURRENTLY IF EXISTS "public"."system_events_partition_key";',
            'CREATE UNIQUE INDEX CONCURRENTLY "system_events_partition_key" ON '
            '"public"."system_events" ("event_id", "ts");',
        ]
        assert online[2] == (
            'ALTER TABLE "public"."user_analytics" VALIDATE CONSTRAINT '
            '"user_analytics_before_partitioning";'
        )
        assert len(online) == 3

        migrated = await pipeline(env, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert await relkinds(url) == dict.fromkeys(PARTITIONED, "p")
        found = await partitions_of(url)
        cutover = found["system_events"]["system_events_legacy"].split("'")[1]
        assert cutover in cutovers(start)
        assert found == expected_partitions(cutover)
        iso = datetime.datetime.fromisoformat(cutover).isoformat()
        partitioned = [
            f"partition public.{t} by day of ts: its rows before {iso} kept in the "
            f"partition public.{t}_legacy, a DEFAULT partition for the rest"
            for t in PARTITIONED
        ]
        assert migrated.stdout.splitlines() == [
            partitioned[0],
            "build the unique index system_events_partition_key on public.system_events "
            "(event_id, ts), without blocking writes",
            *partitioned[1:3],
            f"check that every row of public.user_analytics has ts before {iso}, without "
            "blocking writes",
            *partitioned[3:],
            f"recorded the catalog of: {STREAM_NAMES}",
        ]
        for table in PARTITIONED:
            assert old_rows[table] == await sources(url, f"{table}_legacy"), table
        again = await pipeline(env, "migrate")
        assert (again.returncode, again.stdout) == (0, "the schema is up to date\n")

        second = await produce(bootstrap, prefix, traffic[1_500:])
        agent = AgentProcess(agent_env(bootstrap, url, prefix, prefix)).start()
        try:
            await assert_caught_up_exactly_once(url, bootstrap, prefix, first + second, within=120)
            assert agent.stop() == 0
        finally:
            agent.kill()


CLICKS = """
builtin = false

[[streams]]
name = "clicks"
topic = "web.clicks"
table = "clicks"
mode = "append"
{key}
{partition}

[streams.columns]
click_id = "uuid"
page = "text"
at = "timestamptz"
"""


@pytest.mark.parametrize(
    "key",
    [
        # No index to build: the check's ADD CONSTRAINT, then the swap, wait for the lock.
        pytest.param("", id="keyless"),
        # The index build waits for the long transaction first, beyond the command timeout.
        pytest.param('key = ["click_id"]', id="keyed"),
    ],
)
async def test_the_upgrade_never_holds_writers_up_behind_a_long_transaction(
    servers: Servers, database_url: str, tmp_path: Path, key: str
) -> None:
    """A transaction that writes the table and stays open: each step that needs an exclusive
    lock waits for it at most its lock timeout, then lets the writers queued behind it go and
    tries again, so writers wait about a second at most, never the long transaction's
    length; the upgrade finishes once that transaction does, however long its steps wait
    beyond the session's command timeout (2 s here)."""
    plain = tmp_path / "plain.toml"
    plain.write_text(CLICKS.format(key=key, partition=""))
    partitioned = tmp_path / "partitioned.toml"
    partitioned.write_text(CLICKS.format(key=key, partition='partition_by = "at"'))
    assert (await pipeline(migrator_env(servers, database_url, plain), "migrate")).returncode == 0
    agent_url = testbed.as_agent(database_url)
    insert = (
        "INSERT INTO clicks (click_id, page, at, src_partition, src_offset, batch_id) "
        "VALUES (gen_random_uuid(), '/', now(), 0, $1, 1)"
    )
    holder = await asyncpg.connect(agent_url, timeout=10)
    writer = await asyncpg.connect(agent_url, timeout=10)
    try:
        long_transaction = holder.transaction()
        await long_transaction.start()
        await holder.execute(insert, 0)  # holds the table's ROW EXCLUSIVE lock until it ends
        env = migrator_env(servers, database_url, partitioned)
        env["PIPELINE_DB_COMMAND_TIMEOUT_S"] = "2"
        migrate = asyncio.create_task(pipeline(env, "migrate"))
        waits = []
        held_until = time.monotonic() + 6
        offset = 1
        while time.monotonic() < held_until:
            began = time.monotonic()
            await writer.execute(insert, offset)
            waits.append(time.monotonic() - began)
            offset += 1
            await asyncio.sleep(0.02)
        assert not migrate.done()  # it cannot finish while the long transaction runs
        await long_transaction.commit()
        migrated = await asyncio.wait_for(migrate, 120)
        assert migrated.returncode == 0, migrated.stderr
        assert max(waits) < 3, sorted(waits)[-5:]
        assert len(waits) > 20
        assert await writer.fetchval("SELECT count(*) FROM clicks") == offset
        assert await writer.fetchval("SELECT count(*) FROM clicks_legacy") == offset
    finally:
        await holder.close()
        await writer.close()
    assert await relkinds_of(database_url, "clicks") == "p"


async def relkinds_of(url: str, table: str) -> str:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        kind: str = await conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", table
        )
        return kind
    finally:
        await conn.close()
