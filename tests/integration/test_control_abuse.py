"""The control plane against what a writer to its topics, or an outage, can throw at it (real
broker and database): a forged heartbeat, a flood of garbage on the control topic, a signed
command far back on it, a command that expires while the database is blocked or its
connection is cut, a record whose decision cannot be recorded, a control topic with two
partitions, an instance without keys."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from consumers.agent import DatabaseAgent
from consumers.antigravity import Antigravity
from consumers.controller import Controller, run_controlled
from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.catalog import load as load_catalog
from pipeline.config import load_config
from pipeline.control import (
    Ack,
    Checkpoint,
    ControlError,
    Deactivate,
    Envelope,
    Heartbeat,
    Verifier,
    control_topics,
    encode_envelope,
    encode_status,
    generate_key_pair,
    read_verifier,
    sign,
    verify,
)
from tests.conftest import Servers
from tests.integration.harness import create_topics, migrated, until
from tests.integration.test_control import (
    Keys,
    controlled_env,
    envelope_bytes,
    fetch,
    keys,
    live,
    orchestrator,
    status_acks,
)

ALL_STREAMS = load_catalog().names  # the built-in streams, in catalog order

__all__ = ["keys"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(900)


@contextlib.asynccontextmanager
async def steered(
    bootstrap: str,
    database_url: str,
    prefix: str,
    keys: Keys,
    verifier: Verifier | None,
    **settings: object,
) -> AsyncIterator[Controller]:
    """A DatabaseAgent in this process steered by a controller with ``verifier`` (None: an
    instance without public keys); the controller (its agent: ``.agent``)."""
    config = load_config(controlled_env(bootstrap, database_url, prefix, keys, **settings))
    agent = DatabaseAgent(config)
    controller = Controller(agent, verifier, heartbeat_s=1.0)
    task = asyncio.create_task(run_controlled(agent, controller))
    try:
        yield controller
    finally:
        agent.stop()
        await asyncio.wait_for(task, 60)


async def publish(bootstrap: str, topic: str, values: list[bytes]) -> list[int]:
    """Publish ``values`` to ``topic`` (one partition) in order; their offsets."""
    producer = kafka_clients.producer(
        kafka_clients.kafka_settings(bootstrap), acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value) for value in values]
        return [(await f).offset for f in futures]
    finally:
        await producer.stop()


async def decisions(database_url: str) -> dict[int, tuple[str, str]]:
    rows = await fetch(
        database_url,
        "SELECT src_offset, outcome, reason FROM control_log WHERE direction = 'command'",
    )
    return {r["src_offset"]: (r["outcome"], r["reason"].split(":", 1)[0]) for r in rows}


# -- the status topic is a hint ----------------------------------------------------------------


async def test_a_forged_heartbeat_cannot_exhaust_the_sequence(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    _, status_topic = control_topics(prefix)
    async with steered(bootstrap, database_url, prefix, keys, read_verifier([keys.public_path])):
        (real,) = await live(ag, prefix, 1)
        forged = Heartbeat(
            instance_id="intruder",
            group=prefix,
            state="running",
            applied_seq=2**63 - 2,
            assignment_version=0,
            active_streams=ALL_STREAMS,
            owned_partitions=(),
            lag=0,
            at=datetime.now(UTC),
        )
        await publish(bootstrap, status_topic, [encode_status(forged)])
        assert {h.instance_id for h in await ag.fleet(prefix)} == {real.instance_id, "intruder"}

        for seq in (1, 2):
            delivery = await ag.send(prefix, Checkpoint(name=f"cp{seq}"), wait_s=10)
            assert delivery.envelope.seq == seq
            assert {i: a.outcome for i, a in delivery.acks.items()} == {real.instance_id: "applied"}
            assert delivery.missing == ["intruder"]  # reported live, never answers: a hint
    rows = await fetch(
        database_url,
        "SELECT seq, outcome FROM control_log WHERE direction = 'command' ORDER BY seq",
    )
    assert [(r["seq"], r["outcome"]) for r in rows] == [(1, "applied"), (2, "applied")]
    state = await fetch(database_url, "SELECT applied_seq FROM control_state")
    assert [r["applied_seq"] for r in state] == [2]


async def test_forged_acks_do_not_make_pipeline_control_succeed(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    await ag.ensure_topics()
    control_topic, status_topic = control_topics(prefix)
    # No agent runs: an intruder with a status-topic login claims to be one, and acks.
    forged = Heartbeat(
        instance_id="intruder",
        group=prefix,
        state="running",
        applied_seq=0,
        assignment_version=0,
        active_streams=ALL_STREAMS,
        owned_partitions=(),
        lag=0,
        at=datetime.now(UTC),
    )
    await publish(bootstrap, status_topic, [encode_status(forged)])

    async def ack_whatever_is_sent() -> None:
        consumer = kafka_clients.consumer(kafka_clients.kafka_settings(bootstrap))
        await consumer.start()
        try:
            tp = TopicPartition(control_topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            while True:
                for record in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                    envelope = verify(record.value, keys=Verifier([keys.private.public_key()]))
                    assert isinstance(envelope, Envelope)
                    ack = Ack(
                        command_id=envelope.command_id,
                        seq=envelope.seq,
                        kind=envelope.kind,
                        instance_id="intruder",
                        group=prefix,
                        outcome="applied",
                        at=datetime.now(UTC),
                    )
                    await publish(bootstrap, status_topic, [encode_status(ack)])
                    return
        finally:
            await kafka_io.stop_consumer(consumer)

    forger = asyncio.create_task(ack_whatever_is_sent())
    env = controlled_env(bootstrap, database_url, prefix, keys)
    env["PIPELINE_CONTROL_PRIVATE_KEY_FILE"] = str(keys.private_path)
    sent = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pipeline.cli", "control", "checkpoint", "cp", "--wait", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    await asyncio.wait_for(forger, 10)
    assert sent.returncode == 1, sent.stdout + sent.stderr
    lines = sent.stdout.splitlines()
    assert "1 live instance(s) by their heartbeats; acks as reported by the instances" in lines[0]
    assert lines[1:] == [
        "  intruder: applied",
        "the group's decision (PostgreSQL control_log): none yet",
    ]


# -- a flood of garbage on the control topic ---------------------------------------------------

FLOOD = 10_000


async def test_a_valid_command_behind_a_flood_of_garbage_is_applied_within_seconds(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    await ag.ensure_topics()
    control_topic, status_topic = control_topics(prefix)
    intruder, _ = generate_key_pair()
    forged = [envelope_bytes(keys, prefix, 1000 + i, private_key=intruder) for i in range(50)]
    # Undecodable bytes and envelopes signed by a key no agent trusts, interleaved; then the
    # command, all on the topic before the agent starts: it has the whole flood to get through.
    garbage = [forged[i % len(forged)] if i % 2 else b"\x93garbage %d" % i for i in range(FLOOD)]
    offsets = await publish(bootstrap, control_topic, garbage)
    delivery = await ag.send(prefix, Checkpoint(name="after-flood"), wait_s=0)
    assert delivery.envelope.seq == 1  # the forged seqs (1000+) do not count
    assert delivery.live == []

    async def applied() -> bool:
        return (await decisions(database_url)).get(delivery.offset) == ("applied", "")

    started = time.monotonic()
    async with steered(bootstrap, database_url, prefix, keys, read_verifier([keys.public_path])):
        await until(applied, within=120, what="the command applied", every=0.05)
        took = time.monotonic() - started
        print(f"\na valid command behind {FLOOD:,} garbage control records: {took:.2f} s")
        assert took < 5.0, f"{took:.2f} s from the agent's start"

    found = await decisions(database_url)
    assert len(found) == FLOOD + 1
    assert Counter(found[o] for o in offsets) == Counter(
        {("rejected", "undecodable"): FLOOD // 2, ("rejected", "unknown_key"): FLOOD // 2}
    )
    state = await fetch(database_url, "SELECT next_offset, applied_seq FROM control_state")
    assert [(r["next_offset"], r["applied_seq"]) for r in state] == [(FLOOD + 1, 1)]
    # The forged envelopes name command ids of their writer's choosing: none is acknowledged.
    acks = await status_acks(bootstrap, status_topic)
    assert [(a.command_id, a.outcome) for a in acks] == [(delivery.envelope.command_id, "applied")]
    statuses = await fetch(database_url, "SELECT seq FROM control_log WHERE direction = 'status'")
    assert [r["seq"] for r in statuses] == [1]


async def test_the_next_seq_counts_a_command_more_than_1000_records_back(
    servers: Servers, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    ag = orchestrator(bootstrap, prefix, keys)
    await ag.ensure_topics()
    control_topic, _ = control_topics(prefix)
    first = await ag.send(prefix, Checkpoint(name="first"), wait_s=0)
    assert first.envelope.seq == 1
    await publish(bootstrap, control_topic, [b"\x93garbage %d" % i for i in range(1500)])
    # The signed command is 1,501 records back: the whole topic is read for the seq.
    second = await ag.send(prefix, Checkpoint(name="second"), wait_s=0)
    assert (second.offset, second.envelope.seq) == (first.offset + 1501, 2)


# -- a command that expires while the database is unreachable -----------------------------------


async def publish_expiring_deactivate(
    bootstrap: str, control_topic: str, prefix: str, keys: Keys
) -> tuple[int, datetime]:
    """Publish a signed ``Deactivate(events)``, seq 1, that expires 3 s from now; return its
    offset on the control topic and its expiry."""
    now = datetime.now(UTC)
    expires_at = now + timedelta(seconds=3)
    envelope = sign(
        command=Deactivate(streams=("events",)),
        command_id=uuid.uuid4(),
        seq=1,
        target=prefix,
        issuer="test",
        issued_at=now,
        expires_at=expires_at,
        private_key=keys.private,
    )
    (offset,) = await publish(bootstrap, control_topic, [encode_envelope(envelope)])
    return offset, expires_at


async def test_a_command_that_expires_while_the_database_is_blocked_is_refused(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    control_topic, _ = control_topics(prefix)
    async with steered(
        bootstrap, database_url, prefix, keys, read_verifier([keys.public_path])
    ) as controller:
        agent = controller.agent
        await live(ag, prefix, 1)
        blocker = await asyncpg.connect(database_url, timeout=10)
        try:
            # Hold the group's control_state row: the controller's transaction waits on it as
            # it would on a database that does not answer.
            await blocker.execute(
                "INSERT INTO control_state (group_id) VALUES ($1) ON CONFLICT DO NOTHING", prefix
            )
            block = blocker.transaction()
            await block.start()
            await blocker.execute(
                "SELECT 1 FROM control_state WHERE group_id = $1 FOR UPDATE", prefix
            )
            offset, expires_at = await publish_expiring_deactivate(
                bootstrap, control_topic, prefix, keys
            )

            async def controller_waits_on_the_lock() -> bool:
                rows = await blocker.fetch(
                    "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE NOT l.granted AND a.datname = current_database()"
                )
                return len(rows) > 0

            await until(controller_waits_on_the_lock, within=30, what="the controller blocked")

            async def expired() -> bool:
                return datetime.now(UTC) > expires_at + timedelta(seconds=1)

            await until(expired, within=30, what="the command's expiry passed")
            await block.rollback()
        finally:
            await blocker.close()

        async def decided() -> bool:
            return offset in await decisions(database_url)

        await until(decided, within=60, what="the command decided")
        assert (await decisions(database_url))[offset] == ("rejected", "expired")
        assert agent.ownership.active_streams() == list(ALL_STREAMS)


async def test_a_command_whose_transaction_fails_and_is_retried_after_its_expiry_is_refused(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    control_topic, _ = control_topics(prefix)
    async with steered(
        bootstrap, database_url, prefix, keys, read_verifier([keys.public_path])
    ) as controller:
        await live(ag, prefix, 1)
        admin = await asyncpg.connect(database_url, timeout=10)
        try:
            # Writing the decision waits: the controller has read its clock (before the
            # expiry) and decided to apply the command when its transaction stalls.
            block = admin.transaction()
            await block.start()
            await admin.execute("LOCK TABLE control_log IN EXCLUSIVE MODE")
            offset, expires_at = await publish_expiring_deactivate(
                bootstrap, control_topic, prefix, keys
            )
            waiting: list[int] = []

            async def controller_writes_its_decision() -> bool:
                waiting[:] = [
                    r["pid"]
                    for r in await admin.fetch(
                        "SELECT pid FROM pg_locks WHERE NOT granted "
                        "AND relation = 'control_log'::regclass"
                    )
                ]
                return len(waiting) == 1

            await until(controller_writes_its_decision, within=30, what="the controller writing")

            async def expired() -> bool:
                return datetime.now(UTC) > expires_at + timedelta(seconds=1)

            await until(expired, within=30, what="the command's expiry passed")
            # Its connection is cut: the transaction fails and is retried, after the expiry.
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", waiting[0])
            await block.rollback()
        finally:
            await admin.close()

        async def decided() -> bool:
            return offset in await decisions(database_url)

        await until(decided, within=60, what="the command decided")
        assert (await decisions(database_url))[offset] == ("rejected", "expired")
        assert controller.agent.ownership.active_streams() == list(ALL_STREAMS)


# -- a record that cannot be recorded -------------------------------------------------------------

FAIL_AT_OFFSET_2 = """
CREATE FUNCTION refuse_offset_2() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.direction = 'command' AND NEW.src_offset = 2 AND NEW.reason LIKE 'undecodable%' THEN
        RAISE EXCEPTION 'the rejection at offset 2 cannot be recorded';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_offset_2 BEFORE INSERT ON control_log
    FOR EACH ROW EXECUTE FUNCTION refuse_offset_2();
