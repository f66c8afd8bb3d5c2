"""What the DatabaseAgent tests share: traffic, a recording producer, agent processes, and
the exactly-once oracle (docs/exactly-once.md). What `pipeline bench` needs too (topics,
producing, offsets, agent processes) is in :mod:`pipeline.testbed`; this module adds what
only the tests need.

The oracle compares the database with what was SENT, record by record, using each row's
provenance (source partition and offset): never the tables with themselves. A record the test
made older than its stream's retention horizon must be in no table and no dead letter. It takes the
streams and their tables from a :class:`~pipeline.catalog.Catalog` (the built-in one unless
given), so a user's streams are judged as the built-in ones are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import msgspec
from aiokafka.errors import GroupCoordinatorNotAvailableError
from aiokafka.structs import RecordMetadata

from consumers.agent import DatabaseAgent
from pipeline import catalog as catalogs
from pipeline import kafka_clients, sql_names, testbed
from pipeline.catalog import Catalog, StreamSpec
from pipeline.config import load_config
from pipeline.kafka_clients import KafkaSettings
from pipeline.records import (
    AgentEvent,
    AnalyticsEvent,
    ConfigChange,
    Metric,
    Record,
    StateChange,
    encode,
    topic_name,
)
from pipeline.testbed import AgentProcess  # noqa: F401 - the tests import it from here
from tests.builtin_streams import STREAM_BY_NAME, STREAMS, Stream

# Where each stream's every record lands once (the "latest" tables hold one row per key).
APPEND_TABLE = {
    "states": "agent_state_history",
    "events": "system_events",
    "metrics": "performance_metrics",
    "analytics": "user_analytics",
    "config": "system_config_history",
}
STREAM_OF_TOPIC = {s.topic: s for s in STREAMS}
T0 = datetime(2026, 11, 1, tzinfo=UTC)


class _Streamlike(Protocol):
    """What the harness needs of a stream: a built-in :class:`~pipeline.records.Stream` or a
    catalog :class:`~pipeline.catalog.StreamSpec`."""

    @property
    def name(self) -> str: ...

    @property
    def topic(self) -> str: ...


@dataclass(frozen=True)
class Outgoing:
    stream: Stream | _Streamlike
    key: bytes | None
    value: bytes | None  # None: a tombstone
    poison: str | None = None  # why the agent must dead-letter it, or None when it is good
    headers: tuple[tuple[str, bytes | None], ...] = ()
    # Older than its stream's retention horizon: the agent must neither write it nor
    # dead-letter it (docs/streams.md, "Late records").
    expired: bool = False


@dataclass(frozen=True)
class Sent:
    topic: str  # the default topic name (no prefix)
    partition: int
    offset: int
    poison: str | None
    expired: bool = False


def fleet_traffic(count: int, *, agents: int = 143, seed: int = 0) -> list[Outgoing]:
    """``count`` good records over all five streams, a metrics-heavy mix like a real fleet.

    State and config versions per key are sent in a shuffled order, so the "latest" tables
    must pick the highest version, not the last one to arrive.
    """
    rng = random.Random(seed)
    weights = {"metrics": 50, "events": 20, "analytics": 15, "states": 10, "config": 5}
    streams = {s.name: s for s in STREAMS}
    names = rng.choices(list(weights), weights=list(weights.values()), k=count)
    per_stream = Counter(names)
    records: dict[str, list[Record]] = {
        "metrics": [
            Metric(
                f"agent-{i % agents}",
                rng.choice(("cpu", "memory", "latency_ms", "queue_depth")),
                round(rng.random() * 100, 3),
                T0 + timedelta(milliseconds=i),
                {"region": rng.choice(("eu", "us")), "i": i},
            )
            for i in range(per_stream["metrics"])
        ],
        "events": [
            AgentEvent(
                uuid.UUID(int=rng.getrandbits(128)),
                f"agent-{i % agents}",
                rng.choice(("started", "stopped", "task_done", "error")),
                T0 + timedelta(milliseconds=i),
                rng.choice(("info", "warning", "error")),
                {"task": i},
            )
            for i in range(per_stream["events"])
        ],
        "analytics": [
            AnalyticsEvent(
                uuid.UUID(int=rng.getrandbits(128)),
                f"user-{rng.randrange(500)}",
                rng.choice(("click", "view", "purchase")),
                T0 + timedelta(milliseconds=i),
                {"page": f"/p/{i % 37}"},
            )
            for i in range(per_stream["analytics"])
        ],
        "states": _versioned(per_stream["states"], agents, rng, _state),
        "config": _versioned(per_stream["config"], 20, rng, _config),
    }
    out = []
    for name in names:
        record = records[name].pop()
        stream = streams[name]
        out.append(Outgoing(stream, stream.key(record), encode(record)))
    return out


def _state(key: int, version: int) -> Record:
    return StateChange(
        f"agent-{key}",
        f"state-v{version}",
        version,
        T0 + timedelta(seconds=version),
        {"v": version},
    )


def _config(key: int, version: int) -> Record:
    return ConfigChange(f"setting.{key}", {"v": version}, version, T0, f"admin-{version}")


def _versioned(
    count: int, keys: int, rng: random.Random, make: Callable[[int, int], Record]
) -> list[Record]:
    versions: dict[int, int] = {}
    records = []
    for i in range(count):
        key = i % keys
        versions[key] = versions.get(key, -1) + 1
        records.append(make(key, versions[key]))
    rng.shuffle(records)
    return records


async def produce(bootstrap: str, prefix: str, outgoing: list[Outgoing]) -> list[Sent]:
    """Send everything (acks=all, idempotent) and return where each record landed."""
    messages = [
        testbed.Message(topic_name(o.stream.topic, prefix), o.value, o.key, o.headers)
        for o in outgoing
    ]
    acked: list[RecordMetadata] = []
    await testbed.produce(
        _kafka(bootstrap),
        (messages[start : start + 5000] for start in range(0, len(messages), 5000)),
        acked=acked.extend,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    return [
        Sent(o.stream.topic, meta.partition, meta.offset, o.poison, o.expired)
        for o, meta in zip(outgoing, acked, strict=True)
    ]


async def produce_paced(
    bootstrap: str, prefix: str, outgoing: list[Outgoing], *, over: float, chunks: int = 40
) -> list[Sent]:
    """Send ``outgoing`` in ``chunks`` spread evenly over ``over`` seconds, so ingestion is
    still under way while a test injects a fault."""
    size = -(-len(outgoing) // chunks)
    sent: list[Sent] = []
    for start in range(0, len(outgoing), size):
        sent += await produce(bootstrap, prefix, outgoing[start : start + size])
        await asyncio.sleep(over / chunks)
    return sent


def scrape(metrics_address: str, name: str) -> float:
    """The sum of a metric's samples on a running agent's /metrics endpoint."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def _kafka(bootstrap: str) -> KafkaSettings:
    return kafka_clients.kafka_settings(bootstrap)  # with the environment's TLS and SASL


