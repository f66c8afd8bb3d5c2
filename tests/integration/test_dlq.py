"""`pipeline dlq` against the real broker and database: dead letters a running agent made,
listed, shown and redriven once their table is fixed (docs/repair.md)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from pipeline.catalog import load as load_catalog
from pipeline.records import AgentEvent, Metric, encode
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    APPEND_TABLE,
    STREAM_OF_TOPIC,
    T0,
    Outgoing,
    Sent,
    agent_env,
    assert_caught_up_exactly_once,
    create_topics,
    fleet_traffic,
    migrated,
    produce,
    running_agent,
)

pytestmark = pytest.mark.timeout(300)

METRICS, EVENTS = STREAM_BY_NAME["metrics"], STREAM_BY_NAME["events"]
# Constraints the records cannot know about, added for the test and dropped to "fix" it.
CONSTRAINTS = (
    ("performance_metrics", "redrive_test_value", "CHECK (value < 1000)"),
    ("system_events", "redrive_test_kind", "CHECK (kind <> 'forbidden')"),
)


def _dlq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "dlq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _dlq_async(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline.cli",
        "dlq",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def _fingerprint(database_url: str) -> tuple[object, ...]:
    """Everything a redrive could change: the data tables and every dead letter."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        found = []
        for table in (*load_catalog().data_tables, "dead_letters"):
            found.append([tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1")])
        return tuple(found)
    finally:
        await conn.close()


async def test_dead_letters_are_listed_shown_and_redriven_once_their_table_is_fixed(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(
        database_url,
        *(f"ALTER TABLE {t} ADD CONSTRAINT {name} {check}" for t, name, check in CONSTRAINTS),
    )
    ts = T0.isoformat().encode()
    # (a) rows the database rejects today and will accept once the constraints are dropped
    redrivable = [
        *(
            Outgoing(
                METRICS,
                b"r",
                encode(Metric(f"agent-r{i}", "cpu", 5000.0 + i, T0)),
                "DatabaseRejected",
            )
            for i in range(5)
        ),
        *(
            Outgoing(
                EVENTS,
                b"r",
                encode(AgentEvent(uuid.uuid4(), "agent-r", "forbidden", T0)),
                "DatabaseRejected",
            )
            for _ in range(2)
        ),
    ]
    # (b) records that will never decode
    malformed = [
        Outgoing(METRICS, b"m", b"{not json", "DecodeError", (("trace", b"abc"),)),
        Outgoing(METRICS, b"m", b'{"agent_id": "a", "name": "n"', "DecodeError"),
        Outgoing(METRICS, b"m", b"\xff\xfe\x00 binary garbage", "DecodeError"),
        Outgoing(
            EVENTS, b"m", b'{"agent_id": "a", "kind": "k", "ts": "' + ts + b'"}', "ValidationError"
        ),
    ]
    good = fleet_traffic(1500, seed=5)
    traffic = good[:500] + redrivable[:3] + malformed[:2] + good[500:1000]
    traffic += redrivable[3:] + malformed[2:] + good[1000:]
    sent = await produce(bootstrap, prefix, traffic)
    where = {id(o): s for o, s in zip(traffic, sent, strict=True)}
    env = agent_env(bootstrap, database_url, prefix, prefix)

    async with running_agent(bootstrap, database_url, prefix, batch_max_records=400):
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)

        # -- list and show ----------------------------------------------------------------
        listed = _ok(_dlq(env, "list"))
        assert listed.splitlines()[-1] == f"11 of 11 dead letter(s) of group {prefix}"
        classes = Counter(re.split(r"\s{2,}", line.strip())[3] for line in listed.splitlines()[:-1])
        assert classes == {"DatabaseRejected": 7, "DecodeError": 3, "ValidationError": 1}
        assert "pending, 0 attempts" in listed
        by_class = _ok(_dlq(env, "list", "--error-class", "DecodeError")).splitlines()
        assert by_class[-1] == f"3 of 3 dead letter(s) of group {prefix}"
        by_stream = _ok(_dlq(env, "list", "--stream", "events")).splitlines()
        assert by_stream[-1] == f"3 of 3 dead letter(s) of group {prefix}"
        assert all(f"{prefix}agents.events[" in line for line in by_stream[:-1])
        limited = _ok(_dlq(env, "list", "--limit", "2")).splitlines()
        assert limited[-1] == f"2 of 11 dead letter(s) of group {prefix}"
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        later = _ok(_dlq(env, "list", "--since", future)).splitlines()
        assert later == [f"0 of 0 dead letter(s) of group {prefix}"]
        naive = _dlq(env, "list", "--since", "2026-11-01T00:00:00")
        assert naive.returncode == 2 and "has no offset" in naive.stderr

        ids = await _letter_ids(database_url, prefix, traffic, where)
        text = _ok(_dlq(env, "show", str(ids[id(malformed[0])])))
        bad = where[id(malformed[0])]
        assert (
            f"source:         {prefix}agents.metrics partition {bad.partition} offset {bad.offset}"
            " (stream metrics)"
        ) in text
        assert "error class:    DecodeError" in text
        assert "value:          {not json" in text
        assert "key:            m" in text
        assert 'headers:        [["trace", "abc"]]' in text
        binary = _ok(_dlq(env, "show", str(ids[id(malformed[2])])))
        assert "value:          ff fe 00 20 62 69 6e" in binary and "(hex)" in binary
        missing = _dlq(env, "show", "999999")
        assert missing.returncode == 2 and "no dead letter 999999" in missing.stderr

        # -- the table is fixed; a dry run changes nothing --------------------------------
        await migrated(
            database_url, *(f"ALTER TABLE {t} DROP CONSTRAINT {n}" for t, n, _ in CONSTRAINTS)
        )
        before = await _fingerprint(database_url)
        dry = _ok(_dlq(env, "replay", "--dry-run"))
        assert dry.splitlines()[0] == (
            "dry run, nothing changed: would be redriven 7, would still fail 4"
        ), dry
        assert "  DecodeError: 3 (e.g." in dry and "  ValidationError: 1 (e.g." in dry
        assert await _fingerprint(database_url) == before

        # -- two redrives at once: every redrivable letter lands once ---------------------
        (code_a, out_a), (code_b, out_b) = await asyncio.gather(
            _dlq_async(env, "replay"), _dlq_async(env, "replay")
        )
        assert (code_a, code_b) == (0, 0), out_a + out_b
        redriven = [
            int(m.group(1)) for m in (re.search(r"^redriven (\d+)", o) for o in (out_a, out_b)) if m
        ]
        assert len(redriven) == 2 and sum(redriven) == 7, out_a + out_b
        assert "still fail: kept in dead_letters with their new reasons" in out_a + out_b

        await _assert_redriven(
            database_url,
            prefix,
            traffic=traffic,
            sent=sent,
            redrivable=redrivable,
            malformed=malformed,
            ids=ids,
        )

        # -- a second redrive redrives nothing ------------------------------------------
        again = _ok(_dlq(env, "replay"))
        assert again.splitlines()[0] == "redriven 0, still failing 4", again
        await _assert_redriven(
            database_url,
            prefix,
            traffic=traffic,
            sent=sent,
            redrivable=redrivable,
            malformed=malformed,
            ids=ids,
        )
        listed = _ok(_dlq(env, "list")).splitlines()
        assert sum("  redriven  " in line for line in listed) == 7
        assert sum("pending, 3 attempts" in line for line in listed) == 4  # dry run: no attempt
        # The redrive tells how a letter fared.
        shown = _ok(_dlq(env, "show", str(ids[id(redrivable[0])])))
        assert re.search(
            r"redrive:        1 attempt\(s\), last .*; redriven: .* in batch \d+", shown
        )


async def _letter_ids(
    database_url: str, prefix: str, traffic: list[Outgoing], where: dict[int, Sent]
) -> dict[int, int]:
    """dead_letters.id of each poison record (by the Outgoing's id())."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT id, src_topic, src_partition, src_offset FROM dead_letters")
    finally:
        await conn.close()
    by_source = {(r["src_topic"], r["src_partition"], r["src_offset"]): r["id"] for r in rows}
    return {
        id(o): by_source[(prefix + where[id(o)].topic, where[id(o)].partition, where[id(o)].offset)]
        for o in traffic
        if o.poison
    }


async def _assert_redriven(
    database_url: str,
    prefix: str,
    *,
    traffic: list[Outgoing],
    sent: list[Sent],
    redrivable: list[Outgoing],
    malformed: list[Outgoing],
    ids: dict[int, int],
) -> None:
    """Every record sent is in its table once, except the malformed ones; the redriven rows
    carry their letter's provenance and the batch the letter names; the malformed letters are
    kept, pending, with reasons."""
    still_bad = {id(o) for o in malformed}
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        for topic, stream in STREAM_OF_TOPIC.items():
            table = APPEND_TABLE[stream.name]
            rows = await conn.fetch(f"SELECT src_partition, src_offset FROM {table}")
            found = Counter((r["src_partition"], r["src_offset"]) for r in rows)
            assert all(n == 1 for n in found.values()), f"{table}: twice: {found.most_common(3)}"
            expected = {
                (s.partition, s.offset)
                for o, s in zip(traffic, sent, strict=True)
                if s.topic == topic and id(o) not in still_bad
            }
            assert set(found) == expected, table
        letters = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT id, src_partition, src_offset, error_class, reason, attempts, "
                "redriven_at, redriven_batch_id FROM dead_letters WHERE group_id = $1",
                prefix,
            )
        }
        assert len(letters) == 11
        for out in redrivable:
            letter = letters[ids[id(out)]]
            assert letter["redriven_at"] is not None and letter["redriven_batch_id"] is not None
            table = APPEND_TABLE[out.stream.name]
            batch = await conn.fetchval(
                f"SELECT batch_id FROM {table} WHERE src_partition = $1 AND src_offset = $2",
                letter["src_partition"],
                letter["src_offset"],
            )
            assert batch == letter["redriven_batch_id"]
        for out in malformed:
            letter = letters[ids[id(out)]]
            assert letter["redriven_at"] is None and letter["redriven_batch_id"] is None
            assert letter["error_class"] in ("DecodeError", "ValidationError") and letter["reason"]
            assert letter["attempts"] >= 1
    finally:
        await conn.close()
