"""Time-partitioned tables under load, end to end on real servers (docs/streams.md,
"Partitions and retention"): a user's stream partitioned by the hour and the built-in
``metrics`` (by the day), whose records' times straddle partition boundaries, ingested by
``pipeline run`` agents while one is SIGKILLed and restarted and ``pipeline partitions
maintain`` runs beside them. The exactly-once oracle holds, and every row is in the partition
its time names (none left in ``DEFAULT`` after a last maintenance pass).

The boundaries pass during the test by the records' times, not the clock's: the user stream's
times run from an hour before the test to an hour after it (the previous hour, which no
partition covers until maintenance makes one for the rows in ``DEFAULT``; the current hour;
the next, made ahead), the metrics' across last midnight (yesterday: ``DEFAULT`` first) and
the coming one (both days made ahead).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest

from pipeline import catalog as catalogs
from pipeline import partitions, sql_names, testbed
from pipeline.catalog import Catalog, StreamSpec
from pipeline.records import Metric, encode
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    AgentProcess,
    Outgoing,
    Sent,
    assert_caught_up_exactly_once,
    create_topics,
    produce_paced,
)
from tests.integration.test_catalog_streams import (
    agent_log,
    env_for,
    fetch,
    fresh_database,
    pipeline_ok,
)

pytestmark = pytest.mark.timeout(600)

# builtin streams kept: the metrics table is the built-in one, partitioned by day.
READINGS = """
[[streams]]
name = "readings"
topic = "plant.readings"
table = "plant.readings"
key = ["reading_id"]
partition_by = "taken_at"
partition_interval = "hour"
partitions_ahead = 3

[streams.columns]
reading_id = "uuid"
sensor = "text"
value = "double precision"
taken_at = "timestamptz"
"""
READINGS_COUNT = 4_000
METRICS_COUNT = 4_000


def readings(
    rng: random.Random, spec: StreamSpec, now: datetime
) -> list[tuple[Outgoing, datetime]]:
    """Readings timed from an hour before ``now`` to an hour after it, in time order as a
    plant sends them: three hour partitions, the first not made yet."""
    out = []
    for i in range(READINGS_COUNT):
        taken = now - timedelta(hours=1) + timedelta(hours=2) * (i / READINGS_COUNT)
        taken += timedelta(microseconds=rng.randrange(1000))
        reading_id = uuid.UUID(int=rng.getrandbits(128))
        value = {
            "reading_id": str(reading_id),
            "sensor": f"s-{rng.randrange(40)}",
            "value": rng.random() * 100,
            "taken_at": taken.isoformat(),
        }
        out.append((Outgoing(spec, str(reading_id).encode(), msgspec.json.encode(value)), taken))
    return out


def metrics(rng: random.Random, now: datetime) -> list[tuple[Outgoing, datetime]]:
    """The built-in metrics, half timed across last midnight (yesterday has no partition
    yet), half across the coming one (both days made ahead); each half in time order."""
    stream = STREAM_BY_NAME["metrics"]
    today = partitions.floor(now, "day")
    out = []
    for midnight in (today, today + timedelta(days=1)):
        for i in range(METRICS_COUNT // 2):
            ts = midnight - timedelta(hours=1) + timedelta(hours=2) * (i / (METRICS_COUNT // 2))
            record = Metric(
                f"agent-{rng.randrange(143):04d}",
                rng.choice(("cpu_percent", "memory_mb", "latency_ms")),
                round(rng.random() * 100, 3),
                ts,
                {"region": rng.choice(("eu", "us"))},
            )
            out.append((Outgoing(stream, stream.key(record), encode(record)), ts))
    return out


def _merge(
    rng: random.Random, *streams: list[tuple[Outgoing, datetime]]
) -> list[tuple[Outgoing, datetime]]:
    """The streams interleaved at random, each keeping its order."""
    slots = [i for i, s in enumerate(streams) for _ in s]
    rng.shuffle(slots)
    iterators = [iter(s) for s in streams]
    return [next(iterators[i]) for i in slots]


def expected_partitions(table: str, interval: str, times: list[datetime]) -> Counter[str]:
    """How many rows each partition of ``table`` must hold: where each record's time says."""
    return Counter(
        partitions.partition_name(table, partitions.interval_range(t, interval), interval)
        for t in times
    )


async def rows_by_partition(database_url: str, table: str) -> Counter[str]:
    """How many rows each partition of ``table`` holds, by the partition's bare name."""
    rows = await fetch(
        database_url,
        f"SELECT c.relname AS name, count(*) AS n FROM {sql_names.table(table)} t "
        "JOIN pg_class c ON c.oid = t.tableoid GROUP BY c.relname",
    )
    return Counter({r["name"]: r["n"] for r in rows})