def _by_default_name(found: testbed.Offsets, prefix: str) -> dict[tuple[str, int], int]:
    return {(topic.removeprefix(prefix), partition): o for (topic, partition), o in found.items()}


async def create_topics(
    bootstrap: str, prefix: str, partitions: int, catalog: Catalog | None = None
) -> None:
    """The data topics (of ``catalog``'s streams; default: the built-in ones) and the
    dead-letter topic under ``prefix``."""
    await testbed.create_topics(_kafka(bootstrap), prefix, partitions, catalog)


async def end_offsets(
    bootstrap: str, prefix: str, catalog: Catalog | None = None
) -> dict[tuple[str, int], int]:
    """The end offset of every partition of the catalog's data topics (default: the built-in
    streams'), by default topic name."""
    topics = testbed.data_topics(prefix, catalog)
    ends = await testbed.end_offsets(_kafka(bootstrap), prefix, catalog)
    found = {topic for topic, _ in ends}
    assert found == set(topics), f"data topics missing: {sorted(set(topics) - found)}"
    return _by_default_name(ends, prefix)


async def stored_offsets(database_url: str, group: str, prefix: str) -> dict[tuple[str, int], int]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        stored = await testbed.stored_offsets(conn, group)
    finally:
        await conn.close()
    return _by_default_name(stored, prefix)


