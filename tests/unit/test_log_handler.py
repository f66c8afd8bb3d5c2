"""The logging handler never blocks the app, counts every record it cannot deliver, and
never feeds its own logs back into itself. No broker here: delivery goes to injected sinks."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from pipeline.errors import ConfigError
from pipeline.records import AgentEvent
from producers.log_handler import KafkaLogHandler, log_event


class StalledSink:
    """Accepts a batch, then holds it until released: a broker that stopped answering."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.events: list[AgentEvent] = []

    async def __call__(self, events: Sequence[AgentEvent]) -> int:
        self.entered.set()
        await asyncio.to_thread(self.release.wait)
        self.events.extend(events)
        return len(events)


class CollectingSink:
    def __init__(self, acknowledge: int | None = None) -> None:
        self.events: list[AgentEvent] = []
        self.acknowledge = acknowledge  # per batch; None means all

    async def __call__(self, events: Sequence[AgentEvent]) -> int:
        self.events.extend(events)
        return len(events) if self.acknowledge is None else self.acknowledge


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    """A logger of its own that does not propagate to pytest's capture on the root."""
    log = logging.getLogger(f"tests.log_handler.{request.node.name}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def test_a_full_queue_drops_exactly_the_overflow_without_waiting(logger: logging.Logger) -> None:
    sink = StalledSink()
    handler = KafkaLogHandler(agent_id="agent-1", sink=sink, maxsize=100, batch_size=10)
    logger.addHandler(handler)
    logger.info("first")
    assert sink.entered.wait(5), "the worker never took the first record"
    # The worker holds "first" in flight; the queue is empty and fills up again.
    started = time.perf_counter()
    for i in range(107):
        logger.info("record %d", i)
    emitting = time.perf_counter() - started
    assert handler.dropped == 7
    assert handler.pending == 101  # 1 in flight + 100 queued
    assert emitting < 0.5, f"107 emits took {emitting:.3f}s: emit waited on delivery"

    sink.release.set()
    handler.close(timeout=5)
    assert (handler.delivered, handler.failed, handler.dropped) == (101, 0, 7)
    assert [e.payload["message"] for e in sink.events] == ["first"] + [
        f"record {i}" for i in range(100)
    ]


def test_close_gives_up_at_its_bound_and_counts_the_queued_as_dropped(
    logger: logging.Logger,
) -> None:
    sink = StalledSink()
    handler = KafkaLogHandler(agent_id="agent-1", sink=sink, maxsize=1000, batch_size=1)
    logger.addHandler(handler)
    logger.warning("in flight")
    assert sink.entered.wait(5)
    for i in range(50):
        logger.warning("queued %d", i)

    started = time.perf_counter()
    handler.close(timeout=0.3)
    assert 0.3 <= time.perf_counter() - started < 2
    assert handler.dropped == 50
    logger.warning("after close")
    assert handler.dropped == 51

    sink.release.set()  # the in-flight batch completes; the thread then ends
    handler._thread.join(5)
    assert not handler._thread.is_alive()
    assert (handler.delivered, handler.failed, handler.dropped) == (1, 0, 51)
    assert handler.pending == 0


def test_delivery_failures_are_counted_not_raised(
    logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(events: Sequence[AgentEvent]) -> int:
        raise RuntimeError("broker on fire")

    handler = KafkaLogHandler(agent_id="agent-1", sink=broken, batch_size=10)
    logger.addHandler(handler)
    for i in range(30):
        logger.error("e%d", i)
    handler.flush(timeout=5)
    assert (handler.delivered, handler.failed, handler.dropped, handler.pending) == (0, 30, 0, 0)
    assert capsys.readouterr().err == ""  # nothing printed, nothing raised into the app


def test_unacknowledged_records_count_as_failed(logger: logging.Logger) -> None:
    async def refuses_some(events: Sequence[AgentEvent]) -> int:
        # Counted by content, so the result does not depend on how records were batched.
        return sum("refused" not in e.payload["message"] for e in events)

    handler = KafkaLogHandler(agent_id="agent-1", sink=refuses_some, batch_size=5)
    logger.addHandler(handler)
    for i in range(20):
        logger.info("record %d %s", i, "refused" if i % 5 == 0 else "ok")
    handler.flush(timeout=5)
    assert (handler.delivered, handler.failed, handler.pending) == (16, 4, 0)


def test_records_logged_on_the_worker_thread_are_not_shipped(logger: logging.Logger) -> None:
    """aiokafka logs from the handler's own thread; shipping that would feed back forever."""
    shipped: list[str] = []

    async def chatty(events: Sequence[AgentEvent]) -> int:
        for event in events:
            shipped.append(event.payload["message"])
            logger.error("delivery trouble while shipping %s", event.payload["message"])
        return len(events)

    handler = KafkaLogHandler(agent_id="agent-1", sink=chatty)
    logger.addHandler(handler)
    for i in range(20):
        logger.info("app %d", i)
    # As logging.shutdown() does: flush while holding the handler's lock. A worker that
    # needed that lock to log would stall the flush until its bound.
    started = time.perf_counter()
    with handler.lock:  # type: ignore[union-attr]
        handler.flush(timeout=5)
    assert time.perf_counter() - started < 2
    handler.close(timeout=5)
    assert shipped == [f"app {i}" for i in range(20)]
    assert (handler.delivered, handler.dropped) == (20, 0)


def test_events_carry_the_log_record(logger: logging.Logger) -> None:
    sink = CollectingSink()
    handler = KafkaLogHandler(agent_id="agent-42", sink=sink)
    logger.addHandler(handler)
    logger.debug("quiet")
    logger.warning("careful: %s", "disk")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logger.exception("it broke")
    logger.critical("with stack", stack_info=True)
    handler.close(timeout=5)

    debug, warning, error, critical = sink.events
    assert [e.severity for e in sink.events] == ["debug", "warning", "error", "critical"]
    assert {e.kind for e in sink.events} == {"log"}
    assert {e.agent_id for e in sink.events} == {"agent-42"}
    assert len({e.event_id for e in sink.events}) == 4
    assert warning.payload == {
        "logger": logger.name,
        "message": "careful: disk",
        "module": "test_log_handler",
        "lineno": warning.payload["lineno"],
    }
    assert isinstance(warning.payload["lineno"], int)
    assert "exc" not in debug.payload
    assert error.payload["exc"].startswith("Traceback")
    assert "ZeroDivisionError: division by zero" in error.payload["exc"]
    assert "Stack (most recent call last)" in critical.payload["stack"]


@pytest.mark.parametrize(
    ("level", "severity"),
    [
        (logging.DEBUG, "debug"),
        (logging.INFO, "info"),
        (logging.WARNING, "warning"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "critical"),
        (25, "level 25"),
    ],
)
def test_severity_is_the_level_name_lowercased(level: int, severity: str) -> None:
    record = logging.LogRecord("app", level, __file__, 7, "m %s", ("x",), None)
    event = log_event(record, "agent-9")
    assert (event.severity, event.payload["message"], event.payload["lineno"]) == (
        severity,
        "m x",
        7,
    )
    assert event.ts.timestamp() == pytest.approx(record.created)


def test_exception_text_is_taken_from_exc_info() -> None:
    try:
        raise KeyError("missing")
    except KeyError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("app", logging.ERROR, __file__, 1, "failed", None, exc_info)
    assert "KeyError: 'missing'" in log_event(record, "a").payload["exc"]


def test_bad_format_arguments_follow_the_logging_convention(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Straight to the handler: pytest's own capture handlers on a logger would raise first.
    sink = CollectingSink()
    handler = KafkaLogHandler(agent_id="agent-1", sink=sink)
    bad = logging.LogRecord("app", logging.INFO, __file__, 1, "two %s %s", ("args",), None)
    handler.handle(bad)
    handler.handle(logging.LogRecord("app", logging.INFO, __file__, 2, "fine", None, None))
    handler.close(timeout=5)
    assert [e.payload["message"] for e in sink.events] == ["fine"]
    assert (handler.delivered, handler.dropped, handler.failed) == (1, 0, 0)
    assert "--- Logging error ---" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "bootstrap/sink"),
        ({"bootstrap": "127.0.0.1:1", "sink": CollectingSink()}, "bootstrap/sink"),
        ({"sink": CollectingSink(), "maxsize": 0}, "maxsize"),
        ({"sink": CollectingSink(), "batch_size": 0}, "batch_size"),
        ({"bootstrap": "127.0.0.1:1", "content_type": "text/plain"}, "content_type"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        KafkaLogHandler(agent_id="a", **kwargs)  # type: ignore[arg-type]
