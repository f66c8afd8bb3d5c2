"""`pipeline bench --sdk` against the real servers, shortened: every way's simulated agent
process runs, its records arrive where its way puts them (run_sdk_bench checks the rows and
the topics' end offsets), and the lock holds up the ways that write to PostgreSQL and not
the SDK."""

from __future__ import annotations

from consumers.bench_sdk import BATCHED, NOTHING, OLD, SDK, WAYS, SdkPlan, run_sdk_bench
from pipeline.devstack import Endpoints

# 2.5 s, locked for 1.5 s from 0.5 s: 250 records scheduled, 150 of them while locked.
PLAN = SdkPlan(rate=100, seconds=2.5, lock_at=0.5, lock_seconds=1.5)


async def test_the_lock_holds_up_the_agents_that_write_to_postgresql_not_the_sdk(
    endpoints: Endpoints,
) -> None:
    said: list[str] = []
    results = await run_sdk_bench(endpoints.kafka, endpoints.database_url, PLAN, said.append)
    by_way = {r.way: r for r in results}
    assert list(by_way) == list(WAYS)
    assert [r.scheduled for r in results] == [250] * 4
    assert len(said) == 8  # a line as each way starts, one as it ends
    # An awaited INSERT waits out the lock: no call returns while the tables are locked, and
    # the one that met the lock waited most of it.
    for way in (OLD, BATCHED):
        assert by_way[way].lock_call_max_ms > 1_000, way
        assert by_way[way].records < 250, way  # the ticks it was held up for are lost
    assert by_way[OLD].lock_records == 0
    # The SDK and the agent that hands its records to no one go on: no call waits.
    for way in (NOTHING, SDK):
        assert by_way[way].lock_call_max_ms < 500, way
        assert by_way[way].lock_records > 0, way
    assert by_way[NOTHING].cpu_ms_per_1k_net == 0.0