async def kafka_committed(bootstrap: str, group: str, prefix: str) -> dict[tuple[str, int], int]:
    admin = kafka_clients.admin(_kafka(bootstrap))
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group)
    except GroupCoordinatorNotAvailableError:
        # A fresh broker elects the group's coordinator after the first join: nothing is
        # committed yet, so nothing can have run ahead of the database.
        return {}
    finally:
        await admin.close()
    return {
        (tp.topic.removeprefix(prefix), tp.partition): meta.offset
        for tp, meta in found.items()
        if meta.offset >= 0
    }


async def consumer_group(bootstrap: str, group: str) -> tuple[str, list[str]]:
    """The consumer group's state and its members' client ids (sorted), as the broker says."""
    admin = kafka_clients.admin(_kafka(bootstrap))
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
    except GroupCoordinatorNotAvailableError:  # no member has joined yet
        return "Unknown", []
    finally:
        await admin.close()
    (found,) = response.to_object()["groups"]
    members = sorted(f"{m['client_id']}/{m['member_id']}" for m in found["members"])
    return found["state"], members


async def wait_caught_up(
    database_url: str,
    bootstrap: str,
    group: str,
    prefix: str,
    *,
    within: float,
    on_poll: Callable[[], Awaitable[None]] | None = None,
    catalog: Catalog | None = None,
) -> dict[tuple[str, int], int]:
    """Wait until every partition's stored offset is its end offset; return the end offsets.

    Also samples Kafka's committed offsets on the way: they must never run ahead of the
    database's (oracle point 5).
    """
    ends = await end_offsets(bootstrap, prefix, catalog)
    deadline = time.monotonic() + within
    stored: dict[tuple[str, int], int] = {}
    while time.monotonic() < deadline:
        committed = await kafka_committed(bootstrap, group, prefix)
        stored = await stored_offsets(database_url, group, prefix)
        ahead = {tp: o for tp, o in committed.items() if o > stored.get(tp, 0)}
        assert not ahead, f"Kafka's committed offsets ran ahead of the database's: {ahead}"
        if on_poll is not None:
            await on_poll()
        if all(stored.get(tp) == end for tp, end in ends.items()):
            return ends
        await asyncio.sleep(0.5)
    behind = {tp: (stored.get(tp), end) for tp, end in ends.items() if stored.get(tp) != end}
    raise AssertionError(f"not caught up after {within}s: (stored, end) = {behind}")


async def assert_exactly_once(
    database_url: str,
    group: str,
    prefix: str,
    sent: list[Sent],
    ends: dict[tuple[str, int], int],
    *,
    catalog: Catalog | None = None,
    landed: Mapping[str, set[tuple[int, int]]] | None = None,
) -> None:
    """The oracle: every record sent is in its table exactly once, or dead-lettered exactly
    once with a reason, or, expired, in neither; nothing else is there; stored offsets equal
    the end offsets (past the expired records too).

    For every table of every stream of ``catalog`` (default: the built-in streams), no two
    rows share a source (partition, offset): a record redelivered past a key's ``ON CONFLICT``
    or written under two keys shows here, whatever the table's keys. A table holding one row
    per record (append, history) holds the sources ``landed`` names for it, by default every
    good record of its stream; a "latest" table's rows come from good records of its stream.
    A good record is neither poison nor expired: an expired record's row is in no table.
    """
    catalog = catalog or catalogs.load()
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        for spec in catalog:
            good = {
                (s.partition, s.offset)
                for s in sent
                if s.topic == spec.topic and not s.poison and not s.expired
            }
            expired = {(s.partition, s.offset) for s in sent if s.topic == spec.topic and s.expired}
            for table in spec.table_names:
                ingested = await table_sources(conn, table)
                assert_once_per_source(table, ingested)
                written = expired & set(ingested)
                assert not written, f"{table}: expired records written: {_some(written)}"
                if table in spec.row_per_record:
                    expected = good if landed is None or table not in landed else landed[table]
                    assert set(ingested) == expected, (
                        f"{table}: lost {len(expected - set(ingested))} "
                        f"{_some(expected - set(ingested))}, unexpected "
                        f"{len(set(ingested) - expected)} {_some(set(ingested) - expected)}"
                    )
                else:
                    strays = set(ingested) - good
                    assert not strays, f"{table}: rows from no good record: {_some(strays)}"
        letters = await conn.fetch(
            "SELECT src_topic, src_partition, src_offset, error_class, reason FROM dead_letters "
            "WHERE group_id = $1",
            group,
        )
        dead = Counter(
            (r["src_topic"].removeprefix(prefix), r["src_partition"], r["src_offset"])
            for r in letters
        )
        assert all(n == 1 for n in dead.values()), f"dead-lettered twice: {dead}"
        poison = {(s.topic, s.partition, s.offset) for s in sent if s.poison}
        assert set(dead) == poison, (
            f"dead letters: missing {sorted(poison - set(dead))[:10]}, unexpected "
            + "; ".join(
                f"{r['src_topic']}[{r['src_partition']}]@{r['src_offset']}: {r['reason']}"
                for r in letters
                if (r["src_topic"].removeprefix(prefix), r["src_partition"], r["src_offset"])
                not in poison
            )[:2000]
        )
        assert all(r["reason"] and r["error_class"] for r in letters)
    finally:
        await conn.close()
    assert await stored_offsets(database_url, group, prefix) == ends


