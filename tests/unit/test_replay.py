"""pipeline.replay: parsing the range, resolving it against the log and live ingestion,
progress and pace; and the retry policy the replay shares with the agent (pipeline.retry).
Table-driven; no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pipeline.catalog import load as load_catalog
from pipeline.errors import FatalError, SchemaError, TransientError
from pipeline.replay import (
    AtOffset,
    AtTime,
    Earliest,
    Now,
    PartitionLog,
    Position,
    Progress,
    Range,
    ReplayError,
    pace,
    parse_partitions,
    parse_position,
    parse_streams,
    resolve,
    select_partitions,
)
from pipeline.retry import retrying

T = "agents.metrics"


@pytest.mark.parametrize(
    ("text", "side", "expected"),
    [
        ("earliest", "from", Earliest()),
        ("now", "to", Now()),
        ("0", "from", AtOffset(0)),
        ("5000", "to", AtOffset(5000)),
        ("2026-11-01T12:00:00Z", "from", AtTime(datetime(2026, 11, 1, 12, tzinfo=UTC))),
        (
            "2026-11-01T12:00:00+02:00",
            "to",
            AtTime(datetime(2026, 11, 1, 12, tzinfo=timezone(timedelta(hours=2)))),
        ),
        (
            "2026-11-01 12:00:00.5-05:00",
            "from",
            AtTime(datetime(2026, 11, 1, 12, 0, 0, 500000, tzinfo=timezone(timedelta(hours=-5)))),
        ),
    ],
)
def test_parse_position(text: str, side: str, expected: Position) -> None:
    assert parse_position(text, side=side) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "side", "message"),
    [
        ("2026-11-01T12:00:00", "from", "has no UTC offset"),
        ("2026-11-01", "to", "a date alone has no time zone"),
        ("now", "from", "--from now"),
        ("earliest", "to", "--to earliest"),
        ("-5", "from", "expected earliest"),
        ("yesterday", "to", "expected now"),
    ],
)
def test_parse_position_refuses(text: str, side: str, message: str) -> None:
    with pytest.raises(ReplayError, match=message):
        parse_position(text, side=side)  # type: ignore[arg-type]


def test_time_millis() -> None:
    assert AtTime(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)).millis == 1000


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["metrics"], ("metrics",)),
        (["metrics,events", "states"], ("metrics", "events", "states")),
        (["metrics", "metrics, events"], ("metrics", "events")),
    ],
)
def test_parse_streams(values: list[str], expected: tuple[str, ...]) -> None:
    assert parse_streams(values, load_catalog()) == expected


@pytest.mark.parametrize(("values", "message"), [([], "no stream"), (["bogus"], "unknown")])
def test_parse_streams_refuses(values: list[str], message: str) -> None:
    with pytest.raises(ReplayError, match=message):
        parse_streams(values, load_catalog())


@pytest.mark.parametrize(("text", "expected"), [(None, None), ("0,1", (0, 1)), ("2,0,2", (0, 2))])
def test_parse_partitions(text: str | None, expected: tuple[int, ...] | None) -> None:
    assert parse_partitions(text) == expected


@pytest.mark.parametrize("text", ["a", "", "-1"])
def test_parse_partitions_refuses(text: str) -> None:
    with pytest.raises(ReplayError):
        parse_partitions(text)


def test_select_partitions() -> None:
    topics = {"a": [0, 1, 2], "b": [0, 1]}
    assert select_partitions(topics, None) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert select_partitions(topics, (1,)) == [("a", 1), ("b", 1)]
    with pytest.raises(ReplayError, match="no partition 7"):
        select_partitions(topics, (7,))


# (start, end, log, live, allow_gap) -> the range (start, end) or an error fragment
LOG = PartitionLog(start=0, end=1000, from_time=400, to_time=700)
RETAINED = PartitionLog(start=5000, end=9000, from_time=5000, to_time=6000)


@pytest.mark.parametrize(
    ("start", "end", "log", "live", "expected"),
    [
        (Earliest(), Now(), LOG, None, (0, 1000)),
        (AtOffset(100), AtOffset(200), LOG, None, (100, 200)),
        (AtTime(datetime.now(UTC)), AtTime(datetime.now(UTC)), LOG, None, (400, 700)),
        (Earliest(), Now(), LOG, 600, (0, 600)),  # clamped to live ingestion
        (Earliest(), AtOffset(300), LOG, 600, (0, 300)),  # below live: untouched
        (AtOffset(100), Now(), LOG, 50, "empty"),  # all of it is live's
        (Earliest(), Now(), RETAINED, None, (5000, 9000)),  # earliest is the log's start
        (AtOffset(5000), Now(), RETAINED, None, (5000, 9000)),
        (AtOffset(0), Now(), RETAINED, None, "offsets 0-4999 were deleted by retention"),
        (AtOffset(0), Now(), LOG, None, (0, 1000)),
        (AtOffset(0), AtOffset(1001), LOG, None, "past the log's end 1000"),
        (AtOffset(500), AtOffset(400), LOG, None, "the start 500 is after the end 400"),
        (AtOffset(10), AtOffset(10), LOG, None, "empty"),
        (AtTime(datetime.now(UTC)), Now(), RETAINED, None, "deleted by retention"),
        (AtTime(datetime.now(UTC)), Now(), PartitionLog(0, 10, None, None), None, "empty"),
    ],
)
def test_resolve(
    start: Position,
    end: Position,
    log: PartitionLog,
    live: int | None,
    expected: tuple[int, int] | str,
) -> None:
    logs = {(T, 0): log}
    stored = {} if live is None else {(T, 0): live}
    if isinstance(expected, str):
        with pytest.raises(ReplayError, match=expected):
            resolve(start, end, logs, stored)
        return
    (found,) = resolve(start, end, logs, stored).ranges
    assert (found.start, found.end) == expected


def test_a_gap_is_named_exactly_and_allowed_with_allow_gap() -> None:
    logs = {(T, 0): RETAINED, (T, 1): PartitionLog(0, 100)}
    with pytest.raises(ReplayError) as refused:
        resolve(AtOffset(0), Now(), logs, {})
    assert str(refused.value) == (
        "agents.metrics[0]: offsets 0-4999 were deleted by retention; the log starts at 5000: "
        "refused; --allow-gap replays what is left"
    )
    resolved = resolve(AtOffset(0), Now(), logs, {}, allow_gap=True)
    assert resolved.ranges == [
        Range(T, 0, 5000, 9000, 9000, gap=(0, 5000)),
        Range(T, 1, 0, 100, 100),
    ]
    assert resolved.total == 4100
    assert resolved.notes == [
        "agents.metrics[0]: offsets 0-4999 were deleted by retention; the log starts at 5000: "
        "skipped (--allow-gap)"
    ]


def test_the_clamp_is_noted_per_partition() -> None:
    logs = {(T, 0): LOG, (T, 1): LOG}
    resolved = resolve(Earliest(), Now(), logs, {(T, 0): 600, (T, 1): 1000})
    assert [(r.start, r.end, r.requested_end) for r in resolved.ranges] == [
        (0, 600, 1000),
        (0, 1000, 1000),
    ]
    assert resolved.notes == [
        "agents.metrics[0]: offsets 600-999 belong to live ingestion (its stored offset is "
        "600): the replay ends at 600"
    ]


@pytest.mark.parametrize(
    ("progress", "fraction", "rate", "left", "line"),
    [
        (Progress(0, 100, 0.0), 0.0, 0.0, None, "0/100 records (0%), 0 rows/s, time left unknown"),
        (Progress(50, 100, 5.0), 0.5, 10.0, 5.0, "50/100 records (50%), 10 rows/s, 5s left"),
        (
            Progress(60, 100, 2.0, done_at_start=40),
            0.6,
            10.0,
            4.0,
            "60/100 records (60%), 10 rows/s, 4s left",
        ),
        (Progress(1, 10_001, 1.0), 0.0, 1.0, 10_000, "1/10,001 records (0%), 1 rows/s, 2h46m left"),
        (Progress(5, 0, 1.0), 1.0, 5.0, 0.0, "5/0 records (100%), 5 rows/s, 0s left"),
    ],
)
def test_progress(
    progress: Progress, fraction: float, rate: float, left: float | None, line: str
) -> None:
    assert progress.fraction == pytest.approx(fraction, abs=1e-3)
    assert progress.rate == rate
    assert progress.left_s == left
    assert progress.line() == line
    assert progress.bar(10).startswith("[" + "#" * int(fraction * 10))


@pytest.mark.parametrize(
    ("done", "rate", "elapsed", "wait"),
    [
        (1000, None, 0.0, 0.0),
        (1000, 0.0, 0.0, 0.0),
        (1000, 1000.0, 0.25, 0.75),
        (1000, 1000.0, 2.0, 0.0),
        (0, 1000.0, 0.0, 0.0),
    ],
)
def test_pace(done: int, rate: float | None, elapsed: float, wait: float) -> None:
    assert pace(done, rate, elapsed) == pytest.approx(wait)


# -- retries: the one policy of pipeline/retry.py ---------------------------------------------


async def test_a_replay_batch_is_retried_with_the_policys_backoff_and_its_own_errors_pass() -> None:
    """The replay retries through ``retry.retrying`` without a ``what``: transient failures
    wait 0.1 s, 0.2 s ... up to the cap; a failure retrying cannot fix (the replay's own
    ``ReplayError``, a fence) is raised as it is, not wrapped as the agent's fatal error."""
    slept: list[float] = []
    noted: list[tuple[str, float]] = []
    failures: list[BaseException] = [
        TransientError("connection lost"),
        TransientError("connection lost"),
        TransientError("dlq away", source="kafka"),
        ReplayError("replay 7: agents.metrics[0] moved on"),
    ]

    async def call() -> int:
        raise failures.pop(0)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    with pytest.raises(ReplayError) as stopped:
        await retrying(
            None,
            call,
            max_backoff_s=0.3,
            sleep=sleep,
            stopping=lambda: False,
            on_retry=lambda error, delay: noted.append((error.source, delay)),
        )
    assert str(stopped.value) == "replay 7: agents.metrics[0] moved on"
    assert slept == [0.1, 0.2, 0.3]
    assert noted == [("postgres", 0.1), ("postgres", 0.2), ("kafka", 0.3)]


async def test_a_driver_error_retrying_cannot_fix_is_raised_classified() -> None:
    class Refused(Exception):
        sqlstate = "42501"  # insufficient privilege

    async def call() -> None:
        raise Refused("permission denied for table replay_partitions")

    async def sleep(seconds: float) -> None:
        raise AssertionError("not retried")

    with pytest.raises(SchemaError, match="42501 permission denied") as refused:
        await retrying(
            None, call, max_backoff_s=1, sleep=sleep, stopping=lambda: False, on_retry=print
        )
    assert isinstance(refused.value.__cause__, Refused)
    with pytest.raises(FatalError) as fatal:
        await retrying(
            "writing a batch",
            call,
            max_backoff_s=1,
            sleep=sleep,
            stopping=lambda: False,
            on_retry=print,
        )
    assert str(fatal.value) == (
        "writing a batch failed, and retrying cannot fix it: "
        "42501 permission denied for table replay_partitions"
    )
