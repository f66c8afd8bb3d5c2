"""A :class:`logging.Handler` that ships log records to Kafka as ``kind="log"`` agent events.

Logging happens on the application's threads, often on hot paths, so :meth:`emit` never waits
for Kafka: it turns the record into an :class:`~pipeline.records.AgentEvent` and appends it to
a bounded queue. When the queue is full the record is dropped and counted. One daemon thread
with its own event loop drains the queue in batches through an :class:`AgentPublisher`.

Counters (plain ints, read them any time): ``dropped`` (queue full, or still queued when
:meth:`close` gave up), ``failed`` (handed to Kafka but not acknowledged), ``delivered``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import ConfigError
from pipeline.kafka_clients import KafkaSettings
from pipeline.records import JSON, AgentEvent
from producers.publisher import AgentPublisher, PublishError

__all__ = ["KafkaLogHandler", "LogSink", "log_event"]

#: Delivers a batch of events and returns how many were acknowledged; raising counts the
#: whole batch as failed. It runs on the handler's own thread and event loop.
LogSink = Callable[[Sequence[AgentEvent]], Awaitable[int]]

# The worker also wakes on its own this often, so a wake-up lost to a race costs at most this
# much latency, never a stuck record.
_IDLE_POLL = 0.5
_EXC_FORMATTER = logging.Formatter()


def log_event(
    record: logging.LogRecord, agent_id: str, formatter: logging.Formatter | None = None
) -> AgentEvent:
    """The :class:`AgentEvent` for one log record (pure apart from a fresh ``event_id``).

    ``severity`` is the level name in lower case; ``payload`` holds the logger name, the
    message with its arguments merged, module, line number, and the formatted exception and
    stack when the record has them.
    """
    payload: dict[str, Any] = {
        "logger": record.name,
        "message": record.getMessage(),
        "module": record.module,
        "lineno": record.lineno,
    }
    if record.exc_info and record.exc_info[0] is not None:
        payload["exc"] = record.exc_text or (formatter or _EXC_FORMATTER).formatException(
            record.exc_info
        )
    elif record.exc_text:
        payload["exc"] = record.exc_text
    if record.stack_info:
        payload["stack"] = record.stack_info
    return AgentEvent(
        event_id=uuid.uuid4(),
        agent_id=agent_id,
        kind="log",
        ts=datetime.fromtimestamp(record.created, UTC),
        severity=record.levelname.lower(),
        payload=payload,
    )


class KafkaLogHandler(logging.Handler):
    """Ships log records to the events topic without ever blocking the logging thread.

    Give either ``bootstrap`` (the handler then owns an :class:`AgentPublisher` on its thread)
    or ``sink`` (any :data:`LogSink`, e.g. for tests or to share a transport).

    Args:
        bootstrap: Kafka's connection settings, or its bootstrap servers.
        agent_id: the agent the events belong to (their key, so they stay ordered).
        topic_prefix: prepended to the events topic's default name.
        level: the handler's level.
        maxsize: records that may wait in the queue; more are dropped and counted.
        batch_size: records handed to Kafka per round trip.
        content_type: the events' encoding, JSON or MessagePack.
        send_timeout: the publisher's bound on each broker call, in seconds.
        close_timeout: how long :meth:`close` waits for the queue to drain, in seconds.
        sink: delivers batches instead of a publisher.

    Raises:
        ConfigError: neither or both of ``bootstrap`` and ``sink``, or a bad size.
    """

    def __init__(
        self,
        bootstrap: KafkaSettings | str | None = None,
        *,
        agent_id: str,
        topic_prefix: str = "",
        level: int = logging.NOTSET,
        maxsize: int = 10_000,
        batch_size: int = 500,
        content_type: str = JSON,
        send_timeout: float = 10.0,
        close_timeout: float = 10.0,
        sink: LogSink | None = None,
    ) -> None:
        if (bootstrap is None) == (sink is None):
            raise ConfigError("bootstrap/sink: give exactly one of them")
        if maxsize < 1:
            raise ConfigError(f"maxsize: must be at least 1, got {maxsize}")
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
        super().__init__(level)
        self.agent_id = agent_id
        self.maxsize = maxsize
        self.batch_size = batch_size
        self.close_timeout = close_timeout
        self.dropped = 0
        self.failed = 0
        self.delivered = 0
        # Built here so a bad content_type fails in the caller's thread, not in the worker.
        self._publisher = (
            AgentPublisher(bootstrap, topic_prefix, content_type, send_timeout)
            if bootstrap is not None
            else None
        )
        self._sink: LogSink = sink if sink is not None else self._publish
        # deque's append and popleft are atomic; only emit() (under the handler lock)
        # appends, so the size check below cannot be overtaken.
        self._queue: collections.deque[AgentEvent] = collections.deque()
        self._accepted = 0  # guarded by the handler lock
        self._settled = 0  # delivered + failed + abandoned; guarded by _progress
        self._progress = threading.Condition()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._worker_ident: int | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"kafka-log-handler[{agent_id}]", daemon=True
        )
        self._thread.start()

    # -- the application's side --------------------------------------------------------------

    def handle(self, record: logging.LogRecord) -> bool:
        """Filter, then emit; records logged on the handler's own thread are ignored."""
        if threading.get_ident() == self._worker_ident:
            # aiokafka logs from our own thread (e.g. "unable to connect"). Shipping those
            # would feed back into the very path that produced them, and taking the handler
            # lock here would deadlock with logging.shutdown(), which holds it while flush()
            # waits for this thread.
            return False
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record for Kafka, or count it as dropped; never waits."""
        if threading.get_ident() == self._worker_ident:
            return  # see handle()
        try:
            event = log_event(record, self.agent_id, self.formatter)
        except Exception:
            self.handleError(record)  # the app's bad format args: the stdlib's convention
            return
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            if self._closing or len(self._queue) >= self.maxsize:
                self.dropped += 1
                return
            self._queue.append(event)
            self._accepted += 1
            first = len(self._queue) == 1
        if first:
            self._wake()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record accepted so far is delivered or failed (bounded).

        Args:
            timeout: seconds; ``close_timeout`` when None.
        """
        if not self._thread.is_alive():
            return
        with self.lock:  # type: ignore[union-attr]
            target = self._accepted
        self._wake()
        bound = self.close_timeout if timeout is None else timeout
        with self._progress:
            self._progress.wait_for(lambda: self._settled >= target, bound)

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued within the bound, then stop the thread.

        Records still queued when the bound passes are counted as ``dropped``.

        Args:
            timeout: seconds; ``close_timeout`` when None.
        """
        bound = self.close_timeout if timeout is None else timeout
        with self.lock:  # type: ignore[union-attr]
            already = self._closing
            self._closing = True
        if not already:
            self._wake()
            self._thread.join(bound)
            abandoned = 0
            while True:  # popleft, not clear(): each record is taken by exactly one thread
                try:
                    self._queue.popleft()
                except IndexError:
                    break
                abandoned += 1
            if abandoned:
                with self.lock:  # type: ignore[union-attr]
                    self.dropped += abandoned
                self._settle(0, 0, abandoned)
        super().close()

    @property
    def pending(self) -> int:
        """Records accepted but not yet delivered or failed (queued or in flight)."""
        return self._accepted - self._settled

    # -- the worker thread -------------------------------------------------------------------

    def _wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return  # the worker checks the queue before its first wait
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to wake
            loop.call_soon_threadsafe(wakeup.set)

    def _run(self) -> None:
        self._worker_ident = threading.get_ident()
        # Whatever happens on this thread must not reach threading.excepthook and the app.
        with contextlib.suppress(BaseException):
            asyncio.run(self._drain())

    async def _drain(self) -> None:
        wakeup = asyncio.Event()
        self._wakeup, self._loop = wakeup, asyncio.get_running_loop()
        try:
            while True:
                batch = self._take()
                if batch:
                    await self._deliver(batch)
                    continue
                if self._closing and not self._queue:
                    # Read in this order: once _closing is set nothing more is appended,
                    # so an empty queue now stays empty.
                    return
                # Clear before the last look at the queue: an emit that lands after the look
                # sets the event again, so its wake-up is never lost.
                wakeup.clear()
                if self._queue:
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_IDLE_POLL):
                        await wakeup.wait()
        finally:
            self._loop = None
            if self._publisher is not None:
                with contextlib.suppress(PublishError):
                    await self._publisher.stop()

    def _take(self) -> list[AgentEvent]:
        batch: list[AgentEvent] = []
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.popleft())
            except IndexError:
                break
        return batch

    async def _deliver(self, batch: list[AgentEvent]) -> None:
        try:
            ok = await self._sink(batch)
        except Exception:
            ok = 0  # the sink's failure is the batch's failure, never the app's
        ok = max(0, min(ok, len(batch)))
        self._settle(ok, len(batch) - ok, 0)

    def _settle(self, delivered: int, failed: int, abandoned: int) -> None:
        with self._progress:
            self.delivered += delivered
            self.failed += failed
            self._settled += delivered + failed + abandoned
            self._progress.notify_all()

    async def _publish(self, events: Sequence[AgentEvent]) -> int:
        """The default sink: queue the batch on the publisher, count the acknowledgements."""
        publisher = self._publisher
        assert publisher is not None  # the default sink exists only with a publisher
        if not publisher.started:
            # Started here rather than up front so a broker that is down when the app starts
            # costs the records of that moment, not the handler; the next batch tries again.
            await publisher.start()
        try:
            futures = await publisher.send_many(events)
        except PublishError:
            return 0  # the queued part's outcome is unknown: counted as failed with the rest
        if not futures:
            return 0
        done, pending = await asyncio.wait(futures, timeout=publisher.send_timeout)
        for future in pending:
            future.cancel()  # only stops our wait; the outcome is unknown, so "failed"
        return sum(not f.cancelled() and f.exception() is None for f in done)
