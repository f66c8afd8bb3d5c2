"""Partition maintenance against the real server (`pipeline partitions maintain` and `list`):
rows in a range with no partition land in DEFAULT and a pass moves them out, two maintainers
at once end where one does, retention drops exactly the expired partitions and deletes (and
counts) DEFAULT's expired rows, `--every` runs until SIGTERM, and a pass beside live writes
loses nothing. Time passes by the pass's ``now``. docs/operations.md, "Partitions and
retention"."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import asyncpg
import pytest

from consumers.partition_watch import PartitionWatch
from pipeline import db, partition_maint, testbed
from pipeline.catalog import Catalog
from pipeline.catalog import load as load_catalog
from pipeline.config import load_config
from pipeline.db_session import Session
from pipeline.devstack import pgbouncer
from pipeline.metrics import Metrics
from pipeline.partition_maint import TableResult, Target
from tests.conftest import Servers
from tests.integration.harness import until
from tests.integration.test_streams_schema import pipeline

pytestmark = pytest.mark.timeout(300)

UTC = datetime.UTC
TABLE = "performance_metrics"
NOW = datetime.datetime(2026, 12, 7, 15, 30, tzinfo=UTC)  # a Monday
SESSION = Session(command_timeout=60)


def _day(n: int) -> datetime.datetime:
    """Midnight of the day ``n`` days after NOW's."""
    return datetime.datetime(2026, 12, 7, tzinfo=UTC) + datetime.timedelta(days=n)


def _catalog(retention: str | None = None) -> Catalog:
    catalog = load_catalog()
    return catalog.with_retention({"metrics": retention}) if retention else catalog


def _metrics(catalog: Catalog | None = None) -> list[Target]:
    return partition_maint.targets(catalog or _catalog(), ["metrics"])


async def _pass(
    url: str, now: datetime.datetime, tables: Sequence[Target] | None = None
) -> tuple[list[TableResult], list[str]]:
    lines: list[str] = []
    conn = await db.connect(testbed.as_migrator(url), SESSION)
    try:
        results = await partition_maint.maintain(conn, tables or _metrics(), now, lines.append)
    finally:
        await conn.close()
    return results, lines


@asynccontextmanager
async def _admin(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("SET TimeZone = 'UTC'")
        yield conn
    finally:
        await conn.close()


async def _insert(
    conn: asyncpg.Connection, times: Sequence[datetime.datetime], first: int = 0
) -> None:
    await conn.executemany(
        f"INSERT INTO {TABLE} (agent_id, name, value, ts, labels, src_partition, src_offset, "
        "batch_id) VALUES ('a', 'cpu', 1.0, $1, '{}', 0, $2, 1)",
        [(t, first + i) for i, t in enumerate(times)],
    )


async def _per_partition(conn: asyncpg.Connection) -> dict[str, int]:
    """Rows per partition of the metrics table, by partition name (empty ones included)."""
    rows = await conn.fetch(
        f"SELECT c.relname AS name, (SELECT count(*) FROM {TABLE} t "
        "WHERE t.tableoid = c.oid) AS n FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        f"WHERE i.inhparent = '{TABLE}'::regclass"
    )
    return {r["name"]: r["n"] for r in rows}


def _names(*days: int) -> set[str]:
    return {f"{TABLE}_p{_day(d):%Y%m%d}" for d in days}


async def test_rows_in_default_are_moved_into_partitions_made_for_them(
    servers: Servers, database_url: str
) -> None:
    url = database_url
    async with _admin(url) as conn:
        # A fresh table has only DEFAULT: every row lands there.
        assert await _per_partition(conn) == {f"{TABLE}_default": 0}
        times = [_day(-10) + datetime.timedelta(hours=h) for h in range(5)]  # 5 on day -10
        times += [_day(0) + datetime.timedelta(minutes=m) for m in range(7)]  # 7 today
        times += [_day(30)] * 3  # 3 past the premade ones
        await _insert(conn, times)
        assert await _per_partition(conn) == {f"{TABLE}_default": 15}

    results, lines = await _pass(url, NOW)

    async with _admin(url) as conn:
        found = await _per_partition(conn)
        expected = {f"{TABLE}_default": 0, f"{TABLE}_p20261127": 5, f"{TABLE}_p20261207": 7}
        expected[f"{TABLE}_p20270106"] = 3
        expected.update({n: 0 for n in _names(1, 2, 3)})
        assert found == expected
        record = await conn.fetchrow(
            "SELECT * FROM partition_maintenance WHERE table_name = $1", TABLE
        )
        # Indexes and the primary key came with the attach: the parent's, on each partition.
        indexes = await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE tablename = $1", f"{TABLE}_p20261207"
        )
    (result,) = results
    assert (result.created, result.moved, result.dropped) == (3, 3, 0)
    assert (result.rows_moved, result.rows_expired, result.error) == (15, 0, None)
    assert record["rows_moved"] == 15 and record["partitions_moved"] == 3
    assert record["partitions_created"] == 3 and record["last_error"] is None
    assert record["last_success_at"] is not None
    assert indexes == 2  # the BRIN on the source range, the BRIN on ts
    assert sum("moved" in line for line in lines) == 3, lines
    assert sum(line.endswith(")") and "made" in line for line in lines) == 3, lines

    # A second pass finds nothing to do; a day later, it makes one more ahead.
    again, lines = await _pass(url, NOW)
    assert (again[0].created, again[0].moved, again[0].dropped, lines) == (0, 0, 0, [])
    later, _ = await _pass(url, NOW + datetime.timedelta(days=1))
    assert (later[0].created, later[0].moved) == (1, 0)
    async with _admin(url) as conn:
        assert set(await _per_partition(conn)) == set(expected) | _names(4)