async def table_sources(conn: asyncpg.Connection, table: str) -> Counter[tuple[int, int]]:
    """How many rows of ``table`` (as the catalog names it) come from each source
    (partition, offset)."""
    rows = await conn.fetch(f"SELECT src_partition, src_offset FROM {sql_names.table(table)}")
    return Counter((r["src_partition"], r["src_offset"]) for r in rows)


def assert_once_per_source(table: str, ingested: Counter[tuple[int, int]]) -> None:
    """No two rows of ``table`` from one record; the error names the table and the sources."""
    duplicates = {source: n for source, n in sorted(ingested.items()) if n > 1}
    assert not duplicates, f"{table}: rows ingested more than once: " + ", ".join(
        f"partition {p} offset {o} ({n} rows)" for (p, o), n in list(duplicates.items())[:20]
    )


async def table_rows(
    conn: asyncpg.Connection, spec: StreamSpec, table: str
) -> dict[tuple[int, int], tuple[Any, ...]]:
    """The rows of one of ``spec``'s tables by source: the stream's columns in catalog order,
    jsonb decoded (PostgreSQL gives it as text, re-spaced)."""
    names = spec.column_names
    rows = await conn.fetch(
        f"SELECT {sql_names.columns([*names, 'src_partition', 'src_offset'])} "
        f"FROM {sql_names.table(table)}"
    )
    jsonb = [c.type == "jsonb" for c in spec.columns]
    return {
        (r["src_partition"], r["src_offset"]): tuple(
            json.loads(r[i]) if is_json and r[i] is not None else r[i]
            for i, is_json in enumerate(jsonb)
        )
        for r in rows
    }


