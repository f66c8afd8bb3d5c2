"""No single record stops the pipeline: poison among several thousand good records, while
two agents run. Each poison record is one dead letter, in ``dead_letters`` and on the DLQ
topic, with its reason and coordinates; every good record lands exactly once; neither agent
stops or restarts. Among them too, batches holding a record whose header name is not UTF-8
(test_poison_headers.py sends them: aiokafka's producer cannot).

One more kind of bad record is one more :class:`Poison` in :func:`poison_cases`.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import pytest
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
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
    agent_env,
    assert_exactly_once,
    count_rows,
    create_topics,
    fleet_traffic,
    produce,
    produce_paced,
    stored_offsets,
    until,
    wait_caught_up,
)
from tests.integration.test_poison_headers import BAD_REASON, send_poison

pytestmark = pytest.mark.timeout(600)

STATES, EVENTS, METRICS, CONFIG = (
    STREAM_BY_NAME[n] for n in ("states", "events", "metrics", "config")
)
MSGPACK_HEADERS = (("content-type", MSGPACK.encode()),)
# What the test's producer sends at most (aiokafka's default max_request_size); the topics'
# max.message.bytes is Kafka's default, 12 bytes more.
PRODUCER_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Poison:
    """A record that must become a dead letter: its error class is ``outgoing.poison``."""

    name: str
    outgoing: Outgoing
    reason: str  # a part of the dead letter's reason

    @property
    def error_class(self) -> str:
        assert self.outgoing.poison is not None, f"{self.name}: a poison record has a class"
        return self.outgoing.poison


def incompressible(size: int, seed: int) -> str:
    """Text PostgreSQL cannot compress below an index row's limit (a third of a page)."""
    return "".join(random.Random(seed).choices(string.ascii_letters + string.digits, k=size))


def near_the_limit(stream_key: bytes, value: bytes) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    """A key and headers that make the record just fit the producer's limit: its dead letter,
    with its coordinates and reason added, would not."""
    key = random.Random(1).randbytes(600_000)

    def headers(size: int) -> tuple[tuple[str, bytes], ...]:
        return (("k", stream_key), ("blob", random.Random(2).randbytes(size)))

    size = PRODUCER_LIMIT - len(key) - 100
    room = (
        PRODUCER_LIMIT
        - 16
        - DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers(size)))
    )
    return key, headers(size + room)


def poison_cases() -> list[Poison]:
    long_id = incompressible(8192, 1)
    big_key, big_headers = near_the_limit(b"agent-1", b"{not json")
    return [
        Poison(
            "states: an 8 KiB agent_id, too long for its index",
            Outgoing(
                STATES,
                long_id.encode(),
                encode(StateChange(long_id, "busy", 1, T0, {"v": 1})),
                "DatabaseRejected",
            ),
            "54000 index row",
        ),
        Poison(
            "config: an 8 KiB key, too long for its index",
            Outgoing(
                CONFIG,
                b"k",
                encode(ConfigChange(incompressible(8192, 2), {"v": 1}, 1, T0, "ops")),
                "DatabaseRejected",
            ),
            "54000 index row",
        ),
        Poison(
            "events: an 8 KiB agent_id, too long for the (agent_id, ts) index",
            Outgoing(
                EVENTS,
                b"e",
                encode(AgentEvent(uuid.UUID(int=7), incompressible(8192, 3), "started", T0)),
                "DatabaseRejected",
            ),
            "54000 index row",
        ),
        Poison(
            "metrics: near 1 MiB of key and headers, its dead letter over Kafka's limit",
            Outgoing(METRICS, big_key, b"{not json", "DecodeError", big_headers),
            "JSON is malformed",
        ),
        Poison(
            "metrics: NUL in a JSON text field",
            Outgoing(METRICS, b"n", encode(Metric("a", "cpu\x00", 1.0, T0)), "ValidationError"),
            "text cannot contain NUL (\\u0000) - at `$.name`",
        ),
        Poison(
            "events: NUL in a JSON payload's nested string",
            Outgoing(
                EVENTS,
                b"n",
                encode(AgentEvent(uuid.UUID(int=8), "a", "k", T0, payload={"s": ["\x00"]})),
                "ValidationError",
            ),
            "text cannot contain NUL (\\u0000) - at `$.payload`",
        ),
        Poison(
            "states: NUL in a MessagePack text field",
            Outgoing(
                STATES,
                b"n",
                encode(StateChange("a", "idle\x00", 1, T0), MSGPACK),
                "ValidationError",
                MSGPACK_HEADERS,
            ),
            "text cannot contain NUL (\\u0000) - at `$.state`",
        ),
    ]


