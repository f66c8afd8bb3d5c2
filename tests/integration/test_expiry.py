"""Late records on real servers (docs/streams.md, "Late records"): rows older than their
stream's retention horizon are counted, not written, and their offsets commit like any other.

One `pipeline run` agent, with ``PIPELINE_RETENTION_METRICS=1d`` and a user stream whose
catalog keeps 3 days of a ``date`` column, ingests records of which an exact known set is
older than the horizon, among rows the database refuses (a CHECK added for the test) and
records that do not decode. The exactly-once oracle requires the expired ones absent and every
other one present once or dead-lettered once; ``pipeline_rows_expired_total`` counts them. A
`pipeline replay` of the whole range then reports exactly the rows it skipped, and a
`pipeline dlq replay` under a shorter retention settles the letters that expired meanwhile.
"""

from __future__ import annotations

import json
import random
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline import catalog as catalogs
from pipeline import testbed
from pipeline.catalog import Catalog
from pipeline.devstack.processes import choose_port
from pipeline.records import Metric, encode
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    T0,
    AgentProcess,
    Outgoing,
    Sent,
    assert_caught_up_exactly_once,
    assert_exactly_once,
    create_topics,
    produce,
)
from tests.integration.test_catalog_streams import (
    env_for,
    execute,
    fetch,
    fresh_database,
    pipeline_ok,
)

pytestmark = pytest.mark.timeout(600)

METRICS = STREAM_BY_NAME["metrics"]
# A user stream partitioned by a date column, kept 3 days (in its catalog, not by a setting),
# and one kept for ever.
READINGS = """
[[streams]]
name = "readings"
topic = "plant.readings"
table = "readings"
partition_by = "taken_on"
retention = "3d"

[streams.columns]
reading_id = "uuid"
sensor = "text"
taken_on = "date"
value = "double precision"

[[streams]]
name = "audits"
topic = "plant.audits"
table = "audits"
partition_by = "at"

[streams.columns]
at = "timestamptz"
note = "text"
"""
# Rows the database refuses: a constraint the records cannot know about.
REFUSED_VALUE = 5_000.0
CHECK = "ALTER TABLE performance_metrics ADD CONSTRAINT expiry_test_value CHECK (value < 1000)"


def traffic(catalog: Catalog, now: datetime, rng: random.Random) -> list[Outgoing]:
    """Metrics an hour old (kept) and two days old (expired under 1d); audits from T0, weeks
    old, kept for ever (no retention); readings of today and yesterday (kept) and of ten days
    ago (expired under 3d); metrics the database refuses, recent (dead letters) and old
    (expired: never written, so never refused); records that do not decode."""
    out: list[Outgoing] = []
    for i in range(3_000):
        old = i % 5 == 0
        ts = now - (timedelta(days=2) if old else timedelta(hours=1)) + timedelta(milliseconds=i)
        metric = Metric(f"agent-{i % 40}", "cpu", float(i % 100), ts, {"i": i})
        out.append(Outgoing(METRICS, metric.agent_id.encode(), encode(metric), expired=old))
    audits = catalog["audits"]
    for i in range(1_000):
        audit = {"at": (T0 + timedelta(seconds=i)).isoformat(), "note": f"n{i}"}
        out.append(Outgoing(audits, None, json.dumps(audit).encode()))
    readings = catalog["readings"]
    today = now.date()
    for i in range(1_200):
        old = i % 4 == 0
        day = today - timedelta(days=10 if old else i % 2)
        reading_id = uuid.UUID(int=rng.getrandbits(128))
        value: dict[str, object] = {"reading_id": str(reading_id), "taken_on": str(day)}
        value.update(sensor=f"s{i % 7}", value=i / 8)
        key = str(reading_id).encode()
        out.append(Outgoing(readings, key, json.dumps(value).encode(), expired=old))
    for i, ts in enumerate(refused_times(now)):
        metric = Metric("agent-refused", "cpu", REFUSED_VALUE, ts, {"refused": i})
        out.append(Outgoing(METRICS, b"agent-refused", encode(metric), poison="DatabaseRejected"))
    for i in range(10):  # as old as can be, and still refused: expired rows are not written
        metric = Metric("agent-refused", "cpu", REFUSED_VALUE, now - timedelta(days=3), {"i": i})
        out.append(Outgoing(METRICS, b"agent-refused", encode(metric), expired=True))
    out += [Outgoing(METRICS, b"agent-x", b"{not json", poison="DecodeError")] * 3
    rng.shuffle(out)
    return out


def refused_times(now: datetime) -> list[datetime]:
    """The times of the metrics the database refuses: 8 five hours old and 6 ten minutes old,
    all kept under 1d; under 2h the first 8 have expired."""
    return [now - timedelta(hours=5)] * 8 + [now - timedelta(minutes=10)] * 6


