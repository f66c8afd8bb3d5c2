"""`pipeline replay` against the real broker and database: a truncated table replayed while
live ingestion goes on, a replay killed twice and resumed, a time range, a second database,
and a start that retention deleted. Every check compares with what was SENT (the oracle)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition
from aiokafka.admin.records_to_delete import RecordsToDelete

from consumers.replay import Replayer, Request
from pipeline import cli, kafka_clients, testbed
from pipeline.config import load_config
from pipeline.records import Metric, encode
from pipeline.replay import AtOffset, Earliest, Now, ReplayError
from pipeline.testbed import REPLAY_COMMAND
from tests.builtin_streams import STREAM_BY_NAME, STREAMS
from tests.conftest import Servers
from tests.integration.harness import (
    T0,
    Outgoing,
    Sent,
    agent_env,
    assert_caught_up_exactly_once,
    assert_exactly_once,
    assert_latest_tables_follow_the_log,
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

METRICS = STREAM_BY_NAME["metrics"]
DATA = (
    "agent_states, agent_state_history, system_events, performance_metrics, user_analytics, "
    "system_config, system_config_history"
)


def _replayer(bootstrap: str, database_url: str, prefix: str, **kwargs: object) -> Replayer:
    config = load_config(agent_env(bootstrap, database_url, prefix, prefix))
    return Replayer(config, **kwargs)  # type: ignore[arg-type]


async def _sql(database_url: str, statement: str) -> None:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _metric_sources(database_url: str) -> set[tuple[int, int]]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT src_partition, src_offset FROM performance_metrics")
    finally:
        await conn.close()
    return {(r["src_partition"], r["src_offset"]) for r in rows}


async def _replay_done(database_url: str) -> tuple[int | None, int]:
    """The newest replay's id and records done (None before there is one)."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        if not await conn.fetchval("SELECT to_regclass('replays') IS NOT NULL"):
            return None, 0
        row = await conn.fetchrow(
            "SELECT r.id, coalesce(sum(p.next_offset - p.start_offset), 0) AS done FROM replays r "
            "LEFT JOIN replay_partitions p ON p.replay_id = r.id GROUP BY r.id "
            "ORDER BY r.id DESC LIMIT 1"
        )
    finally:
        await conn.close()
    return (None, 0) if row is None else (row["id"], int(row["done"]))