async def test_poison_among_good_records_is_dead_lettered_and_stops_no_agent(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    cases = poison_cases()
    traffic = fleet_traffic(20_000, seed=24)
    rng = random.Random(24)
    for case in cases:  # anywhere among the good records, so they share batches with them
        traffic.insert(rng.randrange(len(traffic)), case.outgoing)
    env = agent_env(bootstrap, database_url, prefix, prefix, batch_max_records=500)
    agents = [AgentProcess(env, tmp_path / f"agent-{i}.log") for i in range(2)]
    try:
        for agent in agents:
            agent.start()
        pids = [agent.pid for agent in agents]

        async def still_running() -> None:
            for agent, log in zip(agents, ("agent-0.log", "agent-1.log"), strict=True):
                assert agent.alive(), (tmp_path / log).read_text()[-3000:]
            assert [agent.pid for agent in agents] == pids

        half = len(traffic) // 2
        sent = await produce_paced(bootstrap, prefix, traffic[:half], over=3.0, chunks=6)
        bad_names = await send_poison(bootstrap, prefix, fleet_traffic(200, seed=62))
        sent += await produce_paced(bootstrap, prefix, traffic[half:], over=3.0, chunks=6)
        ends = await wait_caught_up(
            database_url, bootstrap, prefix, prefix, within=180, on_poll=still_running
        )
        await still_running()
        await assert_exactly_once(database_url, prefix, prefix, sent + bad_names, ends)
        for agent in agents:
            assert agent.stop() == 0
    finally:
        for agent in agents:
            agent.kill()

    where = {id(o): s for o, s in zip(traffic, sent, strict=True)}
    bad_name_at = {(s.topic, s.partition, s.offset) for s in bad_names if s.poison}
    good = [s for s in sent + bad_names if s.poison is None]
    assert len(sent) == 20_000 + len(cases)
    assert (len(good), len(bad_name_at)) == (20_000 + 12, 6)
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        for stream, table in APPEND_TABLE.items():
            produced = sum(1 for s in good if s.topic == STREAM_BY_NAME[stream].topic)
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == produced, table
        letters = {
            (r["src_topic"].removeprefix(prefix), r["src_partition"], r["src_offset"]): r
            for r in await conn.fetch("SELECT * FROM dead_letters")
        }
    finally:
        await conn.close()
    assert len(letters) == len(cases) + len(bad_name_at)
    for at in bad_name_at:
        assert (letters[at]["error_class"], letters[at]["reason"]) == ("InvalidHeader", BAD_REASON)
    for case in cases:
        s = where[id(case.outgoing)]
        row = letters[(s.topic, s.partition, s.offset)]
        assert (row["error_class"], row["record_key"], row["record_value"]) == (
            case.error_class,
            case.outgoing.key,
            case.outgoing.value,
        ), case.name
        assert case.reason in row["reason"], (case.name, row["reason"][:300])
        headers = msgspec.json.decode(row["record_headers"])
        assert len(headers) == len(case.outgoing.headers), case.name

    # The DLQ topic: one letter per poison record (at least once: a retried batch publishes
    # its letters again), each with its coordinates, class and reason, each within the limit.
    on_topic = await _dlq_letters(bootstrap, prefix, len(cases) + len(bad_name_at))
    assert set(on_topic) == {(s.topic, s.partition, s.offset) for s in sent + bad_names if s.poison}
    for at in bad_name_at:
        _, _, headers = on_topic[at]
        assert (headers["dlq.error.class"], headers["dlq.reason"].decode()) == (
            b"InvalidHeader",
            BAD_REASON,
        )
    for case in cases:
        s = where[id(case.outgoing)]
        key, value, headers = on_topic[(s.topic, s.partition, s.offset)]
        assert headers["dlq.error.class"] == case.error_class.encode(), case.name
        assert case.reason.encode() in headers["dlq.reason"], case.name
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers.items()))
        assert size <= PRODUCER_LIMIT, case.name
    # The record near 1 MiB: its value and headers go, its key (the largest part) does not.
    big = next(c.outgoing for c in cases if len(c.outgoing.key) > 500_000)
    s = where[id(big)]
    key, value, headers = on_topic[(s.topic, s.partition, s.offset)]
    assert (key, value) == (None, big.value)
    assert headers["dlq.key.omitted.bytes"] == str(len(big.key)).encode()
    assert "dlq.headers.omitted.bytes" not in headers
    assert [headers[name] for name, _ in big.headers] == [v for _, v in big.headers]


