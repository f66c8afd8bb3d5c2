"""Two groups, one database: a data row names its source partition and offset, not its group,
so a rollback or a replay of one group deletes by coordinates another group's rows share. Each
data table belongs to one group and topic (docs/exactly-once.md, "One group per table"): a
second group is refused at start, before it writes a row, and no one's rows are lost."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from consumers.replay import Request
from pipeline import testbed
from pipeline.control import (
    Checkpoint,
    RollbackCheckpoint,
)
from pipeline.errors import PipelineError
from pipeline.replay import Earliest, Now
from pipeline.testbed import AgentProcess, stop_agents
from tests.conftest import Servers
from tests.integration.harness import (
    APPEND_TABLE,
    agent_env,
    count_rows,
    create_topics,
    end_offsets,
    fleet_traffic,
    migrated,
    produce,
    running_agent,
    stored_offsets,
    until,
    wait_caught_up,
)
from tests.integration.test_control import (
    Keys,
    assert_all_applied,
    controlled_agent,
    keys,
    live,
    orchestrator,
)
from tests.integration.test_replay import _replayer

__all__ = ["keys"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(600)


async def _append_rows(database_url: str) -> int:
    return sum([await count_rows(database_url, t) for t in APPEND_TABLE.values()])


async def _metric_rows(database_url: str) -> set[tuple[object, ...]]:
    """Every performance_metrics row, as its source and content (not when it was written)."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT src_partition, src_offset, agent_id, name, value, ts FROM performance_metrics"
        )
    finally:
        await conn.close()
    return {tuple(r) for r in rows}


