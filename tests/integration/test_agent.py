"""The DatabaseAgent against the real broker and database: one test per guarantee."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import uuid
from pathlib import Path

import asyncpg
import msgspec
import pytest
from aiokafka import TopicPartition

from pipeline import kafka as kafka_io
from pipeline import kafka_clients, testbed
from pipeline.catalog import load as load_catalog
from pipeline.devstack import kafka, postgres
from pipeline.devstack.processes import choose_port, stop_pid
from pipeline.records import (
    DLQ_TOPIC,
    MSGPACK,
    AgentEvent,
    ConfigChange,
    Metric,
    StateChange,
    encode,
    topic_name,
)
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    APPEND_TABLE,
    T0,
    AgentProcess,
    Outgoing,
    Sent,
    agent_env,
    assert_caught_up_exactly_once,
    assert_exactly_once,
    assert_latest_tables_follow_the_log,
    claimed,
    consumer_group,
    create_topics,
    end_offsets,
    fleet_traffic,
    kafka_committed,
    migrated,
    produce,
    produce_paced,
    running_agent,
    scrape,
    stored_offsets,
    until,
    wait_caught_up,
)

pytestmark = pytest.mark.timeout(600)


async def test_100k_records_across_five_streams_land_exactly_once(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    outgoing = fleet_traffic(100_000, seed=7)
    sent = await produce(bootstrap, prefix, outgoing)

    async with running_agent(bootstrap, database_url, prefix) as agent:
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
        consumed = agent.metrics.total("pipeline_records_consumed_total")
        ingested = agent.metrics.total("pipeline_rows_ingested_total")
        dead = agent.metrics.total("pipeline_dead_letters_total")
        duplicates = agent.metrics.total("pipeline_duplicates_skipped_total")

    assert consumed == len(sent) == 100_000
    assert (ingested, dead, duplicates) == (100_000, 0, 0)
    await _assert_contents(database_url, outgoing, sent)
    await assert_latest_tables_follow_the_log(database_url, outgoing)


async def _assert_contents(database_url: str, outgoing: list[Outgoing], sent: list[Sent]) -> None:
    """Rows hold exactly what was sent: a sample of every stream's rows, field by field."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rng = random.Random(3)
        samples = rng.sample(range(len(sent)), 300)
        for i in samples:
            out, where = outgoing[i], sent[i]
            record = msgspec.json.decode(out.value, type=out.stream.record_type)
            table = APPEND_TABLE[out.stream.name]
            row = await conn.fetchrow(
                f"SELECT * FROM {table} WHERE src_partition = $1 AND src_offset = $2",
                where.partition,
                where.offset,
            )
            assert row is not None
            for field in msgspec.structs.fields(record):
                expected = getattr(record, field.name)
                actual = row[field.name]
                if isinstance(actual, str) and field.name in (
                    "data",
                    "payload",
                    "labels",
                    "properties",
                    "value",
                ):
                    actual = msgspec.json.decode(actual)
                assert actual == expected, (table, field.name)
    finally:
        await conn.close()


