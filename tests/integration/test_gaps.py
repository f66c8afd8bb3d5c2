"""Gaps against the real broker and database: records retention deleted before the group
ingested them (``delete_records``, what retention does, at a known offset) are recorded,
counted and logged by exactly their offsets, or stop the stream until it is activated; Kafka
transactions' aborted records and markers are never taken for one. docs/exactly-once.md, "A
stored offset below the log start"."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition
from aiokafka.admin.records_to_delete import RecordsToDelete

from consumers.agent import DatabaseAgent
from consumers.controller import Controller, run_controlled
from pipeline import kafka_clients
from pipeline.commands.gaps import unacknowledged
from pipeline.config import load_config
from pipeline.control import (
    generate_key_pair,
    read_verifier,
    write_private_key_file,
    write_public_key_file,
)
from pipeline.records import topic_name
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    Outgoing,
    Sent,
    agent_env,
    assert_caught_up_exactly_once,
    assert_exactly_once,
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

pytestmark = pytest.mark.timeout(600)

METRICS = STREAM_BY_NAME["metrics"]
LOST = 700  # records deleted past partition 0's stored offset


def _metrics(count: int, seed: int) -> list[Outgoing]:
    return [o for o in fleet_traffic(count * 4, seed=seed) if o.stream is METRICS][:count]


async def _delete_before(bootstrap: str, topic: str, partition: int, offset: int) -> None:
    """What retention does: the log of ``topic[partition]`` starts at ``offset`` from now on."""
    admin = kafka_clients.admin(kafka_clients.kafka_settings(bootstrap))
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, partition): RecordsToDelete(offset)})
    finally:
        await admin.close()


async def _gap_rows(database_url: str) -> list[dict[str, object]]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT group_id, topic, partition, first_offset, end_offset, action, "
            "skipped_at IS NOT NULL AS skipped, acknowledged_at FROM ingest_gaps ORDER BY id"
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


def _lost_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "records LOST" in r.getMessage()]


def _lost_metric(agent: DatabaseAgent) -> dict[tuple[str, str], float]:
    return {
        (s.labels["stream"], s.labels["partition"]): s.value
        for metric in agent.metrics.registry.collect()
        for s in metric.samples
        if s.name == "pipeline_records_lost_total"
    }


async def _ingested_then_truncated(
    bootstrap: str, database_url: str, prefix: str
) -> tuple[list[Sent], int, int]:
    """An agent ingests a first lot and stops; a second lot is sent and retention deletes the
    first ``LOST`` records of it from partition 0. Returns what was sent, and partition 0's
    stored offset and new log start."""
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(database_url)
    sent = await produce(bootstrap, prefix, _metrics(1_000, seed=61))
    async with running_agent(bootstrap, database_url, prefix):
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
    stored = (await stored_offsets(database_url, prefix, prefix))[(METRICS.topic, 0)]
    sent += await produce(bootstrap, prefix, _metrics(3_000, seed=62))
    assert sum(1 for s in sent if s.partition == 0 and s.offset >= stored) > LOST + 100
    await _delete_before(bootstrap, topic_name(METRICS.topic, prefix), 0, stored + LOST)
    return sent, stored, stored + LOST


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _pipeline(env: dict[str, str], *args: str) -> str:
    done = _run(env, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _kept(sent: Sequence[Sent], first: int, end: int) -> list[Sent]:
    return [s for s in sent if not (s.partition == 0 and first <= s.offset < end)]


async def test_a_gap_is_recorded_counted_and_logged_and_the_rest_ingested_exactly_once(
    servers: Servers, database_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    topic = topic_name(METRICS.topic, prefix)
    sent, first, end = await _ingested_then_truncated(bootstrap, database_url, prefix)
    caplog.set_level(logging.INFO, logger="consumers.agent")
    caplog.clear()

    async with running_agent(bootstrap, database_url, prefix) as agent:  # PIPELINE_ON_GAP=record
        ends = await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
        await assert_exactly_once(database_url, prefix, prefix, _kept(sent, first, end), ends)
        assert _lost_metric(agent) == {("metrics", "0"): LOST}

    assert await _gap_rows(database_url) == [
        {
            "group_id": prefix,
            "topic": topic,
            "partition": 0,
            "first_offset": first,
            "end_offset": end,
            "action": "skipped",
            "skipped": True,
            "acknowledged_at": None,
        }
    ]
    assert _lost_lines(caplog) == [
        f"records LOST: {topic}[0]: offsets {first}-{end - 1} ({LOST} records) were deleted by "
        f"retention before they were ingested; the log starts at {end}. Recorded in "
        "ingest_gaps; stream metrics goes on from the log start (PIPELINE_ON_GAP=record)"
    ]

    # What the operator sees, as the agents' login: the gap listed, unacknowledged (status and
    # top), acknowledged once.
    env = agent_env(bootstrap, database_url, prefix, prefix)
    config = load_config(env)
    assert await unacknowledged(config) == {"metrics": LOST}
    listed = json.loads(_pipeline(env, "gaps", "list", "--json"))
    (gap,) = listed["gaps"]
    assert listed["group"] == prefix
    assert {k: gap[k] for k in ("topic", "partition", "first_offset", "end_offset", "lost")} == {
        "topic": topic,
        "partition": 0,
        "first_offset": first,
        "end_offset": end,
        "lost": LOST,
    }
    assert (gap["action"], gap["acknowledged_at"], gap["acknowledged_by"]) == (
        "skipped",
        None,
        None,
    )
    assert _pipeline(env, "gaps", "list").endswith(
        f"{topic}[0] offsets {first}-{end - 1} ({LOST} records lost), skipped, by "
        f"{gap['instance_id']}; NOT acknowledged\n"
    )
    assert _pipeline(env, "gaps", "ack", "--id", str(gap["id"]), "--by", "ann") == (
        f"acknowledged 1 gap(s) of group {prefix}: {gap['id']}\n"
    )
    again = _run(env, "gaps", "ack", "--id", str(gap["id"]))
    assert (again.returncode, again.stderr) == (
        2,
        f"pipeline: error: group {prefix}: no unacknowledged gap {gap['id']}\n",
    )
    assert (
        _pipeline(env, "gaps", "list", "--unacknowledged") == f"group {prefix}: no gap recorded\n"
    )
    assert await unacknowledged(config) == {}
    (acknowledged,) = json.loads(_pipeline(env, "gaps", "list", "--json"))["gaps"]
    assert acknowledged["acknowledged_by"] == "ann"


async def test_an_out_of_range_reset_while_running_is_a_gap_too(
    servers: Servers, database_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream is switched off while records arrive and retention deletes some past its
    stored offset: switched on, the consumer's position is out of range and reset to the log
    start. That is found and recorded as the gap it is, not ingested as if nothing happened."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    topic = topic_name(METRICS.topic, prefix)
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(database_url)
    caplog.set_level(logging.INFO, logger="consumers.agent")
    async with running_agent(bootstrap, database_url, prefix) as agent:
        sent = await produce(bootstrap, prefix, _metrics(1_000, seed=63))
        await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
        await agent.deactivate(["metrics"])
        first = (await stored_offsets(database_url, prefix, prefix))[(METRICS.topic, 0)]
        sent += await produce(bootstrap, prefix, _metrics(3_000, seed=64))
        await _delete_before(bootstrap, topic, 0, first + LOST)
        await agent.activate(["metrics"])
        ends = await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
        await assert_exactly_once(
            database_url, prefix, prefix, _kept(sent, first, first + LOST), ends
        )
        assert _lost_metric(agent) == {("metrics", "0"): LOST}
    rows = await _gap_rows(database_url)
    assert [(r["partition"], r["first_offset"], r["end_offset"], r["action"]) for r in rows] == [
        (0, first, first + LOST, "skipped")
    ]
    assert len(_lost_lines(caplog)) == 1
    env = agent_env(bootstrap, database_url, prefix, prefix)
    (gap,) = json.loads(_pipeline(env, "gaps", "list", "--unacknowledged", "--json"))["gaps"]
    assert _pipeline(env, "gaps", "ack", "--all", "--by", "ops") == (
        f"acknowledged 1 gap(s) of group {prefix}: {gap['id']}\n"
    )
    assert _pipeline(env, "gaps", "ack", "--all") == f"acknowledged 0 gap(s) of group {prefix}\n"


async def test_with_stop_the_stream_stops_saying_why_and_activate_goes_on_from_the_log_start(
    servers: Servers,
    database_url: str,
    unique: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    topic = topic_name(METRICS.topic, prefix)
    sent, first, end = await _ingested_then_truncated(bootstrap, database_url, prefix)
    caplog.set_level(logging.INFO, logger="consumers.agent")
    caplog.clear()
    private, public = generate_key_pair()
    write_private_key_file(tmp_path / "antigravity.key", private)
    write_public_key_file(tmp_path / "antigravity.pub", public)
    env = agent_env(
        bootstrap,
        database_url,
        prefix,
        prefix,
        on_gap="stop",
        control_public_keys=tmp_path / "antigravity.pub",
    )
    # A DatabaseAgent steered by its controller, in this process (its metrics readable).
    agent = DatabaseAgent(load_config(env))
    controller = Controller(agent, read_verifier([tmp_path / "antigravity.pub"]), heartbeat_s=1)
    running = asyncio.create_task(run_controlled(agent, controller))
    try:

        async def stopped() -> bool:
            return not agent.readiness().ready and "metrics" not in agent.snapshot().active_streams

        await until(stopped, within=60, what="the metrics stream stopped on its gap")
        assert agent.readiness().reason == "stream metrics stopped: RecordsLost"
        assert agent.last_error == (
            f"stream metrics stopped: {topic}[0]: offsets {first}-{end - 1} ({LOST} records) "
            f"were deleted by retention before they were ingested; the log starts at {end}"
        )
        rows = await _gap_rows(database_url)
        assert [(r["first_offset"], r["end_offset"], r["action"], r["skipped"]) for r in rows] == [
            (first, end, "stopped", False)
        ]
        assert (await stored_offsets(database_url, prefix, prefix))[(METRICS.topic, 0)] == first
        assert _lost_metric(agent) == {}
        (line,) = _lost_lines(caplog)
        assert "STOPPED (PIPELINE_ON_GAP=stop)" in line

        # The decision: `pipeline control activate`, signed, through the control topic.
        signing = {**env, "PIPELINE_CONTROL_PRIVATE_KEY_FILE": str(tmp_path / "antigravity.key")}
        activated = await asyncio.to_thread(
            _run, signing, "control", "activate", "--streams", "metrics"
        )
        assert activated.returncode == 0, activated.stdout + activated.stderr
        ends = await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
        await assert_exactly_once(database_url, prefix, prefix, _kept(sent, first, end), ends)
        assert _lost_metric(agent) == {("metrics", "0"): LOST}
        assert agent.readiness().ready
    finally:
        agent.stop()
        await asyncio.wait_for(running, 60)

    rows = await _gap_rows(database_url)
    assert [(r["first_offset"], r["end_offset"], r["action"], r["skipped"]) for r in rows] == [
        (first, end, "resumed", True)
    ]
    assert len(_lost_lines(caplog)) == 2
    assert "activated after it stopped" in _lost_lines(caplog)[1]


async def test_aborted_transactions_and_their_markers_are_no_gap(
    servers: Servers, database_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Transactions of 50 records, one in three aborted, sent while the agent ingests and
    after it restarts: the log has holes (markers, aborted records) at batch boundaries and
    under stored offsets, and nothing is lost."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    topic = topic_name(METRICS.topic, prefix)
    caplog.set_level(logging.DEBUG, logger="consumers.agent")
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    producer = kafka_clients.producer(
        kafka_clients.kafka_settings(bootstrap), transactional_id=f"{unique}-tx", linger_ms=0
    )
    await producer.start()
    committed: list[Sent] = []

    async def send(seed: int, transactions: int) -> None:
        """``transactions`` of 50 records each; the second of every three aborted."""
        outgoing = _metrics(50 * transactions, seed=seed)
        for n in range(transactions):
            chunk = outgoing[50 * n : 50 * (n + 1)]
            try:
                async with producer.transaction():
                    acks = [
                        await producer.send(topic, o.value, key=o.key, partition=0) for o in chunk
                    ]
                    landed = await asyncio.gather(*acks)
                    if n % 3 == 1:
                        raise _Abort
            except _Abort:
                continue
            committed.extend(Sent(METRICS.topic, m.partition, m.offset, None) for m in landed)

    async def ingested(within: float) -> dict[tuple[str, int], int]:
        """Wait for the stored offset to pass the last committed record (the log's end is
        past it: a transaction's marker is never delivered); the offsets to expect."""
        expected = {**await end_offsets(bootstrap, prefix)}
        expected[(METRICS.topic, 0)] = max(s.offset for s in committed) + 1

        async def done() -> bool:
            return await stored_offsets(database_url, prefix, prefix) == expected

        await until(done, within=within, what=f"stored offsets at {expected}")
        return expected

    try:
        async with running_agent(bootstrap, database_url, prefix, batch_max_records=40) as agent:
            await send(seed=65, transactions=12)
            await ingested(within=120)
            lost_first = agent.metrics.total("pipeline_records_lost_total")
        await send(seed=66, transactions=12)
        async with running_agent(bootstrap, database_url, prefix, batch_max_records=40) as agent:
            expected = await ingested(within=120)
            await assert_exactly_once(database_url, prefix, prefix, committed, expected)
            assert agent.metrics.total("pipeline_records_lost_total") == lost_first == 0
    finally:
        await producer.stop()
    assert len(committed) == 2 * 8 * 50
    ends = await end_offsets(bootstrap, prefix)
    assert ends[(METRICS.topic, 0)] == 2 * 12 * 51  # each transaction: 50 records, one marker
    assert await _gap_rows(database_url) == []
    # Batches did begin at such holes: each was checked, and none taken for a gap.
    holes = [r for r in caplog.records if r.getMessage().startswith("batch starts past")]
    assert holes
    assert not _lost_lines(caplog)


class _Abort(Exception):
    """Raised inside a producer transaction to abort it."""
