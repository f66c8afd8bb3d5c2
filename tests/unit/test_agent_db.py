"""AgentDatabase's queue of work for the next ingest transaction, and its batch ids, without a
database: what is taken, what callers get, and what a stop does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from consumers.agent_db import AgentDatabase
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.kafka_clients import KafkaSettings


def agent_db() -> AgentDatabase:
    return AgentDatabase(
        Config(kafka=KafkaSettings(bootstrap_servers="k:9092"), database_url="postgresql://x/y")
    )


async def work(conn: Any) -> str:
    return "done"


async def queued_callers(db: AgentDatabase, count: int) -> list[asyncio.Task[Any]]:
    callers = [asyncio.ensure_future(db.in_ingest_transaction(work)) for _ in range(count)]
    await asyncio.sleep(0)  # each caller queues its work
    return callers


async def test_committed_work_hands_each_caller_its_result_or_its_error() -> None:
    db = agent_db()
    assert not db.has_work
    first, second = await queued_callers(db, 2)
    assert db.has_work
    taken = db.take_work()
    assert [q.work for q in taken] == [work, work]
    failure = ValueError("the work's own")
    db.settle(taken, [("result", None), (None, failure)])
    assert await first == "result"
    with pytest.raises(ValueError) as raised:
        await second
    assert raised.value is failure
    assert not db.has_work and db.take_work() == []


async def test_work_stays_queued_until_a_transaction_commits_it() -> None:
    db = agent_db()
    (caller,) = await queued_callers(db, 1)
    assert len(db.take_work()) == 1  # a transaction that rolls back settles nothing
    taken = db.take_work()
    assert len(taken) == 1  # the next one takes it again
    db.settle(taken, [(3, None)])
    assert await caller == 3


async def test_work_whose_caller_was_cancelled_is_not_taken() -> None:
    db = agent_db()
    gone, stays = await queued_callers(db, 2)
    gone.cancel()
    await asyncio.sleep(0)
    taken = db.take_work()
    assert len(taken) == 1
    db.settle(taken, [("kept", None)])
    assert await stays == "kept"


async def test_a_stop_fails_the_queued_work_and_refuses_more() -> None:
    db = agent_db()
    (caller,) = await queued_callers(db, 1)
    db.close()
    with pytest.raises(PipelineError, match="stopped before the work was committed"):
        await caller
    assert not db.has_work
    with pytest.raises(PipelineError, match="has stopped: no work can be committed"):
        await db.in_ingest_transaction(work)


async def test_batch_ids_are_none_once_used_up_and_when_reserving_gave_up() -> None:
    db = agent_db()
    assert db.batch_id() is None
    asked: list[str] = []

    async def stopping(what: str, call: Callable[[], Awaitable[None]]) -> None:
        asked.append(what)  # the agent stopped before the call succeeded: it never ran

    assert await db.reserve_batch_id(stopping) is None
    assert asked == ["reserving batch ids"]