async def _dlq_letters(
    bootstrap: str, prefix: str, count: int
) -> dict[tuple[str, int, int], tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    """The DLQ topic's letters by source coordinates (default topic name)."""
    consumer = kafka_clients.consumer(
        kafka_clients.kafka_settings(bootstrap),
        topic_name(DLQ_TOPIC, prefix),
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=2 * 1024 * 1024,
    )
    await consumer.start()
    found: dict[tuple[str, int, int], tuple[bytes | None, bytes | None, dict[str, bytes]]] = {}
    try:
        while len(found) < count:
            batches = await consumer.getmany(timeout_ms=10_000)
            assert batches, f"only {len(found)} dead letters on the DLQ topic"
            for record in (r for records in batches.values() for r in records):
                headers = dict(record.headers)
                if record.key == b"probe" and not headers:  # the test's own, not a letter
                    continue
                coordinates = (
                    headers["dlq.source.topic"].decode().removeprefix(prefix),
                    int(headers["dlq.source.partition"]),
                    int(headers["dlq.source.offset"]),
                )
                found[coordinates] = (record.key, record.value, headers)
    finally:
        await kafka_io.stop_consumer(consumer)
    return found


async def _dlq_topic(bootstrap: str, prefix: str, max_message_bytes: int) -> None:
    """The DLQ topic, created before the agent with a smaller max.message.bytes than Kafka's."""
    admin = kafka_clients.admin(kafka_clients.kafka_settings(bootstrap))
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    topic_name(DLQ_TOPIC, prefix),
                    1,
                    replication_factor=1,
                    topic_configs={"max.message.bytes": str(max_message_bytes)},
                )
            ]
        )
    finally:
        await admin.close()


async def test_a_dlq_topic_below_a_records_size_gets_letters_sized_to_it_and_no_agent_stops(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    # The agent reads the topic's max.message.bytes at start-up and sizes its letters to it:
    # a 50 kB record's letter leaves its value out, where it stopped the agent (or, before
    # that, retried for ever).
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await _dlq_topic(bootstrap, prefix, 20_000)
    await create_topics(bootstrap, prefix, partitions=1)  # the data topics
    big = Outgoing(METRICS, b"m", b"{" + b"x" * 50_000, "DecodeError", (("trace", b"t-1"),))
    small = Outgoing(EVENTS, b"e", b"{bad", "DecodeError", (("trace", b"t-2"),))
    traffic = fleet_traffic(400, seed=5)
    outgoing = [*traffic[:200], big, small, *traffic[200:]]  # good records after the bad
    sent = await produce(bootstrap, prefix, outgoing)
    log = tmp_path / "agent.log"
    agent = AgentProcess(agent_env(bootstrap, database_url, prefix, prefix), log).start()
    try:
        pid = agent.pid

        async def still_running() -> None:
            assert agent.alive(), log.read_text()[-3000:]
            assert agent.pid == pid

        ends = await wait_caught_up(
            database_url, bootstrap, prefix, prefix, within=120, on_poll=still_running
        )
        await still_running()
        await assert_exactly_once(database_url, prefix, prefix, sent, ends)
        assert agent.stop() == 0
    finally:
        agent.kill()

    at = {
        (s.topic, s.partition, s.offset): o for s, o in zip(sent, outgoing, strict=True) if s.poison
    }
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT * FROM dead_letters")
    finally:
        await conn.close()
    whole = {
        (r["src_topic"].removeprefix(prefix), r["src_partition"], r["src_offset"]): (
            r["record_key"],
            r["record_value"],
            msgspec.json.decode(r["record_headers"]),
        )
        for r in rows
    }
    assert whole == {
        c: (o.key, o.value, [[n, v.decode()] for n, v in o.headers]) for c, o in at.items()
    }
    on_topic = await _dlq_letters(bootstrap, prefix, 2)
    assert set(on_topic) == set(at)
    for coordinates, outgoing in at.items():
        key, value, headers = on_topic[coordinates]
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers.items()))
        assert size <= 20_000
        assert (key, headers["trace"], headers["dlq.error.class"]) == (
            outgoing.key,
            outgoing.headers[0][1],
            b"DecodeError",
        )
        if outgoing is big:
            assert value == b""
            assert headers["dlq.value.omitted.bytes"] == b"50001"
        else:
            assert value == outgoing.value
            assert not [n for n in headers if n.endswith(".omitted.bytes")]


