"""The rebalance listener hands aiokafka's callbacks to the agent as plain sets."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from consumers.membership import Rebalance


def test_the_listener_hands_each_callback_its_own_partitions() -> None:
    calls: list[tuple[str, set[TopicPartition]]] = []
    listener = Rebalance(
        lambda a: calls.append(("assigned", a)), lambda r: calls.append(("revoked", r))
    )
    revoked = frozenset({TopicPartition("agents.metrics", 0)})
    assigned = frozenset({TopicPartition("agents.metrics", 1), TopicPartition("agents.events", 0)})
    asyncio.run(listener.on_partitions_revoked(revoked))
    asyncio.run(listener.on_partitions_assigned(assigned))
    assert calls == [("revoked", set(revoked)), ("assigned", set(assigned))]
    assert all(type(partitions) is set for _, partitions in calls)
