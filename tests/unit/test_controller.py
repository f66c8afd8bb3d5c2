"""The controller's loop over a fetch of control records, without servers (its transactions
replaced by a script): a run that fails is handled again one record at a time, once, and only
the record that fails alone is given up; an instance without keys logs a lasting error at
most once per interval, not once per attempt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import pytest
from aiokafka.structs import ConsumerRecord

from consumers.agent import DatabaseAgent
from consumers.controller import Controller
from pipeline import control_store as store
from pipeline.config import load_config
from pipeline.control import Envelope, GroupState, RollbackCheckpoint, Verifier

ENV = {"KAFKA_BOOTSTRAP_SERVERS": "localhost:9", "DATABASE_URL": "postgresql://u@localhost:9/d"}


def _controller(verifier: Verifier | None) -> Controller:
    controller = Controller(DatabaseAgent(load_config(ENV)), verifier)
    controller.undecided_poll_s = 0.0
    return controller


def _records(offsets: Iterable[int]) -> list[ConsumerRecord[bytes, bytes]]:
    return [
        ConsumerRecord("antigravity.control", 0, o, 0, 0, None, b"x", None, 0, 1, ())
        for o in offsets
    ]


class Script:
    """Stands for ``Controller._handle``: a run fails while it holds one of ``failing``, or
    for its first ``fail_first`` calls; otherwise every record of it is handled."""

    def __init__(self, failing: Iterable[int] = (), fail_first: int = 0) -> None:
        self.failing = set(failing)
        self.fail_first = fail_first
        self.calls: list[list[int]] = []

    async def __call__(self, records: list[ConsumerRecord[bytes, bytes]]) -> int:
        offsets = [r.offset for r in records]
        self.calls.append(offsets)
        if len(self.calls) <= self.fail_first or self.failing & set(offsets):
            raise RuntimeError("database down")
        return len(records)


async def test_a_failed_run_is_handled_again_one_record_at_a_time_blaming_the_one_that_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    controller = _controller(Verifier([]))
    script = Script(failing={2})
    given_up: list[int] = []

    async def give_up(record: ConsumerRecord[bytes, bytes], error: Exception) -> None:
        given_up.append(record.offset)

    monkeypatch.setattr(controller, "_handle", script)
    monkeypatch.setattr(controller, "_give_up", give_up)
    await controller._handle_fetched(_records(range(5)))
    # Each record once more, alone: linear in the run, never the rest of it again and again.
    assert script.calls == [[0, 1, 2, 3, 4], [0], [1], [2], [3], [4]]
    assert given_up == [2]


async def test_a_record_that_fails_alone_is_given_up_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    controller = _controller(Verifier([]))
    script = Script(failing={5})
    given_up: list[int] = []

    async def give_up(record: ConsumerRecord[bytes, bytes], error: Exception) -> None:
        given_up.append(record.offset)

    monkeypatch.setattr(controller, "_handle", script)
    monkeypatch.setattr(controller, "_give_up", give_up)
    await controller._handle_fetched(_records([5]))
    assert (script.calls, given_up) == ([[5]], [5])


async def test_an_instance_without_keys_logs_a_lasting_error_once_per_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    controller = _controller(None)
    script = Script(fail_first=50)
    monkeypatch.setattr(controller, "_handle", script)
    with caplog.at_level(logging.WARNING, logger="consumers.controller"):
        await controller._handle_fetched(_records([7, 8]))
    # It asked again 50 times, never moving past the record nor giving it up.
    assert script.calls == [[7, 8]] * 51
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "ERROR",
            "1 failed attempt(s) to follow a control record since the last such line; the "
            "last: control record at offset 7: RuntimeError('database down')",
        )
    ]


class _AckedProducer:
    """A producer whose every send is acknowledged at once."""

    async def send(self, topic: str, value: bytes, *, key: bytes) -> asyncio.Future[None]:
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked


@pytest.mark.parametrize("steps", range(10))
async def test_a_cancel_that_comes_as_a_status_send_is_acknowledged_is_never_lost(
    steps: int,
) -> None:
    # Every step of the event loop from the send to its return: a cancel in any of them ends
    # the heartbeat loop and the control loop (else the instance never stops: its close, and
    # asyncio.run, wait for them for ever).
    controller = _controller(None)
    controller._producer = _AckedProducer()  # type: ignore[assignment]
    sending = asyncio.ensure_future(controller._publish_all([b"status"]))
    for _ in range(steps):
        await asyncio.sleep(0)
    requested = sending.cancel()  # False: it had returned already, nothing to cancel
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    assert sending.cancelled() == requested


async def test_a_rollback_the_store_refuses_is_rejected_as_apply_failed_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A data rollback that cannot restore a stream (a "latest" one without history) is a
    rejected command naming the stream, like one that finds another group's table."""
    controller = _controller(Verifier([]))

    async def checkpoint_offsets(conn: object, group: str, name: str) -> dict[object, int]:
        return {("t", 0): 0}

    async def roll_back_data(*args: object) -> None:
        raise store.RollbackRefused("stream 'orders' (orders) is a \"latest\" table")

    monkeypatch.setattr(store, "checkpoint_offsets", checkpoint_offsets)
    monkeypatch.setattr(store, "roll_back_data", roll_back_data)
    now = datetime.now(UTC)
    envelope = Envelope(
        command_id=uuid.uuid4(),
        seq=7,
        target="g",
        issued_at=now,
        expires_at=now,
        issuer="antigravity",
        key_id="0" * 16,
        command=RollbackCheckpoint(to_checkpoint="before", then="reingest"),
        signature=b"",
    )
    state = GroupState()
    outcome = await controller._apply(None, state, envelope)  # type: ignore[arg-type]
    assert outcome.state is state
    assert outcome.decision is not None
    assert (outcome.decision.outcome, outcome.decision.code) == ("rejected", "apply_failed")
    assert "stream 'orders'" in outcome.decision.detail
    assert not outcome.rolled_back