async def test_two_maintainers_at_once_end_where_one_does(
    servers: Servers, database_url: str
) -> None:
    url = database_url
    async with _admin(url) as conn:
        await _insert(conn, [_day(-3), _day(-3), _day(1), _day(9)])
    first, second = await asyncio.gather(_pass(url, NOW), _pass(url, NOW))
    made = sorted((r.created, r.moved, r.rows_moved) for r in (first[0][0], second[0][0]))
    # One did it all; the other waited for the lock, then found it done.
    assert made == [(0, 0, 0), (3, 3, 4)]
    async with _admin(url) as conn:
        found = await _per_partition(conn)
    expected = {f"{TABLE}_default": 0, f"{TABLE}_p20261204": 2, f"{TABLE}_p20261216": 1}
    expected.update({n: 0 for n in _names(0, 2, 3)})
    expected[f"{TABLE}_p20261208"] = 1
    assert found == expected


async def test_two_maintainer_processes_at_once(servers: Servers, database_url: str) -> None:
    url = database_url
    async with _admin(url) as conn:
        await _insert(conn, [_day(-2)] * 4)
    env = _env(servers, url)
    command = ("partitions", "maintain", "--now", NOW.isoformat())
    procs = await asyncio.gather(pipeline(env, *command), pipeline(env, *command))
    outputs = [p.stdout for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    async with _admin(url) as conn:
        found = await _per_partition(conn)
    expected = {f"{TABLE}_default": 0, f"{TABLE}_p20261205": 4}
    expected.update({n: 0 for n in _names(0, 1, 2, 3)})
    assert found == expected
    moved = [line for out in outputs for line in out.splitlines() if "moved 4 row(s)" in line]
    assert len(moved) == 1, outputs


def _env(servers: Servers, url: str, **extra: str) -> dict[str, str]:
    """A `pipeline` command's environment on the test's servers (both endpoints: a command
    given one without the other refuses to start)."""
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=servers.endpoints.kafka_bootstrap,
        DATABASE_URL=testbed.as_agent(url),
        PIPELINE_MIGRATE_DATABASE_URL=testbed.as_migrator(url),
        **extra,
    )
    return env


async def test_retention_drops_exactly_the_expired_partitions(
    servers: Servers, database_url: str
) -> None:
    url = database_url
    tables = _metrics(_catalog("5d"))
    async with _admin(url) as conn:
        # A row on each of days -8 .. 0: one partition each after a pass without retention.
        await _insert(conn, [_day(d) + datetime.timedelta(hours=12) for d in range(-8, 1)])
    await _pass(url, NOW)
    async with _admin(url) as conn:
        before = await _per_partition(conn)
    assert before == {
        f"{TABLE}_default": 0,
        **{n: 1 for n in _names(*range(-8, 1))},
        **{n: 0 for n in _names(1, 2, 3)},
    }
    # Five days kept at NOW (15:30): the horizon is day -5 at 15:30, so days -8, -7 and -6
    # end at or before it; day -5 holds times after it and stays.
    results, lines = await _pass(url, NOW, tables)
    assert results[0].dropped == 3 and results[0].error is None
    async with _admin(url) as conn:
        after = await _per_partition(conn)
    assert after == {k: v for k, v in before.items() if k not in _names(-8, -7, -6)}
    assert sorted(line.split()[2] for line in lines if "dropped" in line) == sorted(
        _names(-8, -7, -6)
    )
    # A day later, day -5 goes too, and nothing else.
    results, _ = await _pass(url, NOW + datetime.timedelta(days=1), tables)
    assert results[0].dropped == 1
    async with _admin(url) as conn:
        assert set(await _per_partition(conn)) == set(after) - _names(-5) | _names(4)


