"""The DatabaseAgent's retries after transient failures: each one logged and counted in
``pipeline_retries_total``, the newest failure kept for status reports, and the source of the
one being retried shown to readiness. The policy (what is transient, the backoff) is
:mod:`pipeline.retry`'s; docs/architecture.md, "Retry policy and errors", says what is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from pipeline.errors import TransientError
from pipeline.metrics import Metrics
from pipeline.retry import retrying

log = logging.getLogger("consumers.agent")  # the agent's retries, logged as its own


class Retries:
    """``sleep`` waits between attempts (the agent keeps polling its consumer meanwhile);
    ``stopping`` ends the retries of a call; ``changed`` runs whenever :attr:`source` may have
    changed (the agent decides its readiness then)."""

    def __init__(
        self,
        metrics: Metrics,
        max_backoff_s: float,
        *,
        sleep: Callable[[float], Awaitable[None]],
        stopping: Callable[[], bool],
        changed: Callable[[], None],
    ) -> None:
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._stopping = stopping
        self._changed = changed
        self.last_error = ""  # the newest failure (or a stream the agent stopped), for status
        # The source ("postgres", "kafka") of the transient failure a batch write, or a
        # positioning or batch-id reservation, is being retried after; None when none is.
        self._write: str | None = None
        self._call: str | None = None

    @property
    def source(self) -> str | None:
        """What is being retried, for readiness: ``"postgres"``, ``"kafka"``, or None."""
        return self._write or self._call

    def write_failed(self, error: TransientError, delay: float) -> None:
        """A batch write failed and is retried after ``delay`` seconds."""
        self._write = error.source
        self._note(error, delay)

    def write_ended(self) -> None:
        """The batch's write committed, or was given up."""
        if self._write is not None:
            self._write = None
            self._changed()

    async def call(self, what: str, call: Callable[[], Awaitable[None]]) -> None:
        """``call()`` until it succeeds or the agent stops (:func:`pipeline.retry.retrying`)."""

        def note(error: TransientError, delay: float) -> None:
            self._call = error.source
            self._note(error, delay)

        try:
            await retrying(
                what,
                call,
                max_backoff_s=self._max_backoff_s,
                sleep=self._sleep,
                stopping=self._stopping,
                on_retry=note,
            )
        finally:
            if self._call is not None:
                self._call = None
                self._changed()

    def _note(self, error: TransientError, delay: float) -> None:
        self.last_error = str(error)
        log.warning("%s; retrying in %.1fs", error, delay)
        self._metrics.retries.labels(error.source).inc()
        self._changed()