async def test_a_truncated_table_is_replayed_beside_live_ingestion_exactly_once(
    servers: Servers, database_url: str, unique: str
) -> None:
    """The incident: performance_metrics truncated while the agent ingests. A replay of the
    metrics stream from earliest to now, while records keep arriving, puts back exactly what
    the log holds; live ingestion never stops, and the replay never writes what is live's."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(database_url)
    traffic = fleet_traffic(40_000, seed=41)

    async with running_agent(bootstrap, database_url, prefix, batch_max_records=500) as agent:
        producing = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=20.0))

        async def metrics_landed() -> bool:
            return await count_rows(database_url, "performance_metrics") > 4_000

        await until(metrics_landed, within=60, what="metrics ingesting")
        await _sql(database_url, "TRUNCATE performance_metrics")  # the incident

        replayer = _replayer(bootstrap, database_url, prefix, batch_records=300, rate=4_000)
        replay_id, notes = await replayer.create(Request(("metrics",), Earliest(), Now()))
        assert all("belong to live ingestion" in n for n in notes)
        before = of_stream(await stored_offsets(database_url, prefix, prefix), "metrics")
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            ranges = await conn.fetch(
                "SELECT topic, partition, end_offset FROM replay_partitions WHERE replay_id = $1",
                replay_id,
            )
        finally:
            await conn.close()
        assert len(ranges) == 2
        for r in ranges:  # never past what live ingestion had stored: that part is live's
            assert r["end_offset"] <= before[(r["topic"].removeprefix(prefix), r["partition"])]
        replaying = asyncio.create_task(replayer.run(replay_id))
        moves = 0
        last = before
        while not replaying.done():
            await asyncio.sleep(0.5)
            now = of_stream(await stored_offsets(database_url, prefix, prefix), "metrics")
            moves += now != last
            last = now
        summary = await replaying
        assert not producing.done(), "records must still arrive after the replay"
        assert moves >= 2, "live ingestion's stored offsets kept moving during the replay"
        assert summary.records > 4_000
        sent = await producing
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=180)
        assert agent.metrics.total("pipeline_fenced_batches_total") == 0

    replayed = replayer.metrics.total("pipeline_records_consumed_total")
    assert replayed == summary.records
    assert replayer.metrics.total("pipeline_replay_records_left") == 0
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        state = await conn.fetchval("SELECT state FROM replays WHERE id = $1", replay_id)
    finally:
        await conn.close()
    assert state == "finished"


async def test_a_replay_killed_twice_with_sigkill_resumes_and_lands_exactly_once(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    traffic = fleet_traffic(20_000, seed=42)
    sent = await produce(bootstrap, prefix, traffic)
    async with running_agent(bootstrap, database_url, prefix):
        ends = await assert_caught_up_exactly_once(
            database_url, bootstrap, prefix, sent, within=120
        )
    await _sql(database_url, f"TRUNCATE {DATA}")
    env = agent_env(bootstrap, database_url, prefix, prefix)
    log_path = tmp_path / "replay.log"
    streams = ",".join(s.name for s in STREAMS)
    args = ["--stream", streams, "--from", "earliest", "--to", "now"]
    slow = ["--batch-records", "200", "--rate", "3000"]

    def start(*extra: str) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            return subprocess.Popen(
                [*REPLAY_COMMAND, *extra, *slow], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    proc = start(*args)
    kills = 0
    try:
        for threshold in (3_000, 9_000):

            async def past(threshold: int = threshold) -> bool:
                return (await _replay_done(database_url))[1] >= threshold

            await until(past, within=60, what=f"{threshold} records replayed")
            proc.kill()
            proc.wait(10)
            kills += 1
            replay_id, done = await _replay_done(database_url)
            assert replay_id is not None and done < 20_000, "killed mid-way"
            proc = start("--resume", str(replay_id))
        assert await asyncio.to_thread(proc.wait, 120) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert kills == 2
    await assert_exactly_once(database_url, prefix, prefix, sent, ends)
    await assert_latest_tables_follow_the_log(database_url, traffic)
    listed = await asyncio.to_thread(
        subprocess.run, [*REPLAY_COMMAND, "list"], env=env, capture_output=True, text=True
    )
    listing = listed.stdout
    assert f"{replay_id:>4}  finished" in listing
    assert f"{len(sent):,}/{len(sent):,}" in listing
    assert "finished" in log_path.read_text().splitlines()[-1]


async def test_a_replay_by_time_range_writes_the_records_of_that_time_only(
    servers: Servers,
    database_url: str,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    traffic = fleet_traffic(9_000, seed=43)
    sent: list[Sent] = []
    cuts: list[datetime] = []
    for third in range(3):
        sent += await produce(bootstrap, prefix, traffic[third * 3_000 : (third + 1) * 3_000])
        await asyncio.sleep(0.05)
        cuts.append(datetime.now(UTC))
        await asyncio.sleep(0.05)
    async with running_agent(bootstrap, database_url, prefix):
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
    await _sql(database_url, "TRUNCATE performance_metrics")

    plus2 = timezone(timedelta(hours=2))
    start, end = (cuts[0].astimezone(plus2).isoformat(), cuts[1].isoformat())
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("PIPELINE_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("PIPELINE_GROUP_ID", prefix)
    naive = cuts[0].replace(tzinfo=None).isoformat()
    command = ["replay", "--stream", "metrics", "--from", naive, "--to", "now"]
    assert await asyncio.to_thread(cli.main, command) == 2
    assert f"pipeline: error: --from {naive}: the time has no UTC offset" in capsys.readouterr().err

    command = ["replay", "--stream", "metrics", "--from", start, "--to", end]
    assert await asyncio.to_thread(cli.main, command) == 0
    middle = {(s.partition, s.offset) for s in sent[3_000:6_000] if s.topic == METRICS.topic}
    assert middle
    assert await _metric_sources(database_url) == middle


async def test_a_replay_into_a_second_empty_database(
    servers: Servers, database_url: str, unique: str
) -> None:
    """A new reporting database, filled from the log with --database-url; the configured
    database is not touched. Partitions the group never stored there are claimed: its
    stored offsets end at the range's end, so live ingestion there would continue after it."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    poison = Outgoing(METRICS, b"agent-x", b"{not json", poison="DecodeError")
    traffic = fleet_traffic(8_000, seed=44)
    outgoing = [*traffic[:4_000], poison, *traffic[4_000:]]
    sent = await produce(bootstrap, prefix, outgoing)
    ends = await end_offsets(bootstrap, prefix)
    await migrated(database_url)
    async with testbed.scratch_database(servers.endpoints.database_url, f"{unique}_r") as second:
        env = agent_env(bootstrap, database_url, prefix, prefix)
        streams = ",".join(s.name for s in STREAMS)
        done = await asyncio.to_thread(
            subprocess.run,
            [
                *REPLAY_COMMAND,
                "--stream",
                streams,
                "--from",
                "earliest",
                "--to",
                "now",
                "--database-url",
                second,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert f"{len(sent):,} records" in done.stdout
        assert "1 dead letters" in done.stdout
        await assert_exactly_once(second, prefix, prefix, sent, ends)
        await assert_latest_tables_follow_the_log(second, traffic)
    assert await count_rows(database_url, "performance_metrics") == 0
    assert await count_rows(database_url, "replays") == 0


async def test_a_start_that_retention_deleted_is_refused_or_skipped_with_allow_gap(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    metrics_only = [o for o in fleet_traffic(6_000, seed=45) if o.stream is METRICS][:2_500]
    sent = await produce(bootstrap, prefix, metrics_only)
    await migrated(database_url)
    topic = prefix + METRICS.topic
    admin = kafka_clients.admin(servers.endpoints.kafka)
    await admin.start()
    try:  # what retention does, at a known offset
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(1_000)})
    finally:
        await admin.close()

    replayer = _replayer(bootstrap, database_url, prefix)
    with pytest.raises(ReplayError) as refused:
        await replayer.create(Request(("metrics",), AtOffset(0), Now()))
    assert str(refused.value) == (
        f"{topic}[0]: offsets 0-999 were deleted by retention; the log starts at 1000: "
        "refused; --allow-gap replays what is left"
    )
    assert await count_rows(database_url, "replays") == 0

    replay_id, notes = await replayer.create(
        Request(("metrics",), AtOffset(0), Now(), allow_gap=True)
    )
    assert notes == [
        f"{topic}[0]: offsets 0-999 were deleted by retention; the log starts at 1000: "
        "skipped (--allow-gap)"
    ]
    summary = await replayer.run(replay_id)
    assert summary.records == 1_500
    assert summary.notes == notes
    assert await _metric_sources(database_url) == {
        (s.partition, s.offset) for s in sent if s.offset >= 1_000
    }
    with pytest.raises(ReplayError, match="past the log's end 2500"):
        await replayer.create(Request(("metrics",), AtOffset(1_000), AtOffset(2_501)))
    with pytest.raises(ReplayError, match="do not exist"):
        await _replayer(bootstrap, database_url, f"{unique}.nope.").create(
            Request(("metrics",), Earliest(), Now())
        )
    with pytest.raises(ReplayError, match="empty"):
        await replayer.create(Request(("metrics",), AtOffset(2_000), AtOffset(2_000)))


async def test_a_replay_puts_rows_a_bug_changed_back_to_the_log_in_every_per_record_table(
    servers: Servers, database_url: str, unique: str
) -> None:
    """After a bug fix: events rows (keyed by event_id) and state history rows that a bug
    rewrote or deleted are exactly the log's records again after a replay of their range; the
    latest table follows its history under the version guard."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    traffic = fleet_traffic(6_000, seed=45)
    sent = await produce(bootstrap, prefix, traffic)
    async with running_agent(bootstrap, database_url, prefix):
        ends = await assert_caught_up_exactly_once(
            database_url, bootstrap, prefix, sent, within=120
        )
    before = await _table_contents(database_url)
    # The bug: event kinds and state payloads rewritten, some rows of each lost.
    await _sql(
        database_url,
        "UPDATE system_events SET kind = 'corrupted', payload = '{}' WHERE src_offset % 3 = 0",
    )
    await _sql(database_url, "DELETE FROM system_events WHERE src_offset % 7 = 1")
    await _sql(database_url, "UPDATE agent_state_history SET data = '{\"bug\": 1}'")
    await _sql(database_url, "DELETE FROM agent_state_history WHERE src_offset % 5 = 2")
    assert await _table_contents(database_url) != before

    env = agent_env(bootstrap, database_url, prefix, prefix)
    done = await asyncio.to_thread(
        subprocess.run,
        [*REPLAY_COMMAND, "--stream", "events,states", "--from", "earliest", "--to", "now"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert await _table_contents(database_url) == before
    await assert_exactly_once(database_url, prefix, prefix, sent, ends)
    await assert_latest_tables_follow_the_log(database_url, traffic)


async def _table_contents(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the events and state tables, as text, without ingest bookkeeping."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        found = {}
        for table, columns in (
            ("system_events", "event_id, agent_id, kind, severity, ts, payload"),
            ("agent_state_history", "agent_id, state, version, ts, data"),
            ("agent_states", "agent_id, state, version, ts, data"),
        ):
            rows = await conn.fetch(
                f"SELECT {columns}, src_partition, src_offset FROM {table} ORDER BY 1, 2, 3"
            )
            found[table] = [tuple(str(v) for v in r.values()) for r in rows]
        return found
    finally:
        await conn.close()


async def test_a_replay_dead_letters_the_rows_the_database_refuses_once_each(
    servers: Servers, database_url: str, unique: str
) -> None:
    """Rows a constraint refuses are found by bisection inside the replay's transaction: each
    refused record is dead-lettered once, as DatabaseRejected with the record's own
    coordinates, and every other record of its chunk lands."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(
        database_url, "ALTER TABLE performance_metrics ADD CONSTRAINT sane CHECK (value < 1e9)"
    )
    refused = [
        Outgoing(METRICS, b"agent-r", encode(Metric(f"r{i}", "cpu", 5e12, T0)), "DatabaseRejected")
        for i in range(3)
    ]
    traffic = fleet_traffic(3_000, seed=45)
    outgoing = [*traffic[:100], refused[0], *traffic[100:1_500], refused[1], refused[2]]
    outgoing += traffic[1_500:]
    sent = await produce(bootstrap, prefix, outgoing)
    ends = await end_offsets(bootstrap, prefix)
    env = agent_env(bootstrap, database_url, prefix, prefix)
    streams = ",".join(s.name for s in STREAMS)
    done = await asyncio.to_thread(
        subprocess.run,
        [*REPLAY_COMMAND, "--stream", streams, "--from", "earliest", "--to", "now"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"{len(sent):,} records" in done.stdout
    assert "3 dead letters" in done.stdout, done.stdout
    await assert_exactly_once(database_url, prefix, prefix, sent, ends)
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        classes = await conn.fetch("SELECT error_class, reason FROM dead_letters")
    finally:
        await conn.close()
    assert [r["error_class"] for r in classes] == ["DatabaseRejected"] * 3
    assert all("sane" in r["reason"] for r in classes), classes


async def _at_least(count: Callable[[], Awaitable[int]], least: int) -> bool:
    return await count() >= least


async def _unsummarized(conn: asyncpg.Connection, table: str) -> tuple[int, int]:
    """(block ranges of ``table``'s leaves, of those the source index had not summarized):
    the second by summarizing them now, as the superuser."""
    leaves = await conn.fetch(
        """SELECT t.relid::regclass::text AS leaf, i.indexrelid::regclass::text AS brin,
                  pg_relation_size(t.relid) / current_setting('block_size')::int AS pages
           FROM pg_partition_tree($1) t
           JOIN pg_index i ON i.indrelid = t.relid
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_am a ON a.oid = c.relam AND a.amname = 'brin'
           JOIN pg_attribute att ON att.attrelid = t.relid AND att.attname = 'src_offset'
           WHERE t.isleaf AND att.attnum = ANY (i.indkey)""",
        table,
    )
    ranges = sum(-(-leaf["pages"] // 128) for leaf in leaves)  # pages_per_range's default
    left = 0
    for leaf in leaves:
        left += await conn.fetchval("SELECT brin_summarize_new_values($1::regclass)", leaf["brin"])
    return ranges, left


async def test_a_replay_summarizes_the_source_index_as_it_goes(
    servers: Servers, database_url: str, unique: str
) -> None:
    """Each batch's range DELETE goes through the BRIN source index, which skips only the
    block ranges it has summarized. The replay has them summarized every SUMMARIZE_EVERY
    batches (as the writer, through the migrator's function), so at the end only the ranges
    of its last few batches are left; autovacuum, which summarizes too, is off."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=1)
    count = 60_000
    outgoing = [
        Outgoing(METRICS, b"agent-s", encode(Metric("agent-s", "cpu", float(i), T0)))
        for i in range(count)
    ]
    await produce(bootstrap, prefix, outgoing)
    await migrated(database_url)
    admin = await asyncpg.connect(database_url, timeout=10)
    try:
        for leaf in await admin.fetch(
            "SELECT relid::regclass::text AS leaf FROM pg_partition_tree('performance_metrics') "
            "WHERE isleaf"
        ):
            await admin.execute(f"ALTER TABLE {leaf['leaf']} SET (autovacuum_enabled = off)")
        replayer = _replayer(bootstrap, database_url, prefix, batch_records=1_000)
        replay_id, _ = await replayer.create(Request(("metrics",), Earliest(), Now()))
        summary = await replayer.run(replay_id)
        assert (summary.records, summary.rows) == (count, count)

        async def index_scans() -> int:  # of the partition that holds the rows
            return int(
                await admin.fetchval(
                    "SELECT max(idx_scan) FROM pg_stat_user_tables WHERE relid IN "
                    "(SELECT relid FROM pg_partition_tree('performance_metrics') WHERE isleaf)"
                )
            )

        # Each batch's DELETE, through the parent, scans every partition by its source index
        # (a table with no statistics yet would be scanned whole instead: no index scan).
        await until(lambda: _at_least(index_scans, 60), within=10, what="60 index scans")
        assert await count_rows(database_url, "performance_metrics") == count
        ranges, left = await _unsummarized(admin, "performance_metrics")
    finally:
        await admin.close()
    # 60 or more batches of at most 1,000 rows: the last summary came at most 7 batches
    # before the end, which is less than one block range of rows this narrow.
    assert ranges >= 4
    assert left <= 2