def expired_counts(sent: list[Sent]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in sent:
        if s.expired:
            stream = "metrics" if s.topic == METRICS.topic else "readings"
            counts[stream] = counts.get(stream, 0) + 1
    return counts


def samples(metrics_address: str, name: str) -> dict[str, float]:
    """A counter's value per label set (the labels as /metrics writes them)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        line.split(" ")[0].removeprefix(name): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{")
    }


async def test_expired_records_are_counted_not_written_and_a_replay_says_how_many_it_skipped(
    servers: Servers, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    catalog_file = tmp_path / "streams.toml"
    catalog_file.write_text(READINGS)  # beside the built-in streams
    catalog = catalogs.load(catalog_file)
    now = datetime.now(UTC)
    outgoing = traffic(catalog, now, random.Random(21))
    metrics_address = f"127.0.0.1:{choose_port(0)}"
    async with fresh_database(servers.endpoints.database_url, unique) as database_url:
        env = env_for(
            bootstrap, database_url, prefix, catalog_file,
            retention_metrics="1d", batch_max_records=200,
        )  # fmt: skip
        await pipeline_ok(env, "migrate")
        await execute(testbed.as_migrator(database_url), CHECK)
        await create_topics(bootstrap, prefix, 2, catalog)
        sent = await produce(bootstrap, prefix, outgoing)
        expired = expired_counts(sent)
        assert expired == {"metrics": 610, "readings": 300}
        agent = AgentProcess(
            {**env, "PIPELINE_METRICS_ADDRESS": metrics_address}, tmp_path / "agent.log"
        ).start()
        try:
            ends = await assert_caught_up_exactly_once(
                database_url, bootstrap, prefix, sent, within=180, catalog=catalog
            )
            counted = samples(metrics_address, "pipeline_rows_expired_total")
            assert counted == {
                '{stream="metrics"}': expired["metrics"],
                '{stream="readings"}': expired["readings"],
            }
        finally:
            print((tmp_path / "agent.log").read_text()[-5000:])
            assert agent.stop() == 0
        # The oracle found the stored offsets at the log's ends: past every expired record.
        assert all(s.offset < ends[(s.topic, s.partition)] for s in sent if s.expired)

        # A replay of the whole log: the same rows written again, the expired ones skipped
        # and counted, with the reason.
        everything = ("--stream", "metrics,audits,readings", "--from", "earliest", "--to", "now")
        replayed = json.loads(await pipeline_ok(env, "replay", *everything, "--json"))
        print(f"\npipeline replay --json: {replayed}")
        assert replayed["records"] == len(sent)
        assert replayed["expired"] == {
            "metrics": {"rows": expired["metrics"], "why": "its ts is older than now minus 1d"},
            "readings": {
                "rows": expired["readings"],
                "why": "its taken_on is older than now minus 3d",
            },
        }
        text = await pipeline_ok(
            env, "replay", "--stream", "readings", "--from", "earliest", "--to", "now"
        )
        assert f"{expired['readings']:,} expired rows skipped" in text, text
        assert (
            f"{expired['readings']:,} readings row(s) skipped as older than the stream's "
            "retention horizon (its taken_on is older than now minus 3d)" in text
        ), text
        await assert_exactly_once(database_url, prefix, prefix, sent, ends, catalog=catalog)

        # The constraint dropped, the refused metrics redriven under a 2h retention: those
        # five hours old have expired meanwhile; they are settled, not written.
        await execute(
            testbed.as_migrator(database_url),
            "ALTER TABLE performance_metrics DROP CONSTRAINT expiry_test_value",
        )
        redriven = json.loads(
            await pipeline_ok(
                {**env, "PIPELINE_RETENTION_METRICS": "2h"}, "dlq", "replay", "--json"
            )
        )
        print(f"pipeline dlq replay --json: {redriven}")
        assert (redriven["dry_run"], redriven["redriven"], redriven["new_rows"]) == (False, 6, 6)
        assert redriven["expired"] == {
            "metrics": {"letters": 8, "why": "its ts is older than now minus 2h"}
        }
        assert {c: f["letters"] for c, f in redriven["still_failing"].items()} == {"DecodeError": 3}
        letters = await fetch(
            database_url,
            "SELECT src_partition, src_offset, error_class, redriven_at IS NOT NULL AS done "
            "FROM dead_letters WHERE group_id = $1",
            prefix,
        )
        assert sorted((r["error_class"], r["done"]) for r in letters) == sorted(
            [("DatabaseRejected", True)] * 14 + [("DecodeError", False)] * 3
        )
        refused = {
            (r["src_partition"], r["src_offset"])
            for r in letters
            if r["error_class"] == "DatabaseRejected"
        }
        rows = await fetch(
            database_url,
            "SELECT src_partition, src_offset, ts FROM performance_metrics WHERE value = $1",
            REFUSED_VALUE,
        )
        assert len(rows) == 6  # the ten minutes old; not the five hours old, nor the expired
        assert {(r["src_partition"], r["src_offset"]) for r in rows} <= refused
        assert all(r["ts"] == now - timedelta(minutes=10) for r in rows)
