"""The pure planning of partition maintenance (pipeline/partitions.py): which ranges a pass
makes, which rows in DEFAULT it moves or expires, which partitions it drops, at every edge of
the intervals (month lengths, weeks from Monday, hours, UTC only), with an upgraded table's
legacy partition, and the bounds as PostgreSQL writes them; the command line's own checks."""

from __future__ import annotations

import argparse
import datetime
import itertools

import pytest

from pipeline.cli import main
from pipeline.commands.partitions import duration
from pipeline.partitions import (
    MAXVALUE,
    MINVALUE,
    MaintenancePlan,
    Partitioning,
    Range,
    bound_literal,
    direct_routes,
    interval_range,
    newest_end,
    parse_bound,
    plan_maintenance,
    premade,
    route,
    show_range,
)

UTC = datetime.UTC


def t(*args: int) -> datetime.datetime:
    return datetime.datetime(*args, tzinfo=UTC)  # type: ignore[arg-type, misc]


def days(start: datetime.datetime, count: int) -> list[Range]:
    return [
        Range(start + datetime.timedelta(days=i), start + datetime.timedelta(days=i + 1))
        for i in range(count)
    ]


DAY = Partitioning("ts", "day", 3)


def test_a_fresh_table_gets_the_current_interval_and_those_ahead() -> None:
    assert plan_maintenance([], [], t(2026, 12, 7, 15, 30), DAY) == MaintenancePlan(
        create=tuple(days(t(2026, 12, 7), 4))
    )


def test_ahead_one_makes_two_ranges_and_then_one_a_day() -> None:
    one = Partitioning("ts", "day", 1)
    made = plan_maintenance([], [], t(2026, 12, 7, 23, 59), one).create
    assert made == tuple(days(t(2026, 12, 7), 2))
    # At midnight, the next one: the one that became current stays.
    later = plan_maintenance(list(made), [], t(2026, 12, 8), one)
    assert later == MaintenancePlan(create=(Range(t(2026, 12, 9), t(2026, 12, 10)),))


def test_nothing_to_do_when_everything_exists() -> None:
    existing = days(t(2026, 12, 6), 6)
    assert plan_maintenance(existing, [], t(2026, 12, 7, 1), DAY).empty


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # 31, 28 (2027 is not a leap year), 31, 30 days: calendar months, from the 1st.
        (
            t(2027, 1, 31, 23),
            [t(2027, 1, 1), t(2027, 2, 1), t(2027, 3, 1), t(2027, 4, 1), t(2027, 5, 1)],
        ),
        (
            t(2028, 2, 29, 12),
            [t(2028, 2, 1), t(2028, 3, 1), t(2028, 4, 1), t(2028, 5, 1), t(2028, 6, 1)],
        ),
        # December into the next year.
        (
            t(2026, 12, 1),
            [t(2026, 12, 1), t(2027, 1, 1), t(2027, 2, 1), t(2027, 3, 1), t(2027, 4, 1)],
        ),
    ],
)
def test_months_of_every_length(now: datetime.datetime, expected: list[datetime.datetime]) -> None:
    made = plan_maintenance([], [], now, Partitioning("ts", "month", 3)).create
    assert made == tuple(Range(a, b) for a, b in itertools.pairwise(expected))


def test_weeks_start_on_monday() -> None:
    # 2026-12-13 is a Sunday: its week began on Monday the 7th.
    made = plan_maintenance([], [], t(2026, 12, 13, 23, 59), Partitioning("ts", "week", 1)).create
    assert made == (Range(t(2026, 12, 7), t(2026, 12, 14)), Range(t(2026, 12, 14), t(2026, 12, 21)))
    assert all(r.start.weekday() == 0 for r in made)


def test_hours_across_midnight() -> None:
    made = plan_maintenance(
        [], [], t(2026, 12, 31, 22, 59, 59), Partitioning("ts", "hour", 2)
    ).create
    assert [r.start for r in made] == [t(2026, 12, 31, 22), t(2026, 12, 31, 23), t(2027, 1, 1, 0)]


def test_a_time_in_another_zone_is_reckoned_in_utc() -> None:
    # 01:30 in Berlin (UTC+1) is 00:30 UTC: the UTC day, not Berlin's; and a day across a
    # DST change in any zone is still 24 hours of UTC.
    berlin = datetime.timezone(datetime.timedelta(hours=1))
    now = datetime.datetime(2026, 12, 8, 0, 30, tzinfo=berlin)
    made = plan_maintenance([], [], now, Partitioning("ts", "day", 1)).create
    assert made[0] == Range(t(2026, 12, 7), t(2026, 12, 8))
    spring = plan_maintenance([], [], t(2027, 3, 28, 12), Partitioning("ts", "day", 1)).create
    assert all(r.end - r.start == datetime.timedelta(hours=24) for r in spring)


