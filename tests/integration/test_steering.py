"""The DatabaseAgent's seams against the real broker and database: a fence provoked on
purpose, streams switched off and on under load, a failed stream brought back without a
restart, work committed inside the ingest transaction, and errors that retrying cannot fix."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from consumers.agent import DatabaseAgent
from pipeline.batching import Limits
from pipeline.config import load_config
from pipeline.errors import FatalError, PipelineError
from pipeline.ownership import UnknownStreamError
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    APPEND_TABLE,
    agent_env,
    assert_caught_up_exactly_once,
    claimed,
    count_rows,
    create_topics,
    end_offsets,
    fleet_traffic,
    migrated,
    of_stream,
    produce,
    produce_paced,
    running_agent,
    stored_offsets,
    until,
)

pytestmark = pytest.mark.timeout(600)


async def test_a_second_writer_moving_a_stored_offset_fences_the_batch_and_duplicates_nothing(
    servers: Servers, database_url: str, unique: str
) -> None:
    """Another writer (as a rollback or a replay would) moves one partition's stored offset
    back and deletes the rows past it, while the agent ingests: the agent's next batch over
    that partition misses its compare-and-set, is dropped, and the partition is re-read from
    the new stored offset. Every record lands exactly once."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    traffic = fleet_traffic(30_000, seed=31)
    metrics_topic = STREAM_BY_NAME["metrics"].topic

    async with running_agent(bootstrap, database_url, prefix, batch_max_records=500) as agent:
        producing = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=12.0))

        async def metrics_partition_0_has_progress() -> bool:
            stored = await stored_offsets(database_url, prefix, prefix)
            return stored.get((metrics_topic, 0), 0) >= 2_000

        await until(metrics_partition_0_has_progress, within=60, what="metrics p0 ingesting")
        assert not producing.done(), "records must still arrive after the move"
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            async with conn.transaction():
                stored = await conn.fetchval(
                    "SELECT next_offset FROM ingest_offsets WHERE group_id = $1 AND topic = $2 "
                    "AND partition = 0 FOR UPDATE",
                    prefix,
                    prefix + metrics_topic,
                )
                back = stored // 2
                await conn.execute(
                    "DELETE FROM performance_metrics WHERE src_partition = 0 AND src_offset >= $1",
                    back,
                )
                await conn.execute(
                    "UPDATE ingest_offsets SET next_offset = $3 WHERE group_id = $1 "
                    "AND topic = $2 AND partition = 0",
                    prefix,
                    prefix + metrics_topic,
                    back,
                )
        finally:
            await conn.close()
        sent = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=180)
        assert agent.metrics.total("pipeline_fenced_batches_total") == 1
        consumed = agent.metrics.total("pipeline_records_consumed_total")
        ingested = agent.metrics.total("pipeline_rows_ingested_total")

    # The records between the new stored offset and the old one were read twice (once before
    # the move, once after): consumed counts both reads, ingested counts every row written.
    assert ingested == len(sent) + (stored - back)
    assert consumed >= len(sent) + (stored - back)


async def test_a_stream_switched_off_under_load_waits_in_kafka_and_lands_once_switched_on(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    traffic = fleet_traffic(40_000, seed=32)

    async with running_agent(bootstrap, database_url, prefix, batch_max_records=1000) as agent:
        producing = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=10.0))

        async def some_events_landed() -> bool:
            return await count_rows(database_url, "system_events") > 500

        await until(some_events_landed, within=60, what="events ingesting")
        await agent.deactivate(["events"])
        # From here on no event row may land: the stored offsets and the table stay put.
        frozen = of_stream(await stored_offsets(database_url, prefix, prefix), "events")
        frozen_rows = await count_rows(database_url, "system_events")
        assert agent.metrics.total("pipeline_stream_active") == 4
        others_then = await stored_offsets(database_url, prefix, prefix)

        async def others_moved_on_and_events_wait() -> bool:
            ends = of_stream(await end_offsets(bootstrap, prefix), "events")
            stored = await stored_offsets(database_url, prefix, prefix)
            moved = sum(o - others_then.get(tp, 0) for tp, o in stored.items() if tp not in ends)
            return moved > 5_000 and sum(ends.values()) - sum(frozen.values()) > 2_000

        await until(others_moved_on_and_events_wait, within=60, what="others ingest, events wait")
        assert of_stream(await stored_offsets(database_url, prefix, prefix), "events") == frozen
        assert await count_rows(database_url, "system_events") == frozen_rows

        await agent.activate(["events"])
        assert agent.metrics.total("pipeline_stream_active") == 5
        sent = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=180)

    events = sum(1 for s in sent if s.topic == STREAM_BY_NAME["events"].topic)
    assert await count_rows(database_url, "system_events") == events


