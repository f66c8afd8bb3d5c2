"""How the pipeline's PostgreSQL connections are set up: :class:`Session` and the
:data:`Pooler` in front of the server. No driver here: :func:`pipeline.db.connect` opens the
connections. docs/compatibility.md describes the poolers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "none": a direct connection, or a pooler in session mode (a client keeps its server session);
# "transaction": a pooler in transaction mode (PgBouncer's pool_mode=transaction, Neon's
# -pooler host, Supabase's port 6543), which may hand each transaction to another session.
Pooler = Literal["none", "session", "transaction"]


@dataclass(frozen=True)
class Session:
    """How the pipeline's connections are set up (docs/compatibility.md).

    No setting outlives a transaction: each transaction begins with :meth:`prelude`'s
    ``SET LOCAL``s (:func:`pipeline.db.transaction`), and staging tables are created inside
    the transaction that uses them (:class:`pipeline.db.TableWriter`), so a transaction pooler
    may run every transaction on another server session. Only asyncpg's cache of named
    prepared statements depends on the pooler: a transaction pooler would send a statement
    prepared on one server session to another.

    With ``idle_in_transaction_timeout`` (seconds), the server ends the session when a
    transaction sits idle that long, rolling it back: a client stopped inside its transaction
    (SIGSTOP, a VM paused) then frees the rows it locked instead of holding them until it
    wakes; when it does, its connection is gone (a transient error, a new connection).

    ``synchronous_commit=off`` is safe here: data and offsets commit together, so a crash
    loses both together and Kafka redelivers.
    """

    command_timeout: float
    pooler: Pooler = "none"
    idle_in_transaction_timeout: float | None = None
    connect_timeout: float = 10.0

    def prelude(self) -> str:
        """The statements each transaction begins with (the simple protocol: one round trip)."""
        statements = ["SET LOCAL synchronous_commit = off"]
        if self.idle_in_transaction_timeout is not None:
            milliseconds = max(1, round(self.idle_in_transaction_timeout * 1000))
            statements.append(f"SET LOCAL idle_in_transaction_session_timeout = {milliseconds}")
        return "; ".join(statements)