async def test_bad_records_are_dead_lettered_with_reasons_and_good_ones_ingested(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    # A constraint the records cannot know about: the database rejects rows, not the decoder.
    await migrated(
        database_url, "ALTER TABLE performance_metrics ADD CONSTRAINT sane CHECK (value < 1e9)"
    )

    metrics, events, states, config = (
        STREAM_BY_NAME[n] for n in ("metrics", "events", "states", "config")
    )
    good = fleet_traffic(3000, seed=11)
    ts = T0.isoformat()
    poison = [
        Outgoing(metrics, b"a", b"{not json", "DecodeError"),
        Outgoing(metrics, b"a", b"\xff\xfe\x00garbage", "DecodeError"),
        Outgoing(
            events,
            b"a",
            b'{"agent_id": "a", "kind": "k", "ts": "' + ts.encode() + b'"}',
            "ValidationError",
        ),  # no event_id
        Outgoing(
            states,
            b"a",
            b'{"agent_id": "a", "state": "s", "version": "7", "ts": "' + ts.encode() + b'"}',
            "ValidationError",
        ),
        Outgoing(
            states,
            b"a",
            b'{"agent_id": "a", "state": "s", "version": -1, "ts": "' + ts.encode() + b'"}',
            "ValidationError",
        ),
        Outgoing(
            states,
            b"a",
            b'{"agent_id": "a", "state": "s", "version": 1, "ts": "'
            + ts.encode()
            + b'", "data": [1]}',
            "ValidationError",
        ),
        Outgoing(
            config,
            b"k",
            b'{"key": "k", "value": 1, "version": 1, "ts": "2026-11-01T00:00:00"}',
            "ValidationError",
        ),  # no offset
        Outgoing(
            metrics,
            b"a",
            encode(Metric("a", "cpu", 1.0, T0)),
            "UnsupportedContentType",
            (("content-type", b"text/csv"),),
        ),
        Outgoing(metrics, b"a", encode(Metric("a", "cpu", 5e12, T0)), "DatabaseRejected"),  # CHECK
        # NUL, which text and jsonb cannot hold: refused by the decoder, before the database.
        Outgoing(metrics, b"a", encode(Metric("a", "cpu\x00", 1.0, T0)), "ValidationError"),
        Outgoing(
            events,
            b"a",
            encode(AgentEvent(uuid.uuid4(), "a", "k", T0, payload={"s": "\x00"})),
            "ValidationError",
        ),
        # Just under the producer's 1 MiB limit, too big for the DLQ topic's (Kafka's default)
        # once wrapped: the topic gets an empty value and the size, dead_letters the whole
        # value.
        Outgoing(metrics, b"big", b"{" + b"x" * 1_048_399, "DecodeError"),
        # Headers jsonb cannot hold as they are: a NUL byte in a value and in a name, a null.
        Outgoing(
            metrics,
            b"h",
            b"[]",
            "ValidationError",
            (("trace", b"a\x00b"), ("none", None), ("nul\x00name", b"v")),
        ),
        Outgoing(
            states,
            b"x",
            msgspec.msgpack.encode(
                {
                    "agent_id": "x",
                    "state": "s",
                    "version": 1,
                    "ts": ts,
                    "data": msgspec.msgpack.Ext(1, b""),
                }
            ),
            "ValidationError",
            (("content-type", MSGPACK.encode()),),
        ),
    ]
    also_good = [
        Outgoing(
            states,
            b"m",
            encode(StateChange("m", "busy", 3, T0, {"via": "msgpack"}), MSGPACK),
            None,
            (("content-type", MSGPACK.encode()),),
        ),
        Outgoing(
            config,
            b"m",
            encode(ConfigChange("m", [1, 2], 1, T0), MSGPACK),
            None,
            (("content-type", MSGPACK.encode()),),
        ),
    ]
    traffic = good[:1000] + poison[:6] + good[1000:2000] + poison[6:] + also_good + good[2000:]
    sent = await produce(bootstrap, prefix, traffic)

    async with running_agent(bootstrap, database_url, prefix, batch_max_records=500) as agent:
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        assert agent.metrics.total("pipeline_dead_letters_total") == len(poison)

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        letters = await conn.fetch(
            "SELECT src_topic, src_partition, src_offset, error_class, reason, record_value, "
            "record_headers FROM dead_letters"
        )
        assert (
            await conn.fetchval("SELECT data FROM agent_state_history WHERE agent_id = 'm'")
            == '{"via": "msgpack"}'
        )
        assert await conn.fetchval("SELECT value FROM system_config WHERE key = 'm'") == "[1, 2]"
    finally:
        await conn.close()
    by_coordinates = {
        (r["src_topic"].removeprefix(prefix), r["src_partition"], r["src_offset"]): r
        for r in letters
    }
    for out, where in zip(traffic, sent, strict=True):
        if out.poison is None:
            continue
        letter = by_coordinates[(where.topic, where.partition, where.offset)]
        assert letter["error_class"] == out.poison, letter["reason"]
        assert letter["record_value"] == out.value
        assert letter["reason"]
        if out.key == b"h":  # NUL is written as the four characters \x00
            assert json.loads(letter["record_headers"]) == [
                ["trace", "a\\x00b"],
                ["none", None],
                ["nul\\x00name", "v"],
            ]

    # The DLQ topic holds the same records, each with its source coordinates and reason.
    dlq = kafka_clients.consumer(
        kafka_clients.kafka_settings(bootstrap),
        topic_name(DLQ_TOPIC, prefix),
        auto_offset_reset="earliest",
    )
    await dlq.start()
    try:
        received = []
        while len(received) < len(poison):
            batches = await dlq.getmany(timeout_ms=10_000)
            assert batches, f"only {len(received)} dead letters on the DLQ topic"
            received += [r for records in batches.values() for r in records]
    finally:
        await kafka_io.stop_consumer(dlq)
    on_topic = {
        (
            dict(r.headers)["dlq.source.topic"].decode().removeprefix(prefix),
            int(dict(r.headers)["dlq.source.partition"]),
            int(dict(r.headers)["dlq.source.offset"]),
        ): dict(r.headers)["dlq.error.class"].decode()
        for r in received
    }
    assert on_topic == {k: v["error_class"] for k, v in by_coordinates.items()}
    (big,) = [r for r in received if "dlq.value.omitted.bytes" in dict(r.headers)]
    assert (big.value, dict(big.headers)["dlq.value.omitted.bytes"]) == (b"", b"1048400")


@pytest.mark.parametrize("seed", [1, 2])
async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    servers: Servers, database_url: str, unique: str, tmp_path: Path, seed: int
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    rng = random.Random(seed)
    traffic = fleet_traffic(60_000, seed=seed)
    poison = Outgoing(STREAM_BY_NAME["metrics"], b"p", b"{broken", "DecodeError")
    traffic[rng.randrange(len(traffic))] = poison
    env = agent_env(
        bootstrap, database_url, prefix, prefix, batch_max_records=500, session_timeout_ms=6000
    )
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        # Records keep arriving for the whole kill window, so every kill lands mid-stream.
        sending = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=12.0))
        for _ in range(4):
            await asyncio.sleep(rng.uniform(1.0, 2.5))
            assert agent.alive(), (tmp_path / "agent.log").read_text()[-3000:]
            agent.kill()
            agent.start()
        assert not sending.done(), "the kills must land while records are still arriving"
        sent = await sending
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
        assert agent.stop() == 0
    finally:
        agent.kill()