async def assert_tables_match(
    database_url: str,
    catalog: Catalog,
    expected: Mapping[str, Mapping[tuple[int, int], tuple[Any, ...]]],
) -> None:
    """Every table ``expected`` names holds exactly its rows, row by row and column by
    column, by source (partition, offset): the tables against a model of the log."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        problems = []
        for spec in catalog:
            for table in spec.table_names:
                if table not in expected:
                    continue
                found = await table_rows(conn, spec, table)
                wanted = expected[table]
                missing = sorted(set(wanted) - set(found))
                extra = sorted(set(found) - set(wanted))
                differ = sorted(s for s in set(wanted) & set(found) if wanted[s] != found[s])
                if missing or extra or differ:
                    problems.append(
                        f"{table} ({len(found)} rows, {len(wanted)} expected): "
                        f"missing {len(missing)} {missing[:3]}, unexpected {len(extra)} "
                        f"{[(s, found[s]) for s in extra[:3]]}, different {len(differ)} "
                        + "; ".join(
                            f"{s}: {found[s]} != {wanted[s]} (expected)" for s in differ[:3]
                        )
                    )
        assert not problems, "\n".join(problems)
    finally:
        await conn.close()


def _some(sources: set[tuple[int, int]]) -> str:
    """A few (partition, offset) pairs of ``sources``, for an error message."""
    return f"e.g. {sorted(sources)[:5]}" if sources else ""


async def assert_caught_up_exactly_once(
    database_url: str,
    bootstrap: str,
    prefix: str,
    sent: list[Sent],
    *,
    within: float,
    catalog: Catalog | None = None,
    landed: Mapping[str, set[tuple[int, int]]] | None = None,
) -> dict[tuple[str, int], int]:
    """The whole oracle: wait for lag 0 (Kafka's offsets never ahead of the database's on the
    way), then every record exactly once; returns the end offsets. The group is ``prefix``."""
    ends = await wait_caught_up(
        database_url, bootstrap, prefix, prefix, within=within, catalog=catalog
    )
    await assert_exactly_once(
        database_url, prefix, prefix, sent, ends, catalog=catalog, landed=landed
    )
    return ends


def agent_env(
    bootstrap: str, database_url: str, prefix: str, group: str, **settings: object
) -> dict[str, str]:
    """:func:`pipeline.testbed.agent_env`, with 3 partitions for the topics the agent creates."""
    return testbed.agent_env(
        bootstrap, database_url, prefix, group, **{"topic_partitions": 3, **settings}
    )


@contextlib.asynccontextmanager
async def running_agent(
    bootstrap: str, database_url: str, prefix: str, **settings: object
) -> AsyncIterator[DatabaseAgent]:
    """A DatabaseAgent in this process (its metrics are inspectable), stopped on exit. The
    group is ``prefix``."""
    agent = DatabaseAgent(
        load_config(agent_env(bootstrap, database_url, prefix, prefix, **settings))
    )
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 60)


async def migrated(database_url: str, *statements: str) -> None:
    """Apply the migrations (as the migrator; the ``database_url`` fixture's database has
    them already), then ``statements`` as ``database_url``'s login: a change the agent does
    not know about."""
    await testbed.migrate(database_url)
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def claimed(database_url: str, group: str) -> bool:
    """Whether the group's agent has claimed its tables: it is past its checks at start (an
    agent refuses to start on a table its catalog does not fit: db.check_catalog), so a test
    may break a table under it now."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        found = await conn.fetchval("SELECT count(*) FROM table_owners WHERE group_id = $1", group)
        return bool(found)
    finally:
        await conn.close()


async def until(
    condition: Callable[[], Awaitable[bool]], *, within: float, what: str, every: float = 0.2
) -> None:
    """Wait for ``condition`` with a deadline; fail naming ``what``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"not within {within}s: {what}")


async def count_rows(database_url: str, table: str) -> int:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        count: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
        return count
    finally:
        await conn.close()


def of_stream(offsets: dict[tuple[str, int], int], stream: str) -> dict[tuple[str, int], int]:
    """The offsets of one stream's partitions (keys by default topic name)."""
    topic = STREAM_BY_NAME[stream].topic
    return {tp: o for tp, o in offsets.items() if tp[0] == topic}


async def assert_latest_tables_follow_the_log(database_url: str, outgoing: list[Outgoing]) -> None:
    """agent_states and system_config hold, per key, the highest version sent, whatever the
    order it arrived in; their history tables hold every version sent."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        for stream, table, key in (
            ("states", "agent_states", "agent_id"),
            ("config", "system_config", "key"),
        ):
            highest: dict[str, int] = {}
            for out in outgoing:
                if out.stream.name == stream:
                    record = msgspec.json.decode(out.value, type=out.stream.record_type)
                    k = getattr(record, key)
                    highest[k] = max(highest.get(k, -1), record.version)
            rows = await conn.fetch(f"SELECT {key} AS k, version FROM {table}")
            assert {r["k"]: r["version"] for r in rows} == highest, table
            history = await conn.fetchval(f"SELECT count(*) FROM {APPEND_TABLE[stream]}")
            assert history == sum(1 for o in outgoing if o.stream.name == stream), table
    finally:
        await conn.close()
