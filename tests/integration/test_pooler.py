"""The pipeline behind PgBouncer, as on managed PostgreSQL's pooled URLs (Neon, Supabase):
migrations, ingestion under kill -9, the control plane and a replay through a pooler in
transaction mode, and one ingestion in session mode. These tests start their own PgBouncers
in front of the session's PostgreSQL, whatever PIPELINE_TEST_POOLER says; the agents and
the migrator connect through them, the tests' own checks connect directly, as the
administrator.

A negative control proves the pooler really is in transaction mode: clients with asyncpg's
prepared statement cache break through it; and an agent that was not told
(PIPELINE_DB_POOLER) stops with one line saying so.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pipeline import db, testbed
from pipeline.control import (
    Activate,
    Deactivate,
    generate_key_pair,
    write_private_key_file,
    write_public_key_file,
)
from pipeline.devstack import pgbouncer
from pipeline.devstack.pgbouncer import PgBouncer
from pipeline.devstack.postgres import Login
from pipeline.testbed import AgentProcess, stop_agents
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    Outgoing,
    agent_env,
    assert_caught_up_exactly_once,
    assert_exactly_once,
    assert_latest_tables_follow_the_log,
    count_rows,
    create_topics,
    fleet_traffic,
    of_stream,
    produce,
    produce_paced,
    stored_offsets,
    until,
)
from tests.integration.test_agent import _assert_contents
from tests.integration.test_control import (
    Keys,
    assert_all_applied,
    controlled_env,
    live,
    orchestrator,
)

pytestmark = pytest.mark.timeout(600)

PIPELINE = (sys.executable, "-m", "pipeline.cli")
# What asyncpg says when a statement it prepared is not on the server connection it got, or
# its name is taken there by another client's: the pool handed it another connection.
PREPARED_STATEMENT_ERRORS = (
    asyncpg.InvalidSQLStatementNameError,
    asyncpg.DuplicatePreparedStatementError,
)


def _bouncer(servers: Servers, home: Path, mode: str) -> Iterator[PgBouncer]:
    assert servers.logins is not None
    logins = [servers.logins.migrator, servers.logins.agent, servers.logins.analyst]
    with pgbouncer.running(home, mode, servers.endpoints.database_url, logins, "postgres") as b:
        yield b


@pytest.fixture(scope="module")
def transaction_pooler(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgBouncer]:
    yield from _bouncer(servers, tmp_path_factory.mktemp("pgbouncer-transaction"), "transaction")


@pytest.fixture(scope="module")
def session_pooler(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgBouncer]:
    yield from _bouncer(servers, tmp_path_factory.mktemp("pgbouncer-session"), "session")


def _login(servers: Servers, name: str) -> Login:
    assert servers.logins is not None
    found: Login = getattr(servers.logins, name)
    return found


def pooled(bouncer: PgBouncer, login: Login, database_url: str) -> str:
    """``database_url``'s database as ``login``, through ``bouncer``."""
    return bouncer.url(login.url(database_url))


def pooled_env(
    servers: Servers, bouncer: PgBouncer, database_url: str, prefix: str, **settings: object
) -> dict[str, str]:
    """A ``pipeline run``'s environment (group ``prefix``) through ``bouncer``; behind a
    transaction pooler with PIPELINE_DB_POOLER=transaction unless ``settings`` say."""
    url = pooled(bouncer, _login(servers, "agent"), database_url)
    told = pgbouncer.agent_settings(bouncer.mode)
    return agent_env(servers.endpoints.kafka_bootstrap, url, prefix, prefix, **{**told, **settings})


@pytest.fixture
async def empty_database(servers: Servers, unique: str) -> AsyncIterator[str]:
    """A new database owned by the migrator, with no schema: the administrator's URL."""
    admin = servers.endpoints.database_url
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{unique}" OWNER {_login(servers, "migrator").user}')
    finally:
        await conn.close()
    try:
        yield testbed.database_url_for(admin, unique)
    finally:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{unique}" WITH (FORCE)')
        finally:
            await conn.close()


async def test_pipeline_migrate_through_a_transaction_pooler_applies_every_migration(
    servers: Servers, transaction_pooler: PgBouncer, empty_database: str
) -> None:
    env = pooled_env(servers, transaction_pooler, empty_database, "unused.")
    env["PIPELINE_MIGRATE_DATABASE_URL"] = pooled(
        transaction_pooler, _login(servers, "migrator"), empty_database
    )
    migrations = db.read_migrations()

    def migrate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PIPELINE, "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    first = await asyncio.to_thread(migrate)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == "applied: " + ", ".join(m.name for m in migrations)
    conn = await asyncpg.connect(empty_database, timeout=10)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        owner = await conn.fetchval(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'performance_metrics'"
        )
    finally:
        await conn.close()
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in migrations]
    assert owner == _login(servers, "migrator").user
    again = await asyncio.to_thread(migrate)
    assert (again.returncode, again.stdout.strip()) == (0, "the schema is up to date")