def _owners(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``pipeline owners ARGS`` as the migrator, the way an operator runs it."""
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",  # not used: the command reads the database
        DATABASE_URL=testbed.as_agent(database_url),
        PIPELINE_MIGRATE_DATABASE_URL=testbed.as_migrator(database_url),
    )
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "owners", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_second_group_is_refused_at_start_and_a_rollback_keeps_its_rows(
    servers: Servers, database_url: str, unique: str, keys: Keys, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    first, second = f"{unique}a.", f"{unique}b."  # each its group and its topic prefix
    for prefix in (first, second):
        await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    ag = orchestrator(bootstrap, first, keys)
    log = tmp_path / "second.log"
    async with controlled_agent(bootstrap, database_url, first, keys):
        await live(ag, first, 1)
        assert_all_applied(await ag.send(first, Checkpoint(name="empty"), wait_s=30), 1)
        await produce(bootstrap, first, fleet_traffic(3_000, seed=1))
        await wait_caught_up(database_url, bootstrap, first, first, within=120)

        # The second group, on the same tables, with its own records at the same partitions
        # and offsets as the first group's.
        await produce(bootstrap, second, fleet_traffic(3_000, seed=2))
        ends = await end_offsets(bootstrap, second)
        other = AgentProcess(agent_env(bootstrap, database_url, second, second), log).start()
        try:

            async def refused_or_caught_up() -> bool:
                stored = await stored_offsets(database_url, second, second)
                return not other.alive() or stored == ends

            await until(refused_or_caught_up, within=120, what="the second group stops or ends")
            ingested = sum((await stored_offsets(database_url, second, second)).values())

            # The first group rolls back to before its records: every row at or after offset 0
            # of its partitions goes, which are the second group's partitions and offsets too.
            command = RollbackCheckpoint(to_checkpoint="empty", then="hold")
            assert_all_applied(await ag.send(first, command, wait_s=60), 1)
            left = await _append_rows(database_url)
            assert left == ingested, f"the second group's rows: {ingested} written, {left} left"
            assert ingested == 0  # ... because it never wrote one: it was refused at start
            assert await asyncio.to_thread(other.wait, 30) == 2
        finally:
            await stop_agents([other])
            other.kill()
    text = log.read_text()
    assert f"group {second!r} on topic '{second}agents.metrics'" in text, text
    assert f"performance_metrics belongs to group {first!r}" in text, text
    assert f"`pipeline owners release --group {first}`" in text, text

    shown = _owners(database_url, "show")
    assert shown.returncode == 0, shown.stderr
    assert f"performance_metrics: group {first}, topic {first}agents.metrics\n" in shown.stdout
    # The way out the error names: the first group stopped for good, the migrator releases
    # its tables, and the second group's agent starts and claims them.
    released = _owners(database_url, "release", "--group", first)
    assert released.returncode == 0, released.stderr
    assert released.stdout.count("released ") == 7, released.stdout
    async with running_agent(bootstrap, database_url, second):
        await wait_caught_up(database_url, bootstrap, second, second, within=120)
    assert await _append_rows(database_url) == sum(ends.values())


async def test_a_replay_of_a_second_group_is_refused_and_keeps_the_first_groups_rows(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    first, second = f"{unique}a.", f"{unique}b."
    for prefix in (first, second):
        await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    await produce(bootstrap, first, fleet_traffic(3_000, seed=1))
    async with running_agent(bootstrap, database_url, first):
        await wait_caught_up(database_url, bootstrap, first, first, within=120)
    before = await _metric_rows(database_url)
    assert before

    # The second group replays its own metrics, at the same partitions and offsets.
    await produce(bootstrap, second, fleet_traffic(3_000, seed=2))
    replayer = _replayer(bootstrap, database_url, second)
    refused: PipelineError | None = None
    try:
        replay_id, _ = await replayer.create(Request(("metrics",), Earliest(), Now()))
        await replayer.run(replay_id)
    except PipelineError as exc:
        refused = exc
    after = await _metric_rows(database_url)
    assert not before - after, f"{len(before - after)} of the first group's rows lost"
    assert after == before
    assert refused is not None
    assert f"performance_metrics belongs to group {first!r}" in str(refused)
    assert f"not to group {second!r} on topic '{second}agents.metrics'" in str(refused)


async def test_a_rollback_of_tables_handed_to_another_group_meanwhile_is_rejected_deleting_nothing(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    """The misuse the release command warns of: the first group's tables released while its
    agent still runs, and claimed by a second group that writes them. The first group's
    rollback then finds a table that is not its own, and is rejected before it deletes."""
    bootstrap = servers.endpoints.kafka_bootstrap
    first, second = f"{unique}a.", f"{unique}b."
    for prefix in (first, second):
        await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    ag = orchestrator(bootstrap, first, keys)
    async with controlled_agent(bootstrap, database_url, first, keys):
        await live(ag, first, 1)
        assert_all_applied(await ag.send(first, Checkpoint(name="empty"), wait_s=30), 1)
        await produce(bootstrap, first, fleet_traffic(3_000, seed=1))
        mine = await wait_caught_up(database_url, bootstrap, first, first, within=120)

        released = _owners(database_url, "release", "--group", first)
        assert released.returncode == 0, released.stderr
        await produce(bootstrap, second, fleet_traffic(3_000, seed=2))
        async with running_agent(bootstrap, database_url, second):
            await wait_caught_up(database_url, bootstrap, second, second, within=120)
        # Both groups' rows (states and config of the same keys and versions were found
        # stored: the two fleets share agent ids).
        rows = await _append_rows(database_url)
        assert rows > sum(mine.values())

        command = RollbackCheckpoint(to_checkpoint="empty", then="reingest")
        delivery = await ag.send(first, command, wait_s=60)
        assert not delivery.missing
        (ack,) = delivery.acks.values()
        assert (ack.outcome, ack.reason) == ("rejected", "apply_failed")
        assert f"performance_metrics belongs to group {second!r}" in ack.detail
        assert await _append_rows(database_url) == rows  # nobody's rows deleted
        assert await stored_offsets(database_url, first, first) == mine  # nor offsets moved


async def test_the_same_group_under_another_topic_prefix_is_refused_at_start(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    """One group id, two prefixes: the same partitions and offsets of other topics, which a
    rollback or replay by partition and offset would mix up as two groups' would."""
    bootstrap = servers.endpoints.kafka_bootstrap
    group, first, second = unique, f"{unique}a.", f"{unique}b."
    for prefix in (first, second):
        await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    owner = AgentProcess(agent_env(bootstrap, database_url, first, group)).start()
    try:

        async def claimed() -> bool:
            return await count_rows(database_url, "table_owners") == 7

        await until(claimed, within=60, what="the first prefix's agent claims the tables")
    finally:
        await stop_agents([owner])
        owner.kill()
    log = tmp_path / "second.log"
    env = agent_env(bootstrap, database_url, second, group)
    other = AgentProcess(env, log).start()
    try:
        assert await asyncio.to_thread(other.wait, 60) == 2
    finally:
        other.kill()
    text = log.read_text()
    assert (
        f"performance_metrics belongs to group {group!r} on topic '{first}agents.metrics', not "
        f"to group {group!r} on topic '{second}agents.metrics'"
    ) in text, text
    # Nothing positioned under the second prefix. (The first prefix's agent may have stored
    # its starting offsets before it was stopped: those keep their prefix in this listing.)
    stored = await stored_offsets(database_url, group, second)
    assert [topic for topic, _ in stored if not topic.startswith(first)] == [], stored