async def test_three_agents_with_rolling_restarts_and_a_hard_kill(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=6)
    traffic = fleet_traffic(60_000, seed=5)
    sent = await produce(bootstrap, prefix, traffic[:20_000])
    env = agent_env(
        bootstrap, database_url, prefix, prefix, batch_max_records=700, session_timeout_ms=6000
    )
    agents = [AgentProcess(env, tmp_path / f"agent-{i}.log") for i in range(3)]
    try:
        more = asyncio.create_task(produce(bootstrap, prefix, traffic[20_000:]))
        for joined, agent in enumerate(agents, 1):  # join one by one: two rebalances
            agent.start()
            await until_members(bootstrap, prefix, joined)
        for agent in agents[:2]:  # rolling restart
            assert agent.stop() == 0
            agent.start()
            await until_members(bootstrap, prefix, 3)
        agents[2].kill()  # and one hard kill, restarted
        agents[2].start()
        sent += await more
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
        for agent in agents:
            assert agent.stop() == 0
    finally:
        for agent in agents:
            agent.kill()


async def until_members(bootstrap: str, group: str, count: int) -> None:
    async def joined() -> bool:
        state, members = await consumer_group(bootstrap, group)
        return (state, len(members)) == ("Stable", count)

    await until(joined, within=90, what=f"group {group} stable with {count} members")


async def until_ingesting(database_url: str, group: str) -> None:
    """Until the group has stored an offset: the agent is past its start-up, mid-stream."""

    async def ingesting() -> bool:
        return bool(await stored_offsets(database_url, group, group))

    await until(ingesting, within=60, what=f"group {group} storing its first offsets")