async def test_three_agents_through_a_transaction_pooler_with_a_kill_9_land_exactly_once(
    servers: Servers,
    transaction_pooler: PgBouncer,
    database_url: str,
    unique: str,
    tmp_path: Path,
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    outgoing = fleet_traffic(45_000, seed=61)
    env = pooled_env(
        servers,
        transaction_pooler,
        database_url,
        prefix,
        batch_max_records=500,
        session_timeout_ms=6000,
    )
    agents = [AgentProcess(env, tmp_path / f"agent-{i}.log").start() for i in range(3)]
    try:
        sending = asyncio.create_task(produce_paced(bootstrap, prefix, outgoing, over=12.0))

        async def ingesting() -> bool:
            return await count_rows(database_url, "performance_metrics") > 3_000

        await until(ingesting, within=90, what="the agents ingest through the pooler")
        for agent in agents:
            assert agent.alive(), agent.log_path and agent.log_path.read_text()[-3000:]
        agents[0].kill()  # SIGKILL mid-ingestion: its transaction dies with its connection
        assert not sending.done(), "the kill must land while records are still arriving"
        agents[0].start()
        sent = await sending
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
        await _assert_contents(database_url, outgoing, sent)
        await assert_latest_tables_follow_the_log(database_url, outgoing)
        await stop_agents(agents)
        assert [a.wait(10) for a in agents] == [0, 0, 0]
    finally:
        for agent in agents:
            agent.kill()


async def _two_clients(url: str, **connect: Any) -> Exception | None:
    """Two clients at once, the second's query twice: in between, the first ends the
    transaction that held a server connection. A transaction pooler hands the second that
    connection (the most recently freed) for its second query, where the statement it
    prepared for the first is not. None when both queries answered, else the error."""
    first = await asyncpg.connect(url, timeout=10, **connect)
    second = await asyncpg.connect(url, timeout=10, **connect)
    try:
        held = first.transaction()
        await held.start()
        await first.execute("SELECT 1")  # the first server connection, held
        assert await second.fetchval("SELECT $1::int + 1", 1) == 2  # prepared on another
        await held.commit()  # the first server connection is free again
        try:
            assert await second.fetchval("SELECT $1::int + 1", 2) == 3
        except PREPARED_STATEMENT_ERRORS as exc:
            return exc
        return None
    finally:
        await first.close()
        await second.close()


async def test_prepared_statements_break_through_the_transaction_pooler_and_not_without_them(
    servers: Servers, transaction_pooler: PgBouncer, session_pooler: PgBouncer, database_url: str
) -> None:
    """The negative control: the pooler is really in transaction mode."""
    agent = _login(servers, "agent")
    through_transaction = pooled(transaction_pooler, agent, database_url)
    broken = await _two_clients(through_transaction)
    assert isinstance(broken, asyncpg.InvalidSQLStatementNameError), broken
    assert "does not exist" in str(broken)
    # No statement cache (unnamed statements, parsed in the transaction that runs them): fine.
    assert await _two_clients(through_transaction, statement_cache_size=0) is None
    # In session mode a client keeps its server connection: the cache is fine too.
    assert await _two_clients(pooled(session_pooler, agent, database_url)) is None


async def _sessions_with_statements_of_another_process(url: str, sessions: int) -> None:
    """What another agent process leaves behind a transaction pooler: asyncpg's named
    statements (``__asyncpg_stmt_1__`` and on: each process counts from 1) on every server
    session of the pool of ``url``'s database and login. ``sessions`` clients hold a
    transaction each at once, so each has its own server session, and PREPARE there
    (prepared statements outlive the transaction)."""
    clients = [
        await asyncpg.connect(url, timeout=10, statement_cache_size=0) for _ in range(sessions)
    ]
    try:
        held = [c.transaction() for c in clients]
        for client, transaction in zip(clients, held, strict=True):
            await transaction.start()
            await client.execute(
                "".join(f"PREPARE __asyncpg_stmt_{n:x}__ AS SELECT {n};" for n in range(1, 200))
            )
        for transaction in held:
            await transaction.commit()
    finally:
        for client in clients:
            await client.close()


async def test_an_agent_not_told_it_is_behind_a_transaction_pooler_stops_with_one_line(
    servers: Servers,
    transaction_pooler: PgBouncer,
    database_url: str,
    unique: str,
    tmp_path: Path,
) -> None:
    """Without PIPELINE_DB_POOLER=transaction, an agent behind a transaction pooler meets
    another process's prepared statements: it stops (exit 2) with one line naming the
    setting, not a traceback."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    await produce(bootstrap, prefix, fleet_traffic(2_000, seed=62))
    url = pooled(transaction_pooler, _login(servers, "agent"), database_url)
    await _sessions_with_statements_of_another_process(url, sessions=20)  # default_pool_size
    env = pooled_env(servers, transaction_pooler, database_url, prefix, db_pooler="none")
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        code = await asyncio.to_thread(agent.wait, 120)
        log = (tmp_path / "agent.log").read_text()
        assert code == 2, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        (said,) = [line for line in log.splitlines() if "PIPELINE_DB_POOLER" in line]
        assert said == log.rstrip("\n").splitlines()[-1], log[-3000:]
        assert said.startswith("pipeline: error: "), said
        assert "prepared statement" in said, said
    finally:
        agent.kill()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    private, public = generate_key_pair()
    write_private_key_file(tmp_path / "antigravity.key", private)
    write_public_key_file(tmp_path / "antigravity.pub", public)
    return Keys(private, tmp_path / "antigravity.key", tmp_path / "antigravity.pub")


async def test_a_stream_switched_off_and_on_through_a_transaction_pooler(
    servers: Servers,
    transaction_pooler: PgBouncer,
    database_url: str,
    unique: str,
    keys: Keys,
) -> None:
    """The control plane's decisions (control_log, assignments) go through the pooler too."""
    logs = keys.private_path.parent
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    url = pooled(transaction_pooler, _login(servers, "agent"), database_url)
    env = controlled_env(bootstrap, url, prefix, keys, db_pooler="transaction")
    ag = orchestrator(bootstrap, prefix, keys)
    agents = [AgentProcess(env, logs / f"agent-{i}.log").start() for i in range(2)]
    try:
        await live(ag, prefix, 2)
        assert_all_applied(await ag.send(prefix, Deactivate(streams=("events",)), wait_s=30), 2)
        sent = await produce(bootstrap, prefix, fleet_traffic(6_000, seed=63))

        async def others_caught_up() -> bool:
            stored = await stored_offsets(database_url, prefix, prefix)
            return sum(stored.values()) - sum(of_stream(stored, "events").values()) == sum(
                1 for s in sent if s.topic != STREAM_BY_NAME["events"].topic
            )

        await until(others_caught_up, within=120, what="every stream but events ingested")
        assert await count_rows(database_url, "system_events") == 0
        assert_all_applied(await ag.send(prefix, Activate(streams=("events",)), wait_s=30), 2)
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            decided = await conn.fetch(
                "SELECT seq, kind, outcome FROM control_log WHERE direction = 'command' "
                "ORDER BY seq"
            )
        finally:
            await conn.close()
        assert [tuple(r) for r in decided] == [
            (1, "deactivate", "applied"),
            (2, "activate", "applied"),
        ]
    finally:
        await stop_agents(agents)
        for agent in agents:
            agent.kill()


async def test_a_truncated_table_replayed_through_a_transaction_pooler(
    servers: Servers, transaction_pooler: PgBouncer, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    poison = Outgoing(STREAM_BY_NAME["metrics"], b"p", b"{broken", "DecodeError")
    traffic = fleet_traffic(10_000, seed=64)
    sent = await produce(bootstrap, prefix, [*traffic[:5_000], poison, *traffic[5_000:]])
    env = pooled_env(servers, transaction_pooler, database_url, prefix)
    agent = AgentProcess(env).start()
    try:
        ends = await assert_caught_up_exactly_once(
            database_url, bootstrap, prefix, sent, within=120
        )
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            await conn.execute("TRUNCATE performance_metrics")  # the incident
        finally:
            await conn.close()
        done = await asyncio.to_thread(
            subprocess.run,
            [*PIPELINE, "replay", "--stream", "metrics", "--from", "earliest", "--to", "now"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        await assert_exactly_once(database_url, prefix, prefix, sent, ends)
        await assert_latest_tables_follow_the_log(database_url, traffic)
        await stop_agents([agent])
        assert agent.wait(10) == 0
    finally:
        agent.kill()


async def test_ingestion_through_a_session_pooler_is_as_direct(
    servers: Servers, session_pooler: PgBouncer, database_url: str, unique: str, tmp_path: Path
) -> None:
    """A session pooler keeps a client's server connection: nothing to tell the agent."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    outgoing = fleet_traffic(20_000, seed=65)
    sent = await produce(bootstrap, prefix, outgoing)
    env = pooled_env(servers, session_pooler, database_url, prefix, db_pooler="none")
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=180)
        await _assert_contents(database_url, outgoing, sent)
        await assert_latest_tables_follow_the_log(database_url, outgoing)
        assert agent.stop() == 0
    finally:
        agent.kill()