async def test_default_rows_older_than_the_horizon_are_deleted_and_counted(
    servers: Servers, database_url: str
) -> None:
    url = database_url
    tables = _metrics(_catalog("2d"))
    horizon = NOW - datetime.timedelta(days=2)  # day -2 at 15:30
    async with _admin(url) as conn:
        await _insert(conn, [_day(-6)] * 3 + [_day(-4)] * 2)  # wholly older: 5 rows
        # Day -2 straddles the horizon: 4 rows before it, 1 after.
        straddling = [horizon - datetime.timedelta(hours=h) for h in (1, 2, 3, 4)]
        await _insert(conn, [*straddling, horizon + datetime.timedelta(hours=1)], first=100)
        await _insert(conn, [_day(0)] * 6, first=200)
    results, lines = await _pass(url, NOW, tables)
    (result,) = results
    assert (result.rows_expired, result.rows_moved, result.moved) == (9, 7, 2)
    async with _admin(url) as conn:
        found = await _per_partition(conn)
        expired = await conn.fetchval(
            "SELECT rows_expired FROM partition_maintenance WHERE table_name = $1", TABLE
        )
    expected = {f"{TABLE}_default": 0, f"{TABLE}_p20261205": 1, f"{TABLE}_p20261207": 6}
    expected.update({n: 0 for n in _names(1, 2, 3)})
    assert found == expected
    assert expired == 9
    assert sum("older than the retention" in line for line in lines) == 3, lines


async def test_list_json(servers: Servers, database_url: str) -> None:
    url = database_url
    async with _admin(url) as conn:
        await _insert(conn, [_day(-1)] * 2)
    await _pass(url, NOW)
    async with _admin(url) as conn:
        await _insert(conn, [_day(40)] * 3, first=10)  # no partition: DEFAULT
        await conn.execute(f"ANALYZE {TABLE}")
    command = ("partitions", "list", "--json", "--stream", "metrics")
    # As the agents' login (the writer role), and as the analyst's (the reader role).
    assert servers.logins is not None
    outputs = []
    for login in (testbed.as_agent(url), servers.logins.analyst.url(url)):
        listed = await pipeline({**_env(servers, url), "DATABASE_URL": login}, *command)
        assert listed.returncode == 0, listed.stderr
        out = listed.stdout
        outputs.append(out)
    assert outputs[0] == outputs[1]
    (table,) = json.loads(out)["tables"]
    assert {k: table[k] for k in ("stream", "table", "column", "interval", "retention")} == {
        "stream": "metrics",
        "table": TABLE,
        "column": "ts",
        "interval": "day",
        "retention": "none",
    }
    assert [p["name"] for p in table["partitions"]] == sorted(_names(-1, 0, 1, 2, 3))
    rows = {p["name"]: p["estimated_rows"] for p in table["partitions"]}
    assert rows == {n: (2 if n in _names(-1) else 0) for n in _names(-1, 0, 1, 2, 3)}
    assert all(p["bytes"] > 0 for p in table["partitions"])
    assert table["default"] == {"name": f"{TABLE}_default", "rows": 3, "rows_capped": False}
    assert table["oldest"] == {"from": _day(-1).isoformat(), "to": _day(0).isoformat()}
    assert table["newest"] == {"from": _day(3).isoformat(), "to": _day(4).isoformat()}
    assert table["last_maintenance"]["rows_moved"] == 2
    assert table["last_maintenance"]["last_error"] is None


