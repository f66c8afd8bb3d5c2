"""The negative control: a deliberately broken agent (tests/integration/broken_agent.py: Kafka
offsets committed before the database transaction, positions taken from Kafka) killed inside
that window must make the exactly-once oracle FAIL, on every run: proof that the oracle can
fail.

The kill is not left to chance: the broken agent's hook (``BROKEN_AGENT_HOLD_AT_BATCH``)
holds it right after it has committed a batch to Kafka and before it writes the batch, and
writes a marker file; the test kills it once the marker is there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.integration.broken_agent import HOLD_AT_BATCH_ENV, MARKER_ENV
from tests.integration.harness import (
    APPEND_TABLE,
    STREAM_OF_TOPIC,
    AgentProcess,
    agent_env,
    assert_caught_up_exactly_once,
    assert_exactly_once,
    count_rows,
    create_topics,
    end_offsets,
    fleet_traffic,
    kafka_committed,
    produce,
    stored_offsets,
    until,
)

pytestmark = pytest.mark.timeout(300)

BROKEN_AGENT = [sys.executable, "-m", "tests.integration.broken_agent"]


def _log_tail(agent: AgentProcess) -> str:
    assert agent.log_path is not None
    return agent.log_path.read_text()[-3000:]


async def test_the_oracle_catches_an_agent_killed_between_its_kafka_and_database_commits(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    traffic = fleet_traffic(30_000, seed=3)
    sent = await produce(bootstrap, prefix, traffic[:20_000])
    env = agent_env(
        bootstrap, database_url, prefix, prefix, batch_max_records=500, session_timeout_ms=6000
    )
    marker = tmp_path / "in-the-window"
    held = AgentProcess(
        {**env, HOLD_AT_BATCH_ENV: "3", MARKER_ENV: str(marker)}, tmp_path / "held.log"
    )
    held.command = BROKEN_AGENT
    restarted = AgentProcess(env, tmp_path / "restarted.log")
    restarted.command = BROKEN_AGENT
    try:
        held.start()

        async def in_the_window() -> bool:
            assert held.alive(), _log_tail(held)
            return marker.exists()

        await until(in_the_window, within=60, what="the broken agent holding in its window")
        held.kill()
        # What the kill leaves: Kafka's committed offsets ahead of the database's by the
        # held batch (at least), which nobody will write.
        committed = await kafka_committed(bootstrap, prefix, prefix)
        stored = await stored_offsets(database_url, prefix, prefix)
        ahead = {tp: o - stored.get(tp, 0) for tp, o in committed.items() if o > stored.get(tp, 0)}
        assert sum(ahead.values()) >= int(marker.read_text()), (committed, stored)
        assert all(o >= stored.get(tp, 0) for tp, o in committed.items()), (committed, stored)

        # More records for every partition, so that the restarted agent writes to each, and
        # its stored offsets reach the end offsets, the held batch's partitions too.
        sent += await produce(bootstrap, prefix, traffic[20_000:])
        restarted.start()
        with pytest.raises(AssertionError) as oracle:
            await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        print(f"the oracle rejected the broken agent: {str(oracle.value)[:300]}")

        # Not only Kafka's offsets running ahead: once the broken agent's stored offsets reach
        # the end offsets, exactly the records of that window are missing from the tables.
        ends = await end_offsets(bootstrap, prefix)

        async def stored_at_end() -> bool:
            assert restarted.alive(), _log_tail(restarted)
            return await stored_offsets(database_url, prefix, prefix) == ends

        await until(stored_at_end, within=120, what="the broken agent's offsets at the end")
        with pytest.raises(AssertionError, match=r"lost [1-9]") as rows:
            await assert_exactly_once(database_url, prefix, prefix, sent, ends)
        print(f"rows: {str(rows.value)[:300]}")
        for topic, stream in STREAM_OF_TOPIC.items():
            lost = sum(n for (t, _), n in ahead.items() if t == topic)
            expected = sum(1 for s in sent if s.topic == topic) - lost
            assert await count_rows(database_url, APPEND_TABLE[stream.name]) == expected, topic
        assert restarted.alive(), _log_tail(restarted)
    finally:
        held.kill()
        restarted.kill()
