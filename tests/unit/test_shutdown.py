"""A stopped ``pipeline run`` ends within its deadline whatever its tasks do, and a second
signal ends it at once (pipeline/shutdown.py). The process is ``pipeline run``'s own signal
handling and exit around a stand-in agent and controller (tests/unit/hanging_run.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from pipeline import kafka_clients
from pipeline.lag_probe import LagProbe
from pipeline.shutdown import FORCED_EXIT_STATUS, BoundedStop, running

ROOT = Path(__file__).resolve().parents[2]


class Run:
    def __init__(self, kind: str, timeout_s: float, allowance_s: float, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.unit.hanging_run",
                    kind,
                    str(timeout_s),
                    str(allowance_s),
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while "ready" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text()

    def signal(self, sig: signal.Signals) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def exit_within(self, seconds: float) -> tuple[int, float]:
        started = time.monotonic()
        try:
            status = self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {seconds}s after the stop:\n{self.output()}")
        return status, time.monotonic() - started


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(10)


def start(runs: list[Run], tmp_path: Path, kind: str, timeout_s: float, allowance_s: float) -> Run:
    run = Run(kind, timeout_s, allowance_s, tmp_path / f"{kind}-{len(runs)}.log")
    runs.append(run)
    return run


def test_a_clean_stop_exits_0_at_once_abandoning_nothing(runs: list[Run], tmp_path: Path) -> None:
    run = start(runs, tmp_path, "clean", 30.0, 10.0)
    run.signal(signal.SIGTERM)
    status, took = run.exit_within(10)
    assert (status, "abandoning" in run.output()) == (0, False)
    assert took < 5


@pytest.mark.parametrize("kind", ["lost-cancel", "blocks-loop"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_that_hangs_exits_at_its_deadline_naming_what_it_abandons(
    runs: list[Run], tmp_path: Path, kind: str, sig: signal.Signals
) -> None:
    # The deadline is shutdown_timeout_s plus the close's allowance: 1.0 + 1.5 here.
    run = start(runs, tmp_path, kind, 1.0, 1.5)
    run.signal(sig)
    status, took = run.exit_within(20)
    output = run.output()
    assert status == FORCED_EXIT_STATUS, output
    assert 2.5 <= took < 8, output
    assert "DatabaseAgent stopped" in output
    (line,) = [x for x in output.splitlines() if "exiting now" in x]
    assert f"the stop deadline: exiting now (status {FORCED_EXIT_STATUS}), abandoning" in line
    assert "Controller.run" in line  # the task that would not end, named


def test_a_second_signal_exits_at_once(runs: list[Run], tmp_path: Path) -> None:
    run = start(runs, tmp_path, "lost-cancel", 60.0, 10.0)
    run.signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "DatabaseAgent stopped" not in run.output():
        assert time.monotonic() < deadline, run.output()
        time.sleep(0.02)
    assert run.proc.poll() is None  # hung, as the first signal left it
    run.signal(signal.SIGINT)
    status, took = run.exit_within(5)
    output = run.output()
    assert status == FORCED_EXIT_STATUS, output
    assert took < 3, output
    (line,) = [x for x in output.splitlines() if "exiting now" in x]
    assert "a second SIGINT" in line and "Controller.run" in line


async def test_the_deadline_is_armed_by_the_first_signal_only() -> None:
    stops: list[int] = []
    exits: list[int] = []
    stopping = BoundedStop(
        lambda: stops.append(1), 30.0, asyncio.get_running_loop(), exit=exits.append
    )
    stopping.signalled(signal.SIGTERM)
    assert (stops, exits) == ([1], [])
    stopping.signalled(signal.SIGTERM)
    stopping.signalled(signal.SIGINT)  # a third changes nothing: the exit happened
    assert (stops, exits) == ([1], [FORCED_EXIT_STATUS])


async def test_a_signal_once_the_agent_has_ended_exits_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stops: list[int] = []
    exits: list[int] = []
    stopping = BoundedStop(
        lambda: stops.append(1), 30.0, asyncio.get_running_loop(), exit=exits.append
    )
    stopping.arm()  # run_controlled returned: asyncio.run is ending
    stopping.signalled(signal.SIGTERM)
    assert (stops, exits) == ([], [FORCED_EXIT_STATUS])
    assert "SIGTERM while exiting: exiting now (status 70)" in caplog.text


async def test_the_deadline_alone_exits_when_it_passes() -> None:
    exits: list[int] = []
    stopping = BoundedStop(lambda: None, 0.05, asyncio.get_running_loop(), exit=exits.append)
    stopping.signalled(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not exits:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert exits == [FORCED_EXIT_STATUS]


async def test_running_names_each_task_with_where_it_waits() -> None:
    async def waiting_here() -> None:
        await asyncio.sleep(3600)

    async def outer() -> None:
        await waiting_here()

    task = asyncio.ensure_future(outer())
    task.set_name("stuck")
    await asyncio.sleep(0)
    try:
        (found,) = [x for x in running(asyncio.get_running_loop()) if "stuck" in x]
        assert found.startswith("task stuck at ")
        assert re.search(r"\.<locals>\.waiting_here > sleep \(tasks\.py:\d+\)$", found), found
        assert ".<locals>.outer > " in found
    finally:
        task.cancel()


class _AnsweringConsumer:
    """A consumer whose end offsets come at once."""

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 7)


@pytest.mark.parametrize("steps", range(8))
async def test_a_cancel_that_comes_as_a_lag_lookup_answers_is_never_lost(steps: int) -> None:
    # The agent cancels its lag task as it stops, and waits for it: a lost cancel would keep
    # the task measuring for ever, and the agent from stopping.
    probe = LagProbe(kafka_clients.kafka_settings("localhost:9"), timeout_s=5.0)
    probe._consumer = _AnsweringConsumer()  # type: ignore[assignment]
    asking = asyncio.ensure_future(probe.end_offsets([("t", 0)]))
    for _ in range(steps):
        await asyncio.sleep(0)
    requested = asking.cancel()  # False: it had answered already, nothing to cancel
    with contextlib.suppress(asyncio.CancelledError):
        await asking
    assert asking.cancelled() == requested