@pytest.mark.exclusive  # stops the shared PostgreSQL
@pytest.mark.timeout(900)  # with the wait for the tests holding the servers
async def test_postgres_restart_during_ingestion_needs_no_agent_restart(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    if servers.stack is None:
        pytest.fail("restarting PostgreSQL needs the local stack; unset the endpoint variables")
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    traffic = fleet_traffic(60_000, seed=9)
    metrics_address = f"127.0.0.1:{choose_port(0)}"
    env = agent_env(
        bootstrap,
        database_url,
        prefix,
        prefix,
        batch_max_records=700,
        metrics_address=metrics_address,
    )
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        sending = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=10.0))
        await until_ingesting(database_url, prefix)
        pg_pid = postgres.pidfile(servers.stack.home / "postgres").live_pid()
        assert pg_pid is not None
        await asyncio.to_thread(stop_pid, pg_pid, signal.SIGINT, 60.0)  # fast shutdown
        await asyncio.sleep(3.0)  # the agent meets a dead server for a while
        assert not sending.done(), "the traffic must still be flowing when the database is back"
        await asyncio.to_thread(servers.stack.up, lambda _: None)
        sent = await sending
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
        assert agent.alive(), "the agent must ride out the restart on its own"
        if testbed.pooler_mode() is None:
            # Behind PgBouncer (PIPELINE_TEST_POOLER) the agent meets the restart only when
            # it lands inside a transaction: between them, the pooler holds its queries.
            assert scrape(metrics_address, "pipeline_retries_total") >= 1
        assert agent.stop() == 0
    finally:
        agent.kill()


