"""`make soak`'s two-minute version (tests/soak.py; docs/testing.md, "The soak run: `make
soak`"): the same run on a stack of its own, shorter, slower and with a fault every 15 s, so
that every kind of fault is injected once.

Two minutes are mostly warm-up: RSS climbs as the agents' buffers and caches fill, and the
open file descriptors swing with each fault (a broker restart closes the Kafka connections).
So this run judges growth only in the asyncio tasks and the database connections, which
settle within seconds; RSS and descriptors are judged by the 30-minute `make soak`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import FAULTS, Settings, run_soak, save, summary

pytestmark = pytest.mark.timeout(900)

SETTINGS = Settings(
    minutes=2,
    rate=2_000,
    seed=1,
    warmup_s=30,
    settle_s=20,
    fault_every_s=15,
    control_every_s=30,
    judged=("asyncio_tasks", "db_connections"),
)


async def test_two_minutes_of_soak_under_every_fault_lose_nothing_and_leak_no_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_HEAP_OPTS", "-Xms128m -Xmx512m")
    run = await run_soak(SETTINGS, tmp_path)
    save(run, tmp_path)
    print(summary(run))
    assert run.ok, summary(run)
    assert run.oracle["holds"], run.oracle["problems"]
    assert run.oracle["agent_exit_codes"] == [0, 0]
    assert sorted(f["kind"] for f in run.faults) == sorted(FAULTS)
    assert not any(p["kafka_ahead"] for p in run.progress), run.progress
    assert sum(run.produced.values()) > 60 * SETTINGS.rate  # a minute's worth, at least
    assert any(c["exit"] == 0 for c in run.commands), run.commands
    for agent in ("agent-0", "agent-1"):
        # Sampled every 10 s but while its process is being restarted.
        assert len([s for s in run.samples if s["agent"] == agent]) >= 9
        for measure in ("asyncio_tasks", "db_connections"):
            verdict = run.trends[f"{agent} {measure}"]
            assert verdict["judged"] >= 5 and not verdict["grows"], (agent, measure, verdict)
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    assert (tmp_path / "soak.json").exists()
