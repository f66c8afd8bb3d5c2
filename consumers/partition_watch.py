"""The DatabaseAgent's partition watch: every 30 s, the partitions of its streams' partitioned
tables, the rows in their DEFAULT partitions and their last maintenance, read from the
database (:func:`pipeline.partition_maint.status`) and set as gauges. Off the write path, on a
connection of its own opened for each read and closed after it, so an agent holds no second
session between reads; a failed read is logged and tried again. docs/observability.md lists
the gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Sequence

from pipeline import db, partition_maint, partitions
from pipeline.config import Config
from pipeline.metrics import Metrics
from pipeline.partition_maint import TableStatus, Target

log = logging.getLogger(__name__)

INTERVAL_S = 30.0


def show(metrics: Metrics, found: Sequence[TableStatus], now: datetime.datetime) -> None:
    """Set each table's gauges from its status at ``now``."""
    for status in found:
        labels = (status.target.stream, status.target.table)
        metrics.partitions.labels(*labels).set(status.partitions)
        metrics.partitions_premade.labels(*labels).set(status.premade)
        metrics.partition_interval.labels(*labels).set(
            partitions.INTERVAL_SECONDS[status.target.partitioning.interval]
        )
        if status.newest_end is not None:
            ahead = (status.newest_end - now).total_seconds()
            metrics.partition_newest_end.labels(*labels).set(ahead)
        if status.default_rows is not None:
            metrics.partition_default_rows.labels(*labels).set(status.default_rows)
        last = status.last_success
        metrics.partition_maintained.labels(*labels).set(0 if last is None else last.timestamp())


class PartitionWatch:
    """``start()`` when the agent runs, ``stop()`` when it closes; nothing when none of its
    streams is partitioned."""

    def __init__(self, config: Config, metrics: Metrics, interval_s: float = INTERVAL_S) -> None:
        self._config = config
        self._metrics = metrics
        self._interval_s = interval_s
        self._tables: list[Target] = partition_maint.targets(config.catalog, config.streams)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._tables:
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        conn = await db.connect(self._config.database_url, self._config.db_session)
        now = datetime.datetime.now(datetime.UTC)
        try:
            found = await partition_maint.status(conn, self._tables, now)
        except BaseException:
            conn.terminate()  # it may be broken: no goodbye to wait for
            raise
        await conn.close(timeout=5)
        show(self._metrics, found, now)

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # watching must never stop ingesting
                log.warning("could not read the partitions of %s: %s", self._names(), exc)
            await asyncio.sleep(self._interval_s)

    def _names(self) -> str:
        return ", ".join(t.table for t in self._tables)