async def test_every_runs_passes_until_sigterm(servers: Servers, database_url: str) -> None:
    url = database_url
    async with _admin(url) as conn:
        await _insert(conn, [_day(-1)])
    command = [
        sys.executable, "-m", "pipeline.cli", "partitions", "maintain", "--every", "1s",
        "--stream", "metrics", "--now", NOW.isoformat(),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command, env=_env(servers, url), stdout=asyncio.subprocess.PIPE
    )
    try:

        async def moved() -> bool:
            async with _admin(url) as conn:
                found = await _per_partition(conn)
            return found.get(f"{TABLE}_p20261206") == 1

        await until(moved, within=60, what="the first pass moved the row")
        async with _admin(url) as conn:
            await _insert(conn, [_day(-2)] * 2, first=5)  # a later pass moves these

            async def moved_again() -> bool:
                return (await _per_partition(conn)).get(f"{TABLE}_p20261205") == 2

            await until(moved_again, within=60, what="a later pass moved the new rows")

            async def counted() -> bool:
                found = await conn.fetchval(
                    "SELECT rows_moved FROM partition_maintenance WHERE table_name = $1", TABLE
                )
                return bool(found == 3)

            # Counted in the step that moved them, whenever the SIGTERM comes.
            await until(counted, within=10, what="the moves counted")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert lines[-1].endswith(" stopped"), out
    assert sum(" moved " in line for line in lines) == 2, out  # by two passes
    assert "maintained 1 table(s)" in lines[6], out  # the first pass's summary


async def test_a_pass_beside_live_writes_loses_nothing(servers: Servers, database_url: str) -> None:
    """Writers insert rows into ranges that have no partition yet (DEFAULT) and into ones
    that do, while passes make partitions and move DEFAULT's rows: every row is there once."""
    url = database_url
    writer_url = testbed.as_agent(url)
    stop = asyncio.Event()
    written: list[int] = []

    async def write(worker: int) -> None:
        conn = await asyncpg.connect(writer_url, timeout=10)
        try:
            n = 0
            while not stop.is_set() or n < 50:
                offset = worker * 1_000_000 + n
                # Days -20 .. 9: some made by the passes, some never (DEFAULT).
                when = _day(n % 30 - 20) + datetime.timedelta(minutes=n % 1440)
                await _insert(conn, [when], first=offset)
                written.append(offset)
                n += 1
        finally:
            await conn.close()

    writers = [asyncio.create_task(write(w)) for w in range(3)]
    try:
        for day in range(-20, -5, 3):  # passes at later and later "now"s, beside the writers
            results, _ = await _pass(url, NOW + datetime.timedelta(days=day + 20))
            assert results[0].error is None
    finally:
        stop.set()
        await asyncio.gather(*writers)
    await _pass(url, NOW + datetime.timedelta(days=20))
    async with _admin(url) as conn:
        offsets = [r[0] for r in await conn.fetch(f"SELECT src_offset FROM {TABLE}")]
        found = await _per_partition(conn)
    assert sorted(offsets) == sorted(written)
    assert found[f"{TABLE}_default"] == 0  # every range is made by the last pass
    assert sum(found.values()) == len(written)


def _watch(servers: Servers, url: str, metrics: Metrics) -> PartitionWatch:
    """An agent's partition gauges (metrics and events), read as the agent's login."""
    config = load_config(
        {
            "KAFKA_BOOTSTRAP_SERVERS": servers.endpoints.kafka_bootstrap,
            "DATABASE_URL": testbed.as_agent(url),
            "PIPELINE_STREAMS": "metrics,events",
        }
    )
    return PartitionWatch(config, metrics)


