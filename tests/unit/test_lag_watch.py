"""LagWatch, the agent's lag collaborator, driven without servers: a real Ownership and
Metrics, a probe answering from a table, a consumer reporting the end offsets its fetches
saw."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition

from consumers.lag_watch import LagWatch
from pipeline.batching import Batch, Partition
from pipeline.metrics import Metrics
from pipeline.ownership import Ownership

M0, M1, E0 = ("agents.metrics", 0), ("agents.metrics", 1), ("agents.events", 0)


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int
    serialized_value_size: int = 1


class Probe:
    """What LagProbe answers, and what it was asked."""

    def __init__(self, ends: dict[Partition, int], oldest: dict[Partition, int | None]) -> None:
        self.ends = ends
        self.oldest = oldest
        self.asked_ends: list[list[Partition]] = []
        self.asked_oldest: list[dict[Partition, int]] = []

    async def end_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        self.asked_ends.append(sorted(partitions))
        return {p: self.ends[p] for p in partitions}

    async def oldest_timestamps(
        self, stored: dict[Partition, int], ends: Any
    ) -> dict[Partition, int | None]:
        self.asked_oldest.append(dict(stored))
        return {p: self.oldest[p] for p in stored}


class Consumer:
    """The end offsets an assigned partition's fetch responses reported."""

    def __init__(self, seen: dict[Partition, int]) -> None:
        self.seen = seen

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(*p) for p in self.seen}

    def last_stable_offset(self, tp: TopicPartition) -> int | None:
        return self.seen.get((tp.topic, tp.partition))

    def highwater(self, tp: TopicPartition) -> int | None:
        return None


class World:
    def __init__(self, stored: dict[Partition, int]) -> None:
        self.ownership = Ownership({"agents.metrics": "metrics", "agents.events": "events"})
        self.ownership.assigned_event(stored)
        self.ownership.positioned_event(stored)
        self.metrics = Metrics()
        self.in_hand: list[Batch | None] = []
        self.refreshes = 0
        self.third = asyncio.Event()
        self.watch = LagWatch(
            self.ownership, self.metrics, lambda: self.in_hand, after_each=self.refreshed
        )

    def refreshed(self) -> None:
        self.refreshes += 1
        if self.refreshes == 3:
            self.third.set()

    def gauge(self, name: str, partition: Partition) -> float | None:
        labels = {"topic": partition[0], "partition": str(partition[1])}
        return self.metrics.registry.get_sample_value(name, labels)


def ms_ago(seconds: float) -> int:
    return int((time.time() - seconds) * 1000)


def test_a_refresh_asks_end_offsets_and_looks_up_only_what_it_does_not_hold() -> None:
    world = World({M0: 100, M1: 50, E0: 7})
    held = Batch(1)
    held.add(M1, [Rec(*M1, 50, ms_ago(30))], ([], []), 0.0)
    world.in_hand = [None, held]
    probe = Probe({M0: 130, M1: 60, E0: 7}, {M0: ms_ago(120)})
    asyncio.run(world.watch.refresh(probe))  # type: ignore[arg-type]
    assert probe.asked_ends == [[E0, M0, M1]]
    assert probe.asked_oldest == [{M0: 100}]  # M1's record is in hand; E0 is caught up
    assert world.gauge("pipeline_consumer_lag_records", M0) == 30
    assert world.gauge("pipeline_consumer_lag_seconds", M0) == pytest.approx(120, abs=2)
    assert world.gauge("pipeline_consumer_lag_seconds", M1) == pytest.approx(30, abs=2)
    assert world.gauge("pipeline_consumer_lag_seconds", E0) == 0
    assert world.gauge("pipeline_partition_stored_offset", M1) == 50
    assert world.gauge("pipeline_partition_end_offset", M1) == 60
    assert world.watch.seconds_behind() == pytest.approx(120, abs=2)
    asyncio.run(world.watch.refresh(probe))  # type: ignore[arg-type]
    assert probe.asked_oldest == [{M0: 100}]  # looked up once per stored offset


