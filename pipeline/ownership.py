"""What a DatabaseAgent owns and may fetch: one object, events in, actions out, no IO.

The fetch loop, the write task and the rebalance callbacks all change what the agent may do
with a partition. They do not poke at shared fields: each tells :class:`Ownership` what
happened (an event) and carries out the :class:`Actions` it returns on the consumer and on the
batch being filled.

The facts, per assigned partition and per stream:

* **positioned**: the partition's stored offset (the database's ``ingest_offsets`` row) is
  known, and the consumer was sought to it. An unpositioned partition is paused and none of
  its records may be written: the fence needs the offset a batch starts from.
* **active**: its stream is switched on (``activate``/``deactivate``, at run time).
* **failed**: its stream stopped on a schema or permission error, with the reason; it stays
  stopped until it is activated again (once the table is fixed).
* **holding**: every partition is paused while a batch is retried, so memory stays bounded.

A partition fetches when it is positioned, its stream is active and not failed, and the agent
is not holding. It may be *written* when it is positioned and its stream is active and not
failed (a batch being retried while holding is written). Whenever fetched records are dropped
unwritten (revoked, fenced, deactivated, rewound), the partition is sought back to its stored
offset, or marked unpositioned when that offset is in doubt, and the batch being filled forgets
what it holds of it: the next records written for it start exactly at the stored offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from pipeline.batching import OffsetMove, Partition


@dataclass(frozen=True)
class Actions:
    """What the agent must do after an event, in this order: forget, seek, pause, resume.

    ``forget``: drop the fetched, unwritten records of these partitions from the batch being
    filled. ``seek``: move the consumer's fetch position. ``pause``/``resume``: stop or start
    fetching. Pause and resume never name the same partition.
    """

    forget: frozenset[Partition] = frozenset()
    seek: Mapping[Partition, int] = field(default_factory=dict)
    pause: frozenset[Partition] = frozenset()
    resume: frozenset[Partition] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.forget or self.seek or self.pause or self.resume)


NOTHING = Actions()


class StreamState(Enum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    FAILED = "failed"


class UnknownStreamError(ValueError):
    """A stream that this agent does not consume (not in its configured streams)."""


class Ownership:
    """The per-partition and per-stream facts of one agent; see the module docstring.

    ``streams`` maps each consumed topic to its stream name; ``active`` names the streams
    switched on at start (default: all of them).
    """

    def __init__(self, streams: Mapping[str, str], active: Iterable[str] | None = None) -> None:
        self._stream_of = dict(streams)
        self._topics_of: dict[str, list[str]] = {}
        for topic, stream in self._stream_of.items():
            self._topics_of.setdefault(stream, []).append(topic)
        chosen = set(self._topics_of) if active is None else set(active)
        self._check_streams(chosen)
        self._active = chosen
        self._failed: dict[str, str] = {}
        self._positions: dict[Partition, int | None] = {}  # assigned; None: not positioned
        self._holding = False

    # -- queries ----------------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        return self._holding

    def assigned(self) -> list[Partition]:
        return list(self._positions)

    def unpositioned(self) -> list[Partition]:
        """Assigned partitions whose stored offset must be read before they fetch."""
        return [p for p, offset in self._positions.items() if offset is None]

    def positions(self) -> dict[Partition, int]:
        """The stored next offset of every positioned partition."""
        return {p: offset for p, offset in self._positions.items() if offset is not None}

    def writable(self) -> dict[Partition, int]:
        """The stored next offset of every partition a batch may write now."""
        return {
            p: offset
            for p, offset in self._positions.items()
            if offset is not None and self._stream_on(p)
        }

    def may_fetch(self, partition: Partition) -> bool:
        return (
            not self._holding
            and self._positions.get(partition) is not None
            and self._stream_on(partition)
        )

    def stream_of(self, topic: str) -> str:
        return self._stream_of[topic]

    def streams(self) -> dict[str, StreamState]:
        """Every consumed stream's state."""
        return {stream: self.stream_state(stream) for stream in self._topics_of}

    def stream_state(self, stream: str) -> StreamState:
        if stream in self._failed:
            return StreamState.FAILED
        return StreamState.ACTIVE if stream in self._active else StreamState.INACTIVE

    def failure(self, stream: str) -> str | None:
        """Why a failed stream stopped (the agent says its error's class, never its text: it
        is shown on /readyz), None when it has not failed."""
        return self._failed.get(stream)

    def active_streams(self) -> list[str]:
        """The streams switched on and not failed, in a stable order."""
        return [s for s in self._topics_of if self.stream_state(s) is StreamState.ACTIVE]

    # -- events: the consumer group ------------------------------------------------------------

    def assigned_event(self, partitions: Iterable[Partition]) -> Actions:
        """The group gave us these partitions (all of ours now). Each is paused until its
        stored offset is read: the database wins over Kafka's committed offset, and a
        partition we held before may have moved on under another owner meanwhile."""
        new = set(partitions)
        gone = frozenset(p for p in self._positions if p not in new)
        self._positions = dict.fromkeys(new)
        return Actions(forget=gone | new, pause=frozenset(new))

    def revoked_event(self, partitions: Iterable[Partition]) -> Actions:
        """These partitions are not ours any more: what was fetched of them is not ours to
        write (and if one comes straight back, it is re-read from its stored offset)."""
        revoked = frozenset(partitions)
        for partition in revoked:
            self._positions.pop(partition, None)
        return Actions(forget=revoked)

    def positioned_event(self, stored: Mapping[Partition, int]) -> Actions:
        """Stored offsets were read for partitions awaiting them: seek, then fetch the ones
        that may. Offsets of partitions no longer assigned, or already positioned, are
        ignored (read before a revocation, or superseded)."""
        seek: dict[Partition, int] = {}
        for partition, offset in stored.items():
            if partition in self._positions and self._positions[partition] is None:
                self._positions[partition] = offset
                seek[partition] = offset
        resume = frozenset(p for p in seek if self.may_fetch(p))
        return Actions(seek=seek, resume=resume)

    # -- events: the write path ------------------------------------------------------------------

    def committed_event(self, moves: Iterable[OffsetMove]) -> None:
        """A batch committed: each partition's stored offset moved, unless the partition was
        revoked or fenced meanwhile (its position is then not the one the batch started at)."""
        for move in moves:
            key = (move.topic, move.partition)
            if key in self._positions and self._positions[key] == move.expected:
                self._positions[key] = move.new

    def fenced_event(self, partitions: Iterable[Partition]) -> Actions:
        """Another writer moved a stored offset: every partition of the fenced batch is
        re-read from the database before it fetches or writes again."""
        fenced = frozenset(p for p in partitions if p in self._positions)
        for partition in fenced:
            self._positions[partition] = None
        return Actions(forget=fenced, pause=fenced)

    def rewound_event(self, partitions: Iterable[Partition]) -> Actions:
        """Fetched records of these partitions were dropped unwritten: fetch them again from
        the stored offset."""
        dropped = frozenset(partitions)
        seek = {p: o for p in dropped if (o := self._positions.get(p)) is not None}
        return Actions(forget=dropped, seek=seek)

    def hold_event(self) -> Actions:
        """A batch is being retried: stop fetching everything until it is written."""
        self._holding = True
        return Actions(pause=frozenset(self._positions))

    def release_event(self) -> Actions:
        """The retried batch is written (or dropped): fetch again what may fetch."""
        if not self._holding:
            return NOTHING
        self._holding = False
        return Actions(resume=frozenset(p for p in self._positions if self.may_fetch(p)))

    # -- events: steering ------------------------------------------------------------------------

    def activate_event(self, streams: Iterable[str]) -> Actions:
        """Switch streams on, and clear their failures: they fetch again from the stored
        offsets (a failed stream once its table is fixed, with no restart)."""
        chosen = set(streams)
        self._check_streams(chosen)
        was_on = {p for p in self._positions if self._stream_on(p)}
        self._active |= chosen
        for stream in chosen:
            self._failed.pop(stream, None)
        switched = [p for p in self._partitions_of(chosen) if p not in was_on]
        seek = {p: o for p in switched if (o := self._positions[p]) is not None}
        return Actions(
            forget=frozenset(switched),
            seek=seek,
            resume=frozenset(p for p in seek if self.may_fetch(p)),
        )

    def deactivate_event(self, streams: Iterable[str]) -> Actions:
        """Switch streams off: their partitions stay assigned and paused, what was fetched of
        them is dropped, and they are re-read from the stored offsets when switched on."""
        chosen = set(streams)
        self._check_streams(chosen)
        self._active -= chosen
        return self._stop_partitions(self._partitions_of(chosen))

    def failed_event(self, stream: str, reason: str) -> Actions:
        """A stream's table rejects every write (schema or permissions): it stops, with the
        reason, until it is activated again. Its records wait in Kafka."""
        self._check_streams({stream})
        self._failed[stream] = reason
        return self._stop_partitions(self._partitions_of({stream}))

    # -- internals -------------------------------------------------------------------------------

    def _stop_partitions(self, partitions: list[Partition]) -> Actions:
        stopped = frozenset(partitions)
        seek = {p: o for p in stopped if (o := self._positions[p]) is not None}
        return Actions(forget=stopped, seek=seek, pause=stopped)

    def _stream_on(self, partition: Partition) -> bool:
        stream = self._stream_of.get(partition[0])
        return stream is not None and stream in self._active and stream not in self._failed

    def _partitions_of(self, streams: set[str]) -> list[Partition]:
        topics = {t for s in streams for t in self._topics_of[s]}
        return [p for p in self._positions if p[0] in topics]

    def _check_streams(self, streams: set[str]) -> None:
        unknown = sorted(streams - set(self._topics_of))
        if unknown:
            raise UnknownStreamError(
                f"stream(s) {', '.join(unknown)} not consumed by this agent "
                f"(it consumes {', '.join(self._topics_of)})"
            )