async def test_the_agents_gauges_come_from_the_database(
    servers: Servers, database_url: str
) -> None:
    """What an agent exports (consumers/partition_watch.py), read as the agent's login."""
    url = database_url
    metrics = Metrics()
    watch = _watch(servers, url, metrics)

    def sample(name: str, table: str = TABLE) -> float | None:
        stream = {TABLE: "metrics", "system_events": "events"}[table]
        return metrics.registry.get_sample_value(name, {"stream": stream, "table": table})

    try:
        await watch.refresh()  # never maintained: DEFAULT only
        assert sample("pipeline_partitions") == 0
        assert sample("pipeline_partitions_premade") == 0
        assert sample("pipeline_partition_maintenance_last_success_timestamp_seconds") == 0
        assert sample("pipeline_partition_newest_end_seconds") is None
        assert sample("pipeline_partition_interval_seconds") == 86400
        now = datetime.datetime.now(UTC)
        async with _admin(url) as conn:
            await _insert(conn, [now - datetime.timedelta(days=2)] * 4)
        await watch.refresh()
        assert sample("pipeline_partition_default_rows") == 4
        await _pass(url, now)
        async with _admin(url) as conn:
            await _insert(conn, [now + datetime.timedelta(days=30)] * 2, first=10)
        await watch.refresh()
    finally:
        await watch.stop()
    assert sample("pipeline_partition_default_rows") == 2
    assert sample("pipeline_partitions") == 5  # two days ago, today and 3 ahead
    assert sample("pipeline_partitions_premade") == 3
    today = datetime.datetime.combine(now.date(), datetime.time(), UTC)
    ahead = (today + datetime.timedelta(days=4) - now).total_seconds()
    newest = sample("pipeline_partition_newest_end_seconds")
    assert newest is not None and ahead - 60 < newest <= ahead
    last = sample("pipeline_partition_maintenance_last_success_timestamp_seconds")
    assert last is not None and abs(last - now.timestamp()) < 60
    # The pass above maintained the metrics table only.
    assert (
        sample("pipeline_partition_maintenance_last_success_timestamp_seconds", "system_events")
        == 0
    )
    # The agents read partition_maintenance; only the maintainer writes it.
    writer = await asyncpg.connect(testbed.as_agent(url), timeout=10)
    try:
        assert await writer.fetchval("SELECT count(*) FROM partition_maintenance") == 1
        for statement in (
            "DELETE FROM partition_maintenance",
            "UPDATE partition_maintenance SET rows_expired = 0",
            "INSERT INTO partition_maintenance (table_name, last_attempt_at) VALUES ('x', now())",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await writer.execute(statement)
    finally:
        await writer.close()


async def test_migrate_ends_with_a_pass(servers: Servers, database_url: str) -> None:
    """`pipeline migrate` on a database whose schema is up to date still makes the partitions:
    every partitioned table of the catalog gets today's and 3 ahead."""
    migrate = await pipeline(_env(servers, database_url), "migrate")
    out, err = migrate.stdout, migrate.stderr
    assert migrate.returncode == 0, err
    tables = [t.table for t in partition_maint.targets(load_catalog())]
    assert len(tables) == 5
    today = datetime.datetime.now(UTC).date()
    async with _admin(database_url) as conn:
        for table in tables:
            names = await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = $1::regclass",
                table,
            )
            expected = {f"{table}_default"} | {
                f"{table}_p{today + datetime.timedelta(days=d):%Y%m%d}" for d in range(4)
            }
            assert {r[0] for r in names} == expected, err
    assert out == "the schema is up to date\n"  # stdout: the schema's changes
    assert sum(" made " in line for line in err.splitlines()) == 20, err  # stderr: the pass


async def test_a_failed_table_is_recorded_and_the_others_go_on(
    servers: Servers, database_url: str
) -> None:
    url = database_url
    tables = partition_maint.targets(load_catalog(), ["events", "metrics"])
    async with _admin(url) as conn:
        await conn.execute("DROP TABLE system_events_default")  # broken by hand
    results, _ = await _pass(url, NOW, tables)
    assert [(r.table, r.error is None) for r in results] == [
        ("system_events", False),
        (TABLE, True),
    ]
    assert (
        results[0].error == "table system_events has no DEFAULT partition: run `pipeline migrate`"
    )
    assert results[1].created == 4
    async with _admin(url) as conn:
        record = await conn.fetchrow(
            "SELECT * FROM partition_maintenance WHERE table_name = 'system_events'"
        )
        assert record["last_success_at"] is None and record["last_error"] == results[0].error
        assert record["last_error_at"] is not None
    async with _admin(testbed.as_migrator(url)) as conn:  # mended by the tables' owner
        await conn.execute("CREATE TABLE system_events_default PARTITION OF system_events DEFAULT")
    # Mended, the next pass succeeds and clears the error.
    results, _ = await _pass(url, NOW, tables)
    assert [r.error for r in results] == [None, None]
    assert (results[0].created, results[1].created) == (4, 0)
    async with _admin(url) as conn:
        record = await conn.fetchrow(
            "SELECT * FROM partition_maintenance WHERE table_name = 'system_events'"
        )
    assert record["last_error"] is None and record["last_success_at"] is not None
    assert record["partitions_created"] == 4


