"""The control plane against the real broker and database: Antigravity's signed commands
steer DatabaseAgents (processes, or in this process where their metrics are read), which
decide each command once per group and acknowledge on the status topic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest
from aiokafka import TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.agent import DatabaseAgent
from consumers.antigravity import Antigravity, Delivery
from consumers.controller import Controller, run_controlled
from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.catalog import load as load_catalog
from pipeline.config import load_config
from pipeline.control import (
    SIGNING_CONTEXT,
    Ack,
    Activate,
    Assign,
    BatchLimits,
    Checkpoint,
    Deactivate,
    Heartbeat,
    RollbackCheckpoint,
    RollbackVersion,
    control_topics,
    decode_status,
    encode_envelope,
    generate_key_pair,
    key_id,
    read_verifier,
    sign,
    write_private_key_file,
    write_public_key_file,
)
from pipeline.testbed import AgentProcess, stop_agents
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    APPEND_TABLE,
    Sent,
    agent_env,
    assert_caught_up_exactly_once,
    assert_latest_tables_follow_the_log,
    count_rows,
    create_topics,
    end_offsets,
    fleet_traffic,
    migrated,
    of_stream,
    produce_paced,
    stored_offsets,
    until,
)

ALL_STREAMS = load_catalog().names  # the built-in streams, in catalog order

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Keys:
    private: Ed25519PrivateKey
    private_path: Path
    public_path: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    private, public = generate_key_pair()
    write_private_key_file(tmp_path / "antigravity.key", private)
    write_public_key_file(tmp_path / "antigravity.pub", public)
    return Keys(private, tmp_path / "antigravity.key", tmp_path / "antigravity.pub")


def orchestrator(bootstrap: str, prefix: str, keys: Keys) -> Antigravity:
    return Antigravity(
        kafka_clients.kafka_settings(bootstrap), prefix=prefix, private_key=keys.private
    )


def controlled_env(
    bootstrap: str, database_url: str, prefix: str, keys: Keys, **settings: object
) -> dict[str, str]:
    return agent_env(
        bootstrap, database_url, prefix, prefix, control_public_keys=keys.public_path, **settings
    )


@contextlib.asynccontextmanager
async def controlled_agent(
    bootstrap: str, database_url: str, prefix: str, keys: Keys, **settings: object
) -> AsyncIterator[DatabaseAgent]:
    """A DatabaseAgent steered by its controller in this process (metrics readable)."""
    config = load_config(controlled_env(bootstrap, database_url, prefix, keys, **settings))
    agent = DatabaseAgent(config)
    controller = Controller(agent, read_verifier([keys.public_path]), heartbeat_s=1.0)
    task = asyncio.create_task(run_controlled(agent, controller))
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 60)


async def live(ag: Antigravity, group: str, count: int, **expect: object) -> list[Heartbeat]:
    """Wait until ``count`` instances of ``group`` are live and running, with ``expect``."""
    found: list[Heartbeat] = []

    async def ready() -> bool:
        nonlocal found
        found = [h for h in await ag.fleet(group) if h.state == "running"]
        return len(found) == count and all(
            getattr(h, k) == v for h in found for k, v in expect.items()
        )

    await until(ready, within=90, what=f"{count} running instances with {expect}")
    return found


async def fetch(database_url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def assert_all_applied(delivery: Delivery, instances: int) -> None:
    assert delivery.ok, (delivery.missing, delivery.rejected)
    assert len(delivery.acks) == instances
    assert {a.outcome for a in delivery.acks.values()} == {"applied"}


# -- steering a fleet ---------------------------------------------------------------------------


async def test_three_instances_switch_a_stream_off_and_on_under_load(
    servers: Servers, database_url: str, unique: str, keys: Keys, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    env = controlled_env(bootstrap, database_url, prefix, keys, batch_max_records=1000)
    agents = [AgentProcess(env, tmp_path / f"agent{i}.log").start() for i in range(3)]
    try:
        await live(ag, prefix, 3)
        traffic = fleet_traffic(45_000, seed=41)
        producing = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=15.0))

        async def events_landing() -> bool:
            return await count_rows(database_url, "system_events") > 500

        await until(events_landing, within=60, what="events ingesting")
        started = time.monotonic()
        delivery = await ag.send(prefix, Deactivate(streams=("events",)), wait_s=30)
        took = time.monotonic() - started
        assert_all_applied(delivery, 3)
        print(f"\ndeactivate -> last of 3 acks: {took:.3f} s")

        frozen = of_stream(await stored_offsets(database_url, prefix, prefix), "events")
        frozen_rows = await count_rows(database_url, "system_events")
        others_then = await stored_offsets(database_url, prefix, prefix)

        async def others_go_on_and_events_wait() -> bool:
            ends = of_stream(await end_offsets(bootstrap, prefix), "events")
            stored = await stored_offsets(database_url, prefix, prefix)
            moved = sum(o - others_then.get(tp, 0) for tp, o in stored.items() if tp not in ends)
            return moved > 5_000 and sum(ends.values()) - sum(frozen.values()) > 2_000

        await until(others_go_on_and_events_wait, within=60, what="others ingest, events wait")
        assert of_stream(await stored_offsets(database_url, prefix, prefix), "events") == frozen
        assert await count_rows(database_url, "system_events") == frozen_rows

        assert_all_applied(await ag.send(prefix, Activate(streams=("events",)), wait_s=30), 3)
        sent = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=180)

        # The fleet as `pipeline control status --json` shows it: every instance at seq 2.
        def status() -> dict[str, object]:
            out = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "control", "status", "--json"],
                env=env,
                capture_output=True,
                check=True,
                timeout=60,
            )
            found: dict[str, object] = json.loads(out.stdout)
            return found

        shown: dict[str, object] = {}

        async def all_at_seq_2() -> bool:
            nonlocal shown
            shown = await asyncio.to_thread(status)
            instances = shown["instances"]
            assert isinstance(instances, list)
            return len(instances) == 3 and all(i["applied_seq"] == 2 for i in instances)

        await until(all_at_seq_2, within=30, what="status shows 3 instances at seq 2")
        assert shown["latest_seq"] == 2
        instances = shown["instances"]
        assert isinstance(instances, list)
        assert {i["behind"] for i in instances} == {False}
        assert {tuple(i["active_streams"]) for i in instances} == {ALL_STREAMS}
    finally:
        await stop_agents(agents)
        for agent in agents:
            agent.kill()


async def test_a_command_sent_while_an_instance_is_down_is_applied_when_it_starts(
    servers: Servers, database_url: str, unique: str, keys: Keys, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    env = controlled_env(bootstrap, database_url, prefix, keys)
    first = AgentProcess(env, tmp_path / "first.log").start()
    second = AgentProcess(env, tmp_path / "second.log").start()
    agents = [first, second]
    try:
        await live(ag, prefix, 2)
        await stop_agents([second])
        v1 = Assign(
            version=1,
            streams=("states", "events", "metrics", "config"),
            limits=BatchLimits(batch_max_records=2000),
        )
        delivery = await ag.send(prefix, v1, wait_s=30)
        assert_all_applied(delivery, 1)  # the stopped instance is not waited for

        second = AgentProcess(env, tmp_path / "second-again.log").start()
        agents.append(second)
        found = await live(ag, prefix, 2, assignment_version=1)
        assert {h.active_streams for h in found} == {("states", "events", "metrics", "config")}

        # Every instance down: the first to start decides the command.
        await stop_agents(agents)
        v2 = Assign(version=2, streams=("metrics",))
        delivery = await ag.send(prefix, v2, wait_s=5)
        assert delivery.live == [] and delivery.ok
        third = AgentProcess(env, tmp_path / "third.log").start()
        agents.append(third)
        (heartbeat,) = await live(ag, prefix, 1, assignment_version=2)
        assert heartbeat.active_streams == ("metrics",)
        assert heartbeat.applied_seq == 2
        decided = await fetch(
            database_url,
            "SELECT seq, kind, outcome, instance_id FROM control_log "
            "WHERE direction = 'command' ORDER BY seq",
        )
        assert [(r["seq"], r["kind"], r["outcome"]) for r in decided] == [
            (1, "assign", "applied"),
            (2, "assign", "applied"),
        ]
        assert decided[1]["instance_id"] == heartbeat.instance_id
        versions = await fetch(
            database_url, "SELECT version, streams FROM assignments ORDER BY version"
        )
        assert [(r["version"], r["streams"]) for r in versions] == [
            (1, ["states", "events", "metrics", "config"]),
            (2, ["metrics"]),
        ]
    finally:
        await stop_agents(agents)
        for agent in agents:
            agent.kill()


async def test_rollback_to_an_assignment_version_is_a_new_version(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    async with controlled_agent(bootstrap, database_url, prefix, keys) as agent:
        await live(ag, prefix, 1)
        v1 = Assign(version=1, streams=ALL_STREAMS, limits=BatchLimits(batch_max_wait_ms=50))
        assert_all_applied(await ag.send(prefix, v1, wait_s=30), 1)
        v2 = Assign(version=2, streams=("metrics",), limits=BatchLimits(batch_max_records=100))
        assert_all_applied(await ag.send(prefix, v2, wait_s=30), 1)
        assert agent.ownership.active_streams() == ["metrics"]
        assert agent.limits.max_records == 100

        assert_all_applied(await ag.send(prefix, RollbackVersion(to_version=1), wait_s=30), 1)
        assert agent.ownership.active_streams() == list(ALL_STREAMS)
        assert (agent.limits.max_records, agent.limits.max_wait_s) == (50_000, 0.05)
        assert agent.metrics.total("pipeline_assignment_version") == 3

        delivery = await ag.send(prefix, RollbackVersion(to_version=7), wait_s=30)
        (ack,) = delivery.rejected
        assert ack.reason == "apply_failed"
        assert "version 7" in ack.detail
    versions = await fetch(
        database_url, "SELECT version, streams, command_id FROM assignments ORDER BY version"
    )
    assert [(r["version"], r["streams"]) for r in versions] == [
        (1, list(ALL_STREAMS)),
        (2, ["metrics"]),
        (3, list(ALL_STREAMS)),
    ]


async def test_a_command_naming_a_stream_the_agents_catalog_lacks_is_rejected_naming_it(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    # Antigravity's catalog may have a stream the agents' lacks (a rolling restart): the agent
    # refuses the command, says which stream, and changes nothing; the next command applies.
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    async with controlled_agent(bootstrap, database_url, prefix, keys) as agent:
        await live(ag, prefix, 1)
        assert_all_applied(await ag.send(prefix, Deactivate(streams=("metrics",)), wait_s=30), 1)
        without_metrics = [s for s in ALL_STREAMS if s != "metrics"]
        assert agent.ownership.active_streams() == without_metrics

        delivery = await ag.send(prefix, Activate(streams=("metrics", "orders")), wait_s=30)
        (ack,) = delivery.rejected
        assert ack.reason == "apply_failed"
        assert ack.detail == (
            "apply_failed: unknown stream(s) orders: this agent's catalog has "
            "states, events, metrics, analytics, config"
        )
        assert agent.ownership.active_streams() == without_metrics
        (state,) = await fetch(
            database_url, "SELECT active_streams FROM control_state WHERE group_id = $1", prefix
        )
        assert state["active_streams"] == without_metrics

        assert_all_applied(await ag.send(prefix, Activate(streams=("metrics",)), wait_s=30), 1)
        assert agent.ownership.active_streams() == list(ALL_STREAMS)


# -- data rollback ------------------------------------------------------------------------------


async def checkpoint_offsets(
    database_url: str, group: str, name: str
) -> dict[tuple[str, int], int]:
    rows = await fetch(
        database_url,
        "SELECT topic, partition, next_offset FROM checkpoint_offsets "
        "WHERE group_id = $1 AND name = $2",
        group,
        name,
    )
    return {(r["topic"].removeprefix(group), r["partition"]): r["next_offset"] for r in rows}


async def progress_past(
    database_url: str, prefix: str, mark: dict[tuple[str, int], int], records: int
) -> None:
    async def moved() -> bool:
        stored = await stored_offsets(database_url, prefix, prefix)
        return sum(stored.values()) - sum(mark.values()) >= records

    await until(moved, within=90, what=f"{records} more records ingested")


async def test_rollback_to_a_checkpoint_under_load_reingests_exactly_once(
    servers: Servers, database_url: str, unique: str, keys: Keys, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    env = controlled_env(bootstrap, database_url, prefix, keys, batch_max_records=1000)
    agents = [AgentProcess(env, tmp_path / f"agent{i}.log").start() for i in range(2)]
    try:
        await live(ag, prefix, 2)
        traffic = fleet_traffic(40_000, seed=42)
        producing = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=15.0))
        await progress_past(database_url, prefix, {}, 5_000)
        assert_all_applied(await ag.send(prefix, Checkpoint(name="before"), wait_s=30), 2)
        checkpoint = await checkpoint_offsets(database_url, prefix, "before")
        assert sum(checkpoint.values()) >= 5_000
        await progress_past(database_url, prefix, checkpoint, 5_000)

        command = RollbackCheckpoint(to_checkpoint="before", then="reingest")
        assert_all_applied(await ag.send(prefix, command, wait_s=60), 2)
        sent = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
        await assert_latest_tables_follow_the_log(database_url, traffic)
    finally:
        await stop_agents(agents)
        for agent in agents:
            agent.kill()


async def test_rollback_to_a_checkpoint_with_hold_keeps_the_checkpoint_until_activated(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    traffic = fleet_traffic(30_000, seed=43)
    async with controlled_agent(
        bootstrap, database_url, prefix, keys, batch_max_records=1000
    ) as agent:
        await live(ag, prefix, 1)
        producing = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=15.0))
        await progress_past(database_url, prefix, {}, 4_000)
        assert_all_applied(await ag.send(prefix, Checkpoint(name="cp"), wait_s=30), 1)
        checkpoint = await checkpoint_offsets(database_url, prefix, "cp")
        await progress_past(database_url, prefix, checkpoint, 4_000)

        command = RollbackCheckpoint(to_checkpoint="cp", then="hold")
        assert_all_applied(await ag.send(prefix, command, wait_s=60), 1)
        assert agent.ownership.active_streams() == []
        rolled = {
            tp: checkpoint.get(tp, 0) for tp in await stored_offsets(database_url, prefix, prefix)
        }
        assert await stored_offsets(database_url, prefix, prefix) == rolled

        async def records_wait_past_the_checkpoint() -> bool:
            ends = await end_offsets(bootstrap, prefix)
            return sum(ends.values()) - sum(rolled.values()) > 10_000

        await until(records_wait_past_the_checkpoint, within=60, what="records arrive, held")
        # The tables are what they were at the checkpoint: every row from before it, no other.
        assert await stored_offsets(database_url, prefix, prefix) == rolled
        for stream, table in APPEND_TABLE.items():
            topic = STREAM_BY_NAME[stream].topic
            rows = await fetch(database_url, f"SELECT src_partition, src_offset FROM {table}")
            found = Counter((r["src_partition"], r["src_offset"]) for r in rows)
            assert all(n == 1 for n in found.values()), table
            assert all(o < rolled.get((topic, p), 0) for p, o in found), table
            expected = sum(o for (t, _), o in rolled.items() if t == topic)
            assert len(found) == expected, table

        assert_all_applied(await ag.send(prefix, Activate(streams=ALL_STREAMS), wait_s=30), 1)
        sent = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
    await assert_latest_tables_follow_the_log(database_url, traffic)


# -- what is refused ----------------------------------------------------------------------------


def envelope_bytes(
    keys: Keys,
    group: str,
    seq: int,
    command: object = None,
    *,
    private_key: Ed25519PrivateKey | None = None,
    expires_in: timedelta = timedelta(minutes=10),
) -> bytes:
    now = datetime.now(UTC)
    envelope = sign(
        command=command or Checkpoint(name=f"c{seq}"),  # type: ignore[arg-type]
        command_id=uuid.uuid4(),
        seq=seq,
        target=group,
        issuer="test",
        issued_at=now - timedelta(hours=2) if expires_in < timedelta(0) else now,
        expires_at=now + expires_in,
        private_key=private_key or keys.private,
    )
    return encode_envelope(envelope)


def unknown_kind_bytes(keys: Keys, group: str, seq: int) -> bytes:
    now = datetime.now(UTC)
    unsigned = {
        "command_id": str(uuid.uuid4()),
        "seq": seq,
        "target": group,
        "issued_at": now,
        "expires_at": now + timedelta(minutes=10),
        "issuer": "test",
        "key_id": key_id(keys.private.public_key()),
        "command": {"kind": "reboot", "when": "now"},
    }
    payload = msgspec.msgpack.encode(unsigned)
    signature = keys.private.sign(SIGNING_CONTEXT + payload)
    return msgspec.msgpack.encode({**unsigned, "signature": signature})


async def test_forged_tampered_replayed_stale_expired_unknown_and_garbage_commands_are_refused(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    control_topic, status_topic = control_topics(prefix)
    intruder, _ = generate_key_pair()
    traffic = fleet_traffic(20_000, seed=44)

    async with controlled_agent(bootstrap, database_url, prefix, keys) as agent:
        await live(ag, prefix, 1)
        producing = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=10.0))
        applied = envelope_bytes(keys, prefix, 5)  # a checkpoint: ingestion goes on as it was
        tampered = bytearray(envelope_bytes(keys, prefix, 6, Activate(streams=("config",))))
        where = tampered.index(b"config")
        tampered[where : where + 6] = b"events"  # still decodes: a different, unsigned command
        bad = {
            "forged": envelope_bytes(keys, prefix, 7, private_key=intruder),
            "tampered": bytes(tampered),
            "replayed": applied,
            "stale": envelope_bytes(keys, prefix, 4),
            "expired": envelope_bytes(keys, prefix, 8, expires_in=-timedelta(minutes=1)),
            "unknown kind": unknown_kind_bytes(keys, prefix, 9),
            "garbage": b"\x93\x01\x02\xc1 not an envelope",
            "empty": b"",
        }
        producer = kafka_clients.producer(kafka_clients.kafka_settings(bootstrap), acks="all")
        await producer.start()
        try:
            first = await producer.send_and_wait(control_topic, applied)
            offsets = {}
            for name, raw in bad.items():
                offsets[name] = (await producer.send_and_wait(control_topic, raw)).offset
        finally:
            await producer.stop()

        async def all_decided() -> bool:
            rows = await fetch(
                database_url,
                "SELECT count(*) AS n FROM control_log WHERE direction = 'command'",
            )
            return rows[0]["n"] == 1 + len(bad)

        await until(all_decided, within=60, what="every control record decided")
        assert agent.ownership.active_streams() == list(ALL_STREAMS)
        sent: list[Sent] = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=180)
        rejected = agent.metrics.total("pipeline_control_commands_total") - 1
        applied_count = _sample(agent, "applied")

    rows = await fetch(
        database_url,
        "SELECT src_offset, outcome, reason FROM control_log WHERE direction = 'command'",
    )
    reasons = {r["src_offset"]: (r["outcome"], r["reason"].split(":", 1)[0]) for r in rows}
    assert reasons[first.offset] == ("applied", "")
    assert {name: reasons[offset] for name, offset in offsets.items()} == {
        "forged": ("rejected", "unknown_key"),
        "tampered": ("rejected", "bad_signature"),
        "replayed": ("rejected", "stale_seq"),
        "stale": ("rejected", "stale_seq"),
        "expired": ("rejected", "expired"),
        "unknown kind": ("rejected", "unknown_kind"),
        "garbage": ("rejected", "undecodable"),
        "empty": ("rejected", "undecodable"),
    }
    assert (rejected, applied_count) == (len(bad), 1)

    # Only a record shown to be signed by a trusted key is acknowledged: a forged, tampered,
    # unknown-kind or undecodable one names a command id its writer chose, or none. Each is
    # recorded and counted, not acknowledged.
    acks = await status_acks(bootstrap, status_topic)
    assert sorted((a.seq, a.outcome, a.reason) for a in acks) == [
        (4, "rejected", "stale_seq"),
        (5, "applied", ""),
        (5, "rejected", "stale_seq"),
        (8, "rejected", "expired"),
    ]


def _sample(agent: DatabaseAgent, outcome: str) -> float:
    return sum(
        s.value
        for metric in agent.metrics.registry.collect()
        for s in metric.samples
        if s.name == "pipeline_control_commands_total" and s.labels["outcome"] == outcome
    )


async def status_acks(bootstrap: str, status_topic: str) -> list[Ack]:
    kafka = kafka_clients.kafka_settings(bootstrap)
    consumer = kafka_clients.consumer(kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(status_topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, 0)
        acks: list[Ack] = []
        while await consumer.position(tp) < end:
            for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                message = decode_status(record.value)
                if isinstance(message, Ack):
                    acks.append(message)
        return acks
    finally:
        await kafka_io.stop_consumer(consumer)


async def test_the_fleet_of_a_prefix_no_agent_has_used_is_empty_at_once(
    servers: Servers, unique: str, keys: Keys
) -> None:
    # No agent has created the status topic yet: an empty fleet, not a 40 s metadata wait.
    ag = orchestrator(servers.endpoints.kafka_bootstrap, f"{unique}.", keys)
    started = time.monotonic()
    assert await ag.fleet("nobody") == []
    assert time.monotonic() - started < 10
