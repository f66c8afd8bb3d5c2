"""A stopped agent exits, promptly and cleanly: the control loop and its heartbeats end when
cancelled, whenever the cancel comes (docs/exactly-once.md, "SIGTERM (or SIGINT), and the
shutdown deadline")."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from consumers.agent import DatabaseAgent
from consumers.controller import Controller
from pipeline import kafka as kafka_io
from pipeline.config import load_config
from pipeline.shutdown import CLOSE_ALLOWANCE_S
from pipeline.testbed import AgentProcess
from tests.conftest import Servers
from tests.integration.harness import agent_env, create_topics, fleet_traffic, produce_paced

pytestmark = pytest.mark.timeout(600)


async def test_the_control_loop_ends_whenever_it_is_cancelled_even_as_a_heartbeat_is_acked(
    servers: Servers, unique: str, database_url: str
) -> None:
    # Heartbeats back to back: the loop is nearly always sending one, so cancels land as
    # sends are acknowledged too (where Python 3.11's wait_for lost them: 4 in 40).
    config = load_config(
        {},  # this test's servers only, whatever the environment says
        kafka_bootstrap_servers=servers.endpoints.kafka_bootstrap,
        database_url=database_url,
        topic_prefix=f"{unique}.",
        group_id=unique,
        metrics_address="",
    )
    rng = random.Random(7)
    lost = []
    for attempt in range(40):
        controller = Controller(DatabaseAgent(config), None, heartbeat_s=0.0)
        if attempt == 0:
            topics = [controller.control_topic, controller.status_topic]
            await kafka_io.ensure_topics(config.kafka, topics, 1)
        running = asyncio.ensure_future(controller.run())
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        running.cancel()
        done, _ = await asyncio.wait({running}, timeout=30)
        if not done:
            lost.append(attempt)
            running.cancel()  # once more, so the test leaves nothing running
            await asyncio.wait({running}, timeout=30)
        else:
            assert running.cancelled()
    assert lost == []


@pytest.mark.parametrize("seed", [1, 2])
async def test_agents_stopped_at_any_moment_exit_0_within_the_deadline(
    servers: Servers, database_url: str, unique: str, tmp_path: Path, seed: int
) -> None:
    # As the README's tour runs them: `pipeline run` with the control plane, several in one
    # group, stopped while starting, while ingesting, or while the group rebalances.
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=4)
    shutdown_s = 5.0
    within = shutdown_s + CLOSE_ALLOWANCE_S
    env = agent_env(
        bootstrap,
        database_url,
        prefix,
        prefix,
        batch_max_records=300,
        session_timeout_ms=6000,
        shutdown_timeout_s=shutdown_s,
    )
    rng = random.Random(seed)
    sending = asyncio.create_task(
        produce_paced(bootstrap, prefix, fleet_traffic(40_000, seed=seed), over=30.0)
    )
    agents: list[AgentProcess] = []
    try:
        for moment in ("starting", "ingesting", "a member joins", "a member leaves"):
            logs = [tmp_path / f"{moment}-{i}.log" for i in range(3)]
            agents = [AgentProcess(env, log) for log in logs]
            for agent in agents[:2]:
                agent.start()
                await _until_logged(agent, "starting", within=30)
            stopped: list[tuple[AgentProcess, float]] = []
            if moment == "starting":
                await asyncio.sleep(rng.uniform(0.0, 1.0))
            elif moment == "ingesting":
                await asyncio.sleep(rng.uniform(2.0, 5.0))
            elif moment == "a member joins":
                await asyncio.sleep(rng.uniform(2.0, 4.0))
                agents[2].start()
                await _until_logged(agents[2], "starting", within=30)
                await asyncio.sleep(rng.uniform(0.0, 2.0))
            else:
                await asyncio.sleep(rng.uniform(3.0, 6.0))
                agents[0].signal(signal.SIGTERM)
                stopped.append((agents[0], time.monotonic()))
                await asyncio.sleep(rng.uniform(0.0, 1.5))  # the other one is rebalancing
            for agent in agents:
                if agent.proc is not None and all(agent is not a for a, _ in stopped):
                    agent.signal(signal.SIGTERM)
                    stopped.append((agent, time.monotonic()))
            for agent, at in stopped:
                left = max(at + within - time.monotonic(), 0.0)
                try:
                    status = await asyncio.to_thread(agent.wait, left)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{moment}: still running {within}s after SIGTERM")
                log = agent.log_path.read_text() if agent.log_path else ""
                assert (status, "exiting now" in log) == (0, False), f"{moment}:\n{log[-3000:]}"
        await sending
    finally:
        sending.cancel()
        for agent in agents:
            agent.kill()


async def _until_logged(agent: AgentProcess, text: str, *, within: float) -> None:
    """Until the agent's log shows ``text``: its signal handlers are installed by then."""
    assert agent.log_path is not None
    deadline = time.monotonic() + within
    while text not in agent.log_path.read_text():
        assert agent.alive(), agent.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {within}s"
        await asyncio.sleep(0.05)
