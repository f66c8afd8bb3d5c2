"""One retry policy for what the DatabaseAgent and the replay ask of Kafka and PostgreSQL.

Positioning partitions, reserving batch ids and writing batches meet the same failures and
treat them the same way: an error is first mapped to ours, once, by :func:`classify`; a
:class:`TransientError` (a server restarting, a connection lost, a timeout) is retried with
exponential backoff (:func:`pipeline.batching.backoff`); anything else cannot be fixed by
retrying, and in the agent ends it with a :class:`FatalError` that says what it was doing (a
permission error is not retried forever).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from pipeline import db
from pipeline.batching import backoff
from pipeline.errors import FatalError, TransientError

T = TypeVar("T")


def classify(exc: BaseException) -> BaseException:
    """Map a driver error to ours: PostgreSQL's by SQLSTATE (:func:`pipeline.db.classify`),
    Kafka's by aiokafka's ``retriable`` flag; anything else as it was."""
    if isinstance(exc, (KafkaConnectionError, KafkaTimeoutError)) or (
        isinstance(exc, KafkaError) and exc.retriable
    ):
        return TransientError(f"{type(exc).__name__}: {exc}", source="kafka")
    return db.classify(exc)


async def retrying(
    what: str | None,
    call: Callable[[], Awaitable[T]],
    *,
    max_backoff_s: float,
    sleep: Callable[[float], Awaitable[None]],
    stopping: Callable[[], bool],
    on_retry: Callable[[TransientError, float], None],
) -> T | None:
    """``await call()`` until it succeeds; None once ``stopping()`` says so.

    Transient failures wait ``sleep(delay)`` (the agent's sleep keeps it in its group) and
    try again, each reported to ``on_retry(error, delay)``; any other failure raises a
    :class:`FatalError` naming ``what``, or without ``what`` the failure itself, classified.
    """
    attempt = 0
    while not stopping():
        try:
            return await call()
        except Exception as exc:
            error = classify(exc)
            if not isinstance(error, TransientError):
                if what is not None:
                    raise fatal(what, error) from exc
                if error is exc:
                    raise
                raise error from exc
            delay = backoff(attempt, max_backoff_s)
            on_retry(error, delay)
            await sleep(delay)
            attempt += 1
    return None


def fatal(what: str, error: BaseException) -> FatalError:
    """The error that ends the agent: what it was doing, and what went wrong."""
    return FatalError(f"{what} failed, and retrying cannot fix it: {error}")
