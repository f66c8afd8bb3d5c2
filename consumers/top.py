"""``pipeline top``: a live view of every DatabaseAgent of a group, refreshed every second.

The IO around :mod:`pipeline.top` (which holds the fleet model and draws the screen): the
status topic's heartbeats, each live instance's ``/metrics`` scraped over HTTP (on the hosts
the operator allowed: :class:`pipeline.top.MetricsHosts`), the refresh
loop, and the terminal. On a terminal it is a full-screen view (curses) that ``q`` or Ctrl-C
quits; otherwise (a pipe, a file, ``--once``) it prints a plain table per refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import curses
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.control import (
    STATUS_TOPIC_CONFIG,
    ControlError,
    Heartbeat,
    control_topics,
    decode_status,
)
from pipeline.errors import PipelineError
from pipeline.kafka_clients import KafkaSettings
from pipeline.top import FORGET_AFTER_S, Fleet, MetricsHosts, Scrape, parse_scrape, render

#: How long one scrape may take: a /metrics page that does not come within it is shown as
#: unreachable for that refresh, rather than holding up the screen.
SCRAPE_TIMEOUT_S = 1.0
_START_TIMEOUT_S = 30.0
# Scrapes go straight to the agents: an http_proxy set for the outside world is not for them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Display(Protocol):
    """Where the screen goes: the terminal (curses) or a stream of plain tables."""

    def width(self) -> int | None: ...

    def show(self, lines: list[str]) -> None: ...

    async def wait(self, seconds: float, stop: asyncio.Event) -> None:
        """Return after ``seconds``, or sooner when ``stop`` is set (or the screen needs
        redrawing)."""


class PlainDisplay:
    """One table per refresh, a blank line between them; lines are never cut."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def width(self) -> int | None:
        return None

    def show(self, lines: list[str]) -> None:
        self.out.write("\n".join(lines) + "\n\n")
        self.out.flush()

    async def wait(self, seconds: float, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


class CursesDisplay:
    """The full-screen view: redrawn every refresh, cut to the terminal's size; ``q``
    quits, a resized terminal is redrawn at once."""

    _POLL_S = 0.05  # how often keys are read while waiting

    def __init__(self, screen: curses.window) -> None:
        self.screen = screen
        screen.nodelay(True)
        with contextlib.suppress(curses.error):
            curses.curs_set(0)  # not every terminal can hide the cursor

    def width(self) -> int | None:
        return self.screen.getmaxyx()[1] - 1  # the last column would scroll the window

    def show(self, lines: list[str]) -> None:
        height, width = self.screen.getmaxyx()
        self.screen.erase()
        body = lines[: max(height - 2, 0)]
        for y, line in enumerate(body):
            attribute = curses.A_BOLD if y == 0 else curses.A_NORMAL
            if line.startswith("INSTANCE "):
                attribute = curses.A_REVERSE
            self._put(y, line, width, attribute)
        if height >= 2:
            self._put(height - 1, "q: quit", width, curses.A_DIM)
        self.screen.refresh()

    def _put(self, y: int, text: str, width: int, attribute: int) -> None:
        with contextlib.suppress(curses.error):  # a terminal too small for the text
            self.screen.addnstr(y, 0, text, max(width - 1, 0), attribute)

    async def wait(self, seconds: float, stop: asyncio.Event) -> None:
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            key = self.screen.getch()
            if key in (ord("q"), ord("Q")):
                stop.set()
            elif key == curses.KEY_RESIZE:
                return
            elif key == -1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._POLL_S)


class StatusFeed:
    """The heartbeats on the status topic (one partition): from a moment on, then as they
    come. Acks and messages that do not decode are passed over."""

    def __init__(self, kafka: KafkaSettings, status_topic: str) -> None:
        self.kafka = kafka
        self.topic = status_topic
        self._tp = TopicPartition(status_topic, 0)
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self, since: datetime) -> list[Heartbeat]:
        """Start reading at ``since``; return every heartbeat from there to the topic's
        present end."""
        await kafka_io.ensure_topics(self.kafka, [self.topic], 1, configs=STATUS_TOPIC_CONFIG)
        consumer = kafka_clients.consumer(self.kafka, enable_auto_commit=False)
        await consumer.start()
        self._consumer = consumer
        consumer.assign([self._tp])
        end = (await consumer.end_offsets([self._tp]))[self._tp]
        found = await consumer.offsets_for_times({self._tp: int(since.timestamp() * 1000)})
        start = found[self._tp].offset if found.get(self._tp) is not None else end
        consumer.seek(self._tp, start)
        heartbeats: list[Heartbeat] = []
        deadline = time.monotonic() + _START_TIMEOUT_S
        while await consumer.position(self._tp) < end:
            if time.monotonic() > deadline:
                raise PipelineError(f"{self.topic} did not deliver its records up to {end}")
            heartbeats += await self._fetch(timeout_ms=500)
        return heartbeats

    async def poll(self) -> list[Heartbeat]:
        """The heartbeats that arrived since the last call (without waiting for more)."""
        return await self._fetch(timeout_ms=0)

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(kafka_io.stop_consumer(consumer), 10)

    async def _fetch(self, *, timeout_ms: int) -> list[Heartbeat]:
        assert self._consumer is not None, "start() first"
        fetched = await self._consumer.getmany(self._tp, timeout_ms=timeout_ms)
        heartbeats = []
        for record in fetched.get(self._tp, []):
            if not record.value:
                continue
            try:
                message = decode_status(record.value)
            except ControlError:
                continue  # not ours to judge; `pipeline control status` skips it too
            if isinstance(message, Heartbeat):
                heartbeats.append(message)
        return heartbeats


