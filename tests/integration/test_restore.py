"""A lost database restored from a `pg_dump` taken earlier: the agents resume from the offsets
in the dump and ingest again exactly what the dump lacks, with no offset surgery
(docs/repair.md). Offsets live in the same tables, and so in the same dump snapshot, as the
rows they cover."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import asyncpg
import pytest

from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    APPEND_TABLE,
    AgentProcess,
    Outgoing,
    agent_env,
    assert_caught_up_exactly_once,
    create_topics,
    end_offsets,
    fleet_traffic,
    migrated,
    produce_paced,
    stored_offsets,
    until,
)

pytestmark = pytest.mark.timeout(420)


def _with_poison(good: list[Outgoing], every: int) -> list[Outgoing]:
    """``good`` with a record that does not decode after every ``every`` records."""
    metrics = STREAM_BY_NAME["metrics"]
    out: list[Outgoing] = []
    for i, record in enumerate(good, 1):
        out.append(record)
        if i % every == 0:
            out.append(Outgoing(metrics, b"p", b"{not json %d" % i, "DecodeError"))
    return out


def _client(name: str) -> str:
    """The machine's ``pg_dump`` or ``pg_restore``, of the server's major or newer (the local
    stack's builds from Maven Central have none)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH: install PostgreSQL's client tools (Debian: apt-get "
            "install postgresql-client)"
        )
    return path


async def _tool(*command: str) -> None:
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{command[0]}: {result.stderr}"


async def _ingested_rows(database_url: str) -> int:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        counts = [await conn.fetchval(f"SELECT count(*) FROM {t}") for t in APPEND_TABLE.values()]
        return sum(counts) + await conn.fetchval("SELECT count(*) FROM dead_letters")
    finally:
        await conn.close()


async def test_a_database_restored_from_a_dump_resumes_from_its_offsets_and_reingests_the_rest(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    dump = tmp_path / "backup.dump"
    await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    env = agent_env(bootstrap, database_url, prefix, prefix, batch_max_records=500)
    # One traffic (distinct state and config versions), in two parts.
    traffic = _with_poison(fleet_traffic(24_000, seed=31), every=1_000)
    first, second = traffic[:6_000], traffic[6_000:]

    agent = AgentProcess(env, tmp_path / "agent-before.log").start()
    try:
        sent = await produce_paced(bootstrap, prefix, first, over=3, chunks=10)
        # The second part arrives while the agent ingests, and the dump is taken meanwhile.
        producing = asyncio.create_task(
            produce_paced(bootstrap, prefix, second, over=10, chunks=40)
        )

        async def ingesting_the_second_part() -> bool:
            stored = await stored_offsets(database_url, prefix, prefix)
            return sum(stored.values()) > len(first)

        await until(ingesting_the_second_part, within=120, what="the second part being ingested")
        await _tool(
            _client("pg_dump"), "--format=custom", f"--file={dump}", f"--dbname={database_url}"
        )
        assert not producing.done(), "the dump was meant to be taken mid-run"
        sent += await producing
        # Before the loss, everything was ingested exactly once.
        ends = await assert_caught_up_exactly_once(
            database_url, bootstrap, prefix, sent, within=180
        )
        assert agent.stop() == 0
    finally:
        agent.kill()

    # The database is lost: dropped, created empty, and restored from the dump.
    server = await asyncpg.connect(servers.endpoints.database_url, timeout=10)
    try:
        await server.execute(f'DROP DATABASE "{unique}" WITH (FORCE)')
        await server.execute(f'CREATE DATABASE "{unique}"')
    finally:
        await server.close()
    await _tool(_client("pg_restore"), "--exit-on-error", f"--dbname={database_url}", str(dump))
    restored = await stored_offsets(database_url, prefix, prefix)
    assert set(restored) == set(ends)
    # The dump holds part of the data, and offsets that say exactly which part.
    assert sum(restored.values()) > len(first)
    assert sum(restored.values()) < sum(ends.values()) == len(sent)
    assert any(restored[tp] < end for tp, end in ends.items())
    assert 0 < await _ingested_rows(database_url) == sum(restored.values())

    # The agents start again, with no offset surgery: what the dump lacks is ingested again.
    agent = AgentProcess(env, tmp_path / "agent-after.log").start()
    try:

        async def caught_up() -> bool:
            stored = await stored_offsets(database_url, prefix, prefix)
            return stored == await end_offsets(bootstrap, prefix)

        # Kafka's committed offsets (a mirror nobody reads) still say where the lost database
        # was, ahead of the restored one, until the agent has caught up: wait for the
        # database first, then the whole oracle, Kafka's offsets included.
        await until(caught_up, within=180, what="the restored database caught up", every=0.5)
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=60)
        assert await _ingested_rows(database_url) == len(sent)
        assert agent.stop() == 0
    finally:
        agent.kill()
