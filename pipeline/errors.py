"""The pipeline's error tree: one root, shallow, behaviour on the class."""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(PipelineError):
    """Bad configuration, detected at start-up; the message names the field."""


class DevStackError(PipelineError):
    """The local Kafka/PostgreSQL stack cannot be set up; the message says what to do."""


class TransientError(PipelineError):
    """Kafka or PostgreSQL is unavailable for now: retry with backoff, skip nothing."""

    def __init__(self, message: str, source: str = "postgres") -> None:
        super().__init__(message)
        self.source = source  # "postgres" or "kafka": a metrics label


class DataError(PipelineError):
    """The database rejected a row (SQLSTATE class 22 or 23, or a limit one value exceeds:
    54000, 54001): the row is dead-lettered."""

    def __init__(self, message: str, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SchemaError(PipelineError):
    """The schema or permissions are wrong (SQLSTATE class 42): stop loudly, dead-letter nothing.

    ``stream`` names the data stream whose table is wrong; only that stream stops. Without
    one (the pipeline's own tables are wrong), the whole agent stops.
    """

    def __init__(self, message: str, stream: str | None = None, sqlstate: str = "") -> None:
        super().__init__(message)
        self.stream = stream
        self.sqlstate = sqlstate

    def for_stream(self, stream: str) -> SchemaError:
        """The same error, naming the stream whose table raised it."""
        return SchemaError(str(self), stream=stream, sqlstate=self.sqlstate)


class FatalError(PipelineError):
    """Something retrying cannot fix (a missing privilege, a missing table, a bug): the agent
    stops, and the message says what it was doing."""


class FencedError(PipelineError):
    """Another writer moved a partition's stored offset: the batch is dropped, and its
    partitions are paused until their stored offsets are read again."""


class OwnershipError(PipelineError):
    """A data table belongs to another group (or the same group under another topic prefix):
    this one may not write it, roll it back or replay into it (docs/exactly-once.md, "One
    group per table"). The message names the owner and the ways out."""