async def bounds(database_url: str, table: str) -> dict[str, str]:
    """Each partition of ``table`` and its bound, as PostgreSQL prints it in UTC."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute("SET TimeZone = 'UTC'")
        rows = await conn.fetch(
            "SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = $1::text::regclass",
            sql_names.table(table),
        )
    finally:
        await conn.close()
    return {r["name"]: r["bound"] for r in rows}


def bound_of(range_: partitions.Range) -> str:
    def at(t: datetime) -> str:
        return t.strftime("%Y-%m-%d %H:%M:%S+00")

    return f"FOR VALUES FROM ('{at(range_.start)}') TO ('{at(range_.end)}')"


def assert_partitions_named_by_range(
    table: str, interval: str, found: dict[str, str], ranges: list[partitions.Range]
) -> None:
    """Every partition of ``table`` covers the range its name says, and DEFAULT is there;
    each of ``ranges`` has its partition."""
    named = {partitions.partition_name(table, r, interval): bound_of(r) for r in ranges}
    default = partitions.default_name(table)
    assert found.get(default) == "DEFAULT", found
    missing = {n: b for n, b in named.items() if found.get(n) != b}
    assert not missing, f"{table}: partitions missing or mis-bounded {missing}; found {found}"
    for name, bound in found.items():
        if name == default:
            continue
        start = datetime.strptime(bound.split("'")[1], "%Y-%m-%d %H:%M:%S+00").replace(tzinfo=UTC)
        range_ = partitions.interval_range(start, interval)
        assert (name, bound) == (
            partitions.partition_name(table, range_, interval),
            bound_of(range_),
        )


async def test_partitioned_streams_across_boundaries_exactly_once_through_a_sigkill_and_maintenance(
    servers: Servers, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    catalog_file = tmp_path / "streams.toml"
    catalog_file.write_text(READINGS)
    catalog: Catalog = catalogs.load(catalog_file)
    readings_spec, metrics_spec = catalog["readings"], catalog["metrics"]
    assert readings_spec.partitioning is not None and metrics_spec.partitioning is not None
    assert (readings_spec.partitioning.interval, metrics_spec.partitioning.interval) == (
        "hour",
        "day",
    )
    rng = random.Random(21)
    now = datetime.now(UTC)
    traffic = _merge(rng, readings(rng, readings_spec, now), metrics(rng, now))
    started = time.monotonic()
    async with fresh_database(servers.endpoints.database_url, unique) as database_url:
        env = env_for(
            bootstrap, database_url, prefix, catalog_file,
            batch_max_records=300, session_timeout_ms=6000,
        )  # fmt: skip
        await pipeline_ok(env, "migrate")
        first = await pipeline_ok(env, "partitions", "maintain")
        print(f"\npipeline partitions maintain (before the load):\n{first}")
        await create_topics(bootstrap, prefix, 3, catalog)

        agents = [AgentProcess(env, tmp_path / f"agent{i}.log").start() for i in range(3)]
        sent_all = asyncio.Event()

        async def send() -> list[Sent]:
            try:
                return await produce_paced(bootstrap, prefix, [o for o, _ in traffic], over=16.0)
            finally:
                sent_all.set()

        async def disturb() -> str:
            await asyncio.sleep(rng.uniform(3.0, 5.0))
            victim = agents[rng.randrange(3)]
            assert victim.alive(), agent_log(victim)
            victim.kill()  # SIGKILL mid-batch: no commit, no goodbye to the group
            victim.start()
            print(f"agent pid {victim.pid} SIGKILLed and restarted")
            # Beside live ingestion: the partitions for the rows in DEFAULT, and the move.
            during = await pipeline_ok(env, "partitions", "maintain")
            assert not sent_all.is_set(), "the kill and maintenance must land while records arrive"
            return during

        try:
            sent, during = await asyncio.gather(send(), disturb())
            print(f"pipeline partitions maintain (during the load):\n{during}")
            await assert_caught_up_exactly_once(
                database_url, bootstrap, prefix, sent, within=240, catalog=catalog
            )
            for agent in agents:
                assert agent.alive(), agent_log(agent)
        finally:
            await testbed.stop_agents(agents)
            for agent in agents:
                agent.kill()

        last_pass = datetime.now(UTC)
        last = await pipeline_ok(env, "partitions", "maintain")
        print(f"pipeline partitions maintain (the last pass):\n{last}")
        # The moves kept every row once: the oracle again, agents stopped.
        await assert_caught_up_exactly_once(
            database_url, bootstrap, prefix, sent, within=30, catalog=catalog
        )
        for spec, kind in ((readings_spec, "hour"), (metrics_spec, "day")):
            assert spec.partitioning is not None
            table = spec.table
            times = [t for o, t in traffic if o.stream.name == spec.name]
            found = await rows_by_partition(database_url, table)
            assert found == expected_partitions(table, kind, times), (table, found)
            assert partitions.default_name(table) not in found  # DEFAULT holds nothing
            ranges = sorted({partitions.interval_range(t, kind) for t in times})
            ranges += partitions.wanted(last_pass, kind, spec.partitioning.ahead)
            assert_partitions_named_by_range(table, kind, await bounds(database_url, table), ranges)
            print(f"{table}: {dict(sorted(found.items()))}")
    # The records really straddled the boundaries the test is about.
    for name, kind in (("readings", "hour"), ("metrics", "day")):
        times = [t for o, t in traffic if o.stream.name == name]
        assert len({partitions.interval_range(t, kind) for t in times}) == 3
    print(f"{len(traffic)} records: {time.monotonic() - started:.1f}s")