async def scrape(address: str, *, timeout_s: float = SCRAPE_TIMEOUT_S) -> Scrape | str:
    """``http://ADDRESS/metrics``, parsed; or why it could not be had, in a few words."""
    try:
        text = await asyncio.wait_for(asyncio.to_thread(_get, address, timeout_s), timeout_s)
    except TimeoutError:
        return "timed out"
    except (OSError, ValueError) as exc:
        return _reason(exc)
    try:
        return parse_scrape(text, at=time.monotonic())
    except ValueError as exc:
        return f"not Prometheus text: {str(exc)[:80]}"


def _get(address: str, timeout_s: float) -> str:
    with _OPENER.open(f"http://{address}/metrics", timeout=timeout_s) as response:
        body: bytes = response.read()
    return body.decode("utf-8", "replace")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    return str(exc)[:80] or type(exc).__name__


class Top:
    """The refresh loop of ``pipeline top`` for one group."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        prefix: str,
        group: str,
        streams: Sequence[str],
        interval_s: float = 1.0,
        metrics_hosts: MetricsHosts | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.feed = StatusFeed(kafka, control_topics(prefix)[1])
        # Heartbeats are unsigned: only the hosts the operator allowed are fetched.
        self.fleet = Fleet(group, metrics_hosts=metrics_hosts)
        self.group = group
        self.streams = tuple(streams)  # the catalog's: a heartbeat naming them all shows "all"
        self.interval_s = interval_s
        self.clock = clock

    async def run(self, display: Display, stop: asyncio.Event, *, once: bool = False) -> None:
        """Show the group until ``stop`` is set.

        1. Read the status topic's heartbeats of the last FORGET_AFTER_S, up to its end.
        2. Each refresh: take the heartbeats that came since, scrape every live instance's
           /metrics at once (each within SCRAPE_TIMEOUT_S), and show the screen.
        3. Wait for the next refresh, or ``stop`` (``q``, Ctrl-C, SIGTERM).

        With ``once``, one screen, after two scrapes one interval apart (a rate needs two).
        """
        try:
            try:
                backlog = await self.feed.start(self.clock() - timedelta(seconds=FORGET_AFTER_S))
            except KafkaError as exc:
                raise PipelineError(
                    f"cannot read the status topic {self.feed.topic} from Kafka at "
                    f"{self.feed.kafka.bootstrap_servers}: {exc!r}"
                ) from None
            for heartbeat in backlog:
                self.fleet.heard(heartbeat)
            while not stop.is_set():
                await self.refresh()
                if once:
                    await display.wait(self.interval_s, stop)
                    await self.refresh()
                    display.show(self.screen(display.width()))
                    return
                display.show(self.screen(display.width()))
                await display.wait(self.interval_s, stop)
        finally:
            await self.feed.stop()

    async def refresh(self) -> None:
        """New heartbeats in; every live instance scraped once."""
        for heartbeat in await self.feed.poll():
            self.fleet.heard(heartbeat)
        targets = self.fleet.scrape_targets(self.clock())
        results = await asyncio.gather(*(scrape(address) for address in targets.values()))
        for instance_id, result in zip(targets, results, strict=True):
            if isinstance(result, Scrape):
                self.fleet.scraped(instance_id, result)
            else:
                self.fleet.scrape_failed(instance_id, result)

    def screen(self, width: int | None) -> list[str]:
        now = self.clock()
        return render(
            self.fleet.rows(now),
            group=self.group,
            streams=self.streams,
            now=now,
            interval_s=self.interval_s,
            width=width,
        )


def run_top(top: Top, *, once: bool, out: TextIO = sys.stdout) -> None:
    """Run ``top`` on the terminal when ``out`` is one (and not ``once``), else as plain
    tables on ``out``. Ctrl-C and SIGTERM end it cleanly, the terminal restored."""
    if once or not out.isatty():
        try:
            asyncio.run(_until_signalled(top, PlainDisplay(out), once=once))
        except BrokenPipeError:
            # Its reader is gone (`pipeline top | head`): nothing more to say, to anyone.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return

    def on_screen(screen: curses.window) -> None:
        asyncio.run(_until_signalled(top, CursesDisplay(screen), once=False))

    # The terminal's own size, not LINES and COLUMNS from the environment, which curses would
    # prefer: they are a snapshot a parent process may have taken of another terminal (or of
    # none: 80x24), and would pin the view to that size.
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
    curses.wrapper(on_screen)


async def _until_signalled(top: Top, display: Display, *, once: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await top.run(display, stop, once=once)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