def test_partitions_no_longer_owned_lose_their_series() -> None:
    world = World({M0: 0, M1: 0})
    probe = Probe({M0: 5, M1: 5}, {M0: ms_ago(1), M1: ms_ago(1)})
    asyncio.run(world.watch.refresh(probe))  # type: ignore[arg-type]
    world.ownership.revoked_event([M1])
    asyncio.run(world.watch.refresh(probe))  # type: ignore[arg-type]
    assert world.gauge("pipeline_consumer_lag_records", M0) == 5
    assert world.gauge("pipeline_consumer_lag_records", M1) is None
    assert world.gauge("pipeline_consumer_lag_seconds", M1) is None
    world.watch.forget([M0])  # a revocation, as the rebalance callback reports it
    assert world.gauge("pipeline_partition_end_offset", M0) is None


def test_after_a_commit_the_gauges_move_without_asking_kafka() -> None:
    world = World({M0: 100})
    probe = Probe({M0: 130}, {M0: ms_ago(60)})
    asyncio.run(world.watch.refresh(probe))  # type: ignore[arg-type]
    world.watch.show(M0, 130, time.time())
    assert world.gauge("pipeline_consumer_lag_records", M0) == 0
    assert world.gauge("pipeline_consumer_lag_seconds", M0) == 0
    assert world.gauge("pipeline_partition_stored_offset", M0) == 130
    world.watch.show(E0, 3, time.time())  # no end offset known: nothing to show
    assert world.gauge("pipeline_consumer_lag_records", E0) is None


def test_an_end_offset_seen_in_a_fetch_response_since_the_refresh_counts() -> None:
    world = World({M0: 100, M1: 10})
    probe = Probe({M0: 130, M1: 10}, {M0: ms_ago(5)})
    assert world.watch.records_behind() == 0  # not started: no consumer yet

    async def started() -> None:
        world.watch.start(Consumer({M0: 150, M1: 4}), probe, 3600)  # type: ignore[arg-type]
        await world.watch.refresh(probe)  # type: ignore[arg-type]
        await world.watch.stop(1.0)

    asyncio.run(started())
    assert world.gauge("pipeline_partition_end_offset", M0) == 150
    assert world.gauge("pipeline_partition_end_offset", M1) == 10  # an older one never wins
    assert world.watch.records_behind() == 50


def test_the_watch_refreshes_until_stopped_and_survives_a_failing_probe() -> None:
    class Failing(Probe):
        async def end_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
            raise ConnectionError("kafka away")

        async def stop(self) -> None:
            self.stopped = True

    async def run() -> None:
        world = World({M0: 0})
        probe = Failing({}, {})
        world.watch.start(Consumer({}), probe, 0.01)  # type: ignore[arg-type]
        await asyncio.wait_for(world.third.wait(), 10)  # after each failed refresh too
        await world.watch.stop(1.0)
        refreshes = world.refreshes
        assert probe.stopped
        await asyncio.sleep(0)
        assert world.refreshes == refreshes  # the loop ended with stop()

    asyncio.run(run())


def test_a_probe_that_fails_then_answers_is_logged_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kafka away for a while: one warning when measuring starts failing, one line when it
    works again (the operator learns it recovered), none for the refreshes in between."""

    class Flaky(Probe):
        failing = 3
        # Set on the second answer: the refresh of the first one has run and logged.
        answered_twice = asyncio.Event()

        async def end_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
            if self.failing:
                self.failing -= 1
                raise ConnectionError("kafka away")
            if self.asked_ends:
                self.answered_twice.set()
            return await super().end_offsets(partitions)

        async def stop(self) -> None:
            pass

    async def run() -> None:
        world = World({M0: 0})
        probe = Flaky({M0: 5}, {M0: ms_ago(1)})
        world.watch.start(Consumer({}), probe, 0.01)  # type: ignore[arg-type]
        await asyncio.wait_for(probe.answered_twice.wait(), 10)
        await world.watch.stop(1.0)

    with caplog.at_level(logging.INFO, logger="consumers.lag_watch"):
        asyncio.run(run())
    said = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in said] == [
        "measuring lag failed (retried every 0.01s)",
        "measuring lag works again after 3 failed refreshes",
    ]