def test_rows_in_default_get_their_range_moved_not_created() -> None:
    now = t(2026, 12, 7, 12)
    held = {interval_range(t(2026, 12, 8, 3), "day"), interval_range(t(2026, 11, 2, 9), "day")}
    plan = plan_maintenance([Range(t(2026, 12, 7), t(2026, 12, 8))], held, now, DAY)
    assert plan.move == (
        Range(t(2026, 11, 2), t(2026, 11, 3)),
        Range(t(2026, 12, 8), t(2026, 12, 9)),
    )
    assert plan.create == (
        Range(t(2026, 12, 9), t(2026, 12, 10)),
        Range(t(2026, 12, 10), t(2026, 12, 11)),
    )
    assert plan.expire == plan.drop == plan.blocked == ()


def test_retention_drops_exactly_the_partitions_wholly_older_than_the_horizon() -> None:
    kept = Partitioning("ts", "day", 3, datetime.timedelta(days=5))
    existing = days(t(2026, 11, 28), 14)  # Nov 28 .. Dec 11
    plan = plan_maintenance(existing, [], t(2026, 12, 7, 15, 30), kept)
    # The horizon is Dec 2, 15:30: Dec 1 ends at Dec 2 00:00 (dropped); Dec 2 ends after it.
    assert plan.drop == tuple(days(t(2026, 11, 28), 4))
    assert plan.create == ()
    # At the horizon exactly, a partition that ends there goes.
    at_midnight = plan_maintenance(existing, [], t(2026, 12, 7), kept)
    assert at_midnight.drop == tuple(days(t(2026, 11, 28), 4))
    before = plan_maintenance(existing, [], t(2026, 12, 6, 23, 59), kept)
    assert before.drop == tuple(days(t(2026, 11, 28), 3))


def test_no_retention_drops_nothing() -> None:
    existing = days(t(2020, 1, 1), 3)
    assert plan_maintenance(existing, [], t(2026, 12, 7), DAY).drop == ()


def test_default_rows_older_than_the_horizon_expire_and_straddling_ones_move() -> None:
    kept = Partitioning("ts", "day", 1, datetime.timedelta(hours=36))
    now = t(2026, 12, 7, 12)  # horizon Dec 6, 00:00
    held = [interval_range(t(2026, 12, 5, 23), "day"), interval_range(t(2026, 12, 6, 1), "day")]
    plan = plan_maintenance([], held, now, kept)
    assert plan.expire == (Range(t(2026, 12, 5), t(2026, 12, 6)),)
    assert plan.move == (Range(t(2026, 12, 6), t(2026, 12, 7)),)


def test_an_upgraded_tables_legacy_partition() -> None:
    """The old heap is attached FROM (MINVALUE) TO (cut-over): nothing is made over it, rows
    after it are moved, and it is dropped only once its end is past the horizon."""
    legacy = Range(MINVALUE, t(2026, 12, 9))
    plan = plan_maintenance(
        [legacy], [interval_range(t(2026, 12, 9, 5), "day")], t(2026, 12, 7, 8), DAY
    )
    assert plan.create == (Range(t(2026, 12, 10), t(2026, 12, 11)),)
    assert plan.move == (Range(t(2026, 12, 9), t(2026, 12, 10)),)
    assert plan.drop == ()
    kept = Partitioning("ts", "day", 3, datetime.timedelta(days=30))
    assert plan_maintenance([legacy], [], t(2027, 1, 7, 23, 59), kept).drop == ()
    assert plan_maintenance([legacy], [], t(2027, 1, 8), kept).drop == (legacy,)


def test_default_rows_a_partition_covers_in_part_are_blocked() -> None:
    # An operator's partition from 12:00 to midnight: the day's rows before noon in DEFAULT
    # cannot have a partition of the whole day.
    odd = Range(t(2026, 12, 8, 12), t(2026, 12, 9))
    plan = plan_maintenance([odd], [interval_range(t(2026, 12, 8, 3), "day")], t(2026, 12, 7), DAY)
    assert plan.blocked == (Range(t(2026, 12, 8), t(2026, 12, 9)),)
    assert plan.move == ()
    assert Range(t(2026, 12, 8), t(2026, 12, 9)) not in plan.create


def test_the_default_partition_is_never_dropped() -> None:
    # DEFAULT has no range: it is never among the existing ranges a plan can drop.
    kept = Partitioning("ts", "day", 1, datetime.timedelta(hours=1))
    plan = plan_maintenance([Range(MINVALUE, t(2000, 1, 1))], [], t(2026, 12, 7), kept)
    assert plan.drop == (Range(MINVALUE, t(2000, 1, 1)),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "FOR VALUES FROM ('2026-12-07 00:00:00+00') TO ('2026-12-08 00:00:00+00')",
            Range(t(2026, 12, 7), t(2026, 12, 8)),
        ),
        (
            "FOR VALUES FROM ('2026-12-07') TO ('2026-12-14')",
            Range(t(2026, 12, 7), t(2026, 12, 14)),
        ),
        (
            "FOR VALUES FROM (MINVALUE) TO ('2026-12-09 00:00:00+00')",
            Range(MINVALUE, t(2026, 12, 9)),
        ),
        (
            "FOR VALUES FROM ('2026-12-09 14:00:00+00') TO (MAXVALUE)",
            Range(t(2026, 12, 9, 14), MAXVALUE),
        ),
        (  # a session in another TimeZone: the same moments, with their offsets
            "FOR VALUES FROM ('2026-12-07 01:00:00+01') TO ('2026-12-08 05:30:00+05:30')",
            Range(t(2026, 12, 7), t(2026, 12, 8)),
        ),
        ("DEFAULT", None),
    ],
)
def test_bounds_as_postgresql_writes_them(text: str, expected: Range | None) -> None:
    assert parse_bound(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "FOR VALUES IN ('a')",
        "FOR VALUES WITH (modulus 2, remainder 0)",
        "FOR VALUES FROM (1) TO (2)",
    ],
)
def test_other_bounds_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bound"):
        parse_bound(text)