# The maintainers' advisory lock in this database, held or awaited by any session. Only that
# lock: the other worker's tests share the server, and take advisory locks of their own.
_MAINTENANCE_LOCKS = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND classid = $1::oid AND objid = $2::oid AND objsubid = 1
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _lock_halves(key: int) -> tuple[int, int]:
    """pg_locks' (classid, objid) of a one-bigint advisory lock: its high and low 32 bits."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


@pytest.fixture(scope="module")
def transaction_pooler(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pgbouncer.PgBouncer]:
    assert servers.logins is not None
    logins = [servers.logins.migrator, servers.logins.agent, servers.logins.analyst]
    home = tmp_path_factory.mktemp("pgbouncer-transaction")
    with pgbouncer.running(
        home, "transaction", servers.endpoints.database_url, logins, "postgres"
    ) as b:
        yield b


async def test_two_maintainers_behind_a_transaction_pooler(
    servers: Servers, database_url: str, transaction_pooler: pgbouncer.PgBouncer
) -> None:
    """No session there to hold a lock in: each step's own lock keeps them apart, and no
    advisory lock is left on the pool's server sessions."""
    url = database_url
    async with _admin(url) as conn:
        await _insert(conn, [_day(-2)] * 4 + [_day(2)] * 3)
    assert servers.logins is not None
    migrator = transaction_pooler.url(servers.logins.migrator.url(url))
    env = {
        **_env(servers, url),
        "PIPELINE_MIGRATE_DATABASE_URL": migrator,
        "PIPELINE_DB_POOLER": "transaction",
    }
    command = ("partitions", "maintain", "--now", NOW.isoformat())
    procs = await asyncio.gather(pipeline(env, *command), pipeline(env, *command))
    outputs = [p.stdout for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    async with _admin(url) as conn:
        found = await _per_partition(conn)
        locks = await conn.fetchval(
            _MAINTENANCE_LOCKS, *_lock_halves(partition_maint.MAINTENANCE_LOCK)
        )
        # The count sees the lock when a session holds it.
        await conn.execute("SELECT pg_advisory_lock($1)", partition_maint.MAINTENANCE_LOCK)
        held = await conn.fetchval(
            _MAINTENANCE_LOCKS, *_lock_halves(partition_maint.MAINTENANCE_LOCK)
        )
        await conn.execute("SELECT pg_advisory_unlock($1)", partition_maint.MAINTENANCE_LOCK)
        record = await conn.fetchrow(
            "SELECT * FROM partition_maintenance WHERE table_name = $1", TABLE
        )
    expected = {f"{TABLE}_default": 0, f"{TABLE}_p20261205": 4, f"{TABLE}_p20261209": 3}
    expected.update({n: 0 for n in _names(0, 1, 3)})
    assert found == expected
    assert (locks, held) == (0, 1)
    # Each step counted once, by whichever maintainer did it.
    assert (record["partitions_moved"], record["partitions_created"]) == (2, 3)
    assert record["rows_moved"] == 7


async def test_a_plain_table_fails_maintenance_until_migrate_upgrades_it(
    servers: Servers, database_url: str
) -> None:
    """A table the catalog partitions that is still a plain one (a database from before
    partitioning, not yet migrated): `pipeline partitions maintain` fails on it (exit 1), and
    the agents export nothing for it; `pipeline migrate` then upgrades it, and its pass makes
    its partitions."""
    url = database_url
    async with _admin(testbed.as_migrator(url)) as conn:
        await conn.execute(
            "ALTER TABLE performance_metrics RENAME TO performance_metrics_old; "
            "CREATE TABLE performance_metrics (LIKE performance_metrics_old INCLUDING ALL); "
            "DROP TABLE performance_metrics_old"
        )
    maintain = await pipeline(_env(servers, url), "partitions", "maintain")
    out = maintain.stdout
    assert maintain.returncode == 1, out
    assert out.splitlines()[-1].endswith("FAILED: performance_metrics"), out
    metrics = Metrics()
    watch = _watch(servers, url, metrics)
    try:
        await watch.refresh()
    finally:
        await watch.stop()
    partitioned = {
        s.labels["table"]
        for family in metrics.registry.collect()
        if family.name == "pipeline_partitions"
        for s in family.samples
    }
    assert partitioned == {"system_events"}
    migrate = await pipeline(_env(servers, url), "migrate")
    err = migrate.stderr
    assert migrate.returncode == 0, err
    upgraded = [
        line
        for line in migrate.stdout.splitlines()
        if line.startswith("partition public.performance_metrics by day of ts")
    ]
    assert len(upgraded) == 1, migrate.stdout
    # The upgrade's legacy partition holds today and tomorrow: the pass makes the two days
    # after them, beside nothing for the four tables it made all of before.
    made = [line for line in err.splitlines() if " made " in line]
    assert [line.split(" made ")[0] for line in made] == ["performance_metrics:"] * 2, err