async def test_group_offsets_reset_to_earliest_in_kafka_change_nothing(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    sent = await produce(bootstrap, prefix, fleet_traffic(20_000, seed=4))
    env = agent_env(bootstrap, database_url, prefix, prefix)
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        ends = await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
        assert agent.stop() == 0
        before = await _table_fingerprint(database_url)

        # What an operator does with kafka-consumer-groups --reset-offsets --to-earliest.
        resetter = kafka_clients.consumer(
            kafka_clients.kafka_settings(bootstrap), group_id=prefix, enable_auto_commit=False
        )
        await resetter.start()
        try:
            partitions = [TopicPartition(prefix + t, p) for (t, p) in ends]
            resetter.assign(partitions)
            await resetter.commit(dict.fromkeys(partitions, 0))
        finally:
            await resetter.stop()
        assert await kafka_committed(bootstrap, prefix, prefix) == dict.fromkeys(ends, 0)

        agent.start()
        # A marker after the end of every partition: once the agent has stored the markers'
        # offsets it has read every partition past all that came before, so whatever it were
        # to ingest again is in the database by then. Undecodable, the markers are dead
        # letters and leave the data tables alone.
        markers = [
            Outgoing(stream, f"marker-{i}".encode(), b"{broken", "DecodeError")
            for stream in STREAM_BY_NAME.values()
            for i in range(30)
        ]
        marked = await produce(bootstrap, prefix, markers)
        assert {(m.topic, m.partition) for m in marked} == set(ends)
        ends = await wait_caught_up(database_url, bootstrap, prefix, prefix, within=60)
        assert await _table_fingerprint(database_url) == before
        await assert_exactly_once(database_url, prefix, prefix, sent + marked, ends)
        assert agent.stop() == 0
    finally:
        agent.kill()


async def _table_fingerprint(database_url: str) -> dict[str, tuple[int, str]]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        found = {}
        for table in load_catalog().data_tables:
            found[table] = tuple(
                await conn.fetchrow(
                    "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) "
                    f"FROM {table} t"
                )
            )
        return found
    finally:
        await conn.close()


async def test_a_broken_table_stops_only_its_stream_and_dead_letters_nothing(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    analytics = STREAM_BY_NAME["analytics"].topic

    async with running_agent(bootstrap, database_url, prefix) as agent:
        # Broken once the agent has started: at start it would refuse the table and exit
        # (db.check_catalog); what a table broken under a running agent does is the test.
        await until(lambda: claimed(database_url, prefix), within=60, what="the agent started")
        await migrated(database_url, "ALTER TABLE user_analytics DROP COLUMN properties")
        sent = await produce(bootstrap, prefix, fleet_traffic(5000, seed=12))
        ends = await wait_caught_up_except(database_url, bootstrap, prefix, analytics)
        assert agent.metrics.total("pipeline_stream_stopped") == 1

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        assert await conn.fetchval("SELECT count(*) FROM user_analytics") == 0
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        for table in ("performance_metrics", "system_events", "agent_state_history"):
            stream = next(s for s, t in APPEND_TABLE.items() if t == table)
            expected = sum(1 for s in sent if s.topic == STREAM_BY_NAME[stream].topic)
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == expected
        stored = await conn.fetch(
            "SELECT next_offset FROM ingest_offsets WHERE topic = $1", prefix + analytics
        )
    finally:
        await conn.close()
    assert [r["next_offset"] for r in stored] == [0, 0]  # its records wait in Kafka
    assert sum(end for (topic, _), end in ends.items() if topic == analytics) > 0


async def wait_caught_up_except(
    database_url: str, bootstrap: str, prefix: str, stopped_topic: str
) -> dict[tuple[str, int], int]:
    ends = await end_offsets(bootstrap, prefix)
    for _ in range(240):
        stored = await stored_offsets(database_url, prefix, prefix)
        if all(stored.get(tp) == end for tp, end in ends.items() if tp[0] != stopped_topic):
            return ends
        await asyncio.sleep(0.5)
    raise AssertionError("the streams that are not stopped did not catch up")


async def test_sigterm_mid_batch_commits_and_leaves_the_group_within_the_deadline(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    traffic = fleet_traffic(40_000, seed=13)
    sent = await produce(bootstrap, prefix, traffic[:20_000])
    metrics_address = f"127.0.0.1:{choose_port(0)}"
    env = agent_env(
        bootstrap, database_url, prefix, prefix, batch_max_records=700, shutdown_timeout_s=10
    )
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        await until_ingesting(database_url, prefix)
        started = asyncio.get_running_loop().time()
        assert agent.stop(within=15) == 0
        assert asyncio.get_running_loop().time() - started < 10
        # It left the group itself: no member lingers until a session timeout.
        assert await consumer_group(bootstrap, prefix) == ("Empty", [])

        # What it committed is not delivered again: the next agent skips nothing.
        sent += await produce(bootstrap, prefix, traffic[20_000:])
        env["PIPELINE_METRICS_ADDRESS"] = metrics_address
        agent = AgentProcess(env, tmp_path / "agent2.log").start()
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        assert scrape(metrics_address, "pipeline_duplicates_skipped_total") == 0
        assert agent.stop() == 0
    finally:
        agent.kill()


@pytest.mark.exclusive  # stops the shared Kafka broker
@pytest.mark.timeout(900)  # with the wait for the tests holding the servers
async def test_broker_restart_during_ingestion_needs_no_agent_restart(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    if servers.stack is None:
        pytest.fail("restarting Kafka needs the local stack; unset the endpoint variables")
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    first, second = fleet_traffic(40_000, seed=21)[:20_000], fleet_traffic(40_000, seed=21)[20_000:]
    sent = await produce(bootstrap, prefix, first)
    env = agent_env(bootstrap, database_url, prefix, prefix, batch_max_records=700)
    agent = AgentProcess(env, tmp_path / "agent.log").start()

    try:
        # Past its start-up, which fails fast without a broker.
        await until_ingesting(database_url, prefix)
        broker = kafka.pidfile(servers.stack.home / "kafka").live_pid()
        assert broker is not None
        await asyncio.to_thread(stop_pid, broker, signal.SIGTERM, 60.0)
        await asyncio.sleep(3.0)  # the agent meets an absent broker for a while
        assert agent.alive()
        await asyncio.to_thread(servers.stack.up, lambda _: None)  # same data dir, same port
        sent += await produce(bootstrap, prefix, second)
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
        assert agent.alive(), "the agent must ride out the broker restart on its own"
        assert agent.stop() == 0
    finally:
        agent.kill()
