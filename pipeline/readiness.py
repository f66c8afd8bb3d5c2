"""Whether a DatabaseAgent is ready, and if not, why: :func:`readiness`, a pure function of
its state, and :class:`ReadinessWatch`, which decides it whenever that state changes and keeps
the gauges with it (docs/observability.md, "Health endpoints").

``/readyz`` answers 200 "ready" once every assigned partition is positioned at its stored
offset, no stream is stopped on an error, and the last write succeeded (or nothing waits to be
written); otherwise 503 with the reasons, never a driver's error text: e.g. "database
unreachable" or "stream metrics stopped: SchemaError (SQLSTATE 42501)". A stream
switched off on purpose (``pipeline control deactivate``) does not make an agent unready: its
records wait in Kafka as the operator asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.ownership import Ownership, StreamState

if TYPE_CHECKING:  # pipeline.metrics imports this module for the endpoints
    from pipeline.metrics import Metrics


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str  # "ready", or what is wrong

    @property
    def status(self) -> int:
        """The HTTP status of ``/readyz``."""
        return 200 if self.ready else 503


STARTING = Readiness(False, "starting: not in the consumer group yet")


def failure_class(error: BaseException) -> str:
    """What /readyz says of a stopped stream's error: its class and SQLSTATE (e.g.
    "SchemaError (SQLSTATE 42501)"), which carry no data. Never the error's text, which names
    tables, columns and roles to whoever can reach the port: the log, the heartbeat's
    last_error and `pipeline control status` carry that."""
    sqlstate = getattr(error, "sqlstate", "")
    if isinstance(sqlstate, str) and re.fullmatch(r"[0-9A-Z]{5}", sqlstate):
        return f"{type(error).__name__} (SQLSTATE {sqlstate})"
    return type(error).__name__


@dataclass(frozen=True)
class AgentHealth:
    """What readiness is decided from.

    Attributes:
        stopping: ``stop()`` was called.
        joined: the consumer group gave this instance an assignment (possibly empty).
        unpositioned: assigned partitions whose stored offset is not read yet.
        stopped_streams: the streams stopped on a schema or permission error, each with its
            :func:`failure_class`.
        retrying: the source ("postgres" or "kafka") of the transient failure being retried
            since the last successful write or positioning; None when the last one succeeded.
    """

    stopping: bool = False
    joined: bool = True
    unpositioned: int = 0
    stopped_streams: tuple[tuple[str, str], ...] = ()
    retrying: str | None = None


def readiness(health: AgentHealth) -> Readiness:
    """Ready, or every reason it is not, most fundamental first, joined by "; "."""
    if health.stopping:
        return Readiness(False, "stopping")
    reasons = []
    if not health.joined:
        reasons.append(STARTING.reason)
    elif health.unpositioned:
        reasons.append(f"starting: {health.unpositioned} partitions not positioned")
    reasons.extend(f"stream {stream} stopped: {kind}" for stream, kind in health.stopped_streams)
    if health.retrying == "postgres":
        reasons.append("database unreachable")
    elif health.retrying == "kafka":
        reasons.append("kafka unreachable: retrying writes")
    elif health.retrying is not None:
        reasons.append("retrying writes")
    if reasons:
        return Readiness(False, "; ".join(reasons))
    return Readiness(True, "ready")


class ReadinessWatch:
    """One agent's readiness, decided on the event loop whenever an input changes, with
    ``pipeline_ready`` and the streams' ``pipeline_stream_active`` and
    ``pipeline_stream_stopped``. :attr:`current` is safe to read from any thread.

    ``stopping`` and ``retrying`` read the agent's own state (:class:`AgentHealth`); the
    streams' states come from its :class:`Ownership`.
    """

    def __init__(
        self,
        ownership: Ownership,
        metrics: Metrics,
        *,
        stopping: Callable[[], bool],
        retrying: Callable[[], str | None],
    ) -> None:
        self._ownership = ownership
        self._metrics = metrics
        self._stopping = stopping
        self._retrying = retrying
        self._joined = False
        self.current = STARTING

    def joined(self) -> None:
        """The group gave this instance an assignment (maybe empty)."""
        self._joined = True
        self.decide()

    def decide(self) -> None:
        own = self._ownership
        health = AgentHealth(
            stopping=self._stopping(),
            joined=self._joined,
            unpositioned=len(own.unpositioned()),
            stopped_streams=tuple(
                (stream, own.failure(stream) or "")
                for stream, state in own.streams().items()
                if state is StreamState.FAILED
            ),
            retrying=self._retrying(),
        )
        self.current = readiness(health)
        self._metrics.ready.set(1 if self.current.ready else 0)

    def show_streams(self) -> None:
        """Set the streams' gauges after one was switched on, off, or stopped; and decide."""
        for stream, state in self._ownership.streams().items():
            self._metrics.stream_active.labels(stream).set(state is StreamState.ACTIVE)
            self._metrics.stream_stopped.labels(stream).set(state is StreamState.FAILED)
        self.decide()