async def test_a_dlq_topic_too_small_for_any_dead_letter_stops_the_agent_at_start(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    # 200 bytes cannot hold even a letter's coordinates: the agent refuses to start, naming
    # the setting, before it ingests a record (not on the first bad record, which would
    # stop it again on every start).
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await _dlq_topic(bootstrap, prefix, 200)
    await create_topics(bootstrap, prefix, partitions=1)  # the data topics
    await produce(bootstrap, prefix, fleet_traffic(50, seed=6))
    log = tmp_path / "agent.log"
    agent = AgentProcess(agent_env(bootstrap, database_url, prefix, prefix), log).start()
    try:

        async def stopped() -> bool:
            return not agent.alive()

        await until(stopped, within=90, what="the agent started with a DLQ topic of 200 bytes")
        assert agent.wait(0) == 2
        text = log.read_text()
        assert (
            f"dead-letter topic {prefix}pipeline.dlq: its max.message.bytes is 200, below "
        ) in text, text[-3000:]
        assert "set the topic's max.message.bytes to at least" in text
    finally:
        agent.kill()
    assert await stored_offsets(database_url, prefix, prefix) == {}
    for table in [*APPEND_TABLE.values(), "dead_letters"]:
        assert await count_rows(database_url, table) == 0, table


async def test_a_dlq_topic_lowered_while_the_agent_runs_gets_letters_sized_to_its_new_limit(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    # The limit read at start-up is Kafka's default; an operator lowers it to 20000 while the
    # agent runs. The first letter over it is refused: the agent reads the limit again, renews
    # its producer (the refused batch left its sequence behind) and sizes letters to 20000
    # from then on; it never stops, and every good record lands once.
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    dlq = topic_name(DLQ_TOPIC, prefix)
    log = tmp_path / "agent.log"
    agent = AgentProcess(agent_env(bootstrap, database_url, prefix, prefix), log).start()
    traffic = fleet_traffic(300, seed=7)  # one call: its (key, version) pairs are distinct
    outgoing = traffic[:100]
    sent = await produce(bootstrap, prefix, outgoing)
    try:
        pid = agent.pid

        async def still_running() -> None:
            assert agent.alive(), log.read_text()[-3000:]
            assert agent.pid == pid

        await wait_caught_up(
            database_url, bootstrap, prefix, prefix, within=90, on_poll=still_running
        )
        settings = kafka_clients.kafka_settings(bootstrap)
        admin = kafka_clients.admin(settings)
        await admin.start()
        try:
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, dlq, {"max.message.bytes": "20000"})]
            )
        finally:
            await admin.close()

        async def enforced() -> bool:  # the broker refuses a 30 kB record on the topic now
            producer = kafka_clients.producer(settings, acks="all")
            await producer.start()
            try:
                await producer.send_and_wait(dlq, b"x" * 30_000, key=b"probe")
            except MessageSizeTooLargeError:
                return True
            finally:
                await producer.stop()
            return False  # not yet: _dlq_letters skips the probe

        await until(enforced, within=30, what="the broker enforcing max.message.bytes=20000")
        first = Outgoing(METRICS, b"m1", b"{" + b"x" * 50_000, "DecodeError")
        second = Outgoing(METRICS, b"m2", b"{" + b"y" * 50_000, "DecodeError")
        more = traffic[100:]
        sent += await produce(bootstrap, prefix, [first, *more[:100]])
        outgoing += [first, *more[:100]]
        await wait_caught_up(
            database_url, bootstrap, prefix, prefix, within=90, on_poll=still_running
        )
        sent += await produce(bootstrap, prefix, [second, *more[100:]])
        outgoing += [second, *more[100:]]
        ends = await wait_caught_up(
            database_url, bootstrap, prefix, prefix, within=90, on_poll=still_running
        )
        await still_running()
        await assert_exactly_once(database_url, prefix, prefix, sent, ends)
        assert agent.stop() == 0
    finally:
        agent.kill()
    text = log.read_text()
    assert "refused a dead letter of at most 1048576 bytes" in text, text[-3000:]
    assert "the topic's limit is now 20000 bytes: letters sized to it" in text
    at = {
        (s.topic, s.partition, s.offset): o for s, o in zip(sent, outgoing, strict=True) if s.poison
    }
    on_topic = await _dlq_letters(bootstrap, prefix, 2)
    assert set(on_topic) == set(at)
    letters = {o.key: on_topic[c] for c, o in at.items()}
    for key_sent in (b"m1", b"m2"):  # sized to the new limit: only the value left out
        key, value, headers = letters[key_sent]
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers.items()))
        assert size <= 20_000
        assert (key, value, headers["dlq.value.omitted.bytes"]) == (key_sent, b"", b"50001")
        assert "dlq.key.omitted.bytes" not in headers
        assert b"JSON is malformed" in headers["dlq.reason"]
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        whole = {
            r["record_key"]: r["record_value"]
            for r in await conn.fetch("SELECT record_key, record_value FROM dead_letters")
        }
    finally:
        await conn.close()
    assert whole == {b"m1": first.value, b"m2": second.value}