async def test_a_stream_stopped_on_a_schema_error_resumes_once_fixed_with_no_restart(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    analytics = STREAM_BY_NAME["analytics"].topic

    async with running_agent(bootstrap, database_url, prefix) as agent:
        # A bad deploy under the running agent (at start it would refuse the table and exit).
        await until(lambda: claimed(database_url, prefix), within=60, what="the agent started")
        await migrated(database_url, "ALTER TABLE user_analytics DROP COLUMN properties")
        sent = await produce(bootstrap, prefix, fleet_traffic(6000, seed=33))

        async def others_caught_up() -> bool:
            ends = await end_offsets(bootstrap, prefix)
            stored = await stored_offsets(database_url, prefix, prefix)
            return all(stored.get(tp) == end for tp, end in ends.items() if tp[0] != analytics)

        await until(others_caught_up, within=120, what="the other streams catch up")
        assert agent.metrics.total("pipeline_stream_stopped") == 1
        assert agent.ownership.failure("analytics") == "SchemaError (SQLSTATE 42703)"
        assert "properties" in agent.last_error
        assert await count_rows(database_url, "user_analytics") == 0

        # `pipeline migrate` puts the column back: the catalog declares it, with a default.
        await migrated(database_url)
        await agent.activate(["analytics"])
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        assert agent.metrics.total("pipeline_stream_stopped") == 0
        assert agent.metrics.total("pipeline_stream_active") == 5

    expected = sum(1 for s in sent if s.topic == analytics)
    assert expected > 0
    assert await count_rows(database_url, APPEND_TABLE["analytics"]) == expected


async def test_work_in_the_ingest_transaction_commits_with_it_and_its_failure_stays_its_own(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)

    async with running_agent(bootstrap, database_url, prefix) as agent:
        # Idle (nothing to ingest): the work runs in a transaction of its own, promptly.
        async def record(conn: asyncpg.Connection) -> int:
            row_id: int = await conn.fetchval(
                "INSERT INTO control_log (direction, kind, target, outcome) "
                "VALUES ('command', 'test', $1, 'applied') RETURNING id",
                prefix,
            )
            return row_id

        row_id = await asyncio.wait_for(agent.in_ingest_transaction(record), 10)
        assert await count_rows(database_url, "control_log") == 1

        # With traffic: the work rides a batch; a failing work rolls back alone.
        producing = asyncio.create_task(produce(bootstrap, prefix, fleet_traffic(5000, seed=34)))

        async def broken(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO control_log (direction, kind, target, outcome) "
                "VALUES ('command', 'broken', $1, 'applied')",
                prefix,
            )
            await conn.execute("SELECT 1 / 0")

        with pytest.raises(asyncpg.DivisionByZeroError):
            await asyncio.wait_for(agent.in_ingest_transaction(broken), 30)
        second = await asyncio.wait_for(agent.in_ingest_transaction(record), 30)
        sent = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        kinds = await conn.fetch("SELECT id, kind FROM control_log ORDER BY id")
    finally:
        await conn.close()
    assert [(r["id"], r["kind"]) for r in kinds] == [(row_id, "test"), (second, "test")]

    with pytest.raises(UnknownStreamError):
        await agent.activate(["nope"])


async def test_a_permission_error_while_positioning_ends_the_agent_with_a_clear_message(
    servers: Servers, database_url: str, unique: str
) -> None:
    """Not retried forever: retrying cannot grant a privilege."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    role = f"{unique}_ro"
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' IN ROLE pipeline_reader")
        await conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    finally:
        await conn.close()
    base, _, rest = database_url.partition("://")
    hostpart = rest.split("@", 1)[-1]
    reader_url = f"{base}://{role}:pw@{hostpart}"
    try:
        # A reader may not even claim its streams' tables: it says so at start.
        agent = DatabaseAgent(load_config(agent_env(bootstrap, reader_url, prefix, prefix)))
        with pytest.raises(FatalError) as failure:
            await asyncio.wait_for(agent.run(), 60)
        assert str(failure.value) == (
            "claiming the tables of its streams (table_owners) failed, and retrying cannot fix "
            "it: 42501 permission denied for table table_owners"
        )
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            await conn.execute(f"GRANT INSERT ON table_owners TO {role}")
        finally:
            await conn.close()
        # With that right, positioning is the first thing it may not do.
        agent = DatabaseAgent(load_config(agent_env(bootstrap, reader_url, prefix, prefix)))
        with pytest.raises(FatalError) as failure:
            await asyncio.wait_for(agent.run(), 60)
        message = str(failure.value)
        assert message.startswith("positioning partitions at their stored offsets failed")
        assert "permission denied for table ingest_offsets" in message
        assert "pw" not in message
        assert agent.metrics.total("pipeline_retries_total") == 0
    finally:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
        finally:
            await conn.close()


async def test_batch_limits_lowered_while_a_batch_fills_take_effect_without_a_crash(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(database_url)
    traffic = fleet_traffic(3000, seed=35)
    settings = {"batch_max_records": 20_000, "batch_max_wait_ms": 60_000}

    async with running_agent(bootstrap, database_url, prefix, **settings) as agent:
        sent = await produce(bootstrap, prefix, traffic[:500])

        async def filling() -> bool:
            return agent._fetcher.batch.count == 500  # a batch far from due: it waits a minute

        await until(filling, within=60, what="500 records in the batch being filled")
        # Below what that batch holds already: it is written as it is, once the fetch under
        # way returns (limits apply from the next fetch on): one more record returns it.
        agent.set_limits(Limits(max_records=50, max_bytes=1 << 20, max_wait_s=0.05))
        with pytest.raises(ValueError, match="above zero"):
            agent.set_limits(Limits(max_records=0, max_bytes=1 << 20, max_wait_s=0.05))
        sent += await produce(bootstrap, prefix, traffic[500:501])

        async def first_batch_committed() -> bool:
            stored = await stored_offsets(database_url, prefix, prefix)
            return sum(stored.values()) == 501

        await until(first_batch_committed, within=30, what="the batch of 501 committed")
        sent += await produce(bootstrap, prefix, traffic[501:])
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=50)
        batches = agent.metrics.total("pipeline_batches_total")
        small = sum(
            s.value
            for m in agent.metrics.registry.collect()
            for s in m.samples
            if s.name == "pipeline_batch_records_bucket" and s.labels["le"] == "100.0"
        )

    # One batch of 501, then batches of 50 at most: 2,499 records take 50 or more.
    assert batches >= 1 + 2499 / 50
    assert small == batches - 1


async def test_work_that_swallows_its_own_database_error_rolls_back_alone(
    servers: Servers, database_url: str, unique: str
) -> None:
    """Work that catches a database error leaves the transaction aborted: its savepoint is
    rolled back, its caller gets the error, and the batch and other work still commit."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)

    async def swallowing(conn: asyncpg.Connection) -> str:
        await conn.execute(
            "INSERT INTO control_log (direction, kind, target, outcome) "
            "VALUES ('command', 'swallowed', 'x', 'applied')"
        )
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1 / 0")  # the transaction is aborted all the same
        return "looks fine"

    async def good(conn: asyncpg.Connection) -> int:
        row_id: int = await conn.fetchval(
            "INSERT INTO control_log (direction, kind, target, outcome) "
            "VALUES ('command', 'good', 'x', 'applied') RETURNING id"
        )
        return row_id

    async with running_agent(bootstrap, database_url, prefix) as agent:
        producing = asyncio.create_task(produce(bootstrap, prefix, fleet_traffic(5000, seed=36)))
        results = await asyncio.wait_for(
            asyncio.gather(
                agent.in_ingest_transaction(swallowing),
                agent.in_ingest_transaction(good),
                return_exceptions=True,
            ),
            30,
        )
        sent = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)

    failed, row_id = results
    assert isinstance(failed, asyncpg.InFailedSQLTransactionError)
    assert isinstance(row_id, int)
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        kinds = await conn.fetch("SELECT id, kind FROM control_log ORDER BY id")
    finally:
        await conn.close()
    assert [(r["id"], r["kind"]) for r in kinds] == [(row_id, "good")]
    with pytest.raises(PipelineError, match="has stopped"):
        await agent.in_ingest_transaction(good)
