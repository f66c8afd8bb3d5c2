"""The negative control: the SIGKILL scenario against a deliberately broken agent
(tests/integration/broken_agent.py: Kafka offsets committed before the database
transaction, positions taken from Kafka) must make the exactly-once oracle FAIL, proving the
oracle can fail.

Not collected by `make test` (the file name does not start with ``test_``): whether a kill
lands in the broken agent's window depends on the kill schedule. The broken agent holds that
window open (a second between its Kafka commit and its database write); before it did, seed
3 missed once in four runs. `make chaos` runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.integration.harness import (
    assert_caught_up_exactly_once,
    assert_exactly_once,
    end_offsets,
    stored_offsets,
    until,
)
from tests.integration.test_faults import (
    BROKEN_AGENT,
    NEGATIVE_SEED,
    _killed_at_random_moments,
    _log_tail,
)

pytestmark = pytest.mark.timeout(600)


async def test_the_oracle_catches_an_agent_that_commits_to_kafka_before_the_database(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    """The same SIGKILL scenario against tests/integration/broken_agent.py (Kafka offsets
    committed before the database transaction, positions from Kafka): the oracle must fail."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    async with _killed_at_random_moments(
        bootstrap, database_url, prefix, tmp_path, NEGATIVE_SEED, command=BROKEN_AGENT
    ) as (agent, sent):
        with pytest.raises(AssertionError) as oracle:
            await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        print(f"the oracle rejected the broken agent: {str(oracle.value)[:300]}")
        # Not only Kafka's offsets running ahead: once its stored offsets reached the end
        # offsets, rows are missing (or doubled).
        ends = await end_offsets(bootstrap, prefix)

        async def stored_at_end() -> bool:
            return await stored_offsets(database_url, prefix, prefix) == ends

        await until(stored_at_end, within=120, what="the broken agent's offsets at the end")
        with pytest.raises(AssertionError, match=r"lost [1-9]|more than once") as rows:
            await assert_exactly_once(database_url, prefix, prefix, sent, ends)
        print(f"rows: {str(rows.value)[:300]}")
        assert agent.alive(), _log_tail(agent)