def test_bound_literals() -> None:
    assert bound_literal(t(2026, 12, 7, 14), "timestamptz") == "'2026-12-07 14:00:00+00:00'"
    assert bound_literal(t(2026, 12, 7), "date") == "'2026-12-07'"
    assert bound_literal(MINVALUE, "timestamptz") == "MINVALUE"
    assert bound_literal(MAXVALUE, "date") == "MAXVALUE"
    assert show_range(Range(MINVALUE, t(2026, 12, 9))) == "[MINVALUE, 2026-12-09T00:00Z)"


def test_premade_and_newest_end() -> None:
    existing = days(t(2026, 12, 6), 4)  # Dec 6 .. Dec 9
    assert premade(existing, t(2026, 12, 7, 10), "day") == 2  # Dec 8 and Dec 9
    assert premade(existing, t(2026, 12, 9, 10), "day") == 0
    assert newest_end(existing) == t(2026, 12, 10)
    assert newest_end([Range(MINVALUE, t(2026, 1, 1))]) == t(2026, 1, 1)
    assert newest_end([]) is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800)]
)
def test_every_takes_a_duration(text: str, seconds: int) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["0h", "1", "1w", "h", "-1h", "1.5h"])
def test_every_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration such as 30m"):
        duration(text)


def test_maintain_refuses_an_unknown_stream(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "DATABASE_URL": "postgresql://x@127.0.0.1:1/x"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        status = main(
            ["partitions", "maintain", "--stream", "states,metrics", "--stream", "nosuch"]
        )
    assert status == 2
    assert "unknown stream(s) nosuch" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        status = main(["partitions", "list", "--stream", "metrics"])
    assert status == 2  # no server there: an error naming it, not a traceback


# -- a writer naming the partition of its batch ----------------------------------------------

_UTC = datetime.UTC


def _day(d: int) -> Range:
    return Range(
        datetime.datetime(2026, 12, d, tzinfo=_UTC), datetime.datetime(2026, 12, d + 1, tzinfo=_UTC)
    )


def test_direct_routes_are_the_current_interval_and_later_never_default_or_older() -> None:
    now = datetime.datetime(2026, 12, 7, 13, 5, tzinfo=_UTC)
    found = [
        ("t_p20261208", _day(8)),
        ("t_default", None),
        ("t_p20261206", _day(6)),  # yesterday: a retention may drop it while a writer names it
        ("t_legacy", Range(MINVALUE, datetime.datetime(2026, 12, 9, tzinfo=_UTC))),
        ("t_p20261207", _day(7)),
    ]
    assert direct_routes(found, now, "day") == ((_day(7), "t_p20261207"), (_day(8), "t_p20261208"))
    # By the hour, today's partition started before the current hour: not one.
    assert direct_routes(found, now, "hour") == ((_day(8), "t_p20261208"),)


def test_a_batch_within_one_partition_is_routed_to_it_and_any_other_is_not() -> None:
    routes = ((_day(7), "t_p20261207"), (_day(8), "t_p20261208"))
    at = lambda d, h, m=0: datetime.datetime(2026, 12, d, h, m, tzinfo=_UTC)  # noqa: E731
    assert route(routes, [at(7, 13), at(7, 0), at(7, 23, 59)]) == "t_p20261207"
    assert route(routes, [at(8, 0)]) == "t_p20261208"  # a range includes its start
    assert route(routes, [at(7, 23), at(8, 1)]) is None  # spans two partitions
    assert route(routes, [at(6, 23)]) is None  # no route holds it: through the parent
    assert route(routes, [at(9, 0)]) is None  # a range excludes its end
    assert route(routes, []) is None
    assert route((), [at(7, 1)]) is None
    # Whatever the insert through the parent should judge: a NULL, a naive time, a string.
    assert route(routes, [at(7, 1), None]) is None
    assert route(routes, [datetime.datetime(2026, 12, 7, 1)]) is None
    assert route(routes, ["2026-12-07"]) is None
    # Another zone, the same moment.
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    assert route(routes, [datetime.datetime(2026, 12, 8, 1, tzinfo=plus_two)]) == "t_p20261207"
    # A date column: a date is its midnight UTC.
    assert route(routes, [datetime.date(2026, 12, 8)]) == "t_p20261208"
    assert route(routes, [datetime.date(2026, 12, 7), at(7, 3)]) is None  # mixed: refused