"""


async def test_a_run_that_fails_blames_the_record_that_fails_not_one_decided_before(
    servers: Servers,
    database_url: str,
    unique: str,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    control_topic, status_topic = control_topics(prefix)
    verifier = read_verifier([keys.public_path])
    # Instance B reads the group's state (nothing decided yet), and is held before it reads
    # the control topic.
    config = load_config(controlled_env(bootstrap, database_url, prefix, keys, instance_id="b"))
    late = Controller(DatabaseAgent(config), verifier, heartbeat_s=1.0)
    await late.prepare()
    # Instance A decides offsets 0 (a command, applied) and 1 (garbage), then stops.
    async with steered(bootstrap, database_url, prefix, keys, verifier, instance_id="a"):
        await live(ag, prefix, 1)
        first = await ag.send(prefix, Checkpoint(name="cp1"), wait_s=30)
        assert (first.offset, [a.outcome for a in first.acks.values()]) == (0, ["applied"])
        (garbage,) = await publish(bootstrap, control_topic, [b"\x93garbage"])

        async def garbage_decided() -> bool:
            return garbage in await decisions(database_url)

        await until(garbage_decided, within=30, what="the garbage rejected")
    # Offset 2, garbage whose rejection cannot be recorded; offset 3, a command.
    await migrated(database_url, FAIL_AT_OFFSET_2)
    second = envelope_bytes(keys, prefix, 2)
    assert await publish(bootstrap, control_topic, [b"\x93poison", second]) == [2, 3]

    # B starts from offset 0: its first run holds two records A decided, then the one that
    # fails.
    agent = late.agent
    ingesting = asyncio.create_task(agent.run())
    controlling = asyncio.create_task(late.run())
    try:

        def counted() -> dict[tuple[str, str], float]:
            return {
                (s.labels["kind"], s.labels["outcome"]): s.value
                for metric in agent.metrics.registry.collect()
                for s in metric.samples
                if s.name == "pipeline_control_commands_total" and s.value
            }

        async def all_handled() -> bool:
            return 3 in await decisions(database_url) and late.state.next_offset == 4

        await until(all_handled, within=60, what="B handled every record")
        # B followed A's decisions on 0 and 1, gave up on 2 alone, applied 3.
        assert counted() == {("checkpoint", "applied"): 2, ("unknown", "rejected"): 2}
    finally:
        agent.stop()
        await asyncio.wait_for(ingesting, 60)
        controlling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await controlling

    assert await decisions(database_url) == {
        0: ("applied", ""),
        1: ("rejected", "undecodable"),
        2: ("rejected", "apply_failed"),
        3: ("applied", ""),
    }
    given_up = [
        r.getMessage()
        for r in caplog.records
        if r.name == "consumers.controller" and "could not be handled" in r.getMessage()
    ]
    assert len(given_up) == 1 and given_up[0].startswith("control record at offset 2 "), given_up
    acks = await status_acks(bootstrap, status_topic)
    assert sorted((a.instance_id, a.seq, a.outcome) for a in acks) == [
        ("a", 1, "applied"),
        ("b", 1, "applied"),
        ("b", 2, "applied"),
    ]


# -- start-up checks ----------------------------------------------------------------------------


async def test_a_control_topic_with_two_partitions_is_refused(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    control_topic, _ = control_topics(prefix)
    admin = kafka_clients.admin(kafka_clients.kafka_settings(bootstrap))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(control_topic, 2, replication_factor=1)])
    finally:
        await admin.close()
    expected = f"the control topic {control_topic} has 2 partitions"

    config = load_config(controlled_env(bootstrap, database_url, prefix, keys))
    controller = Controller(DatabaseAgent(config), read_verifier([keys.public_path]))
    with pytest.raises(ControlError, match=expected):
        await controller.prepare()

    ag = orchestrator(bootstrap, prefix, keys)
    with pytest.raises(ControlError, match=expected):
        await ag.send(prefix, Checkpoint(name="never"), wait_s=1)


# -- an instance without keys -------------------------------------------------------------------


async def test_an_instance_without_keys_waits_for_the_decision_and_follows_it(
    servers: Servers,
    database_url: str,
    unique: str,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    await migrated(database_url)
    ag: Antigravity = orchestrator(bootstrap, prefix, keys)
    control_topic, status_topic = control_topics(prefix)
    intruder, _ = generate_key_pair()
    async with steered(bootstrap, database_url, prefix, keys, None, instance_id="keyless") as kl:
        keyless = kl.agent
        await live(ag, prefix, 1)
        # A forged envelope first, with a command id of its writer's choosing: whoever decides
        # it rejects it, and nobody acknowledges it, neither the decider nor the follower.
        (forged,) = await publish(
            bootstrap, control_topic, [envelope_bytes(keys, prefix, 7, private_key=intruder)]
        )
        delivery = await ag.send(prefix, Deactivate(streams=("events",)), wait_s=0)

        async def waits_at_the_forged_record() -> bool:
            waits = f"control record at offset {forged}: waiting for an instance with control"
            return any(waits in r.getMessage() for r in caplog.records)

        await until(waits_at_the_forged_record, within=30, what="the keyless instance waiting")
        # Nobody could decide it: no decision, the group's position unmoved.
        assert await decisions(database_url) == {}
        state = await fetch(database_url, "SELECT next_offset FROM control_state")
        assert [r["next_offset"] for r in state] in ([], [0])
        assert keyless.ownership.active_streams() == list(ALL_STREAMS)

        async with steered(
            bootstrap,
            database_url,
            prefix,
            keys,
            read_verifier([keys.public_path]),
            instance_id="keyed",
        ) as kd:
            keyed = kd.agent

            async def both_switched_events_off() -> bool:
                return "events" not in keyless.ownership.active_streams() and (
                    "events" not in keyed.ownership.active_streams()
                )

            # No other control record comes: the keyless instance follows the decision itself.
            await until(both_switched_events_off, within=30, what="events off on both")

            async def both_acknowledged_the_command() -> bool:
                acks = await status_acks(bootstrap, status_topic)
                return {a.instance_id for a in acks if a.seq == delivery.envelope.seq} == {
                    "keyed",
                    "keyless",
                }

            # Acks follow the records' order: the forged record's would have come first.
            await until(both_acknowledged_the_command, within=30, what="both acknowledged")
    assert await decisions(database_url) == {
        forged: ("rejected", "unknown_key"),
        delivery.offset: ("applied", ""),
    }
    acks = await status_acks(bootstrap, status_topic)
    assert sorted((a.instance_id, a.command_id, a.outcome) for a in acks) == [
        ("keyed", delivery.envelope.command_id, "applied"),
        ("keyless", delivery.envelope.command_id, "applied"),
    ]
