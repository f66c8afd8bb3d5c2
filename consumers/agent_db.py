"""The DatabaseAgent's side of PostgreSQL outside the write path: its connections, the batch ids
it reserves ahead, and the work queued for its next ingest transaction
(:meth:`AgentDatabase.in_ingest_transaction`). The transaction itself is
:class:`consumers.writer.BatchWriter`'s; docs/exactly-once.md describes both.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from consumers.membership import claim_tables
from pipeline import db
from pipeline.batching import Partition
from pipeline.config import Config
from pipeline.db import Connection
from pipeline.errors import PipelineError

T = TypeVar("T")
FencedWork = Callable[[Connection], Awaitable[T]]
# The agent's retry loop (:meth:`DatabaseAgent._retrying`): ``(what, call)``, returns when the
# call succeeded or the agent is stopping.
Retrying = Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Queued(Generic[T]):
    """Work waiting for the next ingest transaction, and who waits for its result."""

    work: FencedWork[T]
    done: asyncio.Future[T] = field(default_factory=_future)


class AgentDatabase:
    """The connections of one agent (``config``'s database), its batch ids and queued work."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._conn: Connection | None = None  # the one the batches are written on
        self._batch_ids: deque[int] = deque()  # reserved from the sequence, 1000 at a time
        self._queued: list[Queued[Any]] = []  # work for the next ingest transaction
        self._closed = False  # the agent has stopped: no more work is taken

    # -- connections --------------------------------------------------------------------

    async def connect(self) -> Connection:
        """A new connection whose transactions the server ends after sitting idle past
        ``db_idle_in_transaction_timeout_s``: an instance stopped inside its ingest
        transaction does not keep its offset rows locked from their new owner."""
        return await db.connect(self._config.database_url, self._config.db_session)

    async def connection(self) -> Connection:
        """The connection batches are written on, connected again when it was dropped."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await self.connect()
        return self._conn

    def drop(self) -> None:
        """Drop the batches' connection, after a failure that may have left it unusable."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()  # no graceful close: the server may be gone or wedged

    async def prepare(self) -> None:
        """Before anything is written, on a connection of its own: the schema is new enough
        (`pipeline migrate` changes it, not the agents), and the tables of the agent's
        streams are its group's."""
        conn = await self.connect()
        try:
            await db.check_schema(conn)
            await db.check_catalog(conn, self._config.catalog, self._config.streams)
            await claim_tables(conn, self._config)
        finally:
            await conn.close()

    async def load_offsets(self, starts: dict[Partition, int]) -> dict[Partition, int]:
        """The stored offsets of ``starts``' partitions (created at their log start when
        missing), read on a connection of its own: the batches' one may be busy writing."""
        conn = await self.connect()
        try:
            return await db.load_offsets(conn, self._config.group_id, starts)
        finally:
            await conn.close()

    # -- batch ids ----------------------------------------------------------------------

    def batch_id(self) -> int | None:
        """The next batch id already reserved, or None when they are used up."""
        return self._batch_ids.popleft() if self._batch_ids else None

    async def reserve_batch_id(self, retrying: Retrying) -> int | None:
        """Reserve more batch ids, through ``retrying``, and take the first; None when the
        agent stopped first. Reserving takes its own connection, because the batches' one may
        be busy writing the batch before."""

        async def reserve() -> None:
            conn = await self.connect()
            try:
                self._batch_ids.extend(await db.reserve_batch_ids(conn))
            finally:
                await conn.close()

        if not self._batch_ids:
            await retrying("reserving batch ids", reserve)
        return self.batch_id()

    # -- queued work --------------------------------------------------------------------

    async def in_ingest_transaction(self, work: FencedWork[T]) -> T:
        """Run ``work(conn)`` inside the next ingest transaction and return its result.

        It runs after the batch's compare-and-set (the fence) and rows, and commits or rolls
        back with them: a fenced or retried batch runs it again in the next transaction, so
        it must not depend on anything outside the transaction. When nothing arrives, a
        transaction with this work alone runs within about one fetch's wait. If ``work``
        raises, only its own statements roll back (it runs in a savepoint), the batch
        commits, and the error is raised here; a transient database error is retried with
        the batch. Raises :class:`PipelineError` if the agent has stopped, or stops before it
        ran.

        A transaction that carries work and no records has no compare-and-set: work that
        must be fenced has to lock what it depends on itself. A commit whose answer is lost
        (the connection dropped during COMMIT) is retried, so work may run twice: make it
        idempotent, as the control plane's is (it checks what it decided before). Work must
        not call this method or :meth:`DatabaseAgent.deactivate`: both wait for its own
        transaction. If the caller is cancelled before the work was picked up, it does not
        run; after, its outcome is unknown.
        """
        if self._closed:
            raise PipelineError("the DatabaseAgent has stopped: no work can be committed")
        queued: Queued[T] = Queued(work)
        self._queued.append(queued)
        return await queued.done

    @property
    def has_work(self) -> bool:
        return bool(self._queued)

    def take_work(self) -> list[Queued[Any]]:
        """The work for the transaction about to start: what is queued, but the work whose
        caller was cancelled. It stays queued until :meth:`settle`, so a transaction that
        rolls back leaves it for the next one."""
        self._queued = [q for q in self._queued if not q.done.cancelled()]
        return list(self._queued)

    def settle(
        self, taken: list[Queued[Any]], results: list[tuple[Any, BaseException | None]]
    ) -> None:
        """The transaction that ran ``taken`` committed: hand each caller its result or error."""
        for item, (result, error) in zip(taken, results, strict=True):
            self._queued.remove(item)
            if not item.done.done():
                if error is None:
                    item.done.set_result(result)
                else:
                    item.done.set_exception(error)

    def close(self) -> None:
        """The agent stopped: take no more work, and fail the work that did not run."""
        self._closed = True
        for queued in self._queued:
            if not queued.done.done():
                queued.done.set_exception(
                    PipelineError("the DatabaseAgent stopped before the work was committed")
                )
        self._queued.clear()
