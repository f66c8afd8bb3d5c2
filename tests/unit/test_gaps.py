"""pipeline/gaps.py: a gap is a stored offset below the log start, never a hole between
fetched offsets; what a recorded gap says; PIPELINE_ON_GAP checked at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from pipeline.batching import Part
from pipeline.commands.control import status_lines
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.gaps import (
    Gap,
    RecordedGap,
    find,
    gaps_line,
    skipped_to,
    suspects,
    unacknowledged_by_stream,
)
from pipeline.top import render


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int


def part(topic: str, partition: int, *offsets: int) -> Part:
    records = [Rec(topic, partition, o) for o in offsets]
    return Part(records, [(o,) for o in offsets], [])  # type: ignore[arg-type]


def test_a_gap_is_only_a_stored_offset_below_the_log_start() -> None:
    stored = {("t", 0): 100, ("t", 1): 50, ("t", 2): 7, ("u", 0): 0}
    starts = {("t", 0): 130, ("t", 1): 50, ("t", 2): 3, ("u", 0): 1}
    assert find(stored, starts) == [Gap("t", 0, 100, 130), Gap("u", 0, 0, 1)]
    assert find(stored, {}) == []  # a partition whose log start is unknown: nothing said
    assert skipped_to(find(stored, starts)) == {("t", 0): 130, ("u", 0): 1}


def test_a_gap_names_exactly_the_lost_offsets() -> None:
    gap = Gap("p.metrics", 2, 1000, 1700)
    assert gap.lost == 700
    assert gap.key == ("p.metrics", 2)
    assert gap.describe() == (
        "p.metrics[2]: offsets 1000-1699 (700 records) were deleted by retention before they "
        "were ingested; the log starts at 1700"
    )


def test_suspects_are_partitions_whose_first_record_is_past_the_stored_offset() -> None:
    parts = {
        ("t", 0): part("t", 0, 5, 6, 7),  # starts at the stored offset
        ("t", 1): part("t", 1, 12, 13),  # a hole: a marker, aborted records, or a reset
        ("t", 2): part("t", 2, 3, 4, 9),  # records already ingested, then a hole: not a start
        ("t", 3): part("t", 3, 40),  # no longer writable
    }
    stored = {("t", 0): 5, ("t", 1): 10, ("t", 2): 4}
    assert suspects(parts, stored) == [("t", 1)]
    # A hole alone is no gap: only a log start past the stored offset is.
    assert find({("t", 1): 10}, {("t", 1): 0}) == []


def _recorded(gap_id: int, topic: str, first: int, end: int, **fields: object) -> RecordedGap:
    at = datetime(2026, 12, 7, 13, 0, tzinfo=UTC)
    values: dict[str, object] = {
        "id": gap_id,
        "group": "g",
        "topic": topic,
        "partition": 0,
        "first_offset": first,
        "end_offset": end,
        "action": "skipped",
        "instance_id": "host-1",
        "detected_at": at,
        "skipped_at": at,
        "acknowledged_at": None,
        "acknowledged_by": None,
        **fields,
    }
    return RecordedGap(**values)  # type: ignore[arg-type]


def test_a_recorded_gap_line_says_what_was_lost_done_and_acknowledged() -> None:
    assert _recorded(3, "p.metrics", 10, 15).line() == (
        "#3 2026-12-07T13:00:00+00:00 p.metrics[0] offsets 10-14 (5 records lost), skipped, "
        "by host-1; NOT acknowledged"
    )
    stopped = _recorded(4, "p.events", 0, 1, action="stopped", skipped_at=None)
    assert "stream STOPPED: activate it to go on from the log start" in stopped.line()
    seen = _recorded(
        5,
        "p.events",
        0,
        1,
        acknowledged_at=datetime(2026, 12, 8, tzinfo=UTC),
        acknowledged_by="ann",
    )
    assert seen.line().endswith("; acknowledged 2026-12-08T00:00:00+00:00 by ann")


def test_unacknowledged_records_lost_are_summed_per_stream() -> None:
    found = [
        _recorded(1, "p.metrics", 10, 15),
        _recorded(2, "p.metrics", 30, 31),
        _recorded(3, "p.events", 0, 9, acknowledged_at=datetime.now(UTC), acknowledged_by="x"),
        _recorded(4, "other", 0, 2),
    ]
    stream_of = {"p.metrics": "metrics", "p.events": "events"}
    assert unacknowledged_by_stream(found, stream_of) == {"metrics": 6, "other": 2}


def test_on_gap_is_record_or_stop_and_a_bad_value_names_the_variable() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "k:9092", "DATABASE_URL": "postgresql://u@h/d"}
    assert load_config(env).on_gap == "record"
    assert load_config({**env, "PIPELINE_ON_GAP": "stop"}).on_gap == "stop"
    with pytest.raises(ConfigError) as bad:
        load_config({**env, "PIPELINE_ON_GAP": "skip"})
    assert str(bad.value).startswith("PIPELINE_ON_GAP (config field 'on_gap'): ")
    assert "'skip'" in str(bad.value)


def test_control_status_and_top_name_the_streams_with_unacknowledged_gaps() -> None:
    lost = {"metrics": 700, "events": 3}
    shown = (
        "UNACKNOWLEDGED GAPS, records lost to retention: events (3 records), metrics (700 "
        "records); see `pipeline gaps list`, then `pipeline gaps ack`"
    )
    assert gaps_line(lost) == shown
    assert gaps_line({}) == "unacknowledged gaps: none"
    assert gaps_line("unknown (database: refused)") == (
        "unacknowledged gaps: unknown (database: refused)"
    )
    assert status_lines("g", 1, [], lost)[-1] == shown
    assert status_lines("g", 1, [])[-1].startswith("group g: ")  # not read: not shown
    now = datetime(2026, 12, 7, tzinfo=UTC)
    screen = render([], group="g", streams=(), now=now, interval_s=1, width=None, gaps=lost)
    assert screen[2] == shown
    assert shown not in render([], group="g", streams=(), now=now, interval_s=1, width=None)
