"""Least privilege (docs/security.md), against the real server: the agents run as a login with
the writer role only, which may read and write rows and nothing else; the migrator owns the
schema, and what later migrations create reaches the writer and the reader with no GRANT of
its own; an agent on a schema older than its code refuses to start and says what to run."""

from __future__ import annotations

import asyncio
import sys

import asyncpg
import pytest

from pipeline import db, testbed
from pipeline.devstack import postgres
from pipeline.errors import SchemaError
from tests.conftest import Servers
from tests.integration.harness import (
    AgentProcess,
    agent_env,
    assert_caught_up_exactly_once,
    create_topics,
    fleet_traffic,
    produce,
)

pytestmark = pytest.mark.timeout(300)

MIGRATE_COMMAND = (sys.executable, "-m", "pipeline.cli", "migrate")


def _logins(servers: Servers) -> postgres.Logins:
    assert servers.logins is not None, "the test session made no logins"
    return servers.logins


async def _connect_as(login: postgres.Login, database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(login.url(database_url), timeout=10)


async def test_the_agent_ingests_as_a_login_with_the_writer_role_only(
    servers: Servers, database_url: str, unique: str
) -> None:
    """A `pipeline run` from the test harness connects as the agent login, and ingests every
    record exactly once with no more rights than the writer role's."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    traffic = fleet_traffic(3_000, seed=70)
    sent = await produce(bootstrap, prefix, traffic)
    agent = AgentProcess(agent_env(bootstrap, database_url, prefix, prefix)).start()
    try:
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        admin = await asyncpg.connect(database_url, timeout=10)
        try:
            users = await admin.fetch(
                "SELECT DISTINCT usename FROM pg_stat_activity "
                "WHERE datname = $1 AND application_name = 'database-agent'",
                unique,
            )
        finally:
            await admin.close()
        assert [r["usename"] for r in users] == [_logins(servers).agent.user]
        assert agent.stop() == 0
    finally:
        agent.kill()


async def test_the_writer_is_no_superuser_owns_nothing_and_may_not_change_the_schema(
    servers: Servers, database_url: str
) -> None:
    logins = _logins(servers)
    admin = await asyncpg.connect(database_url, timeout=10)
    try:  # a schema of another application on the same database
        await admin.execute("CREATE SCHEMA billing")
        await admin.execute("CREATE TABLE billing.invoices (id int PRIMARY KEY)")
        await admin.execute("GRANT ALL ON billing.invoices TO PUBLIC")
    finally:
        await admin.close()
    writer = await _connect_as(logins.agent, database_url)
    try:
        who = await writer.fetchrow(
            """SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb,
                      pg_has_role(current_user, 'pipeline_writer', 'member') AS writer,
                      pg_has_role(current_user, $1, 'member') AS migrator,
                      (SELECT count(*) FROM pg_class c
                       WHERE pg_has_role(current_user, c.relowner, 'member')) AS owned,
                      (SELECT pg_has_role(current_user, datdba, 'member') FROM pg_database
                       WHERE datname = current_database()) AS owns_database
               FROM pg_roles r WHERE r.rolname = current_user""",
            logins.migrator.user,
        )
        assert dict(who) == {
            "rolsuper": False,
            "rolcreaterole": False,
            "rolcreatedb": False,
            "writer": True,
            "migrator": False,
            "owned": 0,
            "owns_database": False,
        }
        refused = [
            "CREATE TABLE sneaky (id int)",
            "CREATE SCHEMA sneaky",
            "DROP TABLE performance_metrics",
            "ALTER TABLE performance_metrics ADD COLUMN sneaky int",
            "CREATE INDEX sneaky ON system_events (kind)",
            "TRUNCATE performance_metrics",  # a rollback deletes the rows it must, no more
            "INSERT INTO schema_migrations (version, name) VALUES (999, 'sneaky.sql')",
            "INSERT INTO billing.invoices VALUES (1)",  # no USAGE on another schema
            # A group claims a data table, never hands one over: the migrator releases it.
            "DELETE FROM table_owners",
            "UPDATE table_owners SET group_id = 'sneaky'",
            # A gap is recorded and acknowledged, never erased.
            "DELETE FROM ingest_gaps",
            "TRUNCATE ingest_gaps",
        ]
        for statement in refused:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await writer.execute(statement)
        # What ingesting and rolling back take: temporary staging tables, rows in and out,
        # batch ids.
        async with writer.transaction():
            await writer.execute(
                "CREATE TEMP TABLE stage_agent_states (LIKE agent_states INCLUDING DEFAULTS)"
            )
            await writer.execute(
                "INSERT INTO control_log (direction, kind, target, outcome) "
                "VALUES ('status', 'heartbeat', 'g', 'ok')"
            )
            assert await writer.execute("DELETE FROM performance_metrics") == "DELETE 0"
            await db.claim_tables(writer, "g", {"performance_metrics": "agents.metrics"})
            assert await writer.fetchval("SELECT nextval('ingest_batch_id_seq')") >= 1
            assert await writer.fetchval("SELECT max(version) FROM schema_migrations") == (
                db.required_version(db.read_migrations())
            )
    finally:
        await writer.close()


_LEAF_INDEXES = """
SELECT i.indexrelid::regclass::text AS brin,
       'src_offset' = ANY (SELECT attname FROM pg_attribute
                           WHERE attrelid = i.indrelid AND attnum = ANY (i.indkey)) AS source
FROM pg_partition_tree($1) AS t JOIN pg_index AS i ON i.indrelid = t.relid
WHERE t.isleaf
"""


async def test_the_writer_may_have_the_source_indexes_summarized_and_nothing_more(
    servers: Servers, database_url: str
) -> None:
    """sql/013_source_index_summaries.sql: the one function that runs as the migrator. The
    writer may have the source indexes of a table the migrator owns summarized, and no other
    index; never another owner's table, nor a temporary table of its own (whose index could
    run its code as the function's owner); the reader may not run it at all."""
    logins = _logins(servers)
    summarize = "SELECT pipeline_summarize_source_indexes($1::regclass)"
    by_hand = "SELECT brin_summarize_new_values($1::regclass)"
    admin = await asyncpg.connect(database_url, timeout=10)  # the superuser
    writer = await _connect_as(logins.agent, database_url)
    try:
        await admin.execute("CREATE TABLE foreign_brin (src_partition int, src_offset bigint)")
        await admin.execute("CREATE INDEX foreign_source ON foreign_brin USING brin (src_offset)")
        await admin.execute("INSERT INTO foreign_brin SELECT 0, generate_series(1, 100000)")
        await admin.execute("GRANT SELECT ON foreign_brin TO pipeline_writer")
        await writer.execute(
            "INSERT INTO performance_metrics (agent_id, name, value, ts, labels, src_partition, "
            "src_offset, batch_id) SELECT 'a', 'cpu', 1, now(), '{}', 0, i, 1 "
            "FROM generate_series(0, 29999) AS i"
        )
        assert await writer.fetchval(summarize, "performance_metrics") > 0
        assert await writer.fetchval(summarize, "performance_metrics") == 0
        # Every source index is summarized to its last page; the time index, not at all.
        left = {
            (row["source"], await admin.fetchval(by_hand, row["brin"]))
            for row in await admin.fetch(_LEAF_INDEXES, "performance_metrics")
        }
        assert (True, 0) in left and all(n == 0 for source, n in left if source)
        assert any(n > 0 for source, n in left if not source)
        # Another owner's table, and the writer's own temporary one: nothing summarized.
        assert await writer.fetchval(summarize, "foreign_brin") == 0
        assert await admin.fetchval(by_hand, "foreign_source") > 0
        await writer.execute("CREATE TEMP TABLE own (src_partition int, src_offset bigint)")
        await writer.execute("CREATE INDEX own_source ON own USING brin (src_offset)")
        await writer.execute("INSERT INTO own SELECT 0, generate_series(1, 100000)")
        assert await writer.fetchval(summarize, "own") == 0
        assert await writer.fetchval(by_hand, "own_source") > 0
    finally:
        await writer.close()
        await admin.close()
    analyst = await _connect_as(logins.analyst, database_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await analyst.fetchval(summarize, "performance_metrics")
    finally:
        await analyst.close()


async def test_an_agent_on_an_older_schema_refuses_to_start_and_says_to_migrate(
    servers: Servers, unique: str
) -> None:
    """The agents never migrate: on a database from before 007_least_privilege.sql (whose
    version the agent's login may not even read), `pipeline run` exits non-zero naming the
    command to run, and `pipeline migrate` as the agent's login cannot do it either. As the
    migrator it does, and the agent starts."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    logins = _logins(servers)
    migrations = db.read_migrations()
    needed = db.required_version(migrations)
    older = [m for m in migrations if m.version < 7]
    async with testbed.scratch_database(
        servers.endpoints.database_url, f"{unique}_old", migrations=older
    ) as old:
        env = agent_env(bootstrap, old, prefix, prefix)
        run = await asyncio.create_subprocess_exec(
            *testbed.AGENT_COMMAND,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(run.communicate(), 60)
        assert run.returncode == 2, stderr
        last = stderr.decode().strip().splitlines()[-1]
        assert last == (
            f"pipeline: error: the database schema is older than version 7 (this login "
            f"may not read schema_migrations), this pipeline needs {needed}: run `pipeline "
            "migrate` as the migrator (PIPELINE_MIGRATE_DATABASE_URL, docs/security.md)"
        )
        assert "Traceback" not in stderr.decode()

        # Whoever may read the version is told which it is.
        migrator = await _connect_as(logins.migrator, old)
        try:
            with pytest.raises(SchemaError, match=f"at version {older[-1].version}, this "):
                await db.check_schema(migrator, migrations)
        finally:
            await migrator.close()

        # The agent's login may not migrate.
        migrate = await asyncio.create_subprocess_exec(
            *MIGRATE_COMMAND,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(migrate.communicate(), 60)
        assert migrate.returncode == 2, out
        assert err.decode() == (
            "pipeline: error: reading schema_migrations: permission denied for table "
            "schema_migrations: `pipeline migrate` runs as the migrator, the schema's owner "
            "(PIPELINE_MIGRATE_DATABASE_URL, docs/security.md)\n"
        )

        # The migrator may; then the agent starts, and a newer schema does not stop it.
        migrate = await asyncio.create_subprocess_exec(
            *MIGRATE_COMMAND,
            env={**env, "PIPELINE_MIGRATE_DATABASE_URL": logins.migrator.url(old)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(migrate.communicate(), 60)
        newer = ", ".join(m.name for m in migrations[len(older) :])
        # Then the tables of the streams catalog, which the numbered migrations do not make.
        assert migrate.returncode == 0, err
        assert out.decode().splitlines()[0] == f"applied: {newer}"
        admin = await asyncpg.connect(old, timeout=10)
        try:
            await admin.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from_the_future.sql')",
                needed + 1,
            )
        finally:
            await admin.close()
        await create_topics(bootstrap, prefix, partitions=1)
        sent = await produce(bootstrap, prefix, fleet_traffic(200, seed=71))
        agent = AgentProcess(env).start()
        try:
            await assert_caught_up_exactly_once(old, bootstrap, prefix, sent, within=120)
            assert agent.stop() == 0
        finally:
            agent.kill()


async def test_tables_of_later_migrations_reach_the_writer_and_reader_without_a_grant(
    servers: Servers, database_url: str
) -> None:
    """Default privileges: a table (and its sequence) that a later migration creates, as the
    migrator, is writable by the writer and readable by the reader with no GRANT."""
    logins = _logins(servers)
    migrator = await _connect_as(logins.migrator, database_url)
    try:
        await migrator.execute(
            "CREATE TABLE later_notes (id bigserial PRIMARY KEY, note text NOT NULL)"
        )
    finally:
        await migrator.close()
    writer = await _connect_as(logins.agent, database_url)
    try:
        await writer.execute("INSERT INTO later_notes (note) VALUES ('a'), ('b')")
        assert await writer.execute("UPDATE later_notes SET note = 'c' WHERE note = 'b'") == (
            "UPDATE 1"
        )
        assert await writer.execute("DELETE FROM later_notes WHERE note = 'a'") == "DELETE 1"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.execute("DROP TABLE later_notes")
    finally:
        await writer.close()
    reader = await _connect_as(logins.analyst, database_url)
    try:
        assert [r["note"] for r in await reader.fetch("SELECT note FROM later_notes")] == ["c"]
        assert await reader.fetchval("SELECT count(*) FROM performance_metrics") == 0
        for statement in (
            "INSERT INTO later_notes (note) VALUES ('d')",
            "DELETE FROM later_notes",
            "INSERT INTO performance_metrics SELECT * FROM performance_metrics",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(statement)
    finally:
        await reader.close()
